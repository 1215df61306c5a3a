"""gram_entropy: GradSentry's per-sample spectral entropy of the lm_head gradient, without forming the gradient.

For sample b with scored positions t (docs/methods.md section 2):  G_b = (1/n_b) sum_t e_t h_t^T = E_b^T H_b / n_b, where
e_t = softmax(z_t) - onehot(y_t) and h_t is the input of lm_head; GradSentry crops G to [:V//8, :d//8], which is a
column slice of E and of H. With the T x T Grams K = E E^T = Lk Lk^T and M = H H^T = Lm Lm^T, the non-zero
singular values of E^T H are those of the T x T matrix Lk^T Lm, so the spectrum costs O(T^2 (V' + d')) work and
O(T^2) memory instead of O(V' d'). Singular Grams (T > rank, zero or repeated rows) are handled by rank-revealing
factors, not by a Cholesky that would fail or by jitter.

Where the work happens (all in float64 from the Grams on: exact to ~1e-13 relative of the largest singular value,
deterministic):
- CPU tensors ('cpp'): Gram GEMMs and the final eigvalsh in torch; the rank-revealing (pivoted) Cholesky of each
  Gram in C++ (`_C.pivoted_cholesky`); the elementwise work fused in C++ (`_C.logsumexp_update`,
  `_C.crop_error_rows`, `_C.spectrum_entropy`).
- CUDA tensors ('triton'): Gram GEMMs, eigh-based factors and a T x T svdvals in torch (cuBLAS/cuSOLVER); the logits
  chunk work in Triton (`gram_entropy_triton`).
- 'reference': materialises G and calls torch.linalg.svdvals (`reference.gram_spectrum`).
Dispatch follows `_backend.choose` (explicit backend that cannot run -> BackendUnavailable; auto -> falls back).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _backend, reference
from . import _cpp
from .lm_head_errors import _raise_samples, answer_error_blocks, check_blocks, check_forward

# --- singular values of E^T H by the Gram route ---------------------------------------------------------------------

def _psd_factor(gram: torch.Tensor, cols: int) -> torch.Tensor:
    """F with F F^T = gram (symmetric PSD, batched) from eigh. Eigenvalues under max(T, cols) * eps * lambda_max are
    rounding noise of the float64 Gram (numpy's matrix_rank tolerance) and set to 0: that keeps rank-deficient inputs
    (T > rank, repeated rows, zero rows) from leaking ~1e-8-relative noise singular values into the spectrum."""
    w, q = torch.linalg.eigh(gram)
    tol = max(gram.shape[-1], cols, 1) * torch.finfo(torch.float64).eps * w[..., -1:].clamp_min(0)
    w = torch.where(w > tol, w, torch.zeros_like(w))
    return q * w.sqrt().unsqueeze(-2)


_GRAM_COLS = 256  # columns upcast to float64 at a time: extra memory B x T x 256 doubles, not a copy of E


def _gram64(x: torch.Tensor) -> torch.Tensor:
    """x x^T per sample in float64 from the exactly upcast values, a column block at a time."""
    if x.dtype == torch.float64:
        return x @ x.mT
    out = torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for c0 in range(0, x.shape[-1], _GRAM_COLS):
        block = x[..., c0:c0 + _GRAM_COLS].to(torch.float64)
        out.baddbmm_(block, block.mT)
    return out


def _grams(e: torch.Tensor, h: torch.Tensor, op: str):
    """K = E E^T and M = H H^T in float64. A NaN/Inf anywhere in row t of E makes K_tt non-finite, so the diagonals
    are the finiteness check, for free (no separate pass over E and H)."""
    k, m = _gram64(e), _gram64(h)
    for name, g in (("E", k), ("H", m)):
        _raise_samples(~torch.isfinite(g.diagonal(dim1=-2, dim2=-1)).all(-1), f"{name} holds NaN or Inf", op)
    return k, m


def _gram_route(e: torch.Tensor, h: torch.Tensor, op: str) -> torch.Tensor:
    k, m = _grams(e, h, op)
    fk = _psd_factor(k, e.shape[-1])  # K = E E^T = Fk Fk^T
    fm = _psd_factor(m, h.shape[-1])  # M = H H^T = Fm Fm^T
    # E^T H has the non-zero singular values of Fk^T Fm (both are "K^(1/2) M^(1/2)" up to orthogonal factors); the
    # T x T SVD of that product avoids squaring the condition number a second time.
    return torch.linalg.svdvals(fk.mT @ fm)


def _pivoted_factor(gram: torch.Tensor, cols: int):
    """(L, rank): L L^T = gram from the C++ rank-revealing Cholesky, columns past rank zero; the noise tolerance
    is `_psd_factor`'s (LAPACK pstrf uses the same n * eps * max diag)."""
    tol = max(gram.shape[-1], cols, 1) * torch.finfo(torch.float64).eps
    return _cpp.pivoted_cholesky(gram.contiguous(), tol)


def _gram_route_cpu(e: torch.Tensor, h: torch.Tensor, op: str) -> torch.Tensor:
    k, m = _grams(e, h, op)
    return _spectrum_from_grams_host(k, m, e.shape[-1], h.shape[-1])


def _spectrum_from_grams_host(k: torch.Tensor, m: torch.Tensor, cols_e: int, cols_h: int) -> torch.Tensor:
    """Singular values from the float64 Grams (CPU tensors) by the C++ pivoted Cholesky + eigvalsh."""
    t = k.shape[-1]
    lk, rk = _pivoted_factor(k, cols_e)  # K = Lk Lk^T, rank rk
    lm, rm = _pivoted_factor(m, cols_h)  # M = Lm Lm^T, rank rm
    # E^T H has the non-zero singular values of A = Lk^T Lm (rk x rm non-zero block); s^2 = eig of A A^T, or of
    # A^T A when rm < rk: the Gram of the smaller side has no room for spurious (rounding-noise) eigenvalues, and its
    # rows past that rank are exactly zero, so rank-deficient samples get exact zeros. eigvalsh (no vectors) rather
    # than svdvals/eigh: MKL's threaded LAPACK with vectors ran 100x slower on tiny matrices on a loaded host.
    a = lk.mT @ lm
    a = torch.where((rm < rk).view(-1, 1, 1).to(a.device), a.mT, a)
    size = max(1, int(torch.minimum(rk, rm).max()))
    a = a[:, :size]  # rows past every sample's smaller rank are zero
    w = torch.linalg.eigvalsh(a @ a.mT).clamp_min(0).sqrt().flip(-1)
    return torch.cat([w, w.new_zeros(w.shape[0], t - size)], 1) if size < t else w


# Option: on CUDA, run the T x T factorisations on the host (C++ pivoted Cholesky) instead of cuSOLVER's eigh; only
# the Grams (B x T x T doubles) cross the bus. Expected to help when B small eigen-problems dominate (the H200 run
# put fast_entropy at 1.9x a plain forward on a 7B shape), but not yet measured on a GPU: off by default until
# bench/gpu_check.py, which times both routes, shows it wins.
HOST_FACTOR_ON_CUDA = False


def _gram_route_cuda(e: torch.Tensor, h: torch.Tensor, op: str) -> torch.Tensor:
    if not (HOST_FACTOR_ON_CUDA and _backend.cpp() is not None):
        return _gram_route(e, h, op)
    k, m = _grams(e, h, op)
    return _spectrum_from_grams_host(k.cpu(), m.cpu(), e.shape[-1], h.shape[-1]).to(e.device)


def gram_spectrum(E: torch.Tensor, H: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Singular values of G_b = E_b^T H_b for each sample, (B, T) float64, descending, zero-padded.

    E (B, T, V'), H (B, T, d'); rows to ignore are all-zero (they add nothing to either Gram). 2-D inputs are one
    sample and give a (T,) result. Gram route (module docstring): exact, deterministic, robust to rank-deficient E or H
    and to T > rank. Non-finite inputs raise ValueError naming the sample. Backends: see the module docstring.
    """
    e, h, single = check_blocks(E, H, "gram_spectrum", check_finite=False)
    chosen = _backend.choose("gram_spectrum", e.device, backend)
    if chosen == "reference":
        check_blocks(e, h, "gram_spectrum")
        out = reference.gram_spectrum(e, h)
    elif e.shape[0] == 0 or e.shape[1] == 0:
        out = torch.zeros(e.shape[0], e.shape[1], dtype=torch.float64, device=e.device)
    elif chosen == "cpp":
        out = _gram_route_cpu(e, h, "gram_spectrum")
    elif e.device.type == "cuda":
        out = _gram_route_cuda(e, h, "gram_spectrum")
    else:
        out = _gram_route(e, h, "gram_spectrum")
    return out[0] if single else out


# --- entropy of a spectrum ----------------------------------------------------------------------------------------

def spectral_entropy(svals: torch.Tensor, rank: int = 16, squared: bool = False,
                     backend: Optional[str] = None) -> torch.Tensor:
    """GradSentry's normalised entropy of each row of svals (B, n) (1-D = one row): (B,) float64.

    Top `rank` values (zero-padded when n < rank), clamped at 1e-12 (GradSentry's floor), p = s / sum s (amplitudes;
    `squared=True`: p = s^2 / sum s^2), H = -sum p ln p / ln(rank), in [0, 1]. A row holding a NaN (a sample with no
    scored token) gives NaN. An all-zero row gives 1.0 (q equal floors), as GradSentry's own code does.
    """
    if not isinstance(rank, int) or rank < 2:
        raise ValueError(f"spectral_entropy: rank must be an int >= 2 (normalised by ln(rank)); got {rank!r}")
    s = svals.detach()
    if s.dim() == 1:
        s = s.unsqueeze(0)
    if s.dim() != 2:
        raise ValueError(f"spectral_entropy: svals must be (B, n) or (n,); got shape {tuple(svals.shape)}")
    chosen = _backend.choose("spectral_entropy", s.device, backend)
    if chosen != "cpp" or s.shape[0] == 0:
        # The triton backend has nothing worth a kernel here (B x 16 numbers): torch on the device.
        return reference.spectral_entropy(s, rank, squared).to(s.device)
    return _cpp.spectrum_entropy(s.to(torch.float64).contiguous(), rank, bool(squared))


def gram_entropy(E: torch.Tensor, H: torch.Tensor, rank: int = 16, squared: bool = False,
                 backend: Optional[str] = None) -> torch.Tensor:
    """`spectral_entropy(gram_spectrum(E, H))`: (B,) float64 (a 0-d tensor for 2-D inputs)."""
    s = gram_spectrum(E, H, backend=backend)
    out = spectral_entropy(s, rank=rank, squared=squared, backend=backend)
    return out[0] if s.dim() == 1 else out


def gram_spectrum_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, crop: int = 8,
                              vocab_chunk: int = 8192, backend: Optional[str] = None):
    """(svals (B, Tmax) float64, n_tokens (B,) int64) of G_b = (1/n_b) sum_t e_t h_t^T cropped to [:V//crop, :d//crop]:
    the gradient of the mean cross-entropy over sample b's scored tokens w.r.t. the lm_head weight, through the
    logits only (see `answer_error_blocks` for the inputs). Singular values descending, zero-padded, 1/n_b included.
    A sample with no scored position gets n_tokens 0 and a NaN row (the caller flags it; no made-up number).
    The 'reference' backend materialises float64 logits and G (`reference.gram_spectrum_from_hidden`).
    """
    chosen = _backend.choose("gram_entropy", hidden.device if isinstance(hidden, torch.Tensor) else
                             torch.device("cpu"), backend)
    if chosen == "reference":
        hidden, weight, targets = check_forward(hidden, weight, targets, crop, vocab_chunk, "gram_entropy")
        return reference.gram_spectrum_from_hidden(hidden, weight, targets, crop)
    e, h, n = answer_error_blocks(hidden, weight, targets, crop, vocab_chunk, chosen, "gram_entropy")
    s = gram_spectrum(e, h, backend=chosen) / n.clamp_min(1).to(torch.float64).unsqueeze(1)
    s[n == 0] = math.nan
    return s, n


def gram_entropy_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, crop: int = 8,
                             rank: int = 16, squared: bool = False, vocab_chunk: int = 8192,
                             backend: Optional[str] = None) -> torch.Tensor:
    """GradSentry's score per sample, (B,) float64 in [0, 1]; NaN for samples with no scored token."""
    s, _ = gram_spectrum_from_hidden(hidden, weight, targets, crop=crop, vocab_chunk=vocab_chunk, backend=backend)
    return spectral_entropy(s, rank=rank, squared=squared, backend=backend)
