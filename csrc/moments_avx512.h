// AVX-512 body of moments' chunk reduction for fp32 / bf16 / fp16 inputs (see reduce_chunk in moments.cpp for the
// algorithm). Written with intrinsics because GCC's vectorisation of the portable loop spills its eleven
// accumulators to the stack and converts bf16/fp16 poorly. Compiled with a target attribute, chosen at run time.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#define TGF_HAVE_AVX512_PATH 1

namespace tgf {

struct ChunkSums {
  double c;  // the shift actually used: rounded to float, so the blend of a non-finite lane is exact
  double s1, s2, s3, s4, l1, bad, mn, mx;
};

template <int DT>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c"))) inline __m512 load16(const void* p, int64_t i) {
  if constexpr (DT == 0) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
  if constexpr (DT == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

#define TGF_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c")))

// Accumulators of one chunk: two sets (low and high 8 lanes of each 16-float load) for instruction-level parallelism.
struct Avx512Acc {
  __m512d s1a, s1b, s2a, s2b, s3a, s3b, s4a, s4b, l1a, l1b, cd;
  __m512 mn, mx, cf, fmax;
  int64_t bad;

  TGF_AVX512 explicit Avx512Acc(double c) {
    cd = _mm512_set1_pd(c);
    cf = _mm512_set1_ps(static_cast<float>(c));
    fmax = _mm512_set1_ps(std::numeric_limits<float>::max());
    s1a = s1b = s2a = s2b = s3a = s3b = s4a = s4b = l1a = l1b = _mm512_setzero_pd();
    mn = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    bad = 0;
  }

  TGF_AVX512 inline __attribute__((always_inline)) void step(__m512 x, __mmask16 valid) {
    // finite: |x| <= FLT_MAX (false for inf and nan); others become the shift, which adds 0 to s1..s4.
    __mmask16 fin = _mm512_mask_cmp_ps_mask(valid, _mm512_abs_ps(x), fmax, _CMP_LE_OQ);
    bad += __builtin_popcount(static_cast<unsigned>(valid & ~fin));
    __m512 xs = _mm512_mask_blend_ps(fin, cf, x);
    mn = _mm512_min_ps(mn, xs);
    mx = _mm512_max_ps(mx, xs);
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(xs));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(xs), 1)));
    l1a = _mm512_add_pd(l1a, _mm512_abs_pd(lo));
    l1b = _mm512_add_pd(l1b, _mm512_abs_pd(hi));
    __m512d da = _mm512_sub_pd(lo, cd), db = _mm512_sub_pd(hi, cd);
    __m512d da2 = _mm512_mul_pd(da, da), db2 = _mm512_mul_pd(db, db);
    s1a = _mm512_add_pd(s1a, da);
    s1b = _mm512_add_pd(s1b, db);
    s2a = _mm512_add_pd(s2a, da2);
    s2b = _mm512_add_pd(s2b, db2);
    s3a = _mm512_fmadd_pd(da2, da, s3a);
    s3b = _mm512_fmadd_pd(db2, db, s3b);
    s4a = _mm512_fmadd_pd(da2, da2, s4a);
    s4b = _mm512_fmadd_pd(db2, db2, s4b);
  }
};

template <int DT>
TGF_AVX512 ChunkSums chunk_avx512(const void* data, int64_t begin, int64_t len, double c) {
  c = static_cast<double>(static_cast<float>(c));
  Avx512Acc acc(c);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) acc.step(load16<DT>(data, begin + i), 0xFFFF);
  double pad = 0;
  if (i < len) {
    // Tail: pad with the shift (adds nothing to s1..s4) and mask the padding out of the finite count.
    alignas(64) float tail[16];
    for (int j = 0; j < 16; ++j) tail[j] = static_cast<float>(c);
    for (int64_t j = 0; i + j < len; ++j) {
      if constexpr (DT == 0) {
        tail[j] = static_cast<const float*>(data)[begin + i + j];
      } else if constexpr (DT == 1) {
        uint32_t b = uint32_t(static_cast<const uint16_t*>(data)[begin + i + j]) << 16;
        std::memcpy(&tail[j], &b, 4);
      } else {
        tail[j] = _cvtsh_ss(static_cast<const uint16_t*>(data)[begin + i + j]);
      }
    }
    pad = static_cast<double>(16 - (len - i));
    acc.step(_mm512_load_ps(tail), static_cast<__mmask16>((1u << (len - i)) - 1u));
  }
  ChunkSums out;
  out.c = c;
  out.s1 = _mm512_reduce_add_pd(_mm512_add_pd(acc.s1a, acc.s1b));
  out.s2 = _mm512_reduce_add_pd(_mm512_add_pd(acc.s2a, acc.s2b));
  out.s3 = _mm512_reduce_add_pd(_mm512_add_pd(acc.s3a, acc.s3b));
  out.s4 = _mm512_reduce_add_pd(_mm512_add_pd(acc.s4a, acc.s4b));
  out.l1 = _mm512_reduce_add_pd(_mm512_add_pd(acc.l1a, acc.l1b)) - pad * std::fabs(c);
  out.bad = static_cast<double>(acc.bad);
  out.mn = _mm512_reduce_min_ps(acc.mn);
  out.mx = _mm512_reduce_max_ps(acc.mx);
  return out;
}

}  // namespace tgf
#endif
