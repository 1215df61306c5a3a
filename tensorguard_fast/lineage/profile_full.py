"""The "full" fingerprint: which family a checkpoint descends from, from one read of each 2-D tensor.

Why TensorGuard's features cannot do this: for its loss ||W x|| the gradient is u x^T with u = W x / ||W x||, so the
norm is ||x|| exactly and the mean/std are fixed by the shapes; only the shape of u's distribution is left, and two
families with the same widths share it. The weights' identity is in u itself: u_i = <w_i, x> / ||W x||.

What we keep instead, per 2-D tensor W (d_out x d_in):
- the same probe gradient's left factor u = W x / rms(W x), for a probe x = randn(d_in) seeded by (seed, d_in) so
  every model of that width sees the same probe; non-finite rows are counted, then set to 0;
- its first `ROWS` entries (vocabulary matrices: every EMBED_STRIDE-th row): a sketch at fixed coordinates. For a derivative (fine-tune, LoRA,
  quantisation, pruning, noise) every w_i moves a little, so the sketch moves a little; for an independent model of
  the same shape the sketch is an unrelated Gaussian vector. Fixed low row indices keep an extended vocabulary (new
  rows appended at the end) aligned with its parent.

Alignment across architectures (fixed length): each tensor gets a role (embed, q, k, v, o, gate, up, down, lm_head)
and a relative depth; sketches of the layers in the same role and depth quarter are averaged, and each block is
scaled to unit RMS. Embedding and lm_head blocks take DEPTH_BINS x ROWS rows. A tied lm_head reuses the embedding.
A role the model lacks is a zero block. Models of different widths get different probes, so their sketches are
unrelated: compared with each other they read as different families (similarity ~ 0), which is the right answer.

Choice by measurement (bench/bench_fingerprint.py, "full vs forward/backward"): a real forward/backward pass on
random tokens reads every weight at least three times (forward, input gradient, weight gradient) and mixes the
layers, while per-matrix probes read each weight once and keep each tensor's identity separate.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import numpy as np
import torch

from .loading import ModelLoadError, WeightSource

ROLES = ["embed", "attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "lm_head"]
DEPTH_BINS = 4
ROWS = 32
# Vocabulary rows are sampled every EMBED_STRIDE tokens (all below 27k, inside any real vocabulary): the first
# hundred tokens are often special or byte tokens that training never touched, identical across rows.
EMBED_STRIDE = 211
_LAYER = re.compile(r"(?:layers|layer|h|blocks|block)\.(\d+)\.")
_PATTERNS = [  # first match wins; names of Llama/Mistral/Qwen/Gemma, GPT-2/NeoX style and GGUF style
    ("embed", ("embed_tokens", "wte.", "word_embeddings", "tok_embeddings", "token_embd")),
    ("lm_head", ("lm_head", "embed_out", "output.weight")),
    ("attn_q", ("q_proj", ".wq.", "attn_q", ".query.")),
    ("attn_k", ("k_proj", ".wk.", "attn_k", ".key.")),
    ("attn_v", ("v_proj", ".wv.", "attn_v", ".value.")),
    ("attn_o", ("o_proj", ".wo.", "attn_output", "attn.c_proj", "attention.dense", "out_proj")),
    ("mlp_gate", ("gate_proj", ".w1.", "ffn_gate")),
    ("mlp_up", ("up_proj", ".w3.", "ffn_up", "c_fc", "fc1", "dense_h_to_4h")),
    ("mlp_down", ("down_proj", ".w2.", "ffn_down", "mlp.c_proj", "fc2", "dense_4h_to_h")),
]


def role_of(key: str) -> Optional[str]:
    low = key.lower()
    for role, needles in _PATTERNS:
        if any(n in low for n in needles):
            return role
    return None


def probe(d_in: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + d_in)
    return torch.randn(d_in, generator=gen)


def feature_names() -> List[str]:
    return [f"{role}.d{b}.r{r}" for role in ROLES for b in range(DEPTH_BINS) for r in range(ROWS)]


def _sketch(w: torch.Tensor, x: torch.Tensor, rows: int, stride: int = 1):
    """(sketch of u = W x / rms(W x) at `rows` fixed rows, number of non-finite rows). One mat-vec reads W; the
    d_out-long vector is then handled in numpy (torch's small CPU ops cost more than the mat-vec here)."""
    v = (w @ x).to(torch.float64).cpu().numpy()
    finite = np.isfinite(v)
    bad = int(v.size - finite.sum())
    if bad:
        v = np.where(finite, v, 0.0)
    rms = float(np.sqrt(np.dot(v, v) / max(v.size - bad, 1)))
    out = torch.zeros(rows, dtype=torch.float64)
    if rms > 0:
        # Modulo the largest power of two <= d_out: an extended vocabulary keeps the same rows (unless it crosses
        # a power of two), and a small vocabulary still gives `rows` entries.
        span = 1 << (v.size.bit_length() - 1)
        idx = (np.arange(rows) * stride) % span
        out = torch.from_numpy(v[idx] / rms)
    return out, bad


def full_features(source: WeightSource, seed: int = 0, device=torch.device("cpu")):
    """(names, values, metadata) of the full fingerprint for `source`."""
    keys = [k for k in source.keys() if len(source.shape(k)) == 2]
    if not keys:
        raise ModelLoadError(f"{source.describe()}: no 2-D weight tensors to fingerprint")
    layers = [int(m.group(1)) for k in keys for m in [_LAYER.search(k)] if m]
    num_layers = max(layers) + 1 if layers else 1
    sums = {(r, b): torch.zeros(ROWS, dtype=torch.float64) for r in ROLES for b in range(DEPTH_BINS)}
    counts: Dict[tuple, int] = {}
    probes: Dict[int, torch.Tensor] = {}
    nonfinite_rows = 0
    unassigned = []
    for key in keys:
        role = role_of(key)
        if role is None:
            unassigned.append(key)
            continue
        w = source.get(key).to(device, torch.float32)
        d_in = w.shape[1]
        if d_in not in probes:
            probes[d_in] = probe(d_in, seed).to(device)
        if role in ("embed", "lm_head"):
            sketch, bad = _sketch(w, probes[d_in], ROWS * DEPTH_BINS, EMBED_STRIDE)
            for b in range(DEPTH_BINS):
                sums[(role, b)] += sketch[b * ROWS:(b + 1) * ROWS]
                counts[(role, b)] = counts.get((role, b), 0) + 1
        else:
            m = _LAYER.search(key)
            layer = int(m.group(1)) if m else 0
            b = min(DEPTH_BINS - 1, layer * DEPTH_BINS // num_layers)
            sketch, bad = _sketch(w, probes[d_in], ROWS)
            sums[(role, b)] += sketch
            counts[(role, b)] = counts.get((role, b), 0) + 1
        nonfinite_rows += bad
        del w
    tied = source.tied_embeddings or not any(role_of(k) == "lm_head" for k in keys)
    if tied:
        for b in range(DEPTH_BINS):
            if counts.get(("embed", b)) and not counts.get(("lm_head", b)):
                sums[("lm_head", b)] = sums[("embed", b)].clone()
                counts[("lm_head", b)] = counts[("embed", b)]
    blocks = []
    for role in ROLES:
        for b in range(DEPTH_BINS):
            block = sums[(role, b)] / max(counts.get((role, b), 0), 1)
            rms = float(torch.sqrt((block * block).mean()))
            blocks.append((block / rms) if rms > 0 else block)
    values = torch.cat(blocks).numpy()
    meta = {"num_tensors": len(keys), "num_layers": num_layers, "nonfinite_rows": nonfinite_rows,
            "roles_missing": sorted({r for r in ROLES if not any(counts.get((r, b)) for b in range(DEPTH_BINS))}),
            "unassigned_tensors": len(unassigned), "widths": sorted(probes)}
    return feature_names(), values.tolist(), meta
