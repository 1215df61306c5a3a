// fft_entropy: fused power + entropy accumulation over a tile of a complex spectrum.
//
// For P_k = |X_k|^2 the entropy of p = P / S is  H = ln S - (sum_k P_k ln P_k) / S,  so two running sums
// (S and sum P ln P) give it in one pass; the spectrum is never stored or normalised. Row r of the tile keeps its
// first limit[r] + 1 columns (limit < 0 drops the row): this is how the one-sided half of a four-step spectrum is
// selected without a mask tensor.
#include <algorithm>
#include <cmath>
#include <complex>
#include <limits>
#include <vector>

#include "common.h"
#include "fft_entropy.h"

namespace tgf {
namespace {

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void row_sums(const T* re_im, int64_t len, double& s, double& splnp, int64_t& bad) {
  double a = 0, b = 0, nb = 0;
#pragma omp simd reduction(+ : a, b, nb)
  for (int64_t j = 0; j < len; ++j) {
    double re = re_im[2 * j], im = re_im[2 * j + 1];
    double p = re * re + im * im;
    bool fin = p <= std::numeric_limits<double>::max();
    double pf = fin ? p : 0.0;
    a += pf;
    b += pf > 0 ? pf * std::log(pf) : 0.0;
    nb += fin ? 0.0 : 1.0;
  }
  s += a;
  splnp += b;
  bad += static_cast<int64_t>(nb);
}

template <typename T>
PowerSums run(const T* data, int64_t rows, int64_t cols, int64_t row_stride, const int64_t* limit, int nthreads) {
  std::vector<PowerSums> parts(std::max(1, nthreads));
  int t = static_cast<int>(parts.size());
  if (rows * cols < (1 << 16)) t = 1;
#ifdef TGF_HAVE_OPENMP
#pragma omp parallel for num_threads(t) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    int64_t len = limit ? std::min(cols, limit[r] + 1) : cols;
    if (len <= 0) continue;
#ifdef TGF_HAVE_OPENMP
    int tid = omp_get_thread_num();
#else
    int tid = 0;
#endif
    PowerSums& p = parts[tid];
    row_sums<T>(data + 2 * r * row_stride, len, p.s, p.splnp, p.nonfinite);
  }
  PowerSums out;
  for (auto& p : parts) { out.s += p.s; out.splnp += p.splnp; out.nonfinite += p.nonfinite; }
  return out;
}

}  // namespace

PowerSums fft_power_entropy(const void* data, bool is_double, int64_t rows, int64_t cols, int64_t row_stride,
                            const int64_t* limit, int nthreads) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("fft_power_entropy: negative size");
  if (nthreads <= 0) nthreads = max_threads();
  if (is_double) return run(static_cast<const double*>(data), rows, cols, row_stride, limit, nthreads);
  return run(static_cast<const float*>(data), rows, cols, row_stride, limit, nthreads);
}

}  // namespace tgf
