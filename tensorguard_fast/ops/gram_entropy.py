"""gram_entropy: GradSentry's per-sample spectral entropy of the lm_head gradient, without forming the gradient.

For sample b with scored positions t (DESIGN 3.1):  G_b = (1/n_b) sum_t e_t h_t^T = E_b^T H_b / n_b, where
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
from typing import Optional, Tuple

import torch

from .. import _backend, reference

IGNORE_INDEX = -100  # targets value of positions that are not scored (prompt, padding), as in transformers
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _as_batch(x: torch.Tensor, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{op}: {name} has dtype {x.dtype}; use one of {[str(d) for d in FLOATS]}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be (B, T, cols) or (T, cols); got shape {tuple(x.shape)}")
    return x.detach()


def check_blocks(e: torch.Tensor, h: torch.Tensor, op: str,
                 check_finite: bool = True) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Validate per-sample blocks E (B, T, V') and H (B, T, d') (2-D = one sample): shapes, device, and (unless the
    caller checks it more cheaply itself) finiteness. Returns (E, H, was_2d). Non-finite values raise ValueError
    naming the first bad sample."""
    single = isinstance(e, torch.Tensor) and e.dim() == 2
    e, h = _as_batch(e, "E", op), _as_batch(h, "H", op)
    if e.shape[:2] != h.shape[:2]:
        raise ValueError(f"{op}: E {tuple(e.shape)} and H {tuple(h.shape)} need the same (B, T)")
    if e.device != h.device:
        raise ValueError(f"{op}: E on {e.device}, H on {h.device}")
    if check_finite:
        raise_if_nonfinite(e, "E", op)
        raise_if_nonfinite(h, "H", op)
    return e, h, single


def raise_if_nonfinite(x: torch.Tensor, name: str, op: str) -> None:
    if x.numel() == 0:
        return
    # One float64 sum per sample instead of a boolean isfinite tensor: any NaN/Inf makes the sum non-finite, and
    # float32/16 values cannot overflow a float64 sum (float64 inputs beyond ~1e300 are reported too).
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1).sum(1, dtype=torch.float64))
    _raise_samples(bad, f"{name} holds NaN or Inf", op)


def _raise_samples(bad: torch.Tensor, what: str, op: str) -> None:
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: {what} in sample {b} ({int(bad.sum())} sample(s) affected)")


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
    gram = gram.contiguous()
    bsz, n, _ = gram.shape
    factor = torch.empty_like(gram)
    rank = torch.empty(bsz, dtype=torch.int64)
    tol = max(n, cols, 1) * torch.finfo(torch.float64).eps
    _backend.cpp().pivoted_cholesky(gram.data_ptr(), bsz, n, tol, factor.data_ptr(), rank.data_ptr(),
                                    _backend.num_threads())
    return factor, rank


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
    s64 = s.to(torch.float64).contiguous()
    out = torch.empty(s64.shape[0], dtype=torch.float64)
    _backend.cpp().spectrum_entropy(s64.data_ptr(), s64.shape[0], s64.shape[1], rank, bool(squared), out.data_ptr())
    return out


def gram_entropy(E: torch.Tensor, H: torch.Tensor, rank: int = 16, squared: bool = False,
                 backend: Optional[str] = None) -> torch.Tensor:
    """`spectral_entropy(gram_spectrum(E, H))`: (B,) float64 (a 0-d tensor for 2-D inputs)."""
    s = gram_spectrum(E, H, backend=backend)
    out = spectral_entropy(s, rank=rank, squared=squared, backend=backend)
    return out[0] if s.dim() == 1 else out


# --- from the forward pass: hidden states, lm_head weight, targets --------------------------------------------------

def answer_error_blocks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, crop: int = 8,
                        vocab_chunk: int = 8192, backend: Optional[str] = None, op: str = "gram_entropy"):
    """(E, H, n_tokens): the per-sample blocks whose product E_b^T H_b is n_b times the cropped lm_head gradient.

    hidden (B, S, d): inputs of lm_head (final normed hidden states); weight (V, d); targets (B, S) int64 aligned
    with hidden (targets[b, t] is the token the logits at t predict; -100 = not scored). Only the scored positions are
    used: their logits come chunk by chunk over the vocabulary (peak extra memory O(rows x vocab_chunk) for rows =
    scored positions of the batch, never B x S x V), an online logsumexp gives the full-vocabulary normaliser, and
    E_t = softmax(z_t)[:V//crop] - onehot(y_t)[:V//crop], H_t = h_t[:d//crop].
    Returns E (B, Tmax, V//crop), H (B, Tmax, d//crop), zero rows past each sample's count, Tmax = max(1, max n),
    computed in float32 (float64 if hidden or weight is float64); n_tokens (B,) int64.
    Non-finite logits (or hidden states at scored positions) raise ValueError naming the sample.
    Shared by gram_entropy and fft_entropy.
    """
    hidden, weight, targets = _check_forward(hidden, weight, targets, crop, vocab_chunk, op)
    chosen = _backend.choose(op, hidden.device, backend)
    bsz = hidden.shape[0]
    vocab, dim = weight.shape
    vc, dc = vocab // crop, dim // crop
    keep = targets != IGNORE_INDEX
    n_tokens = keep.sum(1).to(torch.int64)
    tmax = max(1, int(n_tokens.max())) if bsz else 1
    cdt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    b_idx, s_idx = keep.nonzero(as_tuple=True)
    t_idx = (keep.cumsum(1) - 1)[b_idx, s_idx]  # position of each scored row inside its sample's block
    rows = hidden[b_idx, s_idx].to(cdt)
    labels = targets[b_idx, s_idx].contiguous()
    e = torch.zeros(bsz, tmax, vc, dtype=cdt, device=hidden.device)
    h = torch.zeros(bsz, tmax, dc, dtype=cdt, device=hidden.device)
    if rows.shape[0]:
        _raise_rows(~torch.isfinite(rows).all(1), b_idx, op, "hidden states at scored positions hold NaN or Inf")
        errors = _cropped_errors(rows, weight, labels, vc, vocab_chunk, cdt, chosen, b_idx, op)
        e[b_idx, t_idx] = errors
        h[b_idx, t_idx] = rows[:, :dc]
    return e, h, n_tokens


