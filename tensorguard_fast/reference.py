"""Slow, obviously-correct float64 implementations: the oracle for every op and the fallback path.

Each function materialises what the fast kernels avoid (the whole tensor in float64, the gradient matrix, its
spectrum) and uses the most direct formula. Tests judge every kernel against these.
"""
from __future__ import annotations

import math

import torch

from .ops.stats import Moments


def moments(x: torch.Tensor) -> Moments:
    """Two-pass float64 moments of the finite values of x."""
    flat = x.detach().reshape(-1)
    finite = torch.isfinite(flat)
    nonfinite = int(flat.numel() - int(finite.sum()))
    v = flat[finite].to(torch.float64)
    n = v.numel()
    if n == 0:
        return Moments.from_state((0, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf, 0.0, 0.0, nonfinite))
    mean = v.mean()
    d = v - mean
    return Moments(n, float(mean), float((d ** 2).sum()), float((d ** 3).sum()), float((d ** 4).sum()),
                   float(v.min()), float(v.max()), float(v.abs().sum()), float((v ** 2).sum()), nonfinite)


def outer_moments(u: torch.Tensor, x: torch.Tensor) -> Moments:
    """Moments of the m x n matrix U^T X (U: k x m, X: k x n), materialised in float64."""
    u2 = u.detach().to(torch.float64).reshape(-1, u.shape[-1]) if u.dim() else u.detach().double().reshape(1, 1)
    x2 = x.detach().to(torch.float64).reshape(-1, x.shape[-1]) if x.dim() else x.detach().double().reshape(1, 1)
    return moments(u2.T @ x2)
