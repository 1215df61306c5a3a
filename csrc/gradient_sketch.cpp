// gradient_sketch: the elementwise part of one vocabulary chunk of the sketch r_t = R^T e_t, fused with the online
// logsumexp (one read of the chunk, one exp per logit). The (rows x chunk) x (chunk x (k+1)) product either follows in
// torch (sketch_exp_update writes the exponentials) or runs here (sketch_acc_update); bench/bench_gradient_sketch.py
// measures both and ops/gradient_sketch_accumulator.py uses the in-kernel product (less CPU time on the SmolLM2 head,
// the same on a 7B head, and no exponentials written and read back).
//
// The max / exp / sum loops are those of gram_entropy.cpp's lse_row, statement for statement, with the same exp, so
// (m, s) are bit-identical to logsumexp_update's and the error blocks E of a fused pass equal those of a plain pass
// (tests/test_gradient_sketch.py checks it).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "gradient_sketch.h"
#include "softmax_exp.h"

namespace tgf {

namespace {
// One row: logsumexp state update, exponentials to out (target column zeroed after the sum), the two factors, and
// c = the sum of out without the target (its own loop, so the loop that forms s stays lse_row's).
TGF_ALWAYS_INLINE void exp_row(const float* row, int64_t cols, float* out, int64_t target, double& m, double& s,
                               int64_t& bad, double& f_old, double& f_new, double& c) {
  const float kMax = std::numeric_limits<float>::max();
  int64_t nb = 0;
  const float mx = finite_row_max(row, cols, nb);
  const double m_new = std::max(m, static_cast<double>(mx));
  const float mf = static_cast<float>(m_new);
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < cols; ++j) {
    float v = row[j];
    bool fin = std::fabs(v) <= kMax;
    const float e = fin ? exp_le0(v - mf) : 0.0f;
    out[j] = e;
    acc += static_cast<double>(e);
  }
  f_new = std::exp(static_cast<double>(mf) - m_new);  // the sub-ulp part of m_new that (v - mf) dropped
  f_old = std::exp(m - m_new);
  acc *= f_new;
  s = s * f_old + acc;
  m = m_new;
  bad += nb;
  if (target >= 0 && target < cols) out[target] = 0.0f;  // e_t's target entry is handled as -c R_y (accumulator)
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < cols; ++j) sum += static_cast<double>(out[j]);
  c = sum;
}

using ExpRow = void (*)(const float*, int64_t, float*, int64_t, double&, double&, int64_t&, double&, double&,
                        double&);
TGF_TARGET_AVX512 void exp_row_avx512(const float* z, int64_t n, float* o, int64_t t, double& m, double& s,
                                      int64_t& b, double& fo, double& fn, double& c) {
  exp_row(z, n, o, t, m, s, b, fo, fn, c);
}
TGF_TARGET_AVX2 void exp_row_avx2(const float* z, int64_t n, float* o, int64_t t, double& m, double& s, int64_t& b,
                                  double& fo, double& fn, double& c) { exp_row(z, n, o, t, m, s, b, fo, fn, c); }
void exp_row_default(const float* z, int64_t n, float* o, int64_t t, double& m, double& s, int64_t& b, double& fo,
                     double& fn, double& c) { exp_row(z, n, o, t, m, s, b, fo, fn, c); }

// sum_j e[i][j] r[j, :kk] for a block of up to kRows rows at once: each row of r is loaded once per block (8 rows x
// 32 columns = 16 AVX-512 accumulators). KK > 0: the width known at compile time (the default k = 32).
constexpr int kRows = 8;
template <int KK>
TGF_ALWAYS_INLINE void block_product_t(const float* const* e, int nrows, int64_t cols, const float* r,
                                       int64_t r_stride, int64_t kk_rt, float* out /* nrows x kk */) {
  const int64_t kk = KK > 0 ? KK : kk_rt;
  std::fill(out, out + nrows * kk, 0.0f);
  for (int64_t j = 0; j < cols; ++j) {
    const float* rj = r + j * r_stride;
    for (int i = 0; i < nrows; ++i) {
      const float ej = e[i][j];
      float* oi = out + i * kk;
#pragma omp simd
      for (int64_t c = 0; c < kk; ++c) oi[c] += ej * rj[c];
    }
  }
}

