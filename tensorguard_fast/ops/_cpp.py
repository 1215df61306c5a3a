"""The one checked hand-off from tensors to the C++ kernels (`tensorguard_fast._C`).

The extension does not link libtorch, so its functions take raw addresses, sizes and strides. Nothing outside this
module passes an address: every kernel is called through the function of the same name here, which checks each
tensor argument (a torch.Tensor, on the CPU, the dtype the kernel reads, the shape the other arguments imply, a
memory layout the kernel walks correctly, no lazy conjugate/negative view) and derives every size and stride it
passes from the tensors themselves. A wrong input raises TypeError (type, dtype) or ValueError (device, shape,
layout, value) in one line naming the kernel, the argument and the fix; it never reaches C++.
The caller keeps the tensors alive for the call (they are arguments), and the kernels never keep an address.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import _backend

_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _ext():
    ext = _backend.cpp()
    if ext is None:
        raise _backend.BackendUnavailable(f"the C++ kernels are not available: {_backend.cpp_error()}")
    return ext


def _tensor(op: str, name: str, t, dtypes: Tuple[torch.dtype, ...], dim: Optional[int] = None,
            shape: Optional[Tuple[int, ...]] = None, rows: bool = False) -> torch.Tensor:
    """Check one tensor argument of kernel `op`. `rows`: a 2-D matrix whose rows are contiguous and do not overlap
    (row stride >= number of columns), e.g. a column slice of a larger matrix; otherwise the tensor must be
    contiguous. `shape` entries of -1 are not checked."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{op}: argument '{name}' is on {t.device}; the C++ kernels read host memory: pass "
                         f"{name}.cpu()")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: argument '{name}' has dtype {t.dtype}; the kernel reads {want}: pass "
                        f"{name}.to({dtypes[0]})")
    if t.is_conj() or t.is_neg():
        raise ValueError(f"{op}: argument '{name}' is a lazy conjugate/negative view; pass {name}.resolve_conj()"
                         f".resolve_neg()")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: argument '{name}' must be {dim}-D; got shape {tuple(t.shape)}")
    if shape is not None and any(w != -1 and w != g for w, g in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if w == -1 else str(w) for w in shape) + ")"
        raise ValueError(f"{op}: argument '{name}' must have shape {want}; got {tuple(t.shape)}")
    if rows:
        r, c = t.shape
        if c > 1 and t.stride(1) != 1 or r > 1 and c > 0 and t.stride(0) < c:
            raise ValueError(f"{op}: argument '{name}' needs contiguous, non-overlapping rows; got strides "
                             f"{t.stride()} for shape {tuple(t.shape)}: pass {name}.contiguous()")
    elif not t.is_contiguous():
        raise ValueError(f"{op}: argument '{name}' must be contiguous; got strides {t.stride()} for shape "
                         f"{tuple(t.shape)}: pass {name}.contiguous()")
    return t


