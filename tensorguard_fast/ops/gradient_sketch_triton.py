"""Triton path of the gradient sketch's per-chunk update (CUDA tensors; Triton's interpreter under TRITON_INTERPRET=1).

The logits chunk z = rows @ W_chunk^T comes from cuBLAS, as for the logsumexp. `_sketch_chunk_kernel` reads it once
and, per row block and column split, keeps the online-softmax state of the split: max m_i, s_i = sum exp(z - m_i),
c_i = the same sum without the row's target column, and a_i = sum_{v != y} exp(z_v - m_i) R_v (k-vector, by tl.dot
on the exponentiated tile, full float32: input_precision="ieee", not TF32). The splits merge into the running float64
state on the device: m' = max(m, m_i), x' = x e^(m - m') + sum_i x_i e^(m_i - m') for x in (s, c, a). The kernel keeps
its own (m, s), so the logsumexp kernel of the error blocks (gram_entropy_triton) is untouched by a sketch request.
Matches `reference.gradient_sketch_from_hidden` through gradient_sketch_accumulator (r_t = (a - c R_y) / s).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a Triton global must be a constexpr
_BLOCK_R = 16  # tl.dot needs >= 16 rows
_BLOCK_C = 64
_COLS_PER_PROGRAM = 2048  # column split: enough programs to fill a GPU even when a batch has few scored rows


@triton.jit
def _sketch_chunk_kernel(z_ptr, z_stride, rows, cols, r_ptr, r_stride, k, label_ptr, v0, part_m_ptr, part_s_ptr,
                         part_c_ptr, part_a_ptr, part_bad_ptr, COLS_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < k
    target = tl.load(label_ptr + r, mask=rmask, other=-1) - v0
    run_m = tl.full([BLOCK_R], -_FLT_MAX, tl.float32)  # finite start: exp(run_m - new) never sees inf - inf
    run_s = tl.zeros([BLOCK_R], tl.float32)
    run_c = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    bad = tl.zeros([BLOCK_R], tl.int32)
    c_start = pid_c * COLS_PER_PROGRAM
    for c0 in range(0, COLS_PER_PROGRAM, BLOCK_C):
        c = c_start + c0 + tl.arange(0, BLOCK_C)
        cmask = c < cols
        msk = rmask[:, None] & cmask[None, :]
        z = tl.load(z_ptr + r[:, None].to(tl.int64) * z_stride + c[None, :], mask=msk, other=0.0).to(tl.float32)
        isfin = tl.abs(z) <= _FLT_MAX  # false for inf and nan
        fin = msk & isfin
        new_m = tl.maximum(run_m, tl.max(tl.where(fin, z, -_FLT_MAX), axis=1))
        zf = tl.where(fin, z, new_m[:, None])  # masked and non-finite entries must not reach exp (overflow)
        ez = tl.where(fin, tl.exp(zf - new_m[:, None]), 0.0)
        alpha = tl.exp(run_m - new_m)
        run_s = run_s * alpha + tl.sum(ez, axis=1)
        ez = tl.where(c[None, :].to(tl.int64) == target[:, None], 0.0, ez)  # e_t's target entry is -c R_y
        run_c = run_c * alpha + tl.sum(ez, axis=1)
        rk = tl.load(r_ptr + c[:, None].to(tl.int64) * r_stride + kk[None, :], mask=cmask[:, None] & kmask[None, :],
                     other=0.0)
        acc = acc * alpha[:, None] + tl.dot(ez, rk, input_precision="ieee")
        run_m = new_m
        bad += tl.sum((msk & (isfin == 0)).to(tl.int32), axis=1)
    out = pid_c * rows + r
    tl.store(part_m_ptr + out, run_m, mask=rmask)
    tl.store(part_s_ptr + out, run_s, mask=rmask)
    tl.store(part_c_ptr + out, run_c, mask=rmask)
    tl.store(part_bad_ptr + out, bad.to(tl.int64), mask=rmask)
    tl.store(part_a_ptr + out[:, None].to(tl.int64) * k + kk[None, :], acc, mask=rmask[:, None] & kmask[None, :])


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))  # tl.dot needs >= 16 columns


def sketch_update(z: torch.Tensor, r: torch.Tensor, labels: torch.Tensor, v0: int, m: torch.Tensor,
                  s: torch.Tensor, bad: torch.Tensor, acc: torch.Tensor) -> None:
    """Fold the float32 logits chunk z (N, C) of vocabulary columns [v0, v0 + C) into the float64 state, in place:
    m, s (N,), bad (N,) int64, acc (N, k + 1) = [a, c]; r (C, k) float32 = R_chunk (rows contiguous)."""
    rows, cols = z.shape
    if rows == 0 or cols == 0:
        return
    k = r.shape[1]
    splits = triton.cdiv(cols, _COLS_PER_PROGRAM)
    part_m = torch.empty(splits, rows, dtype=torch.float32, device=z.device)
    part_s, part_c = torch.empty_like(part_m), torch.empty_like(part_m)
    part_a = torch.empty(splits, rows, k, dtype=torch.float32, device=z.device)
    part_bad = torch.empty(splits, rows, dtype=torch.int64, device=z.device)
    grid = (triton.cdiv(rows, _BLOCK_R), splits)
    _sketch_chunk_kernel[grid](z, z.stride(0), rows, cols, r, r.stride(0), k, labels, v0, part_m, part_s,
                               part_c, part_a, part_bad, COLS_PER_PROGRAM=_COLS_PER_PROGRAM, BLOCK_R=_BLOCK_R,
                               BLOCK_C=_BLOCK_C, BLOCK_K=_block_k(k))
    pm = part_m.to(torch.float64)
    m_new = torch.maximum(m, pm.max(0).values)
    weight = torch.exp(pm - m_new)  # (splits, N): split sums to the new max
    old = torch.exp(m - m_new)
    s.copy_(s * old + (part_s.to(torch.float64) * weight).sum(0))
    acc[:, :k] = acc[:, :k] * old.unsqueeze(1) + (part_a.to(torch.float64) * weight.unsqueeze(2)).sum(0)
    acc[:, k] = acc[:, k] * old + (part_c.to(torch.float64) * weight).sum(0)
    m.copy_(m_new)
    bad += part_bad.sum(0)


# Compiled for sm_90 on the CPU by tests/test_triton_compile.py (the interpreter is more lenient than the compiler).
COMPILE_SPECS = [
    (_sketch_chunk_kernel,
     {"z_ptr": "*fp32", "z_stride": "i64", "rows": "i64", "cols": "i64", "r_ptr": "*fp32", "r_stride": "i64",
      "k": "i64", "label_ptr": "*i64", "v0": "i64", "part_m_ptr": "*fp32", "part_s_ptr": "*fp32",
      "part_c_ptr": "*fp32", "part_a_ptr": "*fp32", "part_bad_ptr": "*i64"},
     {"COLS_PER_PROGRAM": _COLS_PER_PROGRAM, "BLOCK_R": _BLOCK_R, "BLOCK_C": _BLOCK_C, "BLOCK_K": 32}),
]
