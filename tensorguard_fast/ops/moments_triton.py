"""Triton path of `moments` (CUDA tensors; runs in Triton's interpreter under TRITON_INTERPRET=1).

Each program loads one block once and reduces it two-pass in registers (mean, then central sums), writing ten
partial statistics; the partials are merged pairwise in float64 on the device (Chan/Terriberry), a log2(blocks)-step
tree, so no atomics and a deterministic result.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .stats import Moments

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
    """Merge rows of (n, mean, M2, M3, M4, min, max, l1, sumsq, nonfinite) pairwise until one is left (float64)."""
    while p.shape[0] > 1:
        if p.shape[0] % 2:
            p = torch.cat([p, torch.zeros_like(p[:1])])
            p[-1, 5], p[-1, 6] = float("inf"), float("-inf")
        a, b = p[0::2], p[1::2]
        na, nb = a[:, 0], b[:, 0]
        n = na + nb
        delta = b[:, 1] - a[:, 1]
        dn = torch.where(n > 0, delta / n.clamp_min(1), torch.zeros_like(delta))
        dn2 = dn * dn
        t1 = delta * dn * na * nb
        out = torch.empty_like(a)
        out[:, 0] = n
        out[:, 1] = a[:, 1] + nb * dn
        out[:, 2] = a[:, 2] + b[:, 2] + t1
        out[:, 3] = a[:, 3] + b[:, 3] + t1 * dn * (na - nb) + 3 * dn * (na * b[:, 2] - nb * a[:, 2])
        out[:, 4] = (a[:, 4] + b[:, 4] + t1 * dn2 * (na * na - na * nb + nb * nb)
                     + 6 * dn2 * (na * na * b[:, 2] + nb * nb * a[:, 2]) + 4 * dn * (na * b[:, 3] - nb * a[:, 3]))
        out[:, 5] = torch.minimum(a[:, 5], b[:, 5])
        out[:, 6] = torch.maximum(a[:, 6], b[:, 6])
        out[:, 7:] = a[:, 7:] + b[:, 7:]
        p = out
    return p[0]


def moments(x: torch.Tensor) -> Moments:
    flat = x.contiguous().reshape(-1)
    n = flat.numel()
    if n == 0:
        return Moments.empty()
    block = _block_size(n)
    grid = triton.cdiv(n, block)
    parts = torch.empty((grid, 10), dtype=torch.float64, device=flat.device)
    _moments_block_kernel[(grid,)](flat, n, parts, BLOCK=block)
    s = merge_partials(parts).tolist()
    return Moments.from_state((int(s[0]), s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], int(s[9])))


# Compiled for sm_90 on the CPU by tests/test_triton_compile.py (the interpreter is more lenient than the compiler).
COMPILE_SPECS = [
    (_moments_block_kernel, {"x_ptr": f"*{t}", "n": "i64", "part_ptr": "*fp64"}, {"BLOCK": 4096})
    for t in ("fp32", "bf16", "fp16")
]
