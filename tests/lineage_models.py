"""Tiny real models for the lineage tests: random-init Llama configs small enough to build in well under a second.

Real transformers modules and real safetensors files (no mocks); the bundled SmolLM2 covers the full-size path.
"""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny(path: Path, seed: int = 0, dtype=torch.float32, **kw) -> Path:
    model = tiny_llama(seed, **kw).to(dtype)
    model.save_pretrained(str(path))
    return Path(path)
