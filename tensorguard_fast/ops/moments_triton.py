"""Triton path of `moments` (CUDA tensors; runs in Triton's interpreter under TRITON_INTERPRET=1).

Each program loads one block once and reduces it two-pass in registers (mean, then central sums), writing ten
partial statistics; the partials are merged in float64 on the device by the exact many-way form of the Chan /
Terriberry update (`merge_partials`): no atomics, a deterministic result.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..stats import Moments

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a Triton global must be a constexpr


@triton.jit
def _moments_block_kernel(x_ptr, n, part_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    fin = inb & (tl.abs(x) <= _FLT_MAX)  # false for inf and nan
    v = tl.where(fin, x, 0.0)
    cnt = tl.sum(fin.to(tl.float32), axis=0)
    mean = tl.sum(v, axis=0) / tl.maximum(cnt, 1.0)
    d = tl.where(fin, v - mean, 0.0)
    d2 = d * d
    base = part_ptr + pid.to(tl.int64) * 10
    tl.store(base + 0, cnt.to(tl.float64))
    tl.store(base + 1, mean.to(tl.float64))
    tl.store(base + 2, tl.sum(d2, axis=0).to(tl.float64))
    tl.store(base + 3, tl.sum(d2 * d, axis=0).to(tl.float64))
    tl.store(base + 4, tl.sum(d2 * d2, axis=0).to(tl.float64))
    tl.store(base + 5, tl.min(tl.where(fin, x, float("inf")), axis=0).to(tl.float64))
    tl.store(base + 6, tl.max(tl.where(fin, x, float("-inf")), axis=0).to(tl.float64))
    tl.store(base + 7, tl.sum(tl.abs(v), axis=0).to(tl.float64))
    tl.store(base + 8, tl.sum(v * v, axis=0).to(tl.float64))
    tl.store(base + 9, (tl.sum(inb.to(tl.float32), axis=0) - cnt).to(tl.float64))


def _block_size(n: int) -> int:
    # Next power of two up to 4096: big enough to amortise the partials, small enough for registers.
    return max(16, min(4096, triton.next_power_of_2(max(n, 1))))


def merge_partials(p: torch.Tensor) -> torch.Tensor:
    """Combine rows of (n, mean, M2, M3, M4, min, max, l1, sumsq, nonfinite) into one row, in float64.

    The exact many-way form of the pairwise update: with N = sum n_i, mean = sum n_i mean_i / N, d_i = mean_i - mean,
        M2 = sum M2_i + n_i d_i^2
        M3 = sum M3_i + 3 d_i M2_i + n_i d_i^3
        M4 = sum M4_i + 4 d_i M3_i + 6 d_i^2 M2_i + n_i d_i^4
    A fixed ~20 device ops whatever the number of blocks (a pairwise tree costs that per level).
    """
    n = p[:, 0]
    total = n.sum()
    mean = (n * p[:, 1]).sum() / total.clamp_min(1)
    d = p[:, 1] - mean
    d2 = d * d
    m2 = (p[:, 2] + n * d2).sum()
    m3 = (p[:, 3] + 3 * d * p[:, 2] + n * d2 * d).sum()
    m4 = (p[:, 4] + 4 * d * p[:, 3] + 6 * d2 * p[:, 2] + n * d2 * d2).sum()
    return torch.stack([total, mean, m2, m3, m4, p[:, 5].min(), p[:, 6].max(), p[:, 7].sum(), p[:, 8].sum(),
                        p[:, 9].sum()])


def moments(x: torch.Tensor, block: int = None, num_warps: int = None) -> Moments:
    """`block` / `num_warps` override the launch heuristic (bench/gpu_check.py sweeps them)."""
    flat = x.contiguous().reshape(-1)
    n = flat.numel()
    if n == 0:
        return Moments.empty()
    block = block or _block_size(n)
    num_warps = num_warps or (4 if block <= 4096 else 8)
    grid = triton.cdiv(n, block)
    parts = torch.empty((grid, 10), dtype=torch.float64, device=flat.device)
    _moments_block_kernel[(grid,)](flat, n, parts, BLOCK=block, num_warps=num_warps)
    s = merge_partials(parts).tolist()
    return Moments.from_state((int(s[0]), s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], int(s[9])))


# Compiled for sm_90 on the CPU by tests/test_triton_compile.py (the interpreter is more lenient than the compiler).
COMPILE_SPECS = [
    (_moments_block_kernel, {"x_ptr": f"*{t}", "n": "i64", "part_ptr": "*fp64"}, {"BLOCK": 4096})
    for t in ("fp32", "bf16", "fp16")
]
