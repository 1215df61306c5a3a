"""The running state of the gradient sketch inside the vocabulary-chunked pass over the lm_head logits.

For a scored row t (hidden state h_t, target y_t) the sketch needs r_t = R^T e_t with e_t = softmax(z_t) - onehot(y_t)
over the FULL vocabulary and R the seeded V x k matrix of `gradient_sketch.sketch_matrix`. With the online softmax
over vocabulary chunks (running max m, s = sum_v exp(z_v - m), both rescaled by exp(m_old - m_new) when m grows):

    r_t = (1/s) sum_{v != y} exp(z_v - m) (R_v - R_y) = (a - c R_y) / s,
    a = sum_{v != y} exp(z_v - m) R_v  (k-vector),   c = sum_{v != y} exp(z_v - m).

Leaving the target's column out of a and c (instead of the textbook acc/s - R_y) matters for a confident token
(p_y -> 1, e_t -> 0): acc/s - R_y cancels to a few float32 ulps of |R_y|, (a - c R_y)/s keeps full relative accuracy.
a comes from one product per chunk, exp(z_chunk - m) @ R_chunk ((rows x chunk) x (chunk x k)), c from the row sums of
the same exponentials; the state is rows x (k+1) float64 ([a, c]) plus (m, s); nothing of size rows x V or V x d.

Backends of the per-chunk update ('cpp' and 'triton' run on float32 logits; everything else takes the torch formula
in float64):
- cpp: `_C.sketch_exp_update` does the max, the rescale factors, exp (written to a scratch chunk, target column
  zeroed), c and s in one pass, with the same loops as `_C.logsumexp_update`, so (m, s) are bit-identical to the
  pass without a sketch and it REPLACES that call (`fuses_logsumexp`). The product runs inside the kernel
  (`_C.sketch_acc_update`, CPP_PRODUCT = "acc") rather than as a torch GEMM on the written exponentials ("gemm"):
  bench/bench_gradient_sketch.py, 1 thread, process CPU time over the pass without sketch: SmolLM2 head +7.7% vs
  +10.8%, 7B head +2.7% vs +2.0% (noise level), and no rows x chunk scratch buffer (28.5 vs 36.6 MB peak).
- triton: one fused kernel (`gradient_sketch_triton`) reads the chunk and accumulates a and c with tl.dot per
  column split; the splits merge in float64 here. It keeps its own (m, s): the logsumexp kernel for E is untouched.
- torch: float64 exp and product, own (m, s).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

# In-kernel accumulation ('acc') or exp in C++ then a torch GEMM ('gemm'): chosen by bench/bench_gradient_sketch.py.
CPP_PRODUCT = "acc"
KERNEL_BACKENDS = ("cpp", "triton")


class SketchAccumulator:
    """r_t = R^T e_t for the scored rows, fed one vocabulary chunk of logits at a time (module docstring)."""

    def __init__(self, r: torch.Tensor, labels: torch.Tensor, backend: str, cdt: torch.dtype):
        n, device = labels.shape[0], labels.device
        self.k = r.shape[1]
        self.labels = labels
        self.backend = backend if cdt == torch.float32 and backend in KERNEL_BACKENDS else "torch"
        self.r = r.to(device, torch.float32 if self.backend != "torch" else torch.float64).contiguous()
        self.m = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        self.s = torch.zeros(n, dtype=torch.float64, device=device)
        self.bad = torch.zeros(n, dtype=torch.int64, device=device)
        self.acc = torch.zeros(n, self.k + 1, dtype=torch.float64, device=device)
        self.fuses_logsumexp = self.backend == "cpp"  # the C++ update also gives the pass's own (m, s, bad)
        self._scratch = None

    def update(self, z: torch.Tensor, v0: int) -> None:
        """Fold the logits chunk z (rows, cols) of vocabulary columns [v0, v0 + cols) into the state; z is read only."""
        if z.shape[0] == 0 or z.shape[1] == 0:
            return
        if self.backend == "cpp":
            self._cpp_update(z, v0)
        elif self.backend == "triton":
            from . import gradient_sketch_triton

            gradient_sketch_triton.sketch_update(z, self.r[v0:v0 + z.shape[1]], self.labels, v0, self.m, self.s,
                                                 self.bad, self.acc)
        else:
            self._torch_update(z, v0)

    def _cpp_update(self, z: torch.Tensor, v0: int) -> None:
        from . import _cpp

        r_chunk = self.r[v0:v0 + z.shape[1]]
        if CPP_PRODUCT == "acc":
            _cpp.sketch_acc_update(z, r_chunk, self.labels, v0, self.m, self.s, self.bad, self.acc)
            return
        rows, cols = z.shape
        if self._scratch is None or self._scratch.shape[1] < cols:
            self._scratch = torch.empty(rows, cols, dtype=torch.float32)
        out = self._scratch[:, :cols]
        old, new, sums = _cpp.sketch_exp_update(z, out, self.labels, v0, self.m, self.s, self.bad)
        part = torch.cat([(out @ r_chunk).to(torch.float64), sums.unsqueeze(1)], 1)
        self.acc.mul_(old.unsqueeze(1)).add_(part.mul_(new.unsqueeze(1)))

    def _torch_update(self, z: torch.Tensor, v0: int) -> None:
        finite = torch.isfinite(z)
        self.bad += (~finite).sum(1)
        zf = torch.where(finite, z, torch.full_like(z, -math.inf)).to(torch.float64)
        m_new = torch.maximum(self.m, zf.max(1).values)
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        ez = torch.exp(zf - safe.unsqueeze(1))
        old = torch.exp(self.m - safe)
        self.s.copy_(self.s * old + ez.sum(1))
        inside = (self.labels >= v0) & (self.labels < v0 + z.shape[1])
        ez[inside.nonzero(as_tuple=True)[0], self.labels[inside] - v0] = 0
        part = torch.cat([ez @ self.r[v0:v0 + z.shape[1]], ez.sum(1, keepdim=True)], 1)
        self.acc.copy_(self.acc * old.unsqueeze(1) + part)
        self.m.copy_(m_new)

    def rows(self) -> torch.Tensor:
        """r_t = (a - c R_y) / s for every row, (rows, k) float64 (call after the last chunk)."""
        r_y = self.r[self.labels].to(torch.float64)
        return (self.acc[:, : self.k] - self.acc[:, self.k:] * r_y) / self.s.unsqueeze(1)


def per_sample_sketch(r_rows: torch.Tensor, rows: torch.Tensor, n_tokens: torch.Tensor, bsz: int,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """S_b = (1/n_b) sum_t r_t h_t^T for the scored rows packed sample after sample (r_rows (N, k), rows (N, d) in
    the order of `keep.nonzero()`): (B, k, d) in out_dtype, accumulated in float64; NaN for a sample with n_b = 0."""
    k, d = r_rows.shape[1], rows.shape[1]
    out = torch.full((bsz, k, d), math.nan, dtype=torch.float64, device=rows.device)
    counts: Sequence[int] = n_tokens.tolist()
    for b, (rb, hb) in enumerate(zip(torch.split(r_rows, counts), torch.split(rows, counts))):
        if counts[b]:
            out[b] = rb.mT @ hb.to(torch.float64) / counts[b]
    return out.to(out_dtype)
