"""Triton path of fft_entropy's fused power + entropy accumulation (CUDA; Triton's interpreter under
TRITON_INTERPRET=1). FFTs and GEMMs stay in cuFFT/cuBLAS (torch); this kernel is what surrounds them.

`_power_sums_kernel` reads a tile of a complex spectrum (B, R, C) once and, per batch entry and block of rows, gives
    S = sum P,  sum P ln P,  and the count of non-finite P,   P = re^2 + im^2 (in float64),
over the columns c <= limit[r] of each row (the one-sided half of a four-step spectrum), optionally without bin 0
(element [0, 0]: mean removal). Partials are summed in float64 on the device: deterministic, no atomics.
Matches `reference.fft_power_sums_signal` (torch.fft in float64).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_DBL_MAX = tl.constexpr(1.7976931348623157e308)  # a Triton global must be a constexpr
_BLOCK_R = 8
_BLOCK_C = 256


@triton.jit
def _power_sums_kernel(x_ptr, rows, cols, limit_ptr, skip_first, part_ptr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    pid_r = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    lim = tl.load(limit_ptr + r, mask=rmask, other=-1)
    base = x_ptr + b.to(tl.int64) * rows * cols * 2
    s = tl.zeros([BLOCK_R], tl.float64)
    plogp = tl.zeros([BLOCK_R], tl.float64)
    bad = tl.zeros([BLOCK_R], tl.float64)
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        keep = rmask[:, None] & (c[None, :] < cols) & (c[None, :] <= lim[:, None])
        is_bin0 = (r[:, None] == 0) & (c[None, :] == 0)
        keep = keep & ((is_bin0 & (skip_first != 0)) == 0)
        off = (r[:, None].to(tl.int64) * cols + c[None, :]) * 2
        re = tl.load(base + off, mask=keep, other=0.0).to(tl.float64)
        im = tl.load(base + off + 1, mask=keep, other=0.0).to(tl.float64)
        p = re * re + im * im
        fin = keep & (p <= _DBL_MAX)  # false for inf and nan
        pf = tl.where(fin, p, 0.0)
        s += tl.sum(pf, axis=1)
        plogp += tl.sum(tl.where(pf > 0, pf * tl.log(tl.where(pf > 0, pf, 1.0)), 0.0), axis=1)
        bad += tl.sum(tl.where(keep & (fin == 0), 1.0, 0.0), axis=1)
    out = part_ptr + (b.to(tl.int64) * tl.num_programs(1) + pid_r) * 3
    tl.store(out + 0, tl.sum(s, axis=0))
    tl.store(out + 1, tl.sum(plogp, axis=0))
    tl.store(out + 2, tl.sum(bad, axis=0))


def power_sums(spec: torch.Tensor, limit: Optional[torch.Tensor], skip_first: bool):
    """(S, sum P ln P, non-finite count), each (B,) float64, of a contiguous complex (B, R, C) spectrum tile; row r
    keeps columns 0..limit[r] (all when None); skip_first leaves out element [0, 0] of each batch entry."""
    bsz, rows, cols = spec.shape
    if bsz == 0 or rows == 0 or cols == 0:
        z = torch.zeros(bsz, dtype=torch.float64, device=spec.device)
        return z, z.clone(), z.clone()
    x = torch.view_as_real(spec.contiguous())
    if limit is None:
        limit = torch.full((rows,), cols - 1, dtype=torch.int64)
    limit = limit.to(device=spec.device, dtype=torch.int64).contiguous()
    blocks = triton.cdiv(rows, _BLOCK_R)
    parts = torch.empty(bsz, blocks, 3, dtype=torch.float64, device=spec.device)
    _power_sums_kernel[(bsz, blocks)](x, rows, cols, limit, int(skip_first), parts, BLOCK_R=_BLOCK_R,
                                      BLOCK_C=_BLOCK_C)
    tot = parts.sum(1)
    return tot[:, 0], tot[:, 1], tot[:, 2]


# Compiled for sm_90 on the CPU by tests/test_triton_compile.py (the interpreter is more lenient than the compiler).
COMPILE_SPECS = [
    (_power_sums_kernel,
     {"x_ptr": f"*{t}", "rows": "i64", "cols": "i64", "limit_ptr": "*i64", "skip_first": "i32", "part_ptr": "*fp64"},
     {"BLOCK_R": _BLOCK_R, "BLOCK_C": _BLOCK_C})
    for t in ("fp32", "fp64")
]
