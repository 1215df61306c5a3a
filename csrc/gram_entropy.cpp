// gram_entropy: the two elementwise steps around the Gram eigen-solve, fused.
//
// 1. crop_error_rows: E[t, j] = exp(z[t, j] - lse[t]) - [j == y_t] for the cropped logits, in place. The logsumexp
//    comes from the whole vocabulary (computed chunk by chunk by the caller); only the crop is ever written.
// 2. spectrum_entropy: Gram eigenvalues lambda -> singular values s = sqrt(max(lambda, 0)), keep the top q,
//    clamp at 1e-12 (GradSentry's floor), p = s / sum s (or s^2 / sum s^2), H = -sum p ln p / ln q.
#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "common.h"
#include "gram_entropy.h"

namespace tgf {

void crop_error_rows(float* z, int64_t rows, int64_t cols, int64_t row_stride, const float* lse, const int64_t* labels) {
#ifdef TGF_HAVE_OPENMP
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
#endif
  for (int64_t r = 0; r < rows; ++r) {
    float* row = z + r * row_stride;
    const float m = lse[r];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] = std::exp(row[j] - m);
    int64_t y = labels[r];
    if (y >= 0 && y < cols) row[y] -= 1.0f;
  }
}

void spectrum_entropy(const double* evals, int64_t batch, int64_t n, int64_t q, bool squared, double* out) {
  const double floor = 1e-12;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<double> s(evals + b * n, evals + (b + 1) * n);
    for (double& v : s) v = std::sqrt(std::max(v, 0.0));
    std::sort(s.begin(), s.end(), std::greater<double>());
    // Values past the rank of G are exactly zero; GradSentry's top-q always has q of them, floored at 1e-12.
    s.resize(q, 0.0);
    double total = 0;
    for (double& v : s) {
      v = std::max(v, floor);
      if (squared) v = v * v;
      total += v;
    }
    double h = 0;
    for (double v : s) {
      double p = v / total;
      if (p > 0) h -= p * std::log(p);
    }
    out[b] = q > 1 ? h / std::log(static_cast<double>(q)) : 0.0;
  }
}

}  // namespace tgf
