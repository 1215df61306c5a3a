"""gradient_sketch: a seeded k x d random projection of each sample's FULL lm_head gradient, from the forward pass.

For sample b with scored positions t (targets != -100) the gradient of its mean answer cross-entropy w.r.t. the
lm_head weight is G_b = (1/n_b) sum_t e_t h_t^T (V x d), e_t = softmax(h_t W^T) - onehot(y_t) over the full
vocabulary. The sketch is S_b = R^T G_b = (1/n_b) sum_t (R^T e_t) h_t^T (k x d), R the V x k matrix of
`sketch_matrix`. R^T e_t comes out of the vocabulary-chunked online softmax (gradient_sketch_accumulator), so
neither the B x S x V probabilities nor any V x d matrix exists; extra memory O(rows x vocab_chunk + rows x k).
Sketches of two samples are comparable (same R) when they use the same (vocab, k, seed): E[<S_a, S_b>] = <G_a, G_b>.

`answer_error_blocks(..., sketch=R)` (lm_head_errors) gives the same sketch from the pass that forms GradSentry's
error blocks, for one pass over the vocabulary. Backends: see gradient_sketch_accumulator; 'reference' materialises
float64 logits, G_b and R^T G_b (`reference.gradient_sketch_from_hidden`).
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Optional, Tuple

import torch

from .. import _backend, reference
from .gradient_sketch_accumulator import SketchAccumulator, per_sample_sketch
from .lm_head_errors import IGNORE_INDEX, _raise_rows, check_forward

SKETCH_K = 32
SKETCH_SEED = 0
_DEVICE_COPIES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_DEVICE_COPIES_KEPT = 4  # a scan uses one (vocab, k, seed); tests and benchmarks a few


def _check_sketch_args(vocab, k, seed, op: str) -> None:
    for name, v, lo in (("vocab", vocab, 1), ("k", k, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{op}: {name} must be an int >= {lo}; got {v!r}")


@functools.lru_cache(maxsize=_DEVICE_COPIES_KEPT)
def _host_matrix(vocab: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(vocab, k, generator=g, dtype=torch.float64) / math.sqrt(k)


def sketch_matrix(vocab: int, k: int = SKETCH_K, seed: int = SKETCH_SEED, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """R (vocab, k) with entries N(0, 1/k), the same on every device and in every run.

    Recipe: `torch.randn(vocab, k, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float64)
    / sqrt(k)`, row-major (row v is the projection of vocabulary entry v), then cast to `dtype` and moved to `device`.
    Generated on the CPU so a GPU run and a CPU run project onto the same R. The result is cached (a few recent
    (vocab, k, seed, device, dtype)) and shared between callers: do not modify it in place.
    """
    _check_sketch_args(vocab, k, seed, "sketch_matrix")
    device = torch.device(device if device is not None else "cpu")
    key = (vocab, k, seed, str(device), dtype)
    hit = _DEVICE_COPIES.get(key)
    if hit is not None:
        _DEVICE_COPIES.move_to_end(key)
        return hit
    r = _host_matrix(vocab, k, seed).to(device=device, dtype=dtype)
    _DEVICE_COPIES[key] = r
    while len(_DEVICE_COPIES) > _DEVICE_COPIES_KEPT:
        _DEVICE_COPIES.popitem(last=False)
    return r


def gradient_sketch_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                k: int = SKETCH_K, seed: int = SKETCH_SEED, vocab_chunk: int = 8192,
                                backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sketch (B, k, d), n_tokens (B,) int64): S_b = R^T G_b for each sample (module docstring).

    hidden (B, S, d) or (S, d): inputs of lm_head; weight (V, d); targets (B, S) int64 aligned with hidden
    (targets[b, t] is the token the logits at t predict; -100 = not scored). The sketch is float32 (float64 if hidden
    or weight is float64). A sample with no scored position gets n_tokens 0 and a NaN sketch (the caller flags it).
    Non-finite hidden states at scored positions or non-finite logits raise ValueError naming the sample.
    """
    op = "gradient_sketch"
    hidden, weight, targets = check_forward(hidden, weight, targets, 1, vocab_chunk, op)
    vocab = weight.shape[0]
    _check_sketch_args(vocab, k, seed, op)
    chosen = _backend.choose(op, hidden.device, backend)
    cdt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    if chosen == "reference":
        r = sketch_matrix(vocab, k, seed, hidden.device, torch.float64)
        sketch, n_tokens = reference.gradient_sketch_from_hidden(hidden, weight, targets, r)
        return sketch.to(cdt), n_tokens
    keep = targets != IGNORE_INDEX
    n_tokens = keep.sum(1).to(torch.int64)
    b_idx, s_idx = keep.nonzero(as_tuple=True)
    rows = hidden[b_idx, s_idx].to(cdt)
    labels = targets[b_idx, s_idx].contiguous()
    _raise_rows(~torch.isfinite(rows).all(1), b_idx, op, "hidden states at scored positions hold NaN or Inf")
    # float64 R: the accumulator rounds it to float32 for the float32 kernels only
    state = SketchAccumulator(sketch_matrix(vocab, k, seed, hidden.device, torch.float64), labels, chosen, cdt)
    if rows.shape[0]:
        for v0 in range(0, vocab, vocab_chunk):
            state.update(rows @ weight[v0:v0 + vocab_chunk].to(cdt).T, v0)
        lse = state.m + state.s.log()
        _raise_rows((state.bad > 0) | ~torch.isfinite(lse), b_idx, op, "non-finite logits")
    return per_sample_sketch(state.rows(), rows, n_tokens, hidden.shape[0], cdt), n_tokens
