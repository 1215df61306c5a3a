// gram_entropy: the elementwise steps around the Gram eigen-solve, fused (the GEMMs and eigh stay in torch).
//
// 1. logsumexp_update: the full-vocabulary softmax normaliser, one vocabulary chunk at a time (online logsumexp:
//    m' = max(m, max_j z_j), s' = s e^(m - m') + sum_j e^(z_j - m')), so the B x T x V logits never exist.
// 2. crop_error_rows: E[t, j] = exp(z[t, j] - lse[t]) - [j == y_t] over the cropped logits, in place.
// 3. pivoted_cholesky: a factor L of each T x T Gram (K = E E^T, M = H H^T) that reveals its rank, so singular
//    Grams (T > rank, repeated or zero rows) need no jitter and contribute exact zero columns. Single-threaded per
//    matrix (T is small; MKL's threaded LAPACK on tiny matrices was 100x slower under load), OpenMP over the batch.
// 4. spectrum_entropy: singular values -> top q (zero-padded) -> clamp at 1e-12 (GradSentry's floor) ->
//    p = s / sum s (or s^2 / sum s^2) -> H = -sum p ln p / ln q.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "common.h"
#include "gram_entropy.h"
#include "softmax_exp.h"

namespace tgf {

namespace {
// One row of logsumexp_update / crop_error_rows. Inlined into one build per instruction set (below); the kernels
// pick the build once per call (common.h: isa_level, TGF_NO_AVX512).
TGF_ALWAYS_INLINE void lse_row(const float* row, int64_t cols, double& m, double& s, int64_t& bad) {
  const float kMax = std::numeric_limits<float>::max();
  int64_t nb = 0;
  const float mx = finite_row_max(row, cols, nb);
  const double m_new = std::max(m, static_cast<double>(mx));
  const float mf = static_cast<float>(m_new);
  // exp in float on (z - m) <= 0: relative error ~2e-7 per term; the sum is carried in double.
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < cols; ++j) {
    float v = row[j];
    bool fin = std::fabs(v) <= kMax;
    acc += fin ? static_cast<double>(exp_le0(v - mf)) : 0.0;
  }
  // (v - mf) in float drops the sub-ulp part of m_new; correct the sum by exp(mf - m_new) so lse stays exact.
  acc *= std::exp(static_cast<double>(mf) - m_new);
  s = s * std::exp(m - m_new) + acc;
  m = m_new;
  bad += nb;
}

TGF_ALWAYS_INLINE void error_row(float* row, int64_t cols, double lse) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) row[j] = exp_le0(static_cast<float>(static_cast<double>(row[j]) - lse));
}

using LseRow = void (*)(const float*, int64_t, double&, double&, int64_t&);
using ErrorRow = void (*)(float*, int64_t, double);
TGF_TARGET_AVX512 void lse_row_avx512(const float* r, int64_t c, double& m, double& s, int64_t& b) { lse_row(r, c, m, s, b); }
TGF_TARGET_AVX2 void lse_row_avx2(const float* r, int64_t c, double& m, double& s, int64_t& b) { lse_row(r, c, m, s, b); }
void lse_row_default(const float* r, int64_t c, double& m, double& s, int64_t& b) { lse_row(r, c, m, s, b); }
TGF_TARGET_AVX512 void error_row_avx512(float* r, int64_t c, double l) { error_row(r, c, l); }
TGF_TARGET_AVX2 void error_row_avx2(float* r, int64_t c, double l) { error_row(r, c, l); }
void error_row_default(float* r, int64_t c, double l) { error_row(r, c, l); }
}  // namespace

void logsumexp_update(const float* z, int64_t rows, int64_t cols, int64_t row_stride, double* m, double* s,
                      int64_t* bad, int nthreads) {
  const LseRow f = pick_isa<LseRow>(lse_row_avx512, lse_row_avx2, lse_row_default);
  const int t = threads_for(rows * cols, nthreads);
#ifdef TGF_HAVE_OPENMP
#pragma omp parallel for num_threads(t) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) f(z + r * row_stride, cols, m[r], s[r], bad[r]);
}

void crop_error_rows(float* z, int64_t rows, int64_t cols, int64_t row_stride, const double* lse,
                     const int64_t* labels, int nthreads) {
  const ErrorRow f = pick_isa<ErrorRow>(error_row_avx512, error_row_avx2, error_row_default);
  const int t = threads_for(rows * cols, nthreads);
#ifdef TGF_HAVE_OPENMP
#pragma omp parallel for num_threads(t) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    float* row = z + r * row_stride;
    f(row, cols, lse[r]);
    const int64_t y = labels[r];
    if (y >= 0 && y < cols) row[y] -= 1.0f;  // the target's column is outside the crop for most tokens
  }
}

void pivoted_cholesky(const double* m, int64_t batch, int64_t n, double rel_tol, double* l, int64_t* rank,
                      int nthreads) {
  const int t = threads_for(batch * n * n * n, nthreads);
#ifdef TGF_HAVE_OPENMP
#pragma omp parallel for num_threads(t) schedule(dynamic, 1)
#endif
  for (int64_t b = 0; b < batch; ++b) {
    const double* a = m + b * n * n;
    double* L = l + b * n * n;
    std::fill(L, L + n * n, 0.0);
    std::vector<double> d(n);
    std::vector<char> used(n, 0);
    double dmax = 0;
    for (int64_t i = 0; i < n; ++i) {
      d[i] = a[i * n + i];
      dmax = std::max(dmax, d[i]);
    }
    const double tol = rel_tol * dmax;
    int64_t k = 0;
    for (; k < n; ++k) {
      int64_t p = -1;
      double best = tol;
      for (int64_t i = 0; i < n; ++i)
        if (!used[i] && d[i] > best) { best = d[i]; p = i; }
      if (p < 0) break;  // the rest of the Gram is rounding noise: rank k
      used[p] = 1;
      const double lpk = std::sqrt(d[p]);
      const double* lp = L + p * n;
      L[p * n + k] = lpk;
      for (int64_t i = 0; i < n; ++i) {
        if (used[i]) continue;
        const double* li = L + i * n;
        double s = a[i * n + p];
        for (int64_t j = 0; j < k; ++j) s -= li[j] * lp[j];
        const double v = s / lpk;
        L[i * n + k] = v;
        d[i] -= v * v;
      }
    }
    rank[b] = k;
  }
}

void spectrum_entropy(const double* svals, int64_t batch, int64_t n, int64_t q, bool squared, double* out) {
  const double floor = 1e-12;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> s;
  for (int64_t b = 0; b < batch; ++b) {
    const double* row = svals + b * n;
    s.assign(row, row + n);
    if (std::any_of(s.begin(), s.end(), [](double v) { return std::isnan(v); })) {
      out[b] = nan;  // a sample without a gradient (no scored token) stays flagged, never scored
      continue;
    }
    const int64_t k = std::min(n, q);
    std::partial_sort(s.begin(), s.begin() + k, s.end(), std::greater<double>());
    // Values past the rank of G are zero; GradSentry's top-q always has q of them, floored at 1e-12.
    s.resize(q);
    std::fill(s.begin() + k, s.end(), 0.0);
    double total = 0;
    for (double& v : s) {
      v = std::max(v, floor);
      if (squared) v = v * v;
      total += v;
    }
    double h = 0;
    for (double v : s) {
      const double p = v / total;
      if (p > 0) h -= p * std::log(p);
    }
    out[b] = h / std::log(static_cast<double>(q));
  }
}

}  // namespace tgf