def _int(op: str, name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{op}: argument '{name}' must be an int >= {lo}; got {v!r}")
    return v


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


# --- moments ----------------------------------------------------------------------------------------------------------

def moments_many(xs: Sequence[torch.Tensor]) -> List[tuple]:
    """(n, mean, m2, m3, m4, min, max, l1, sumsq, nonfinite) of each contiguous CPU tensor, in one call."""
    items = []
    for i, x in enumerate(xs):
        x = _tensor("moments", f"xs[{i}]", x, tuple(_backend.DTYPE_CODES))
        items.append((x.data_ptr(), x.numel(), _backend.DTYPE_CODES[x.dtype]))
    return _ext().moments_many(items, _backend.num_threads())


# --- fft_entropy --------------------------------------------------------------------------------------------------------

def fft_power_entropy(spec: torch.Tensor, limit: torch.Tensor) -> Tuple[float, float, int]:
    """(S, sum P ln P, non-finite count) over the complex (R, C) tile `spec` (rows contiguous, may be a slice);
    row r keeps columns 0..limit[r] (int64 (R,); negative drops the row)."""
    op = "fft_power_entropy"
    spec = _tensor(op, "spec", spec, (torch.complex64, torch.complex128), dim=2, rows=True)
    r, c = spec.shape
    limit = _tensor(op, "limit", limit, (torch.int64,), dim=1, shape=(r,))
    if r == 0 or c == 0:
        return 0.0, 0.0, 0
    return tuple(_ext().fft_power_entropy(spec.data_ptr(), spec.dtype == torch.complex128, r, c, _row_stride(spec),
                                          limit.data_ptr(), _backend.num_threads()))


def twiddle_interleave(zri: torch.Tensor, k1_0: int, n: int, out: torch.Tensor) -> torch.Tensor:
    """out[b, j, c] = (zri[b, j, 0, c] + i zri[b, j, 1, c]) * exp(-2 pi i (k1_0 + j) c / n), written into `out`
    (zri float32/float64 (B, R, 2, N2), contiguous; out complex of the same precision (B, R, N2), contiguous)."""
    op = "twiddle_interleave"
    zri = _tensor(op, "zri", zri, (torch.float32, torch.float64), dim=4, shape=(-1, -1, 2, -1))
    b, r, _, n2 = zri.shape
    out = _tensor(op, "out", out, (_COMPLEX[zri.dtype],), dim=3, shape=(b, r, n2))
    _int(op, "k1_0", k1_0, 0)
    _int(op, "n", n, 1)
    _ext().twiddle_interleave(zri.data_ptr(), out.dtype == torch.complex128, b, r, n2, k1_0, n, out.data_ptr(),
                              _backend.num_threads())
    return out


# --- lm_head error blocks -----------------------------------------------------------------------------------------------

def logsumexp_update(z: torch.Tensor, m: torch.Tensor, s: torch.Tensor, bad: torch.Tensor) -> None:
    """Online logsumexp over one float32 logits chunk z (N, C) (rows contiguous): updates the running max m, sum s
    (float64 (N,)) and the non-finite count bad (int64 (N,)) in place."""
    op = "logsumexp_update"
    z = _tensor(op, "z", z, (torch.float32,), dim=2, rows=True)
    n = z.shape[0]
    for name, t, dt in (("m", m, torch.float64), ("s", s, torch.float64), ("bad", bad, torch.int64)):
        _tensor(op, name, t, (dt,), dim=1, shape=(n,))
    _ext().logsumexp_update(z.data_ptr(), n, z.shape[1], _row_stride(z), m.data_ptr(), s.data_ptr(),
                            bad.data_ptr(), _backend.num_threads())


def crop_error_rows(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z <- exp(z - lse) - onehot(labels) in place over float32 cropped logits z (N, C) (rows contiguous);
    lse float64 (N,), labels int64 (N,) (labels outside [0, C) subtract nothing)."""
    op = "crop_error_rows"
    z = _tensor(op, "z", z, (torch.float32,), dim=2, rows=True)
    n = z.shape[0]
    lse = _tensor(op, "lse", lse, (torch.float64,), dim=1, shape=(n,))
    labels = _tensor(op, "labels", labels, (torch.int64,), dim=1, shape=(n,))
    _ext().crop_error_rows(z.data_ptr(), n, z.shape[1], _row_stride(z), lse.data_ptr(), labels.data_ptr(),
                           _backend.num_threads())
    return z


# --- gram_entropy -------------------------------------------------------------------------------------------------------

def pivoted_cholesky(gram: torch.Tensor, rel_tol: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L (B, n, n) float64, rank (B,) int64) with L L^T = gram for each symmetric PSD float64 (B, n, n) matrix."""
    op = "pivoted_cholesky"
    n = gram.shape[-1] if isinstance(gram, torch.Tensor) and gram.dim() == 3 else -1
    gram = _tensor(op, "gram", gram, (torch.float64,), dim=3, shape=(-1, n, n))  # square matrices
    bsz = gram.shape[0]
    if not (isinstance(rel_tol, float) and rel_tol >= 0.0):
        raise ValueError(f"{op}: argument 'rel_tol' must be a float >= 0; got {rel_tol!r}")
    factor = torch.empty_like(gram)
    rank = torch.empty(bsz, dtype=torch.int64)
    _ext().pivoted_cholesky(gram.data_ptr(), bsz, n, rel_tol, factor.data_ptr(), rank.data_ptr(),
                            _backend.num_threads())
    return factor, rank


def spectrum_entropy(svals: torch.Tensor, q: int, squared: bool) -> torch.Tensor:
    """GradSentry's normalised entropy of the top q values of each row of svals (B, n) float64: (B,) float64."""
    op = "spectrum_entropy"
    svals = _tensor(op, "svals", svals, (torch.float64,), dim=2)
    _int(op, "q", q, 2)
    out = torch.empty(svals.shape[0], dtype=torch.float64)
    _ext().spectrum_entropy(svals.data_ptr(), svals.shape[0], svals.shape[1], q, bool(squared), out.data_ptr())
    return out


# --- gradient_sketch ----------------------------------------------------------------------------------------------------

def _sketch_state(op: str, z, labels, m, s, bad) -> torch.Tensor:
    z = _tensor(op, "z", z, (torch.float32,), dim=2, rows=True)
    n = z.shape[0]
    _tensor(op, "labels", labels, (torch.int64,), dim=1, shape=(n,))
    for name, t, dt in (("m", m, torch.float64), ("s", s, torch.float64), ("bad", bad, torch.int64)):
        _tensor(op, name, t, (dt,), dim=1, shape=(n,))
    return z


def sketch_exp_update(z: torch.Tensor, out: torch.Tensor, labels: torch.Tensor, v0: int, m: torch.Tensor,
                      s: torch.Tensor, bad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One vocabulary chunk [v0, v0 + C) of the gradient sketch: float32 logits z (N, C) -> the logsumexp state (m, s,
    bad) updated in place as `logsumexp_update` does, out (N, C) float32 = exp(z - m_new) with each row's target column
    (labels - v0) zeroed; returns (f_old, f_new, c) float64 (N,): the rescale factors of the running sums and the
    row sums of out."""
    op = "sketch_exp_update"
    z = _sketch_state(op, z, labels, m, s, bad)
    n, c = z.shape
    out = _tensor(op, "out", out, (torch.float32,), dim=2, shape=(n, c), rows=True)
    _int(op, "v0", v0, 0)
    f_old = torch.empty(n, dtype=torch.float64)
    f_new = torch.empty(n, dtype=torch.float64)
    sums = torch.empty(n, dtype=torch.float64)
    if n and c:
        _ext().sketch_exp_update(z.data_ptr(), n, c, _row_stride(z), out.data_ptr(), _row_stride(out),
                                 labels.data_ptr(), v0, m.data_ptr(), s.data_ptr(), bad.data_ptr(), f_old.data_ptr(),
                                 f_new.data_ptr(), sums.data_ptr(), _backend.num_threads())
    return f_old, f_new, sums


def sketch_acc_update(z: torch.Tensor, r: torch.Tensor, labels: torch.Tensor, v0: int, m: torch.Tensor,
                      s: torch.Tensor, bad: torch.Tensor, acc: torch.Tensor) -> None:
    """`sketch_exp_update` with the product inside the kernel: acc (N, K + 1) float64 <- acc * f_old + f_new *
    [out @ r, c] with out = exp(z - m_new), target zeroed, c its row sums; r (C, K) float32 (rows contiguous)."""
    op = "sketch_acc_update"
    z = _sketch_state(op, z, labels, m, s, bad)
    n, c = z.shape
    r = _tensor(op, "r", r, (torch.float32,), dim=2, shape=(c, -1), rows=True)
    kk = r.shape[1]
    _tensor(op, "acc", acc, (torch.float64,), dim=2, shape=(n, kk + 1))
    _int(op, "v0", v0, 0)
    if n and c and kk:
        _ext().sketch_acc_update(z.data_ptr(), n, c, _row_stride(z), r.data_ptr(), _row_stride(r), kk,
                                 labels.data_ptr(), v0, m.data_ptr(), s.data_ptr(), bad.data_ptr(), acc.data_ptr(),
                                 _backend.num_threads())
