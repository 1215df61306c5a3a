"""Triton path of gram_entropy's elementwise work (CUDA tensors; Triton's interpreter under TRITON_INTERPRET=1).

The logits chunks themselves come from cuBLAS (`rows @ W_chunk^T`, as fused-linear-cross-entropy kernels do); the
kernels fuse what surrounds them:
- `_logsumexp_chunk_kernel`: one read of a chunk of float32 logits giving, per row and per column split, the online
  logsumexp state (max m, sum of exp(z - m)) and the count of non-finite logits. The splits are merged into the
  running float64 state on the device: m' = max(m, m_i), s' = s e^(m - m') + sum_i s_i e^(m_i - m').
  Matches `reference.lm_head_error_blocks` (softmax normaliser of the materialised float64 logits).
- `_crop_error_kernel`: E[t, j] = exp(z[t, j] - lse[t]) - [j == y_t] over the cropped logits, in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a Triton global must be a constexpr
_BLOCK_R = 16  # rows per program: the scored tokens of a batch are tens to thousands
_BLOCK_C = 128
_COLS_PER_PROGRAM = 2048  # column split: enough programs to fill a GPU even when a batch has few scored rows


@triton.jit
def _logsumexp_chunk_kernel(z_ptr, stride, rows, cols, part_m_ptr, part_s_ptr, part_bad_ptr,
                            COLS_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    run_m = tl.full([BLOCK_R], -_FLT_MAX, tl.float32)  # finite start: exp(run_m - new) never sees inf - inf
    run_s = tl.zeros([BLOCK_R], tl.float32)
    bad = tl.zeros([BLOCK_R], tl.int32)
    c_start = pid_c * COLS_PER_PROGRAM
    for c0 in range(0, COLS_PER_PROGRAM, BLOCK_C):
        c = c_start + c0 + tl.arange(0, BLOCK_C)
        msk = rmask[:, None] & (c[None, :] < cols)
        z = tl.load(z_ptr + r[:, None].to(tl.int64) * stride + c[None, :], mask=msk, other=0.0).to(tl.float32)
        isfin = tl.abs(z) <= _FLT_MAX  # false for inf and nan
        fin = msk & isfin
        new_m = tl.maximum(run_m, tl.max(tl.where(fin, z, -_FLT_MAX), axis=1))
        zf = tl.where(fin, z, new_m[:, None])  # masked and non-finite entries must not reach exp (overflow)
        ez = tl.where(fin, tl.exp(zf - new_m[:, None]), 0.0)
        run_s = run_s * tl.exp(run_m - new_m) + tl.sum(ez, axis=1)
        run_m = new_m
        bad += tl.sum((msk & (isfin == 0)).to(tl.int32), axis=1)
    out = pid_c * rows + r
    tl.store(part_m_ptr + out, run_m, mask=rmask)
    tl.store(part_s_ptr + out, run_s, mask=rmask)
    tl.store(part_bad_ptr + out, bad.to(tl.int64), mask=rmask)


@triton.jit
def _crop_error_kernel(z_ptr, stride, rows, cols, lse_ptr, label_ptr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = r < rows
    msk = rmask[:, None] & (c[None, :] < cols)
    ptrs = z_ptr + r[:, None].to(tl.int64) * stride + c[None, :]
    z = tl.load(ptrs, mask=msk, other=0.0)
    lse = tl.load(lse_ptr + r, mask=rmask, other=0.0)
    y = tl.load(label_ptr + r, mask=rmask, other=-1)
    # the difference in float64 keeps lse's digits; exp in float32 is then exact to ~1 ulp
    e = tl.exp((z.to(tl.float64) - lse[:, None]).to(tl.float32))
    e = tl.where(c[None, :] == y[:, None], e - 1.0, e)
    tl.store(ptrs, e.to(z.dtype), mask=msk)


def logsumexp_update(z: torch.Tensor, m: torch.Tensor, s: torch.Tensor, bad: torch.Tensor) -> None:
    """Fold a float32 logits chunk z (rows, cols; unit column stride) into the running float64 state (m, s) and
    the int64 non-finite counts, in place."""
    rows, cols = z.shape
    if rows == 0 or cols == 0:
        return
    splits = triton.cdiv(cols, _COLS_PER_PROGRAM)
    part_m = torch.empty(splits, rows, dtype=torch.float32, device=z.device)
    part_s = torch.empty_like(part_m)
    part_bad = torch.empty(splits, rows, dtype=torch.int64, device=z.device)
    grid = (triton.cdiv(rows, _BLOCK_R), splits)
    _logsumexp_chunk_kernel[grid](z, z.stride(0), rows, cols, part_m, part_s, part_bad,
                                  COLS_PER_PROGRAM=_COLS_PER_PROGRAM, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)
    pm = part_m.to(torch.float64)
    m_new = torch.maximum(m, pm.max(0).values)
    s.copy_(s * torch.exp(m - m_new) + (part_s.to(torch.float64) * torch.exp(pm - m_new)).sum(0))
    m.copy_(m_new)
    bad += part_bad.sum(0)


def crop_error_rows(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> None:
    """z (rows, cols) float32 cropped logits -> exp(z - lse) - onehot(labels), in place."""
    rows, cols = z.shape
    if rows == 0 or cols == 0:
        return
    block_c = 256
    grid = (triton.cdiv(rows, _BLOCK_R), triton.cdiv(cols, block_c))
    _crop_error_kernel[grid](z, z.stride(0), rows, cols, lse, labels, BLOCK_R=_BLOCK_R, BLOCK_C=block_c)


# Compiled for sm_90 on the CPU by tests/test_triton_compile.py (the interpreter is more lenient than the compiler).
COMPILE_SPECS = [
    (_logsumexp_chunk_kernel,
     {"z_ptr": "*fp32", "stride": "i64", "rows": "i64", "cols": "i64", "part_m_ptr": "*fp32", "part_s_ptr": "*fp32",
      "part_bad_ptr": "*i64"},
     {"COLS_PER_PROGRAM": _COLS_PER_PROGRAM, "BLOCK_R": _BLOCK_R, "BLOCK_C": _BLOCK_C}),
    (_crop_error_kernel,
     {"z_ptr": "*fp32", "stride": "i64", "rows": "i64", "cols": "i64", "lse_ptr": "*fp64", "label_ptr": "*i64"},
     {"BLOCK_R": _BLOCK_R, "BLOCK_C": 256}),
]
