"""TensorGuard's fingerprint (arXiv 2506.01631, public code), computed exactly from one read of each tensor.

What TensorGuard does (docs/methods.md section 1.1), reproduced here step by step:
1. Tensors of layers with index > 15 are not loaded; `total_params` counts what is loaded (1-D tensors included).
2. 2-D tensors only. Above 10 of them: up to 3 evenly spaced names from each of the groups embed / attention /
   ffn / others, padded to 10 with random picks (`np.random.RandomState(seed)`, the same stream that later draws
   the probe kinds, so the pad consumes draws exactly as the original does).
3. Per tensor, 15 samples; each draws a kind from [adversarial, structured, gaussian, low_frequency,
   high_frequency]. Every sample restarts the torch RNG at `seed` and draws x = randn(1, d_in), so a tensor only
   ever sees five distinct probes: each distinct probe is computed once and weighted by how often it was drawn.
4. Loss ||x W^T||; its gradient w.r.t. W is u x^T with u = W x / ||W x||. mean, std, Frobenius norm, skewness and
   excess kurtosis of that d_out x d_in gradient come exactly from the rank-1 factorisation of `outer_moments` in
   O(d_out + d_in): sum_ij (u_i x_j)^p = (sum_i u_i^p)(sum_j x_j^p), batched over the distinct probes so W is read
   once (X W^T). The gradient is never formed.
5. Statistics averaged over samples, then over tensors (global_*) and within groups (attention_*, ffn_*,
   embedding_*; a group absent from the selection is written as 0, as TensorGuard's clustering reads it).

Deliberate differences (measured in bench/bench_fingerprint.py, column "feature rel. diff"):
- Skewness and kurtosis are exact over all entries; TensorGuard subsamples 500k entries above 1M.
- Statistics accumulate in float64; TensorGuard uses numpy float32 reductions of a float32 gradient.
- Probes are drawn from the CPU generator whatever the device, so a fingerprint does not depend on the device;
  TensorGuard draws on its CUDA device, whose generator gives other numbers for the same seed.
- The random pad picks from the sorted remaining names; TensorGuard picks from a Python set, whose order changes
  with PYTHONHASHSEED (its selection is not reproducible across runs).
- Non-finite weights: statistics cover the finite gradient entries and `nonfinite` is recorded in the metadata;
  TensorGuard would write NaN features.
- A sharded model is fingerprinted as a whole; TensorGuard reads one file (one shard) at a time.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Tuple

import numpy as np
import torch

from .loading import ModelLoadError, WeightSource
from ..ops.moments import rank1_moments

NOISE_TYPES = ["adversarial", "structured", "gaussian", "low_frequency", "high_frequency"]
NUM_SAMPLES = 15
MAX_LAYER = 15
FGSM_EPS = 0.03
SMALL_MATRIX = 1 << 22  # elements (16 MiB of float32): below it W stays in cache across the k mat-vecs
_LAYER = re.compile(r"layers\.(\d+)\.")


def loaded_by_tensorguard(key: str) -> bool:
    """TensorGuard skips every tensor whose name has "layers.<n>." with n > 15."""
    if "layers." not in key:
        return True
    m = _LAYER.search(key)
    return not (m and int(m.group(1)) > MAX_LAYER)


def select_tensors(targets: List[str], rs: np.random.RandomState) -> List[str]:
    if len(targets) <= 10:
        return list(targets)
    groups: Dict[str, List[str]] = {"embed": [], "attention": [], "ffn": [], "others": []}
    for key in targets:
        low = key.lower()
        if "embed" in low:
            groups["embed"].append(key)
        elif "attention" in low or "attn" in low:
            groups["attention"].append(key)
        elif "ffn" in low or "mlp" in low:
            groups["ffn"].append(key)
        else:
            groups["others"].append(key)
    selected: List[str] = []
    for keys in groups.values():
        if keys:
            idx = np.linspace(0, len(keys) - 1, min(3, len(keys)), dtype=int)
            selected.extend(keys[i] for i in idx)
    if len(selected) < 10:
        remaining = sorted(set(targets) - set(selected))
        if remaining:
            picks = rs.choice(remaining, min(10 - len(selected), len(remaining)), replace=False)
            selected.extend(str(p) for p in picks)
    return selected


def layer_type(key: str) -> str:
    """TensorGuard's grouping for the group statistics (note: attention is tested before embed here)."""
    low = key.lower()
    if "attention" in low or "attn" in low:
        return "attention"
    if "ffn" in low or "mlp" in low:
        return "ffn"
    if "embed" in low:
        return "embedding"
    if "norm" in low:
        return "norm"
    return "unknown"


