// AVX-512 bodies of moments' chunk reduction for fp32 / bf16 / fp16 inputs (see reduce_chunk in moments.cpp for the
// algorithm and docs/methods.md, "One-pass moments", for the error bounds). Written with intrinsics because GCC's
// vectorisation of the portable loop spills its eleven accumulators to the stack and converts bf16/fp16 poorly.
// Compiled with a target attribute, chosen at run time (common.h: isa_level).
//
// Three chunk bodies, fastest first; each fast one reports when it cannot vouch for its result and the caller then
// reruns the chunk (4096 values, still in L1/L2) with the next:
//  - chunk_f32acc (fp32, bf16, fp16): power sums of d = x - c accumulated in float32 by four sets of 16 lanes for
//    kSetSteps steps (384 values), then added into float64 totals. Refused when the chunk holds a non-finite value,
//    when its largest |d| leaves [2^-28, 2^28] (d^4 would under/overflow float32), or when the chunk mean is farther
//    than half a chunk standard deviation from the shift c (the central sums would cancel); the caller retries with
//    c = chunk mean.
//  - chunk_f64 (the fallback of the above): float64 accumulation, no per-element finiteness test: a non-finite
//    value makes the L1 total non-finite, and the chunk is refused.
//  - chunk_exact: float64 accumulation with a per-element mask: non-finite values are counted and skipped.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"
#include "moments_blocks.h"

#define TGF_HAVE_AVX512_PATH 1