def _check_forward(hidden, weight, targets, crop, vocab_chunk, op):
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dim() == 2:
        hidden, targets = hidden.unsqueeze(0), targets.reshape(1, -1)
    if hidden.dim() != 3 or weight.dim() != 2 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"{op}: need hidden (B, S, d), weight (V, d), targets (B, S); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden width {hidden.shape[-1]} != weight width {weight.shape[1]}")
    if hidden.dtype not in FLOATS or weight.dtype not in FLOATS:
        raise TypeError(f"{op}: hidden/weight dtypes {hidden.dtype}/{weight.dtype} are not supported")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: targets must be int64 token ids (-100 = not scored); got {targets.dtype}")
    if not (isinstance(crop, int) and crop >= 1) or not (isinstance(vocab_chunk, int) and vocab_chunk >= 1):
        raise ValueError(f"{op}: crop and vocab_chunk must be positive ints; got {crop!r}, {vocab_chunk!r}")
    if len({hidden.device, weight.device, targets.device}) > 1:
        raise ValueError(f"{op}: hidden, weight and targets must share a device")
    targets = targets.to(torch.int64)
    scored = targets[targets != IGNORE_INDEX]
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= weight.shape[0]):
        raise ValueError(f"{op}: targets must be -100 or token ids in [0, {weight.shape[0]})")
    return hidden.detach(), weight.detach(), targets


def _raise_rows(bad_rows: torch.Tensor, b_idx: torch.Tensor, op: str, what: str) -> None:
    if bool(bad_rows.any()):
        samples = torch.unique(b_idx[bad_rows])
        raise ValueError(f"{op}: sample {int(samples[0])}: {what} ({samples.numel()} sample(s) affected)")


def _cropped_errors(rows, weight, labels, vc, vocab_chunk, cdt, chosen, b_idx, op):
    """E rows = softmax(z)[:vc] - onehot(y)[:vc] for the scored rows (N, d), logits chunked over the vocabulary."""
    n = rows.shape[0]
    vocab = weight.shape[0]
    # The fused kernels take float32 logits; float64 inputs (tests, exact checks) take the torch formulas.
    use_cpp = chosen == "cpp" and cdt == torch.float32
    use_triton = chosen == "triton" and cdt == torch.float32
    if use_triton:
        from . import gram_entropy_triton as kernels
    # The cropped logits are computed once and kept: they become E in place. The rest of the vocabulary streams.
    crop_logits = rows @ weight[:vc].to(cdt).T
    m = torch.full((n,), -math.inf, dtype=torch.float64, device=rows.device)
    s = torch.zeros(n, dtype=torch.float64, device=rows.device)
    bad = torch.zeros(n, dtype=torch.int64, device=rows.device)
    chunks = [(0, vc)] + [(v0, min(v0 + vocab_chunk, vocab)) for v0 in range(vc, vocab, vocab_chunk)]
    for v0, v1 in chunks:
        z = crop_logits if v0 == 0 else rows @ weight[v0:v1].to(cdt).T
        if z.shape[1] == 0:
            continue
        if use_cpp:
            _backend.cpp().logsumexp_update(z.data_ptr(), n, z.shape[1], z.stride(0), m.data_ptr(), s.data_ptr(),
                                           bad.data_ptr(), _backend.num_threads())
        elif use_triton:
            kernels.logsumexp_update(z, m, s, bad)
        else:
            _torch_logsumexp_update(z, m, s, bad)
    lse = m + s.log()
    _raise_rows((bad > 0) | ~torch.isfinite(lse), b_idx, op, "non-finite logits")
    if use_cpp:
        _backend.cpp().crop_error_rows(crop_logits.data_ptr(), n, vc, crop_logits.stride(0), lse.data_ptr(),
                                       labels.data_ptr(), _backend.num_threads())
        return crop_logits
    if use_triton:
        kernels.crop_error_rows(crop_logits, lse, labels)
        return crop_logits
    errors = torch.exp(crop_logits.to(torch.float64) - lse.unsqueeze(1)).to(cdt)
    inside = labels < vc
    errors[inside.nonzero(as_tuple=True)[0], labels[inside]] -= 1
    return errors


def _torch_logsumexp_update(z, m, s, bad):
    finite = torch.isfinite(z)
    bad += (~finite).sum(1)
    zf = torch.where(finite, z, torch.full_like(z, -math.inf)).to(torch.float64)
    m_new = torch.maximum(m, zf.max(1).values)
    safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    s.copy_(s * torch.exp(m - safe) + torch.exp(zf - safe.unsqueeze(1)).sum(1))
    m.copy_(m_new)


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
        hidden, weight, targets = _check_forward(hidden, weight, targets, crop, vocab_chunk, "gram_entropy")
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
