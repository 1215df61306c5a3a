#pragma once
#include <cstdint>
#include <limits>

namespace tgf {

// Running state of the moments of the finite values seen so far. m2..m4 are central sums (not divided by n).
struct MomentState {
  int64_t n = 0;
  double mean = 0, m2 = 0, m3 = 0, m4_ = 0;
  double mn = std::numeric_limits<double>::infinity();
  double mx = -std::numeric_limits<double>::infinity();
  double l1 = 0, sumsq = 0;
  int64_t nonfinite = 0;
  void merge(const MomentState& other);
};

MomentState moments(const void* data, int64_t n, int dtype, int nthreads);

}  // namespace tgf
