"""TensorGuard's fingerprint computed the way its public code computes it: the oracle and the speed baseline.

Every loaded tensor is materialised in float32 at once (layers <= 15), each of the 15 samples per selected tensor
runs autograd and materialises the d_out x d_in gradient, and the statistics are numpy/scipy reductions of it
(skewness/kurtosis on a 500k random subsample above 1M entries when `subsample=True`, as the original does).
Written from the method's description (docs/methods.md section 1.1); shares only the selection/grouping helpers and the
probe definitions with the fast path, so a mistake in the gradient statistics cannot hide in both.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from scipy import stats as sps

from ..lineage.profile_tensorguard import (FGSM_EPS, NOISE_TYPES, NUM_SAMPLES, _band, features_from_layers,
                                      loaded_by_tensorguard, select_tensors)
from ..lineage.loading import WeightSource


def _perturb(x: torch.Tensor, kind: str, gen: torch.Generator, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    n = x.shape[-1] // 2 + 1
    if kind == "adversarial":
        w = next(p for p in params.values() if p.dim() == 2 and p.shape[1] == x.shape[-1])
        leaf = x.clone().requires_grad_(True)
        logits = leaf @ w.T
        target = torch.randint(0, logits.shape[1], (1,), generator=gen).to(x.device)
        torch.nn.functional.cross_entropy(logits, target).backward()
        return (leaf + FGSM_EPS * leaf.grad.sign()).detach()
    if kind == "structured":
        return x + _band(x, 0, n // 4)
    if kind == "low_frequency":
        return x + 0.1 * _band(x, 0, n // 8)
    if kind == "high_frequency":
        return x + 0.1 * _band(x, n // 2, n)
    return x + torch.randn(x.shape, generator=gen).to(x.device) * 0.1


def _grad_stats(g: np.ndarray, subsample: bool) -> Dict[str, float]:
    out = {"mean": float(np.mean(g)), "std": float(np.std(g)), "norm": float(np.linalg.norm(g))}
    flat = g.reshape(-1)
    if subsample and flat.size > 1_000_000:
        rng = np.random.RandomState(0)
        flat = flat[rng.choice(flat.size, 500_000, replace=False)]
    out["skewness"] = float(sps.skew(flat))
    out["kurtosis"] = float(sps.kurtosis(flat))
    return out


def tensorguard_reference(source: WeightSource, seed: int = 0, subsample: bool = True,
                          float64_stats: bool = False, device="cpu") -> Dict[str, float]:
    """TensorGuard's feature dict (minus model_name). float64_stats: reduce the gradient in float64 (to isolate
    the effect of numpy's float32 reductions). device: where the tensors and autograd live (TensorGuard: CUDA);
    probes are drawn on the CPU generator either way."""
    params = {k: source.get(k).to(device, torch.float32) for k in source.keys() if loaded_by_tensorguard(k)}
    total_params = sum(p.numel() for p in params.values())
    rs = np.random.RandomState(seed)
    selected = select_tensors([k for k, p in params.items() if p.dim() == 2], rs)
    per_layer = {}
    for key in selected:
        w = params[key].clone().requires_grad_(True)
        samples = []
        for _ in range(NUM_SAMPLES):
            kind = str(rs.choice(NOISE_TYPES))
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn((1, w.shape[1]), generator=gen)
            x = _perturb(x.to(device), kind, gen, params)
            (x @ w.T).norm().backward()
            g = w.grad.detach().cpu().numpy()
            samples.append(_grad_stats(g.astype(np.float64) if float64_stats else g, subsample))
            w.grad = None
        per_layer[key] = {s: float(np.mean([f[s] for f in samples])) for s in samples[0]}
    return features_from_layers(per_layer, total_params)
