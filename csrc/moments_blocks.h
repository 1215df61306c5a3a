// What every chunk body of moments returns, and the checks (and the one retry) under which a chunk summed in
// float32 blocks can be trusted (moments_avx512.h, moments_avx2.h; the error bound: tests/test_moments.py).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace tgf {

struct ChunkSums {
  double c;  // the shift actually used: rounded to float, so the blend of a non-finite lane is exact
  double s1, s2, s3, s4, l1, bad, mn, mx;
};

// Whether the float32 blocks of a chunk of `len` values can vouch for `out`: false on a non-finite value, on a
// largest |d| outside [2^-28, 2^28] (d^4 would over- or underflow float32), or on a chunk mean farther than half a
// chunk standard deviation from the shift (the central sums would cancel); `retry_shift` then holds the chunk mean
// when a second try about it can succeed, NaN otherwise.
inline bool f32_blocks_vouch(const ChunkSums& out, int64_t len, double& retry_shift) {
  retry_shift = std::numeric_limits<double>::quiet_NaN();
  // a non-finite input makes l1 (and s4) non-finite; NaN fails every comparison below as well
  if (!(std::isfinite(out.l1) && std::isfinite(out.s4) && out.mn <= out.mx)) return false;
  const double dmax = std::max(out.mx - out.c, out.c - out.mn);
  if (dmax > 0x1p28 || (dmax > 0 && dmax < 0x1p-28)) return false;
  const double n = static_cast<double>(len), a = out.s1 / n, m2 = out.s2 - out.s1 * a;
  if (a * a * n > 0.25 * m2) {  // |chunk mean - c| > std / 2 (or no spread at all around a far shift)
    retry_shift = out.c + a;
    return false;
  }
  return true;
}

// One chunk in float32 blocks about `c`, then once more about the chunk's own mean when the first try says that can
// succeed; false when neither try vouches. `body(shift, out, retry_shift)` is a chunk body (AVX-512 or AVX2).
template <typename Body>
inline bool f32_blocks_with_retry(Body body, double c, ChunkSums& out) {
  double retry = 0;
  if (body(c, out, retry)) return true;
  return std::isfinite(retry) && body(retry, out, retry);
}

}  // namespace tgf
