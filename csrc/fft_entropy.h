#pragma once
#include <cstdint>

namespace tgf {
struct PowerSums {
  double s = 0, splnp = 0;
  int64_t nonfinite = 0;
};
PowerSums fft_power_entropy(const void* data, bool is_double, int64_t rows, int64_t cols, int64_t row_stride,
                            const int64_t* limit, int nthreads);
}  // namespace tgf
