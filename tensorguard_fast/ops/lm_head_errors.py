"""lm_head error blocks: the per-sample factors E (softmax - onehot) and H (lm_head inputs) of the lm_head gradient.

For sample b with scored positions t, d(mean cross-entropy)/d(lm_head weight) = (1/n_b) sum_t e_t h_t^T = E_b^T H_b / n_b
with e_t = softmax(z_t) - onehot(y_t) over the vocabulary and h_t the input of lm_head (docs/methods.md). Every
spectrum op (gram_entropy, fft_entropy) starts from these blocks; the logits come chunk by chunk over the
vocabulary with an online logsumexp, so neither the B x S x V logits nor any V x d gradient exists.
Also here: the input checks the block ops share, and IGNORE_INDEX, the label of positions that are not scored.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _backend
from . import _cpp
from .gradient_sketch_accumulator import SketchAccumulator, per_sample_sketch

IGNORE_INDEX = -100  # targets value of positions that are not scored (prompt, padding), as in transformers
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _as_batch(x: torch.Tensor, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{op}: {name} has dtype {x.dtype}; use one of {[str(d) for d in FLOATS]}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be (B, T, cols) or (T, cols); got shape {tuple(x.shape)}")
    return x.detach()


def check_blocks(e: torch.Tensor, h: torch.Tensor, op: str,
                 check_finite: bool = True) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Validate per-sample blocks E (B, T, V') and H (B, T, d') (2-D = one sample): shapes, device, and (unless the
    caller checks it more cheaply itself) finiteness. Returns (E, H, was_2d). Non-finite values raise ValueError
    naming the first bad sample."""
    single = isinstance(e, torch.Tensor) and e.dim() == 2
    e, h = _as_batch(e, "E", op), _as_batch(h, "H", op)
    if e.shape[:2] != h.shape[:2]:
        raise ValueError(f"{op}: E {tuple(e.shape)} and H {tuple(h.shape)} need the same (B, T)")
    if e.device != h.device:
        raise ValueError(f"{op}: E on {e.device}, H on {h.device}")
    if check_finite:
        raise_if_nonfinite(e, "E", op)
        raise_if_nonfinite(h, "H", op)
    return e, h, single


def raise_if_nonfinite(x: torch.Tensor, name: str, op: str) -> None:
    if x.numel() == 0:
        return
    # One float64 sum per sample instead of a boolean isfinite tensor: any NaN/Inf makes the sum non-finite, and
    # float32/16 values cannot overflow a float64 sum (float64 inputs beyond ~1e300 are reported too).
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1).sum(1, dtype=torch.float64))
    _raise_samples(bad, f"{name} holds NaN or Inf", op)


def _raise_samples(bad: torch.Tensor, what: str, op: str) -> None:
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: {what} in sample {b} ({int(bad.sum())} sample(s) affected)")


# --- from the forward pass: hidden states, lm_head weight, targets ----------------------------------------------