namespace tgf {

template <int DT>
TGF_TARGET_AVX512 TGF_ALWAYS_INLINE __m512 load16(const void* p, int64_t i) {
  if constexpr (DT == 0) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
  if constexpr (DT == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// 32 values at i as two sets of 16 floats, in any order (the sums, min and max do not depend on it). bf16 takes one
// 512-bit load: a bf16 is the high half of a float32, so the odd values are the 32-bit lanes with the low half
// cleared and the even ones the lanes shifted up 16 bits: two operations per 32 values, against four for two
// widening loads.
template <int DT>
TGF_TARGET_AVX512 TGF_ALWAYS_INLINE void load32(const void* p, int64_t i, __m512& x0, __m512& x1) {
  if constexpr (DT == 1) {
    const __m512i v = _mm512_loadu_si512(static_cast<const uint16_t*>(p) + i);
    x0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    x1 = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else {
    x0 = load16<DT>(p, i);
    x1 = load16<DT>(p, i + 16);
  }
}

// The rem < 16 values at i, the shift c in the other lanes (masked loads never touch memory past the end).
template <int DT>
TGF_TARGET_AVX512 TGF_ALWAYS_INLINE __m512 load_tail(const void* p, int64_t i, int64_t rem, __m512 cf) {
  const __mmask16 m = static_cast<__mmask16>((1u << rem) - 1u);
  if constexpr (DT == 0) return _mm512_mask_loadu_ps(cf, m, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
  __m512 x;
  if constexpr (DT == 1) {
    x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    x = _mm512_cvtph_ps(h);
  }
  return _mm512_mask_blend_ps(m, cf, x);
}

TGF_TARGET_AVX512 TGF_ALWAYS_INLINE __m512d lo8(__m512 x) { return _mm512_cvtps_pd(_mm512_castps512_ps256(x)); }
TGF_TARGET_AVX512 TGF_ALWAYS_INLINE __m512d hi8(__m512 x) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}

// --- chunk_exact: float64, per-element finiteness mask ------------------------------------------------------------

// Accumulators of one chunk: two sets (low and high 8 lanes of each 16-float load) for instruction-level parallelism.
struct Avx512Acc {
  __m512d s1a, s1b, s2a, s2b, s3a, s3b, s4a, s4b, l1a, l1b, cd;
  __m512 mn, mx, cf, fmax;
  int64_t bad;

  TGF_TARGET_AVX512 explicit Avx512Acc(double c) {
    cd = _mm512_set1_pd(c);
    cf = _mm512_set1_ps(static_cast<float>(c));
    fmax = _mm512_set1_ps(std::numeric_limits<float>::max());
    s1a = s1b = s2a = s2b = s3a = s3b = s4a = s4b = l1a = l1b = _mm512_setzero_pd();
    mn = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    bad = 0;
  }

  // masked: non-finite lanes (and lanes outside `valid`) become the shift, which adds 0 to s1..s4
  template <bool kMasked>
  TGF_TARGET_AVX512 TGF_ALWAYS_INLINE void step(__m512 x, __mmask16 valid) {
    __m512 xs = x;
    if constexpr (kMasked) {
      // finite: |x| <= FLT_MAX (false for inf and nan)
      __mmask16 fin = _mm512_mask_cmp_ps_mask(valid, _mm512_abs_ps(x), fmax, _CMP_LE_OQ);
      bad += __builtin_popcount(static_cast<unsigned>(valid & ~fin));
      xs = _mm512_mask_blend_ps(fin, cf, x);
    }
    mn = _mm512_min_ps(mn, xs);
    mx = _mm512_max_ps(mx, xs);
    __m512d lo = lo8(xs), hi = hi8(xs);
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

  TGF_TARGET_AVX512 ChunkSums finish(double c, double pad) const {
    ChunkSums out;
    out.c = c;
    out.s1 = _mm512_reduce_add_pd(_mm512_add_pd(s1a, s1b));
    out.s2 = _mm512_reduce_add_pd(_mm512_add_pd(s2a, s2b));
    out.s3 = _mm512_reduce_add_pd(_mm512_add_pd(s3a, s3b));
    out.s4 = _mm512_reduce_add_pd(_mm512_add_pd(s4a, s4b));
    out.l1 = _mm512_reduce_add_pd(_mm512_add_pd(l1a, l1b)) - pad * std::fabs(c);
    out.bad = static_cast<double>(bad);
    out.mn = _mm512_reduce_min_ps(mn);
    out.mx = _mm512_reduce_max_ps(mx);
    return out;
  }
};

template <int DT, bool kMasked>
TGF_TARGET_AVX512 ChunkSums chunk_f64_body(const void* data, int64_t begin, int64_t len, double c) {
  c = static_cast<double>(static_cast<float>(c));
  Avx512Acc acc(c);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) acc.step<kMasked>(load16<DT>(data, begin + i), 0xFFFF);
  double pad = 0;
  if (i < len) {
    // Tail: pad with the shift (adds nothing to s1..s4) and mask the padding out of the finite count.
    pad = static_cast<double>(16 - (len - i));
    acc.step<true>(load_tail<DT>(data, begin + i, len - i, acc.cf), static_cast<__mmask16>((1u << (len - i)) - 1u));
  }
  return acc.finish(c, pad);
}

template <int DT>
TGF_TARGET_AVX512 ChunkSums chunk_exact(const void* data, int64_t begin, int64_t len, double c) {
  return chunk_f64_body<DT, true>(data, begin, len, c);
}

// false when the chunk holds a non-finite value (the caller reruns it with chunk_exact)
template <int DT>
TGF_TARGET_AVX512 bool chunk_f64(const void* data, int64_t begin, int64_t len, double c, ChunkSums& out) {
  out = chunk_f64_body<DT, false>(data, begin, len, c);
  return out.bad == 0 && std::isfinite(out.l1);
}

// --- chunk_f32acc: float32 blocks of kSets x kSetSteps x 16 values, float64 totals --------------------------------

// Four sets of float32 sums, each summing kSetSteps terms per lane, added pairwise ((0 + 1) + (2 + 3)) before they
// are widened: 5 + 2 roundings in a lane's block sum, the 7 of the bound derived in tests/test_moments.py. Four sets,
// not two: widening into float64 every 14 steps cost ~25% of the loop (measured by skipping it); every 24 steps took
// bf16 from 6.7 to 7.2 G values/s on one Zen 4 core.
constexpr int kSets = 4;
constexpr int kSetSteps = 6;

struct F32Set {
  __m512 f1, f2, f3, f4, fl;

  TGF_TARGET_AVX512 TGF_ALWAYS_INLINE void zero() { f1 = f2 = f3 = f4 = fl = _mm512_setzero_ps(); }

  // f1 and f2 as fmas (d * 1, d * d): the same roundings as adds, on the multiply pipes, which the adds' pipes were
  // short of (bf16 5.9 -> 6.7 G values/s on one Zen 4 core)
  TGF_TARGET_AVX512 TGF_ALWAYS_INLINE void step(__m512 x, __m512 cf, __m512 one) {
    fl = _mm512_add_ps(fl, _mm512_abs_ps(x));
    const __m512 d = _mm512_sub_ps(x, cf);
    const __m512 d2 = _mm512_mul_ps(d, d);
    f1 = _mm512_fmadd_ps(d, one, f1);
    f2 = _mm512_fmadd_ps(d, d, f2);
    f3 = _mm512_fmadd_ps(d2, d, f3);
    f4 = _mm512_fmadd_ps(d2, d2, f4);
  }

  TGF_TARGET_AVX512 TGF_ALWAYS_INLINE void add(const F32Set& o) {
    f1 = _mm512_add_ps(f1, o.f1);
    f2 = _mm512_add_ps(f2, o.f2);
    f3 = _mm512_add_ps(f3, o.f3);
    f4 = _mm512_add_ps(f4, o.f4);
    fl = _mm512_add_ps(fl, o.fl);
  }
};

struct F64Totals {
  __m512d d1, d2, d3, d4, dl;

  TGF_TARGET_AVX512 TGF_ALWAYS_INLINE void zero() { d1 = d2 = d3 = d4 = dl = _mm512_setzero_pd(); }

  TGF_TARGET_AVX512 TGF_ALWAYS_INLINE static void widen(__m512 f, __m512d& d) {
    d = _mm512_add_pd(d, _mm512_add_pd(lo8(f), hi8(f)));
  }

  // the sets added pairwise, widened into the totals; every set starts again from zero
  TGF_TARGET_AVX512 TGF_ALWAYS_INLINE void flush(F32Set (&s)[kSets]) {
    s[0].add(s[1]);
    s[2].add(s[3]);
    s[0].add(s[2]);
    widen(s[0].f1, d1);
    widen(s[0].f2, d2);
    widen(s[0].f3, d3);
    widen(s[0].f4, d4);
    widen(s[0].fl, dl);
    for (F32Set& set : s) set.zero();
  }
};

// false when the chunk must be rerun (non-finite value, |d| out of float32's safe range, or c far from the chunk
// mean; `retry_shift` then holds the chunk mean when a second try with it can succeed, NaN otherwise)
template <int DT>
TGF_TARGET_AVX512 bool chunk_f32acc(const void* data, int64_t begin, int64_t len, double c, ChunkSums& out,
                                    double& retry_shift) {
  constexpr int64_t kStep = 16 * kSets;
  const float c32 = static_cast<float>(c);
  const __m512 cf = _mm512_set1_ps(c32), one = _mm512_set1_ps(1.0f);
  __m512 mn = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  F32Set sets[kSets];
  for (F32Set& set : sets) set.zero();
  F64Totals tot;
  tot.zero();
  int64_t i = 0;
  // No read-ahead, unlike AVX2's: on Zen 4 prefetching 1 KB ahead made fp32 from memory slower (0.94-0.99x one
  // torch.sum at 64M and 256M values without it, 1.04-1.33x with it; bf16, compute-bound, the same either way).
  while (i + kStep <= len) {
    const int64_t stop = std::min<int64_t>(len - kStep + 1, i + kStep * kSetSteps);
    for (; i < stop; i += kStep) {
      __m512 x0, x1, x2, x3;
      load32<DT>(data, begin + i, x0, x1);
      load32<DT>(data, begin + i + 32, x2, x3);
      const __m512 xs[kSets] = {x0, x1, x2, x3};
      for (int k = 0; k < kSets; ++k) {
        mn = _mm512_min_ps(mn, xs[k]);
        mx = _mm512_max_ps(mx, xs[k]);
        sets[k].step(xs[k], cf, one);
      }
    }
    tot.flush(sets);
  }
  double pad = 0;
  if (i < len) {  // the last < 64 values: full 16s in sets 0.., the rest padded with the shift (|c| to l1: taken back)
    int k = 0;
    for (; i < len; i += 16, ++k) {
      const bool full = i + 16 <= len;
      if (!full) pad = static_cast<double>(16 - (len - i));
      const __m512 x = full ? load16<DT>(data, begin + i) : load_tail<DT>(data, begin + i, len - i, cf);
      mn = _mm512_min_ps(mn, x);
      mx = _mm512_max_ps(mx, x);
      sets[k].step(x, cf, one);
    }
    tot.flush(sets);
  }
  out.c = c32;
  out.s1 = _mm512_reduce_add_pd(tot.d1);
  out.s2 = _mm512_reduce_add_pd(tot.d2);
  out.s3 = _mm512_reduce_add_pd(tot.d3);
  out.s4 = _mm512_reduce_add_pd(tot.d4);
  out.l1 = _mm512_reduce_add_pd(tot.dl) - pad * std::fabs(static_cast<double>(c32));
  out.bad = 0;
  out.mn = _mm512_reduce_min_ps(mn);
  out.mx = _mm512_reduce_max_ps(mx);
  return f32_blocks_vouch(out, len, retry_shift);
}

}  // namespace tgf
#endif
