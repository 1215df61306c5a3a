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

// Power and entropy sums of one row; inlined into one build per instruction set, picked per call (common.h).
template <typename T>
TGF_ALWAYS_INLINE void row_sums(const T* re_im, int64_t len, double& s, double& splnp, int64_t& bad) {
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
using RowSums = void (*)(const T*, int64_t, double&, double&, int64_t&);
template <typename T>
TGF_TARGET_AVX512 void row_sums_avx512(const T* x, int64_t n, double& s, double& p, int64_t& b) { row_sums(x, n, s, p, b); }
template <typename T>
TGF_TARGET_AVX2 void row_sums_avx2(const T* x, int64_t n, double& s, double& p, int64_t& b) { row_sums(x, n, s, p, b); }
template <typename T>
void row_sums_default(const T* x, int64_t n, double& s, double& p, int64_t& b) { row_sums(x, n, s, p, b); }

template <typename T>
PowerSums run(const T* data, int64_t rows, int64_t cols, int64_t row_stride, const int64_t* limit, int nthreads) {
  const RowSums<T> f = pick_isa<RowSums<T>>(row_sums_avx512<T>, row_sums_avx2<T>, row_sums_default<T>);
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
    f(data + 2 * r * row_stride, len, p.s, p.splnp, p.nonfinite);
  }
  PowerSums out;
  for (auto& p : parts) { out.s += p.s; out.splnp += p.splnp; out.nonfinite += p.nonfinite; }
  return out;
}

template <typename T>
void twiddle_rows(const T* zri, int64_t batch, int64_t rows, int64_t cols, int64_t k1_0, int64_t n, T* out,
                  int nthreads) {
  const double two_pi = 6.283185307179586476925286766559;
  // The twiddle of row k1 advances by the fixed step w_N^k1 per column: a complex recurrence in double, restarted
  // from an exact sin/cos every kRestart columns so its rounding (~1e-16 per step) never exceeds ~1e-14.
  constexpr int64_t kRestart = 64;
  int t = std::max(1, nthreads);
  if (batch * rows * cols < (1 << 15)) t = 1;
#ifdef TGF_HAVE_OPENMP
#pragma omp parallel for num_threads(t) schedule(static) collapse(2)
#endif
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t k1 = k1_0 + j;
      const T* zr = zri + (b * rows + j) * 2 * cols;
      const T* zi = zr + cols;
      T* o = out + (b * rows + j) * 2 * cols;
      const double step = -two_pi * static_cast<double>(k1 % n) / static_cast<double>(n);
      const double sr = std::cos(step), si = std::sin(step);
      for (int64_t c0 = 0; c0 < cols; c0 += kRestart) {
        // exact phase of column c0: (k1 * c0) mod N in integers first
        const double ang = -two_pi * static_cast<double>((k1 % n) * c0 % n) / static_cast<double>(n);
        double wr = std::cos(ang), wi = std::sin(ang);
        const int64_t c1 = std::min(cols, c0 + kRestart);
        for (int64_t c = c0; c < c1; ++c) {
          const double a = zr[c], bb = zi[c];
          o[2 * c] = static_cast<T>(a * wr - bb * wi);
          o[2 * c + 1] = static_cast<T>(a * wi + bb * wr);
          const double nr = wr * sr - wi * si;
          wi = wr * si + wi * sr;
          wr = nr;
        }
      }
    }
  }
}

}  // namespace

void twiddle_interleave(const void* zri, bool is_double, int64_t batch, int64_t rows, int64_t cols, int64_t k1_0,
                        int64_t n, void* out, int nthreads) {
  if (batch < 0 || rows < 0 || cols < 0 || n <= 0 || k1_0 < 0) throw std::invalid_argument("twiddle_interleave: bad size");
  if (nthreads <= 0) nthreads = max_threads();
  if (is_double)
    twiddle_rows(static_cast<const double*>(zri), batch, rows, cols, k1_0, n, static_cast<double*>(out), nthreads);
  else
    twiddle_rows(static_cast<const float*>(zri), batch, rows, cols, k1_0, n, static_cast<float*>(out), nthreads);
}

PowerSums fft_power_entropy(const void* data, bool is_double, int64_t rows, int64_t cols, int64_t row_stride,
                            const int64_t* limit, int nthreads) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("fft_power_entropy: negative size");
  if (nthreads <= 0) nthreads = max_threads();
  if (is_double) return run(static_cast<const double*>(data), rows, cols, row_stride, limit, nthreads);
  return run(static_cast<const float*>(data), rows, cols, row_stride, limit, nthreads);
}

}  // namespace tgf
