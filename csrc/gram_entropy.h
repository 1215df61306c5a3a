#pragma once
#include <cstdint>

namespace tgf {
// Online logsumexp over one vocabulary chunk of float32 logits (rows x cols, row_stride apart): updates the running
// max m[r] and the running sum s[r] = sum exp(z - m[r]) of each row; bad[r] counts non-finite logits.
void logsumexp_update(const float* z, int64_t rows, int64_t cols, int64_t row_stride, double* m, double* s,
                      int64_t* bad, int nthreads);
// E = exp(z - lse) - onehot(label) over the cropped logits, in place.
void crop_error_rows(float* z, int64_t rows, int64_t cols, int64_t row_stride, const double* lse,
                     const int64_t* labels, int nthreads);
// Rank-revealing (diagonally pivoted) Cholesky of each symmetric PSD n x n matrix: l (zero-filled by the callee)
// gets L with M = L L^T, L a row permutation of a lower-triangular matrix whose columns past rank[b] are zero.
// Stops when every remaining Schur-complement diagonal is <= rel_tol * max_i M_ii.
void pivoted_cholesky(const double* m, int64_t batch, int64_t n, double rel_tol, double* l, int64_t* rank,
                      int nthreads);
// GradSentry entropy of the top q singular values of each row of svals (batch x n); NaN rows give NaN.
void spectrum_entropy(const double* svals, int64_t batch, int64_t n, int64_t q, bool squared, double* out);
}  // namespace tgf