def answer_error_blocks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, crop: int = 8,
                        vocab_chunk: int = 8192, backend: Optional[str] = None, op: str = "gram_entropy",
                        sketch: Optional[torch.Tensor] = None):
    """(E, H, n_tokens), or (E, H, n_tokens, S) with `sketch`: the per-sample blocks whose product E_b^T H_b is n_b times the cropped lm_head gradient.

    hidden (B, S, d): inputs of lm_head (final normed hidden states); weight (V, d); targets (B, S) int64 aligned
    with hidden (targets[b, t] is the token the logits at t predict; -100 = not scored). Only the scored positions are
    used: their logits come chunk by chunk over the vocabulary (peak extra memory O(rows x vocab_chunk) for rows =
    scored positions of the batch, never B x S x V), an online logsumexp gives the full-vocabulary normaliser, and
    E_t = softmax(z_t)[:V//crop] - onehot(y_t)[:V//crop], H_t = h_t[:d//crop].
    Returns E (B, Tmax, V//crop), H (B, Tmax, d//crop), zero rows past each sample's count, Tmax = max(1, max n),
    computed in float32 (float64 if hidden or weight is float64); n_tokens (B,) int64.
    Non-finite logits (or hidden states at scored positions) raise ValueError naming the sample.
    Shared by gram_entropy and fft_entropy.
    sketch: R (V, k) from `gradient_sketch.sketch_matrix`; the same chunk loop then also gives S (B, k, d), the
    gradient sketch R^T G_b of the FULL gradient (NaN where n_b = 0; `gradient_sketch_from_hidden` computes the same),
    and E, H, n are exactly those of the call without it.
    """
    hidden, weight, targets = check_forward(hidden, weight, targets, crop, vocab_chunk, op)
    chosen = _backend.choose(op, hidden.device, backend)
    bsz = hidden.shape[0]
    vocab, dim = weight.shape
    vc, dc = vocab // crop, dim // crop
    keep = targets != IGNORE_INDEX
    n_tokens = keep.sum(1).to(torch.int64)
    tmax = max(1, int(n_tokens.max())) if bsz else 1
    cdt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    b_idx, s_idx = keep.nonzero(as_tuple=True)
    t_idx = (keep.cumsum(1) - 1)[b_idx, s_idx]  # position of each scored row inside its sample's block
    rows = hidden[b_idx, s_idx].to(cdt)
    labels = targets[b_idx, s_idx].contiguous()
    e = torch.zeros(bsz, tmax, vc, dtype=cdt, device=hidden.device)
    h = torch.zeros(bsz, tmax, dc, dtype=cdt, device=hidden.device)
    state = None if sketch is None else SketchAccumulator(_check_sketch(sketch, weight, op), labels, chosen, cdt)
    if rows.shape[0]:
        _raise_rows(~torch.isfinite(rows).all(1), b_idx, op, "hidden states at scored positions hold NaN or Inf")
        errors = _cropped_errors(rows, weight, labels, vc, vocab_chunk, cdt, chosen, b_idx, op, state)
        e[b_idx, t_idx] = errors
        h[b_idx, t_idx] = rows[:, :dc]
    if state is None:
        return e, h, n_tokens
    return e, h, n_tokens, per_sample_sketch(state.rows(), rows, n_tokens, bsz, cdt)


def _check_sketch(r, weight, op):
    if not isinstance(r, torch.Tensor) or r.dim() != 2 or r.shape[0] != weight.shape[0] or r.shape[1] < 1:
        got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise ValueError(f"{op}: sketch must be R ({weight.shape[0]}, k) from gradient_sketch.sketch_matrix(vocab, k, "
                         f"seed); got {got}")
    if r.device != weight.device or not r.dtype.is_floating_point:
        raise ValueError(f"{op}: sketch R must be a float tensor on {weight.device}; got {r.dtype} on {r.device}")
    return r.detach()


def check_forward(hidden, weight, targets, crop, vocab_chunk, op):
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dim() == 2:
        hidden, targets = hidden.unsqueeze(0), targets.reshape(1, -1)
    if hidden.dim() != 3 or weight.dim() != 2 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"{op}: need hidden (B, S, d), weight (V, d), targets (B, S); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden width {hidden.shape[-1]} != weight width {weight.shape[1]}")
    if hidden.dtype not in FLOATS or weight.dtype not in FLOATS:
        raise TypeError(f"{op}: hidden/weight dtypes {hidden.dtype}/{weight.dtype} are not supported")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: targets must be int64 token ids (-100 = not scored); got {targets.dtype}")
    if not (isinstance(crop, int) and crop >= 1) or not (isinstance(vocab_chunk, int) and vocab_chunk >= 1):
        raise ValueError(f"{op}: crop and vocab_chunk must be positive ints; got {crop!r}, {vocab_chunk!r}")
    vocab, dim = weight.shape
    if crop > min(vocab, dim):   # the crop keeps the first V//crop rows and d//crop columns: none would be left
        raise ValueError(f"{op}: crop {crop} leaves no gradient to score: the lm_head is {vocab} x {dim} and the "
                         f"crop keeps the first V//crop rows and d//crop columns; use a crop <= {min(vocab, dim)}")
    if len({hidden.device, weight.device, targets.device}) > 1:
        raise ValueError(f"{op}: hidden, weight and targets must share a device")
    targets = targets.to(torch.int64)
    scored = targets[targets != IGNORE_INDEX]
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= weight.shape[0]):
        raise ValueError(f"{op}: targets must be -100 or token ids in [0, {weight.shape[0]})")
    return hidden.detach(), weight.detach(), targets