TGF_ALWAYS_INLINE void block_product(const float* const* e, int nrows, int64_t cols, const float* r, int64_t r_stride,
                                     int64_t kk, float* out) {
  if (kk == 32 && nrows == kRows) return block_product_t<32>(e, kRows, cols, r, r_stride, kk, out);
  block_product_t<0>(e, nrows, cols, r, r_stride, kk, out);
}

using BlockProduct = void (*)(const float* const*, int, int64_t, const float*, int64_t, int64_t, float*);
TGF_TARGET_AVX512 void block_product_avx512(const float* const* e, int n, int64_t c, const float* r, int64_t rs,
                                            int64_t kk, float* o) { block_product(e, n, c, r, rs, kk, o); }
TGF_TARGET_AVX2 void block_product_avx2(const float* const* e, int n, int64_t c, const float* r, int64_t rs,
                                        int64_t kk, float* o) { block_product(e, n, c, r, rs, kk, o); }
void block_product_default(const float* const* e, int n, int64_t c, const float* r, int64_t rs, int64_t kk,
                           float* o) { block_product(e, n, c, r, rs, kk, o); }
}  // namespace

void sketch_exp_update(const float* z, int64_t rows, int64_t cols, int64_t z_stride, float* out, int64_t out_stride,
                       const int64_t* labels, int64_t v0, double* m, double* s, int64_t* bad, double* f_old,
                       double* f_new, double* c, int nthreads) {
  const ExpRow f = pick_isa<ExpRow>(exp_row_avx512, exp_row_avx2, exp_row_default);
  const int t = threads_for(rows * cols, nthreads);
#ifdef TGF_HAVE_OPENMP
#pragma omp parallel for num_threads(t) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r)
    f(z + r * z_stride, cols, out + r * out_stride, labels[r] - v0, m[r], s[r], bad[r], f_old[r], f_new[r], c[r]);
}

void sketch_acc_update(const float* z, int64_t rows, int64_t cols, int64_t z_stride, const float* r, int64_t r_stride,
                       int64_t kk, const int64_t* labels, int64_t v0, double* m, double* s, int64_t* bad, double* acc,
                       int nthreads) {
  const ExpRow f = pick_isa<ExpRow>(exp_row_avx512, exp_row_avx2, exp_row_default);
  const BlockProduct prod = pick_isa<BlockProduct>(block_product_avx512, block_product_avx2, block_product_default);
  const int64_t blocks = (rows + kRows - 1) / kRows;
  const int t = threads_for(rows * cols * (kk + 1), nthreads);
#ifdef TGF_HAVE_OPENMP
#pragma omp parallel num_threads(t)
#endif
  {
    std::vector<float> ebuf(static_cast<size_t>(kRows) * cols), part(static_cast<size_t>(kRows) * kk);
    const float* e[kRows];
    double fo[kRows], fn[kRows], cs[kRows];
#ifdef TGF_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t bk = 0; bk < blocks; ++bk) {
      const int64_t r0 = bk * kRows;
      const int n = static_cast<int>(std::min<int64_t>(kRows, rows - r0));
      for (int i = 0; i < n; ++i) {
        const int64_t row = r0 + i;
        float* ei = ebuf.data() + i * cols;
        f(z + row * z_stride, cols, ei, labels[row] - v0, m[row], s[row], bad[row], fo[i], fn[i], cs[i]);
        e[i] = ei;
      }
      prod(e, n, cols, r, r_stride, kk, part.data());
      for (int i = 0; i < n; ++i) {
        double* a = acc + (r0 + i) * (kk + 1);
        for (int64_t c = 0; c < kk; ++c) a[c] = a[c] * fo[i] + static_cast<double>(part[i * kk + c]) * fn[i];
        a[kk] = a[kk] * fo[i] + cs[i] * fn[i];
      }
    }
  }
}

}  // namespace tgf
