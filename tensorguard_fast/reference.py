"""Slow, obviously-correct float64 implementations: the oracle for every op and the fallback path.

Each function materialises what the fast kernels avoid (the whole tensor in float64, the gradient matrix, its
spectrum) and uses the most direct formula. Tests judge every kernel against these.
"""
from __future__ import annotations

import math

import torch

from .stats import Moments


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


# --- gram_entropy / fft_entropy: the gradient matrix G_b = E_b^T H_b materialised in float64 -----------------------

def gram_matrices(e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """G_b = E_b^T H_b for E (B, T, V') and H (B, T, d'), in float64: (B, V', d')."""
    return e.detach().to(torch.float64).mT @ h.detach().to(torch.float64)


def gram_spectrum(e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Singular values of each G_b by torch.linalg.svdvals, descending, cut or zero-padded to T: (B, T) float64."""
    g = gram_matrices(e, h)
    t = e.shape[-2]
    s = torch.linalg.svdvals(g) if g.numel() else g.new_zeros(g.shape[0], 0)
    out = s.new_zeros(g.shape[0], t)
    k = min(t, s.shape[-1])
    out[:, :k] = s[:, :k]
    return out


def spectral_entropy(svals: torch.Tensor, rank: int = 16, squared: bool = False) -> torch.Tensor:
    """GradSentry's normalised entropy per row: top `rank` values (zero-padded), clamp 1e-12, p = s / sum s (or
    s^2 / sum s^2), -sum p ln p / ln(rank). A row holding a NaN gives NaN."""
    s = svals.detach().to(torch.float64)
    s = s.unsqueeze(0) if s.dim() == 1 else s
    top = torch.sort(s, dim=-1, descending=True).values[:, :rank]
    top = torch.cat([top, top.new_zeros(top.shape[0], rank - top.shape[1])], 1).clamp_min(1e-12)
    if squared:
        top = top * top
    p = top / top.sum(-1, keepdim=True)
    h = -(p * p.log()).sum(-1) / math.log(rank)
    return torch.where(torch.isnan(s).any(-1), torch.full_like(h, math.nan), h)


def softmax_errors(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """softmax(logits) - onehot(y), rows of float64 logits, with each target's entry taken as minus the sum of the
    other probabilities: p_y - 1 computed directly loses every digit when p_y is close to 1 (the relative error of
    1 - p_y grows as u / (1 - p_y)), which is where the kernels' exact treatment of such tokens must be checked."""
    p = torch.softmax(logits, dim=-1)
    rows = torch.arange(len(y), device=logits.device)
    others = p.clone()
    others[rows, y] = 0
    e = p.clone()
    e[rows, y] = -others.sum(-1)
    return e


def lm_head_error_blocks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, crop: int = 8):
    """(E, H, n) from materialised float64 logits: E_t = softmax(z_t)[:V//crop] - onehot(y_t)[:V//crop] and
    H_t = h_t[:d//crop] at the scored positions (targets != -100), packed per sample and zero-padded to the largest
    count (at least 1); n = scored positions per sample."""
    w = weight.detach().to(torch.float64)
    v, d = w.shape
    keep = targets != -100
    n = keep.sum(1)
    tmax = max(1, int(n.max())) if n.numel() else 1
    e = torch.zeros(hidden.shape[0], tmax, v // crop, dtype=torch.float64, device=hidden.device)
    hh = torch.zeros(hidden.shape[0], tmax, d // crop, dtype=torch.float64, device=hidden.device)
    for b in range(hidden.shape[0]):
        h = hidden[b][keep[b]].detach().to(torch.float64)
        y = targets[b][keep[b]]
        probs = softmax_errors(h @ w.T, y)
        e[b, : len(y)] = probs[:, : v // crop]
        hh[b, : len(y)] = h[:, : d // crop]
    return e, hh, n


def gram_spectrum_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, crop: int = 8):
    """(svals (B, Tmax) float64, n (B,)): svdvals of the cropped lm_head gradient of the mean answer-token CE,
    G = E^T H / n, from materialised float64 logits. NaN rows for samples with no scored position."""
    e, h, n = lm_head_error_blocks(hidden, weight, targets, crop)
    s = gram_spectrum(e, h) / n.clamp_min(1).to(torch.float64).unsqueeze(1)
    s[n == 0] = math.nan
    return s, n


def gram_entropy_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, crop: int = 8,
                             rank: int = 16, squared: bool = False) -> torch.Tensor:
    """GradSentry's score per sample from materialised float64 logits: `spectral_entropy` of
    `gram_spectrum_from_hidden`; NaN for samples with no scored token."""
    return spectral_entropy(gram_spectrum_from_hidden(hidden, weight, targets, crop)[0], rank, squared)


def fft_power_sums_signal(x: torch.Tensor, onesided: bool = True, remove_mean: bool = False):
    """(S, sum P ln P, bins) of P = |X|^2 of the row-major flattened x, from torch.fft in float64. Mean removal
    drops bin 0 (X_0 = N * mean)."""
    flat = x.detach().to(torch.float64).reshape(-1)
    spec = torch.fft.rfft(flat) if onesided else torch.fft.fft(flat)
    if remove_mean:
        spec = spec[1:]
    power = spec.real ** 2 + spec.imag ** 2
    pos = power[power > 0]
    return float(power.sum()), float((pos * pos.log()).sum()), power.numel()


def fft_entropy_signal(x: torch.Tensor, onesided: bool = True, remove_mean: bool = False,
                       normalize: bool = True) -> float:
    """-sum p ln p with p = P / sum P over the chosen bins (divided by ln(bins) if normalize), computed directly.
    NaN when the spectrum has no energy, or normalising with fewer than 2 bins."""
    flat = x.detach().to(torch.float64).reshape(-1)
    spec = torch.fft.rfft(flat) if onesided else torch.fft.fft(flat)
    if remove_mean:
        spec = spec[1:]
    power = spec.real ** 2 + spec.imag ** 2
    total = power.sum()
    if not bool(total > 0) or (normalize and power.numel() < 2):
        return math.nan
    p = power[power > 0] / total
    h = float(-(p * p.log()).sum())
    return h / math.log(power.numel()) if normalize else h


def fft_entropy(e: torch.Tensor, h: torch.Tensor, onesided: bool = True, remove_mean: bool = False,
                normalize: bool = True) -> torch.Tensor:
    """`fft_entropy_signal` of each materialised G_b = E_b^T H_b (row-major flattening): (B,) float64."""
    g = gram_matrices(e, h)
    return torch.tensor([fft_entropy_signal(gb, onesided, remove_mean, normalize) for gb in g], dtype=torch.float64)


def fft_entropy_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, crop: int = 8,
                            onesided: bool = True, remove_mean: bool = False, normalize: bool = True) -> torch.Tensor:
    """`fft_entropy` of the cropped lm_head gradient G = E^T H / n per sample; NaN where n = 0."""
    e, h, n = lm_head_error_blocks(hidden, weight, targets, crop)
    out = fft_entropy(e, h, onesided, remove_mean, normalize)
    out[n == 0] = math.nan
    return out


def outer_moments(u: torch.Tensor, x: torch.Tensor) -> Moments:
    """Moments of the m x n matrix U^T X (U: k x m, X: k x n), materialised in float64."""
    u2, x2 = torch.atleast_2d(u.detach().double()), torch.atleast_2d(x.detach().double())  # 1-D = rank 1
    return moments(u2.T @ x2)


# --- GradSentry per-sample score, the slow way (oracle for tensorguard_fast.backdoor.entropy) ---------------------------------

def lm_head_gradient_crops(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           crop: int = 8) -> list:
    """Cropped lm_head gradients G_i[:V//crop, :d//crop] of the mean answer-token cross-entropy, one per sample.

    hidden (B, S, d) = inputs of lm_head, weight (V, d), targets (B, S) aligned with hidden (-100 = not scored).
    Float64 autograd through logits = h W^T only (the logits path: for tied embeddings this leaves out the gradient
    that reaches the same matrix through the input embedding). A sample with no scored token gives None.
    """
    w64 = weight.detach().to(torch.float64)
    v, d = w64.shape
    vc, dc = v // crop, d // crop
    crops = []
    for b in range(hidden.shape[0]):
        keep = targets[b] != -100
        if not bool(keep.any()):
            crops.append(None)
            continue
        h = hidden[b][keep].detach().to(torch.float64)
        y = targets[b][keep].to(w64.device)
        block = w64[:vc, :dc].clone().requires_grad_(True)
        # The full matrix with the cropped block as the only leaf: the gradient w.r.t. the leaf is the crop exactly.
        full = torch.cat([torch.cat([block, w64[:vc, dc:]], 1), w64[vc:]], 0)
        loss = torch.nn.functional.cross_entropy(h @ full.T, y)
        (grad,) = torch.autograd.grad(loss, [block])
        crops.append(grad)
    return crops


def gradsentry_gradient(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None,
                        crop: int = 8) -> torch.Tensor:
    """GradSentry's own call for one sample: autograd.grad of the model's mean answer-token loss w.r.t. the output
    embedding weight, cropped to [:V//crop, :d//crop]. A full backward pass; with tied embeddings this includes the
    input-embedding path (rows of the prompt's token ids), as the original code does. Mode (train/eval) is the caller's.
    """
    weight = model.get_output_embeddings().weight
    was = weight.requires_grad
    weight.requires_grad_(True)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        (grad,) = torch.autograd.grad(out.loss, [weight])
    finally:
        weight.requires_grad_(was)
    v, d = grad.shape
    return grad[:v // crop, :d // crop].detach().float()


def gradsentry_lowrank_entropy(g: torch.Tensor, rank: int = 16, niter: int = 2) -> float:
    """GradSentry's spectrum: torch.svd_lowrank(q=rank, niter) of the crop (randomised), then `spectral_entropy`."""
    _, s, _ = torch.svd_lowrank(g.float(), q=rank, niter=niter)
    return float(spectral_entropy(s, rank)[0])


# --- gradient_sketch: R^T G_b with the full lm_head gradient materialised ----------------------------------------------

def gradient_sketch_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                r: torch.Tensor):
    """(sketch (B, k, d), n (B,)): S_b = R^T G_b with G_b = (1/n_b) sum_t (softmax(h_t W^T) - onehot(y_t)) h_t^T the
    full V x d lm_head gradient of sample b's mean answer cross-entropy, from materialised float64 logits and G.
    r (V, k) is the projection; NaN sketch where n_b = 0; float64."""
    w = weight.detach().to(torch.float64)
    r64 = r.detach().to(torch.float64)
    v, d = w.shape
    keep = targets != -100
    n = keep.sum(1).to(torch.int64)
    out = torch.full((hidden.shape[0], r.shape[1], d), math.nan, dtype=torch.float64, device=hidden.device)
    for b in range(hidden.shape[0]):
        if not bool(keep[b].any()):
            continue
        h = hidden[b][keep[b]].detach().to(torch.float64)
        y = targets[b][keep[b]]
        e = softmax_errors(h @ w.T, y)
        g = e.T @ h / len(y)  # V x d: what the kernels never form
        out[b] = r64.T @ g
    return out, n