def _raise_rows(bad_rows: torch.Tensor, b_idx: torch.Tensor, op: str, what: str) -> None:
    if bool(bad_rows.any()):
        samples = torch.unique(b_idx[bad_rows])
        raise ValueError(f"{op}: sample {int(samples[0])}: {what} ({samples.numel()} sample(s) affected)")


def _cropped_errors(rows, weight, labels, vc, vocab_chunk, cdt, chosen, b_idx, op, sketch=None):
    """E rows = softmax(z)[:vc] - onehot(y)[:vc] for the scored rows (N, d), logits chunked over the vocabulary;
    each chunk also goes to `sketch` (a SketchAccumulator) when given."""
    n = rows.shape[0]
    vocab = weight.shape[0]
    # The fused kernels take float32 logits; float64 inputs (tests, exact checks) take the torch formulas.
    use_cpp = chosen == "cpp" and cdt == torch.float32
    use_triton = chosen == "triton" and cdt == torch.float32
    if use_triton:
        from . import gram_entropy_triton as kernels
    # The cropped logits are computed once and kept: they become E in place. The rest of the vocabulary streams.
    crop_logits = rows @ weight[:vc].to(cdt).T
    m = torch.full((n,), -math.inf, dtype=torch.float64, device=rows.device)
    s = torch.zeros(n, dtype=torch.float64, device=rows.device)
    bad = torch.zeros(n, dtype=torch.int64, device=rows.device)
    fused = sketch is not None and sketch.fuses_logsumexp
    if fused:  # one C++ pass per chunk gives the logsumexp state (bit-identical) and the sketch's exponentials
        m, s, bad = sketch.m, sketch.s, sketch.bad
    chunks = [(0, vc)] + [(v0, min(v0 + vocab_chunk, vocab)) for v0 in range(vc, vocab, vocab_chunk)]
    for v0, v1 in chunks:
        z = crop_logits if v0 == 0 else rows @ weight[v0:v1].to(cdt).T
        if z.shape[1] == 0:
            continue
        if sketch is not None:
            sketch.update(z, v0)
        if fused:
            continue
        if use_cpp:
            _cpp.logsumexp_update(z, m, s, bad)
        elif use_triton:
            kernels.logsumexp_update(z, m, s, bad)
        else:
            _torch_logsumexp_update(z, m, s, bad)
    lse = m + s.log()
    _raise_rows((bad > 0) | ~torch.isfinite(lse), b_idx, op, "non-finite logits")
    if use_cpp:
        return _cpp.crop_error_rows(crop_logits, lse, labels)
    if use_triton:
        kernels.crop_error_rows(crop_logits, lse, labels)
        return crop_logits
    errors = torch.exp(crop_logits.to(torch.float64) - lse.unsqueeze(1)).to(cdt)
    inside = labels < vc
    errors[inside.nonzero(as_tuple=True)[0], labels[inside]] -= 1
    return errors


def _torch_logsumexp_update(z, m, s, bad):
    finite = torch.isfinite(z)
    bad += (~finite).sum(1)
    zf = torch.where(finite, z, torch.full_like(z, -math.inf)).to(torch.float64)
    m_new = torch.maximum(m, zf.max(1).values)
    safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    s.copy_(s * torch.exp(m - safe) + torch.exp(zf - safe.unsqueeze(1)).sum(1))
    m.copy_(m_new)