def _band(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """irfft of the rfft bins [lo, hi) of x (TensorGuard's frequency masks)."""
    freq = torch.fft.rfft(x)
    mask = torch.zeros_like(freq)
    mask[..., lo:hi] = 1
    return torch.fft.irfft(freq * mask, n=x.size(-1)).real


class ProbeFactory:
    """The five probes for an input width, computed once per width (they depend on the width and seed only, plus
    the FGSM weight: the first loaded 2-D tensor of that input width)."""

    def __init__(self, source: WeightSource, loaded: List[str], seed: int, device: torch.device):
        self.source, self.loaded, self.seed, self.device = source, loaded, seed, device
        self.cache: Dict[Tuple[int, str], torch.Tensor] = {}

    def base(self, d_in: int) -> Tuple[torch.Tensor, torch.Generator]:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn((1, d_in), generator=gen), gen

    def fgsm_weight(self, d_in: int) -> torch.Tensor:
        for key in self.loaded:
            shape = self.source.shape(key)
            if len(shape) == 2 and shape[1] == d_in:
                return self.source.get(key).to(self.device, torch.float32)
        raise ModelLoadError(f"{self.source.describe()}: no 2-D tensor of input width {d_in} for the FGSM probe")

    def probe(self, d_in: int, kind: str) -> torch.Tensor:
        key = (d_in, kind)
        if key not in self.cache:
            x, gen = self.base(d_in)
            if kind == "adversarial":
                w = self.fgsm_weight(d_in)
                xd = x.to(self.device)
                logits = (w @ xd[0]).unsqueeze(0)
                target = torch.randint(0, logits.shape[1], (1,), generator=gen).to(self.device)
                # d CE / d x = (softmax(logits) - onehot(target)) W; only its sign is used.
                g = torch.softmax(logits, dim=-1)
                g[0, target] -= 1.0
                grad_x = g @ w
                out = (xd + FGSM_EPS * grad_x.sign()).cpu()
                del w
            elif kind == "structured":
                n = x.shape[-1] // 2 + 1
                out = x + _band(x, 0, n // 4)
            elif kind == "low_frequency":
                n = x.shape[-1] // 2 + 1
                out = x + 0.1 * _band(x, 0, n // 8)
            elif kind == "high_frequency":
                n = x.shape[-1] // 2 + 1
                out = x + 0.1 * _band(x, n // 2, n)
            else:  # gaussian
                out = x + torch.randn(x.shape, generator=gen) * 0.1
            self.cache[key] = out[0].to(torch.float32)
        return self.cache[key]


def gradient_stats(w: torch.Tensor, probes: torch.Tensor) -> Tuple[List[Dict[str, float]], int]:
    """mean, std, norm, skewness, kurtosis of d||W x||/dW = u x^T for each probe x (rows of `probes`, k x d_in).

    One pass over W for all k probes (X W^T); then the engine's rank-1 op `ops.moments.rank1_moments` (sum_ij
    (u_i x_j)^p = (sum_i u_i^p)(sum_j x_j^p), all 2k factor vectors reduced by one call of the moments kernel).
    Statistics are over the finite gradient entries; the count of non-finite rows of V is returned.
    """
    probes = probes.to(w.device)
    if w.device.type == "cpu" and w.numel() < SMALL_MATRIX:
        # Cache-resident W: k mat-vecs. A CPU GEMM with few columns cost a fixed ~16 ms per call on the torch
        # wheel measured here (0.05 ms for the mat-vecs), which dominated the whole fingerprint.
        v = torch.stack([torch.mv(w, p) for p in probes]).to(torch.float64)
    else:
        # W X^T, not X W^T: BLAS streams W row-major once (the transposed product was 2x slower here).
        v = (w @ probes.T).T.to(torch.float64)
    # A row of W with a NaN/Inf gives a non-finite entry of V for (almost) every probe: such rows are left out of
    # every probe's statistics (NaN in u), and counted.
    finite = torch.isfinite(v)
    rows_ok = finite.all(0)
    v = torch.where(finite, v, torch.zeros((), dtype=v.dtype, device=v.device))
    u = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    u = torch.where(rows_ok, u, torch.full((), math.nan, dtype=u.dtype, device=u.device))
    stats = rank1_moments(u, probes.to(torch.float64))
    out = [{"mean": m.mean, "std": m.std, "norm": m.l2, "skewness": m.skewness, "kurtosis": m.kurtosis}
           for m in stats]
    return out, int((~rows_ok).sum())


def tensorguard_features(source: WeightSource, seed: int = 0, device=torch.device("cpu")):
    """(names, values, metadata) of TensorGuard's fingerprint for `source`."""
    loaded = [k for k in source.keys() if loaded_by_tensorguard(k)]
    total_params = 0
    for k in loaded:
        n = 1
        for d in source.shape(k):
            n *= d
        total_params += n
    targets = [k for k in loaded if len(source.shape(k)) == 2]
    if not targets:
        raise ModelLoadError(f"{source.describe()}: no 2-D weight tensors to fingerprint")
    rs = np.random.RandomState(seed)
    selected = select_tensors(targets, rs)
    probes = ProbeFactory(source, loaded, seed, device)
    per_layer: Dict[str, Dict[str, float]] = {}
    nonfinite_rows = 0
    for key in selected:
        kinds = [str(rs.choice(NOISE_TYPES)) for _ in range(NUM_SAMPLES)]
        w = source.get(key).to(device, torch.float32)
        d_in = w.shape[1]
        distinct = list(dict.fromkeys(kinds))
        stats, bad = gradient_stats(w, torch.stack([probes.probe(d_in, k) for k in distinct]))
        nonfinite_rows += bad
        sums = {s: 0.0 for s in ("mean", "std", "norm", "skewness", "kurtosis")}
        for kind, st in zip(distinct, stats):
            for s in sums:
                sums[s] += kinds.count(kind) * st[s]
        per_layer[key] = {s: v / NUM_SAMPLES for s, v in sums.items()}
        del w
    values = features_from_layers(per_layer, total_params)
    names = [k for k in values]
    meta = {"selected_tensors": selected, "num_tensors": len(targets), "nonfinite_rows": nonfinite_rows,
            "missing_groups": [g for g in ("attention", "ffn", "embedding")
                               if not any(layer_type(k) == g for k in per_layer)]}
    return names, [values[k] for k in names], meta


def features_from_layers(per_layer: Dict[str, Dict[str, float]], total_params: int) -> Dict[str, float]:
    """TensorGuard's feature dict from per-tensor statistics (already averaged over the probe samples): global
    means of all five statistics, group means of mean/std/norm (a group with no tensor reads 0, as in its code),
    total_params and num_layers. Shared with reference_tensorguard: this is the definition, not a computation."""
    values: Dict[str, float] = {}
    for s in ("mean", "std", "norm", "skewness", "kurtosis"):
        values[f"global_{s}"] = float(np.mean([f[s] for f in per_layer.values()]))
    for group in ("attention", "ffn", "embedding", "norm"):
        members = [f for k, f in per_layer.items() if layer_type(k) == group]
        if members or group != "norm":
            for s in ("mean", "std", "norm"):
                values[f"{group}_{s}"] = float(np.mean([f[s] for f in members])) if members else 0.0
    values["total_params"] = float(total_params)
    values["num_layers"] = float(len(per_layer))
    return values
