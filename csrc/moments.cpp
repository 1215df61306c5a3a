// moments: one read of a tensor -> count, mean, central sums M2..M4, min, max, L1, sum of squares, non-finite count.
//
// The tensor is cut into chunks of 4096 values, each read once (see reduce_chunk; fp32/bf16/fp16 chunks accumulate
// in float32 blocks on AVX-512 and AVX2, see moments_avx512.h, moments_avx2.h). Chunks, then threads, are combined
// with the pairwise update of Chan et al. / Terriberry for M2..M4, which is stable whatever the magnitudes.
// Non-finite elements are counted and excluded from every other statistic.
#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "moments.h"
#include "moments_avx2.h"
#include "moments_blocks.h"
#include "moments_avx512.h"

namespace tgf {

void MomentState::merge(const MomentState& b) {
  if (b.n == 0) { nonfinite += b.nonfinite; return; }
  if (n == 0) { int64_t nf = nonfinite; *this = b; nonfinite += nf; return; }
  const double na = n, nb = b.n, nn = na + nb;
  const double delta = b.mean - mean, dn = delta / nn, dn2 = dn * dn;
  const double t1 = delta * dn * na * nb;
  const double m4 = m4_ + b.m4_ + t1 * dn2 * (na * na - na * nb + nb * nb) + 6.0 * dn2 * (na * na * b.m2 + nb * nb * m2) +
                    4.0 * dn * (na * b.m3 - nb * m3);
  const double m3n = m3 + b.m3 + t1 * dn * (na - nb) + 3.0 * dn * (na * b.m2 - nb * m2);
  m2 = m2 + b.m2 + t1;
  m3 = m3n;
  m4_ = m4;
  mean += nb * dn;
  n += b.n;
  mn = std::min(mn, b.mn);
  mx = std::max(mx, b.mx);
  l1 += b.l1;
  sumsq += b.sumsq;
  nonfinite += b.nonfinite;
}

namespace {

constexpr int64_t kChunk = 4096;

template <int DT>
inline double load(const void* p, int64_t i) {
  if constexpr (DT == F32) return static_cast<const float*>(p)[i];
  if constexpr (DT == BF16) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  if constexpr (DT == F16) return f16_to_float(static_cast<const uint16_t*>(p)[i]);
  if constexpr (DT == F64) return static_cast<const double*>(p)[i];
  return 0.0;
}

// Power sums of one chunk about a shift c (portable loop; the vectorised twins are in moments_avx512.h and
// moments_avx2.h, and every body returns the same ChunkSums, moments_blocks.h).
// A non-finite x is replaced by the shift c: it then adds exactly 0 to s1..s4, |c| to l1 (taken back below) and
// cannot move min/max (c lies inside the range already merged, or inside this chunk's finite values). One blend
// per element instead of a mask on every accumulator keeps the loop in registers.
using Sums = ChunkSums;

template <int DT>
TGF_ALWAYS_INLINE Sums chunk_portable_body(const void* data, int64_t begin, int64_t len, double c) {
  double s1 = 0, s2 = 0, s3 = 0, s4 = 0, bad = 0, l1 = 0;
  double mn = std::numeric_limits<double>::infinity(), mx = -mn;
#pragma omp simd reduction(+ : s1, s2, s3, s4, bad, l1) reduction(min : mn) reduction(max : mx)
  for (int64_t i = 0; i < len; ++i) {
    double x = load<DT>(data, begin + i);
    bool fin = std::fabs(x) <= std::numeric_limits<double>::max();  // false for inf and nan
    double xs = fin ? x : c;
    double d = xs - c;
    double d2 = d * d;
    s1 += d;
    s2 += d2;
    s3 += d2 * d;
    s4 += d2 * d2;
    bad += fin ? 0.0 : 1.0;
    l1 += std::fabs(xs);
    mn = std::min(mn, xs);
    mx = std::max(mx, xs);
  }
  return {c, s1, s2, s3, s4, l1, bad, mn, mx};
}

// The portable loop, built for AVX2 and for the baseline; TGF_NO_AVX512=1 selects it on AVX-512 machines too.
template <int DT>
TGF_TARGET_AVX2 Sums chunk_portable_avx2(const void* d, int64_t b, int64_t n, double c) {
  return chunk_portable_body<DT>(d, b, n, c);
}
template <int DT>
Sums chunk_portable_default(const void* d, int64_t b, int64_t n, double c) {
  return chunk_portable_body<DT>(d, b, n, c);
}

template <int DT>
Sums chunk_sums(const void* data, int64_t begin, int64_t len, double c) {
  const int isa = isa_level();
#ifdef TGF_HAVE_AVX512_PATH
  if (DT != F64 && isa == ISA_AVX512) {
    ChunkSums a;
    // float32 blocks (docs/methods.md: error <= ~13 u of the sums of |terms|, u = 2^-24); otherwise float64
    bool ok = f32_blocks_with_retry(
        [&](double shift, ChunkSums& out, double& retry) {
          return chunk_f32acc<DT>(data, begin, len, shift, out, retry);
        },
        c, a);
    if (!ok) ok = chunk_f64<DT>(data, begin, len, c, a);
    if (!ok) a = chunk_exact<DT>(data, begin, len, c);
    return a;
  }
#endif
#ifdef TGF_HAVE_AVX2_F32_PATH
  if constexpr (DT != F64) {
    if (isa == ISA_AVX2) {   // the float32 blocks and retry of AVX-512, for fp32 too (docs/methods.md section 6)
      ChunkSums a;
      if (f32_blocks_with_retry(
              [&](double shift, ChunkSums& out, double& retry) {
                return chunk_f32acc_avx2<DT>(data, begin, len, shift, out, retry);
              },
              c, a))
        return a;
      // fp32 where the blocks cannot vouch: the float64 body; then (a NaN/Inf) the portable loop, as bf16/fp16
      if constexpr (DT == F32) {
        if (chunk_f64_avx2(static_cast<const float*>(data), begin, len, c, a)) return a;
      }
    }
  }
#endif
  return isa == ISA_DEFAULT ? chunk_portable_default<DT>(data, begin, len, c)
                            : chunk_portable_avx2<DT>(data, begin, len, c);
}

// One chunk in one pass: power sums of d = x - c for a shift c close to the mean (the running mean of the
// previous chunks), turned into central sums exactly. With |c - mean| of the order of the spread, the corrections
// cost no precision in float64 (the "shifted data" algorithm), and the chunk is read once with no scratch buffer.
template <int DT>
void reduce_chunk(const void* data, int64_t begin, int64_t len, double c, MomentState& out) {
  const Sums r = chunk_sums<DT>(data, begin, len, c);
  c = r.c;
  const double bad = r.bad, cnt = static_cast<double>(len) - bad;
  const double s1 = r.s1, s2 = r.s2, s3 = r.s3, s4 = r.s4;
  MomentState ch;
  ch.n = static_cast<int64_t>(cnt);
  ch.nonfinite = len - ch.n;
  if (ch.n > 0) {
    const double n = cnt, a = s1 / n;
    ch.mean = c + a;
    ch.m2 = std::max(0.0, s2 - s1 * a);
    ch.m3 = s3 - 3.0 * a * s2 + 2.0 * n * a * a * a;
    ch.m4_ = std::max(0.0, s4 - 4.0 * a * s3 + 6.0 * a * a * s2 - 3.0 * n * a * a * a * a);
    ch.mn = r.mn;
    ch.mx = r.mx;
    ch.l1 = r.l1 - bad * std::fabs(c);
    ch.sumsq = s2 + 2.0 * c * s1 + n * c * c;
  }
  out.merge(ch);
}

template <int DT>
double first_shift(const void* data, int64_t begin, int64_t end) {
  // Mean of up to 64 finite leading values: a shift of the order of the data's own spread.
  double s = 0;
  int k = 0;
  for (int64_t i = begin; i < end && k < 64; ++i) {
    double x = load<DT>(data, i);
    if (std::fabs(x) <= std::numeric_limits<double>::max()) { s += x; ++k; }
  }
  return k ? s / k : 0.0;
}

template <int DT>
MomentState reduce_range(const void* data, int64_t begin, int64_t end) {
  MomentState st;
  for (int64_t b = begin; b < end; b += kChunk) {
    int64_t len = std::min(kChunk, end - b);
    double c = st.n > 0 ? st.mean : first_shift<DT>(data, b, b + len);
    reduce_chunk<DT>(data, b, len, c, st);
  }
  return st;
}

template <int DT>
MomentState reduce_all(const void* data, int64_t n, int nthreads) {
  // Below ~64k elements thread start-up costs more than the work.
  int64_t nchunks = (n + kChunk - 1) / kChunk;
  int t = std::max(1, std::min<int>(nthreads, static_cast<int>(std::min<int64_t>(nchunks / 16, 1 << 20))));
  if (t <= 1) return reduce_range<DT>(data, 0, n);
  std::vector<MomentState> parts(t);
#ifdef TGF_HAVE_OPENMP
#pragma omp parallel for num_threads(t) schedule(static, 1)
#endif
  for (int i = 0; i < t; ++i) {
    // Ranges on chunk boundaries, contiguous per thread: results are deterministic for a given thread count.
    int64_t c0 = nchunks * i / t, c1 = nchunks * (i + 1) / t;
    parts[i] = reduce_range<DT>(data, c0 * kChunk, std::min(n, c1 * kChunk));
  }
  MomentState st;
  for (auto& p : parts) st.merge(p);
  return st;
}

}  // namespace

MomentState moments(const void* data, int64_t n, int dtype, int nthreads) {
  if (n < 0) throw std::invalid_argument("moments: negative length");
  if (nthreads <= 0) nthreads = max_threads();
  switch (dtype) {
    case F32: return reduce_all<F32>(data, n, nthreads);
    case BF16: return reduce_all<BF16>(data, n, nthreads);
    case F16: return reduce_all<F16>(data, n, nthreads);
    case F64: return reduce_all<F64>(data, n, nthreads);
    default: throw std::invalid_argument("moments: unsupported dtype code");
  }
}

}  // namespace tgf
