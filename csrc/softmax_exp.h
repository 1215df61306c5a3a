// Shared by the kernels that exponentiate softmax arguments (gram_entropy.cpp, gradient_sketch.cpp): one definition,
// so a fused pass that computes both keeps its logsumexp state bit-identical to the plain one.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"

namespace tgf {

// e^x for the arguments of a softmax after subtracting the row max (x <= ~0), written branch-free so the loops
// below vectorise (glibc's expf is a scalar call there): x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite split of
// ln2), e^r by its degree-7 Taylor polynomial (truncation < 6e-9 relative, under float's 6e-8 rounding), 2^k from
// the exponent bits. x below -87 (e^x under float's normal range) gives 0, which is what it adds to any sum here.
TGF_ALWAYS_INLINE float exp_le0(float x) {
  const float xc = std::max(x, -87.0f);
  const float k = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

inline int threads_for(int64_t work, int nthreads) {
  if (nthreads <= 0) nthreads = max_threads();
  return work < (1 << 16) ? 1 : nthreads;  // below ~64k elements a parallel region costs more than it saves
}

// The largest finite value of a row (-FLT_MAX when there is none) and, added to `nonfinite`, how many values are NaN or
// Inf: the first pass of every online-softmax row update, one vectorised loop.
TGF_ALWAYS_INLINE float finite_row_max(const float* row, int64_t cols, int64_t& nonfinite) {
  const float kMax = std::numeric_limits<float>::max();
  float mx = -kMax;
  int64_t nb = 0;
#pragma omp simd reduction(max : mx) reduction(+ : nb)
  for (int64_t j = 0; j < cols; ++j) {
    float v = row[j];
    bool fin = std::fabs(v) <= kMax;  // false for inf and nan
    mx = fin ? std::max(mx, v) : mx;
    nb += fin ? 0 : 1;
  }
  nonfinite += nb;
  return mx;
}

}  // namespace tgf
