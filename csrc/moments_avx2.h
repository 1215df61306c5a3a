// AVX2 bodies of moments' chunk reduction, for CPUs without AVX-512 (moments_avx512.h has the wider twins):
//  - chunk_f32acc_avx2 (bf16, fp16, fp32): power sums of d = x - c in float32 blocks added into float64 totals,
//    with the same refusals as on AVX-512 (the caller then retries about the chunk mean, or falls back to a float64
//    body). Two sets of 8 lanes per 16 values, added together and flushed every kFlush2 steps: each lane's float32
//    sum takes 7 roundings, as on AVX-512, so the error bound derived in tests/test_moments.py holds.
//    fp32 takes it too on AVX2: about 11 vector operations per 8 values against 21 for the float64 body; on this
//    2-core Zen 3 VM that (with the read-ahead below) moved fp32 from 1.9x one torch.sum to 1.2x (README).
//  - chunk_f64_avx2 (fp32 where the blocks refuse): float64 accumulation without a per-element finiteness test.
// Without them every dtype went through the portable float64 loop: fp32 3-4.6x and bf16 7-11x one torch.sum on the
// 2-core AVX2 machine (4 float64 lanes, a finiteness test, a blend and a count per element).
#pragma once
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"
#include "moments_blocks.h"

#define TGF_HAVE_AVX2_F32_PATH 1

