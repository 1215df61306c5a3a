"""fft_entropy: streaming spectral entropy of a signal, or of the row-major flattening of G_b = E_b^T H_b.

Conventions (defaults first):
- spectrum: one-sided (`onesided=True`): the N//2 + 1 bins of `torch.fft.rfft` of the flattened signal; or the full N
  bins of `torch.fft.fft` (`onesided=False`).
- P_k = |X_k|^2 (unnormalised DFT, so Parseval reads S_full = N * sum x^2); p = P / S with S = sum P.
- `remove_mean=True` drops bin 0 (X_0 = N * mean): one bin fewer.
- H = -sum p ln p (natural log); `normalize=True` divides by ln(number of bins kept), giving [0, 1].
- NaN when the kept spectrum has no energy (S = 0, e.g. G = 0 or an empty signal), or when normalising fewer than
  2 bins: the entropy is not defined there and no number is made up.

Streaming form (docs/methods.md section 4): H = ln S - (sum P ln P) / S, so two running sums give it in one pass over the spectrum.
For G (N1 x N2, N = N1 N2) the four-step decomposition gives bin k1 + N1 k2 as
    X[k1 + N1 k2] = FFT_N2( w_N^(c k1) * Z[k1, c] )[k2],   Z[k1, c] = sum_t FFT_N1(E_t)[k1] H_t[c],
computed for a tile of k1 rows at a time (one real GEMM on interleaved re/im, a twiddle, row FFTs of length N2) and
reduced at once: neither G nor its spectrum is ever stored whole. The one-sided half is selected per tile row:
row k1 keeps k2 <= (N//2 - k1) // N1.

Where the work happens: FFTs and GEMMs in torch (pocketfft/MKL on CPU, cuBLAS/cuFFT on CUDA; complex64 for
fp32/bf16/fp16 inputs, complex128 for float64). On CPU tensors C++ fuses the twiddle with the re/im interleave
(`_C.twiddle_interleave`, a per-row complex recurrence in double) and the power + two running sums
(`_C.fft_power_entropy`, float64 accumulation); on CUDA tensors the twiddle is one table times one row per tile
(torch) and the power + sums are a Triton kernel (`fft_entropy_triton`).
The 'reference' backend materialises G and calls torch.fft in float64 (`reference.fft_entropy`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .. import _backend, reference
from . import _cpp
from .lm_head_errors import answer_error_blocks, check_blocks, check_forward, raise_if_nonfinite

_TILE_ELEMENTS = 1 << 20  # complex values per tile across the batch on CUDA (~8 MiB in complex64)
_SIGNAL_ROW = 4096  # a signal's spectrum is reduced as rows of this many bins
_TILE_ELEMENTS_CPU = 1 << 17  # per sample on CPU (1 MiB): a tile stays in L2/L3 between GEMM, FFT and reduction


class SpectrumSums(NamedTuple):
    """The two running sums of the streaming entropy, per sample, and the number of bins they cover."""

    total: torch.Tensor  # (B,) float64: S = sum_k P_k
    plogp: torch.Tensor  # (B,) float64: sum_k P_k ln P_k (terms with P_k = 0 count 0)
    bins: int


def num_bins(n: int, onesided: bool = True, remove_mean: bool = False) -> int:
    if n <= 0:
        return 0
    return (n // 2 + 1 if onesided else n) - (1 if remove_mean else 0)


def entropy_from_sums(sums: SpectrumSums, normalize: bool = True) -> torch.Tensor:
    """H = ln S - (sum P ln P) / S per sample (divided by ln(bins) if normalize); NaN where undefined."""
    s, plogp = sums.total.to(torch.float64), sums.plogp.to(torch.float64)
    h = torch.log(s) - plogp / s
    undefined = ~(s > 0) | ~torch.isfinite(s)
    if normalize:
        if sums.bins < 2:
            return torch.full_like(h, math.nan)
        h = h / math.log(sums.bins)
    return torch.where(undefined, torch.full_like(h, math.nan), h)


# --- the fused power + entropy accumulation, per backend ------------------------------------------------------------

def _accumulate(spec: torch.Tensor, limit: Optional[torch.Tensor], skip_first: bool, chosen: str):
    """(S, sum P ln P, non-finite count) per batch entry of a complex (B, R, C) spectrum tile; row r keeps columns
    0..limit[r] (all when limit is None); skip_first drops element [0, 0] of each batch entry (bin 0)."""
    spec = spec.contiguous()
    if chosen == "triton":
        from . import fft_entropy_triton

        return fft_entropy_triton.power_sums(spec, limit, skip_first)
    bsz, rows, cols = spec.shape
    out = torch.zeros(bsz, 3, dtype=torch.float64)
    if rows == 0 or cols == 0:
        return out[:, 0], out[:, 1], out[:, 2]
    lim = (limit if limit is not None else torch.full((rows,), cols - 1, dtype=torch.int64)).contiguous()
    for b in range(bsz):
        first = 0
        if skip_first:
            # row 0 from column 1 (a view: rows stay contiguous), its limit one less
            out[b] += torch.tensor(_cpp.fft_power_entropy(spec[b, :1, 1:], lim[:1] - 1), dtype=torch.float64)
            first = 1
        if rows > first:
            out[b] += torch.tensor(_cpp.fft_power_entropy(spec[b, first:], lim[first:]), dtype=torch.float64)
    return out[:, 0], out[:, 1], out[:, 2]


def _raise_overflow(bad: torch.Tensor, op: str) -> None:
    if bool((bad > 0).any()):
        b = int((bad > 0).nonzero()[0, 0])
        raise ValueError(f"{op}: the spectrum of sample {b} overflowed (non-finite |X|^2); rescale the input")


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# --- signals ----------------------------------------------------------------------------------------------------------

def signal_power_sums(x: torch.Tensor, onesided: bool = True, remove_mean: bool = False,
                      backend: Optional[str] = None) -> SpectrumSums:
    """(S, sum P ln P, bins) of a 1-D or 2-D (row-major flattened) real signal, as (1,)-tensors. Parseval: with the
    full spectrum S = N * sum x^2. The spectrum of x is formed (it is the size of x); the reduction is fused."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fft_entropy_signal: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (1, 2):
        raise ValueError(f"fft_entropy_signal: expected a 1-D or 2-D signal; got shape {tuple(x.shape)}")
    x = x.detach()
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"fft_entropy_signal: dtype {x.dtype} is not supported")
    raise_if_nonfinite(x.reshape(1, -1), "the signal", "fft_entropy_signal")
    chosen = _backend.choose("fft_entropy", x.device, backend)
    n = x.numel()
    bins = num_bins(n, onesided, remove_mean)
    if chosen == "reference":
        s, plogp, _ = reference.fft_power_sums_signal(x, onesided, remove_mean)
        return SpectrumSums(torch.tensor([s], dtype=torch.float64), torch.tensor([plogp], dtype=torch.float64), bins)
    if n == 0:
        zero = torch.zeros(1, dtype=torch.float64)
        return SpectrumSums(zero, zero.clone(), 0)
    flat = x.reshape(-1).to(_compute_dtype(x))
    spec = torch.fft.rfft(flat) if onesided else torch.fft.fft(flat)
    # One long row would be one thread / one Triton program: fold the spectrum into rows of _SIGNAL_ROW values.
    # The zero padding of the last row adds nothing to either sum (P = 0 terms count 0).
    rows = -(-spec.numel() // _SIGNAL_ROW)
    folded = torch.zeros(rows * _SIGNAL_ROW, dtype=spec.dtype, device=spec.device)
    folded[: spec.numel()] = spec
    s, plogp, bad = _accumulate(folded.view(1, rows, _SIGNAL_ROW), None, remove_mean, chosen)
    _raise_overflow(bad, "fft_entropy_signal")
    return SpectrumSums(s.cpu(), plogp.cpu(), bins)


def fft_entropy_signal(x: torch.Tensor, onesided: bool = True, remove_mean: bool = False, normalize: bool = True,
                       backend: Optional[str] = None) -> float:
    """Spectral entropy of a 1-D or 2-D (row-major flattened) real signal (conventions: module docstring)."""
    return float(entropy_from_sums(signal_power_sums(x, onesided, remove_mean, backend), normalize)[0])


# --- G = E^T H, four-step and tiled ---------------------------------------------------------------------------------

def _twiddle(k1: torch.Tensor, n2: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """w_N^(k1 c) for the given rows k1 and c < n2; (k1 c) mod N in exact integers first, so the angle stays
    accurate for any N."""
    c = torch.arange(n2, dtype=torch.int64, device=device)
    phase = (k1.to(device).unsqueeze(1) * c) % n
    angle = phase.to(torch.float64) * (-2.0 * math.pi / n)
    return torch.polar(torch.ones_like(angle), angle).to(dtype)


def _twiddled_tile(zri: torch.Tensor, a: int, n: int, ctype, base: Optional[torch.Tensor], chosen: str):
    """(B, R, 2, N2) real GEMM output (re row, im row per k1) -> complex (B, R, N2) times w_N^((a + j) c)."""
    bsz, r, _, n2 = zri.shape
    if chosen == "cpp":
        return _cpp.twiddle_interleave(zri, a, n, torch.empty(bsz, r, n2, dtype=ctype))
    # w_N^((a + j) c) = w_N^(j c) * w_N^(a c): one table for all tiles and one row per tile, not R x N2 sin/cos
    row = _twiddle(torch.tensor([a]), n2, n, ctype, zri.device)
    return torch.complex(zri[:, :, 0], zri[:, :, 1]) * (base[:r] * row)


def fft_power_sums(E: torch.Tensor, H: torch.Tensor, onesided: bool = True, remove_mean: bool = False,
                   tile_rows: Optional[int] = None, backend: Optional[str] = None) -> SpectrumSums:
    """(S (B,), sum P ln P (B,), bins) of the spectrum of the row-major flattening of each G_b = E_b^T H_b, by the
    four-step decomposition, `tile_rows` spectrum rows k1 at a time (default: ~2^17 complex values per tile and
    sample on CPU, 2^20 per tile of the whole batch on CUDA).
    E (B, T, N1), H (B, T, N2); 2-D = one sample. Parseval: full spectrum S = N1 N2 ||G_b||_F^2."""
    e, h, _ = check_blocks(E, H, "fft_entropy")
    chosen = _backend.choose("fft_entropy", e.device, backend)
    bsz, _, n1 = e.shape
    n2 = h.shape[-1]
    n = n1 * n2
    bins = num_bins(n, onesided, remove_mean)
    if chosen == "reference":
        g = reference.gram_matrices(e, h)
        sums = [reference.fft_power_sums_signal(gb, onesided, remove_mean)[:2] for gb in g]
        t = torch.tensor(sums, dtype=torch.float64).reshape(bsz, 2)
        return SpectrumSums(t[:, 0], t[:, 1], bins)
    total = torch.zeros(bsz, dtype=torch.float64, device=e.device)
    plogp = torch.zeros_like(total)
    if bsz == 0 or n == 0 or e.shape[1] == 0:  # no sample, an empty G, or T = 0 (G = 0: S = 0, entropy NaN)
        return SpectrumSums(total.cpu(), plogp.cpu(), bins)
    # CPU: one sample at a time, so the extra memory is one Ehat (T x N1 complex) plus one tile, whatever B is.
    # CUDA: the whole batch per launch (memory is plentiful there; launches are not free).
    group = bsz if e.device.type == "cuda" else 1
    tile = _TILE_ELEMENTS if e.device.type == "cuda" else _TILE_ELEMENTS_CPU
    bad = torch.zeros_like(total)
    for b0 in range(0, bsz, group):
        sl = slice(b0, b0 + group)
        s, p, nb = _four_step_sums(e[sl], h[sl], onesided, remove_mean, tile_rows, tile, chosen)
        total[sl] += s.to(total.device)
        plogp[sl] += p.to(total.device)
        bad[sl] += nb.to(total.device)
    _raise_overflow(bad, "fft_entropy")
    return SpectrumSums(total.cpu(), plogp.cpu(), bins)


def _four_step_sums(e, h, onesided, remove_mean, tile_rows, tile_elements, chosen):
    """Running sums over the spectrum of each G_b of a group of samples, one tile of k1 rows at a time."""
    bsz, _, n1 = e.shape
    n2 = h.shape[-1]
    n = n1 * n2
    cdt = _compute_dtype(e, h)
    ctype = torch.complex128 if cdt == torch.float64 else torch.complex64
    ehat = torch.fft.fft(e.to(cdt), dim=-1)  # (B, T, N1): T FFTs of length N1
    hh = h.to(cdt)
    rows = tile_rows or max(1, min(n1, tile_elements // max(1, bsz * n2)))
    total = torch.zeros(bsz, dtype=torch.float64, device=e.device)
    plogp = torch.zeros_like(total)
    bad = torch.zeros_like(total)
    base = None if chosen == "cpp" else _twiddle(torch.arange(min(rows, n1)), n2, n, ctype, e.device)
    for a in range(0, n1, rows):
        if onesided and a > n // 2:
            break  # rows past N//2 hold no one-sided bin
        k1 = torch.arange(a, min(a + rows, n1), dtype=torch.int64)
        r = k1.numel()
        # Z = Ehat[:, k1]^T H as one real GEMM: re/im of Ehat interleaved as 2R rows.
        ri = torch.view_as_real(ehat[:, :, a:a + r]).reshape(bsz, -1, 2 * r)
        zri = (ri.mT @ hh).contiguous().view(bsz, r, 2, n2)
        z = _twiddled_tile(zri, a, n, ctype, base, chosen)
        del zri
        spec = torch.fft.fft(z, dim=-1)  # (B, R, N2): bins k1 + N1 k2
        del z
        limit = ((n // 2 - k1) // n1).clamp(max=n2 - 1) if onesided else None
        s, p, nb = _accumulate(spec, limit, remove_mean and a == 0, chosen)
        total += s.to(total.device)
        plogp += p.to(total.device)
        bad += nb.to(total.device)
    return total, plogp, bad


def fft_entropy(E: torch.Tensor, H: torch.Tensor, onesided: bool = True, remove_mean: bool = False,
                normalize: bool = True, tile_rows: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Spectral entropy of the row-major flattening of each G_b = E_b^T H_b: (B,) float64 on the CPU (0-d for 2-D
    inputs). Conventions and method: module docstring. Non-finite inputs raise ValueError naming the sample."""
    out = entropy_from_sums(fft_power_sums(E, H, onesided, remove_mean, tile_rows, backend), normalize)
    return out[0] if E.dim() == 2 else out


def fft_entropy_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, crop: int = 8,
                            onesided: bool = True, remove_mean: bool = False, normalize: bool = True,
                            vocab_chunk: int = 8192, tile_rows: Optional[int] = None,
                            backend: Optional[str] = None) -> torch.Tensor:
    """`fft_entropy` of the cropped lm_head gradient G_b = E_b^T H_b / n_b of each sample (inputs as in
    `lm_head_errors.answer_error_blocks`, the shared chunked-logsumexp/crop helper): (B,) float64; NaN for samples
    with no scored token."""
    chosen = _backend.choose("fft_entropy", hidden.device if isinstance(hidden, torch.Tensor) else
                             torch.device("cpu"), backend)
    if chosen == "reference":

        hidden, weight, targets = check_forward(hidden, weight, targets, crop, vocab_chunk, "fft_entropy")
        return reference.fft_entropy_from_hidden(hidden, weight, targets, crop, onesided, remove_mean, normalize)
    e, h, n = answer_error_blocks(hidden, weight, targets, crop, vocab_chunk, chosen, "fft_entropy")
    e = e / n.clamp_min(1).to(e.dtype).view(-1, 1, 1)  # the 1/n of the mean loss: exact raw sums for G itself
    out = fft_entropy(e, h, onesided, remove_mean, normalize, tile_rows, chosen)
    out[n.cpu() == 0] = math.nan
    return out
