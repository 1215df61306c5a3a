#pragma once
#include <cstdint>

namespace tgf {
// One vocabulary chunk of the gradient sketch (tensorguard_fast/ops/gradient_sketch_accumulator.py). z: float32 logits
// (rows x cols, z_stride apart) of vocabulary columns [v0, v0 + cols). Per row: the online logsumexp state (m, s, bad)
// exactly as logsumexp_update updates it; out[j] = exp(z_j - float(m_new)) (0 for non-finite z_j and for the row's
// target column labels[r] - v0); c[r] = sum_j out[j]; f_old[r] = exp(m_old - m_new) and f_new[r] =
// exp(float(m_new) - m_new), the factors that bring the running sums and this chunk's (out @ R, c) to the new max.
void sketch_exp_update(const float* z, int64_t rows, int64_t cols, int64_t z_stride, float* out, int64_t out_stride,
                       const int64_t* labels, int64_t v0, double* m, double* s, int64_t* bad, double* f_old,
                       double* f_new, double* c, int nthreads);
// The same step with the product inside the kernel (nothing written per element): acc (rows x (kk + 1) float64,
// contiguous) <- acc * f_old + f_new * [sum_j out[j] r[j, :], c] for r (cols x kk float32, r_stride apart).
void sketch_acc_update(const float* z, int64_t rows, int64_t cols, int64_t z_stride, const float* r, int64_t r_stride,
                       int64_t kk, const int64_t* labels, int64_t v0, double* m, double* s, int64_t* bad, double* acc,
                       int nthreads);
}  // namespace tgf
