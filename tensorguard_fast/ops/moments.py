"""moments: count, mean, std, skewness, kurtosis, min, max, L1, L2 and non-finite count in one read of a tensor.

Backends: C++ (`_C.moments`, CPU, fp64 accumulation, OpenMP), Triton (CUDA; per-block two-pass partials merged
in float64), reference (`reference.moments`, float64 two-pass). The rank-k form `outer_moments(U, X)` gives the
moments of U^T X without forming it: exactly, from power-sum factorisation, when k = 1; tile by tile otherwise.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import _backend, reference
from . import _cpp
from ..stats import Moments, from_power_sums

SUPPORTED = tuple(_backend.DTYPE_CODES)


def _check(x: torch.Tensor, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED:
        raise TypeError(f"{op}: dtype {x.dtype} is not supported; use one of {[str(d) for d in SUPPORTED]}")
    return x.detach()


def moments(x: torch.Tensor, backend: Optional[str] = None) -> Moments:
    """Moments of all elements of `x` (any shape, any length including 0) in one read.

    Formula: per chunk, power sums of d = x - c about a shift c near the mean, turned into central sums; chunks
    merged by the pairwise update of Chan et al. (M2) and Terriberry (M3, M4). Matches `reference.moments`
    (float64) within 1e-6 relative where chunks are summed in float32 blocks on CPU (fp32/bf16/fp16), within
    1e-10 for float64; on GPUs within 4e-6 (docs/methods.md section 6).
    """
    x = _check(x, "moments")
    chosen = _backend.choose("moments", x.device, backend)
    if chosen == "reference":
        return reference.moments(x)
    if chosen == "triton":
        from . import moments_triton

        return moments_triton.moments(x)
    return _cpp_moments([x])[0]


def moments_many(xs: Sequence[torch.Tensor], backend: Optional[str] = None) -> list:
    """`moments` of each tensor of `xs` in one call (one trip into the extension for CPU tensors)."""
    xs = [_check(x, "moments_many") for x in xs]
    if not xs:
        return []
    devices = {x.device for x in xs}
    if len(devices) > 1:
        raise ValueError(f"moments_many: tensors are on several devices {sorted(map(str, devices))}")
    chosen = _backend.choose("moments", xs[0].device, backend)
    if chosen == "cpp":
        return _cpp_moments(xs)
    return [moments(x, backend=chosen) for x in xs]


def _cpp_moments(xs: Sequence[torch.Tensor]) -> list:
    # contiguous() is a no-op for the common case; the list keeps every buffer alive during the call.
    return [Moments.from_state(s) for s in _cpp.moments_many([x.contiguous() for x in xs])]


def outer_moments(u: torch.Tensor, x: torch.Tensor, backend: Optional[str] = None, tile_rows: int = 1024) -> Moments:
    """Moments of the m x n matrix U^T X from U (k x m) and X (k x n), never forming it whole.

    k = 1 (U and X may be 1-D): sum_ij (u_i x_j)^p = (sum_i u_i^p)(sum_j x_j^p), so the moments cost O(m + n), exact
    in float64 (statistics over the pairs of finite u_i and x_j; overflow of a product is not checked); see
    `rank1_moments`, the batched form the lineage profile uses.
    k > 1: U^T X is formed `tile_rows` rows at a time (float32 GEMM, or float64 for float64 inputs) and each tile is
    reduced by `moments`; the summaries are merged exactly. Memory: one tile.
    """
    u = _check(u, "outer_moments")
    x = _check(x, "outer_moments")
    if u.dim() == 1:
        u = u.unsqueeze(0)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if u.dim() != 2 or x.dim() != 2 or u.shape[0] != x.shape[0]:
        raise ValueError(f"outer_moments: need U (k x m) and X (k x n) with the same k; got {tuple(u.shape)} and "
                         f"{tuple(x.shape)}")
    if u.device != x.device:
        raise ValueError(f"outer_moments: U on {u.device}, X on {x.device}")
    chosen = _backend.choose("outer_moments", u.device, backend)
    if chosen == "reference":
        return reference.outer_moments(u, x)
    if u.shape[0] == 1:
        return _rank1(u[0], x[0])
    if u.shape[1] == 0 or x.shape[1] == 0:
        return Moments.empty()
    acc_dtype = torch.float64 if torch.float64 in (u.dtype, x.dtype) else torch.float32
    uu, xx = u.to(acc_dtype), x.to(acc_dtype)
    total = Moments.empty()
    for r0 in range(0, uu.shape[1], tile_rows):
        tile = uu[:, r0:r0 + tile_rows].T @ xx
        total = total.merge(moments(tile, backend=chosen))
    return total


def _rank1(u: torch.Tensor, x: torch.Tensor) -> Moments:
    return rank1_moments(u.unsqueeze(0), x.unsqueeze(0))[0]


def rank1_moments(u: torch.Tensor, x: torch.Tensor, backend: Optional[str] = None) -> list:
    """Moments of each rank-1 matrix u_b x_b^T for the rows of U (B x m) and X (B x n), never formed: a list of B.

    sum_ij (u_i x_j)^p = (sum_i u_i^p)(sum_j x_j^p) for p = 1..4, and sum |u_i x_j| = (sum |u_i|)(sum |x_j|): each
    product needs the moments of its two factors only, O(m + n). The factors are reduced by `moments` (on CPU one
    call into the C++ kernel for all 2B rows; elsewhere the float64 reference), their power
    sums recovered from the central sums, and the products finished by `stats.from_power_sums` (float64; fine for
    gradients, |mean| << std). Statistics over the pairs of finite u_i and x_j; `nonfinite` counts the other pairs.
    Factors are upcast to float64 first (exact; O(m + n), small beside forming W X^T): the moments kernel sums
    float32 rows in float32 blocks (error ~1e-7, docs/methods.md section 6), and recovering raw power sums
    from central ones needs the factor moments at float64 accuracy.
    """
    u = _check(u, "rank1_moments")
    x = _check(x, "rank1_moments")
    if u.dim() != 2 or x.dim() != 2 or u.shape[0] != x.shape[0]:
        raise ValueError(f"rank1_moments: need U (B x m) and X (B x n) with the same B; got {tuple(u.shape)} and "
                         f"{tuple(x.shape)}")
    if u.device != x.device:
        raise ValueError(f"rank1_moments: U on {u.device}, X on {x.device}")
    chosen = _backend.choose("outer_moments", u.device, backend)
    rows = [r.double() for r in (*u, *x)]
    if chosen == "cpp":
        factors = _cpp_moments(rows)
    else:  # the reference reduces in float64 on the tensor's device; Triton's float32 blocks are not exact enough
        factors = [reference.moments(r) for r in rows]
    b = u.shape[0]
    return [_outer_from_factors(factors[i], factors[b + i]) for i in range(b)]


def _power_sums(m: Moments):
    """(sum x, sum x^2, sum x^3, sum x^4) of the finite values from their central sums (float64)."""
    n, mu = m.count, m.mean
    return (n * mu, m.sumsq, m.m3 + 3.0 * mu * m.m2 + n * mu ** 3,
            m.m4 + 4.0 * mu * m.m3 + 6.0 * mu * mu * m.m2 + n * mu ** 4)


def _outer_from_factors(mu: Moments, mx: Moments) -> Moments:
    nonfinite = (mu.count + mu.nonfinite) * (mx.count + mx.nonfinite) - mu.count * mx.count
    if mu.count == 0 or mx.count == 0:
        return Moments.from_state((0, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf, 0.0, 0.0, nonfinite))
    pu, px = _power_sums(mu), _power_sums(mx)
    corners = [a * b for a in (mu.min, mu.max) for b in (mx.min, mx.max)]
    return from_power_sums(mu.count * mx.count, pu[0] * px[0], pu[1] * px[1], pu[2] * px[2], pu[3] * px[3],
                           min(corners), max(corners), mu.l1 * mx.l1, nonfinite)