namespace tgf {

// 16-value steps per float32 block: each of the 2 x 8 lanes sums at most 7 terms, and the two sets are added in
// float32 before they are widened (flush_pair): 6 + 6 + 1 roundings in a lane's sum of 14 terms, the 7 of one sum of
// 8 terms, so the bound derived in tests/test_moments.py is unchanged, with half the widenings of flushing each set.
constexpr int kFlush2 = 7;
// Read 1 KB ahead: without it the loads' misses did not overlap the arithmetic (fp32 1.3-1.5x one torch.sum, with
// it 1.1-1.3x; 512 and 2048 bytes measured no better, bench/bench_moments.py). A prefetch never faults, so one
// past the end of the data is harmless.
constexpr int64_t kPrefetchBytes = 1024;

// 8 values at i as float32 (DT 0: fp32, 1: bf16, 2: fp16).
template <int DT>
TGF_TARGET_AVX2 TGF_ALWAYS_INLINE __m256 load8(const void* p, int64_t i) {
  if constexpr (DT == 0) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if constexpr (DT == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

TGF_TARGET_AVX2 TGF_ALWAYS_INLINE __m256d widen_sum(__m256 f) {  // the 8 floats as 4 doubles, pairs added
  return _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(f)), _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
}

TGF_TARGET_AVX2 TGF_ALWAYS_INLINE double hsum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

struct Avx2AccF32 {
  __m256 f1, f2, f3, f4, fl, mn, mx, cf, sign;
  __m256d d1, d2, d3, d4, dl;

  TGF_TARGET_AVX2 explicit Avx2AccF32(float c) {
    cf = _mm256_set1_ps(c);
    sign = _mm256_set1_ps(-0.0f);
    f1 = f2 = f3 = f4 = fl = _mm256_setzero_ps();
    d1 = d2 = d3 = d4 = dl = _mm256_setzero_pd();
    mn = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  }

  TGF_TARGET_AVX2 TGF_ALWAYS_INLINE void step(__m256 x) {
    mn = _mm256_min_ps(mn, x);
    mx = _mm256_max_ps(mx, x);
    fl = _mm256_add_ps(fl, _mm256_andnot_ps(sign, x));
    const __m256 d = _mm256_sub_ps(x, cf);
    const __m256 d2 = _mm256_mul_ps(d, d);
    f1 = _mm256_add_ps(f1, d);
    f2 = _mm256_add_ps(f2, d2);
    f3 = _mm256_fmadd_ps(d2, d, f3);
    f4 = _mm256_fmadd_ps(d2, d2, f4);
  }

  TGF_TARGET_AVX2 TGF_ALWAYS_INLINE static void flush1(__m256& f, __m256d& d) {
    d = _mm256_add_pd(d, widen_sum(f));
    f = _mm256_setzero_ps();
  }

  // b's float32 sums added into a's, then a's widened into its float64 totals; both sets start again from zero
  TGF_TARGET_AVX2 TGF_ALWAYS_INLINE static void flush_pair(Avx2AccF32& a, Avx2AccF32& b) {
    a.f1 = _mm256_add_ps(a.f1, b.f1);
    a.f2 = _mm256_add_ps(a.f2, b.f2);
    a.f3 = _mm256_add_ps(a.f3, b.f3);
    a.f4 = _mm256_add_ps(a.f4, b.f4);
    a.fl = _mm256_add_ps(a.fl, b.fl);
    b.f1 = b.f2 = b.f3 = b.f4 = b.fl = _mm256_setzero_ps();
    flush1(a.f1, a.d1);
    flush1(a.f2, a.d2);
    flush1(a.f3, a.d3);
    flush1(a.f4, a.d4);
    flush1(a.fl, a.dl);
  }
};

// false when the chunk must be rerun; `retry_shift` as for chunk_f32acc (moments_avx512.h)
template <int DT>
TGF_TARGET_AVX2 bool chunk_f32acc_avx2(const void* data, int64_t begin, int64_t len, double c, ChunkSums& out,
                                       double& retry_shift) {
  const float cf = static_cast<float>(c);
  Avx2AccF32 a(cf), b(cf);   // two independent sets: the fma chains of one set alone would bound the loop
  int64_t i = 0;
  while (i + 16 <= len) {
    const int64_t stop = std::min<int64_t>(len - 15, i + 16 * kFlush2);
    for (; i < stop; i += 16) {
      _mm_prefetch(static_cast<const char*>(data) + (begin + i) * (DT == 0 ? 4 : 2) + kPrefetchBytes, _MM_HINT_T0);
      a.step(load8<DT>(data, begin + i));
      b.step(load8<DT>(data, begin + i + 8));
    }
    Avx2AccF32::flush_pair(a, b);
  }
  int64_t pad = 0;
  if (i < len) {   // the last < 16 values, padded with the shift (adds 0 to s1..s4, |c| to l1: taken back below)
    alignas(32) float tail[16];
    const int64_t rem = len - i;
    for (int k = 0; k < 16; ++k) tail[k] = cf;
    for (int64_t k = 0; k < rem; ++k) {
      if constexpr (DT == 0) {
        tail[k] = static_cast<const float*>(data)[begin + i + k];
      } else {
        const uint16_t h = static_cast<const uint16_t*>(data)[begin + i + k];
        tail[k] = DT == 1 ? bf16_to_float(h) : f16_to_float(h);
      }
    }
    a.step(_mm256_load_ps(tail));
    b.step(_mm256_load_ps(tail + 8));
    Avx2AccF32::flush_pair(a, b);
    pad = 16 - rem;
  }
  out.c = cf;
  out.s1 = hsum(a.d1);
  out.s2 = hsum(a.d2);
  out.s3 = hsum(a.d3);
  out.s4 = hsum(a.d4);
  out.l1 = hsum(a.dl) - static_cast<double>(pad) * std::fabs(static_cast<double>(cf));
  out.bad = 0;
  alignas(32) float lo[8], hi[8];
  _mm256_store_ps(lo, _mm256_min_ps(a.mn, b.mn));
  _mm256_store_ps(hi, _mm256_max_ps(a.mx, b.mx));
  out.mn = *std::min_element(lo, lo + 8);
  out.mx = *std::max_element(hi, hi + 8);
  return f32_blocks_vouch(out, len, retry_shift);
}

// float32 inputs: float64 accumulation (the fp32 bound of 1e-10 stays), with no per-element finiteness test: a
// non-finite value makes the L1 total non-finite and the chunk is refused (the caller reruns it with the portable
// loop, which counts and skips them). The portable loop pays a test, a blend and a count per element, 4 lanes wide.
TGF_TARGET_AVX2 bool chunk_f64_avx2(const float* data, int64_t begin, int64_t len, double c, ChunkSums& out) {
  c = static_cast<double>(static_cast<float>(c));
  const __m256d cd = _mm256_set1_pd(c), sign = _mm256_set1_pd(-0.0);
  __m256d s1a = _mm256_setzero_pd(), s1b = s1a, s2a = s1a, s2b = s1a, s3a = s1a, s3b = s1a, s4a = s1a, s4b = s1a,
          l1a = s1a, l1b = s1a;
  __m256 mn = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const float* p = data + begin;
  int64_t i = 0;
  alignas(32) float tail[8];
  while (i < len) {
    __m256 x;
    if (i + 8 <= len) {
      x = _mm256_loadu_ps(p + i);
    } else {   // the last < 8 values, padded with the shift (adds 0 to s1..s4, |c| to l1: taken back below)
      for (int k = 0; k < 8; ++k) tail[k] = i + k < len ? p[i + k] : static_cast<float>(c);
      x = _mm256_load_ps(tail);
    }
    i += 8;
    mn = _mm256_min_ps(mn, x);
    mx = _mm256_max_ps(mx, x);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    l1a = _mm256_add_pd(l1a, _mm256_andnot_pd(sign, lo));
    l1b = _mm256_add_pd(l1b, _mm256_andnot_pd(sign, hi));
    const __m256d da = _mm256_sub_pd(lo, cd), db = _mm256_sub_pd(hi, cd);
    const __m256d da2 = _mm256_mul_pd(da, da), db2 = _mm256_mul_pd(db, db);
    s1a = _mm256_add_pd(s1a, da);
    s1b = _mm256_add_pd(s1b, db);
    s2a = _mm256_add_pd(s2a, da2);
    s2b = _mm256_add_pd(s2b, db2);
    s3a = _mm256_fmadd_pd(da2, da, s3a);
    s3b = _mm256_fmadd_pd(db2, db, s3b);
    s4a = _mm256_fmadd_pd(da2, da2, s4a);
    s4b = _mm256_fmadd_pd(db2, db2, s4b);
  }
  const int64_t pad = (8 - len % 8) % 8;
  out.c = c;
  out.s1 = hsum(_mm256_add_pd(s1a, s1b));
  out.s2 = hsum(_mm256_add_pd(s2a, s2b));
  out.s3 = hsum(_mm256_add_pd(s3a, s3b));
  out.s4 = hsum(_mm256_add_pd(s4a, s4b));
  out.l1 = hsum(_mm256_add_pd(l1a, l1b)) - static_cast<double>(pad) * std::fabs(c);
  out.bad = 0;
  alignas(32) float lo8[8], hi8[8];
  _mm256_store_ps(lo8, mn);
  _mm256_store_ps(hi8, mx);
  out.mn = *std::min_element(lo8, lo8 + 8);
  out.mx = *std::max_element(hi8, hi8 + 8);
  return std::isfinite(out.l1) && out.mn <= out.mx;
}

}  // namespace tgf
#endif
