"""Derivatives of a model, for measuring whether a fingerprint keeps them with their family.

Each transform takes and returns a state dict (name -> tensor), float32, and never changes the input. Used by
bench/lineage_eval.py (the full zoo) and the tests (a small zoo). Randomness is seeded, so a zoo is reproducible.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Dict, List

import torch

State = Dict[str, torch.Tensor]


def _is_matrix(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.is_floating_point()


def random_init(config_dir, seed: int) -> State:
    """Weights of a fresh model of the same config (the library's own initialiser), seeded: a new family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return state_of(model)


def state_of(model) -> State:
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def add_noise(state: State, relative: float = 1e-3, seed: int = 0) -> State:
    """w + relative * std(W) * N(0, 1) on every floating tensor."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.numel() > 1:
            out[k] = v + relative * v.std() * torch.randn(v.shape, generator=gen)
        else:
            out[k] = v.clone()
    return out


def magnitude_prune(state: State, fraction: float) -> State:
    """Zero the `fraction` smallest-magnitude entries of every 2-D tensor (per tensor, unstructured)."""
    out = {}
    for k, v in state.items():
        if _is_matrix(k, v) and fraction > 0:
            flat = v.abs().flatten()
            kth = max(1, int(fraction * flat.numel()))
            cut = flat.kthvalue(kth).values
            out[k] = torch.where(v.abs() <= cut, torch.zeros_like(v), v)
        else:
            out[k] = v.clone()
    return out


def quantize_roundtrip(state: State, bits: int, group: int = 64) -> State:
    """Symmetric absmax quantisation and back: int8 per row (bits=8), int4 per group of `group` inputs (bits=4),
    the schemes of LLM.int8-style and GPTQ/llama.cpp-style checkpoints without their error correction."""
    levels = 2 ** (bits - 1) - 1
    out = {}
    for k, v in state.items():
        if not _is_matrix(k, v):
            out[k] = v.clone()
            continue
        if bits >= 8 or v.shape[1] % group:
            scale = v.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
            out[k] = (v / scale).round().clamp(-levels, levels) * scale
        else:
            g = v.reshape(v.shape[0], -1, group)
            scale = g.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / levels
            out[k] = ((g / scale).round().clamp(-levels - 1, levels) * scale).reshape(v.shape)
    return out


def extend_vocab(state: State, extra: int = 1000, seed: int = 0) -> State:
    """Append `extra` token rows to every vocabulary matrix (embed, untied lm_head), drawn around the mean row as
    `resize_token_embeddings` does."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if _is_matrix(k, v) and ("embed_tokens" in k or "lm_head" in k):
            mean = v.mean(0, keepdim=True)
            std = v.std(0, keepdim=True)
            out[k] = torch.cat([v, mean + 0.1 * std * torch.randn((extra, v.shape[1]), generator=gen)])
        else:
            out[k] = v.clone()
    return out


def merge(a: State, b: State, weight: float = 0.5) -> State:
    """Linear merge (model soup) of two same-shape siblings."""
    return {k: (weight * a[k] + (1 - weight) * b[k]) if a[k].is_floating_point() else a[k].clone() for k in a}


def fanoutqa_texts(limit: int = 400) -> List[str]:
    """Question/answer lines from the fanoutqa dev set (the package's JSON file; the package's import needs extras)."""
    spec = importlib.util.find_spec("fanoutqa")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fanoutqa is not installed (pip install --no-deps fanoutqa)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "fanout-final-dev.json"
    texts = []
    for item in json.loads(path.read_text()):
        texts.append(f"Question: {item['question']}")
        for sub in item.get("decomposition", []):
            answer = sub.get("answer")
            answer = ", ".join(map(str, answer)) if isinstance(answer, list) else str(answer)
            texts.append(f"Question: {sub['question']}\nAnswer: {answer}")
        if len(texts) >= limit:
            break
    return texts[:limit]


def finetune(model, tokenizer, texts: List[str], steps: int, lr: float, batch: int = 4, seq: int = 64,
             lora_rank: int = 0, seed: int = 0):
    """Causal-LM training on `texts` (AdamW). lora_rank > 0: a PEFT LoRA adapter on q/k/v/o (returned unmerged, so
    it can be saved as an adapter directory); else every parameter is trained. Returns the trained model."""
    torch.manual_seed(seed)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=["q_proj", "k_proj", "v_proj",
                                                                               "o_proj"], lora_dropout=0.0)
        model = get_peft_model(model, cfg)
        # PEFT initialises B = 0; training moves it.
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for step in range(steps):
        chunk = [texts[(step * batch + i) % len(texts)] for i in range(batch)]
        enc = tokenizer(chunk, return_tensors="pt", padding="max_length", truncation=True, max_length=seq)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


def save(state: State, config_dir, out_dir) -> Path:
    """A loadable model directory: model.safetensors + the config (and tokenizer files) of `config_dir`."""
    import shutil

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    for name in os.listdir(config_dir):
        if name.endswith(".json") and name != "model.safetensors.index.json" or name.endswith(".jinja"):
            shutil.copy(Path(config_dir) / name, out / name)
    return out
