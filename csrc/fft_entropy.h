#pragma once
#include <cstdint>

namespace tgf {
struct PowerSums {
  double s = 0, splnp = 0;
  int64_t nonfinite = 0;
};
PowerSums fft_power_entropy(const void* data, bool is_double, int64_t rows, int64_t cols, int64_t row_stride,
                            const int64_t* limit, int nthreads);
// Four-step middle step, fused: out[b, j, c] = (zr + i zi)[b, j, c] * w_N^((k1_0 + j) c) with w_N = exp(-2 pi i / N).
// zri holds the GEMM output (batch, rows, 2, cols): the real row, then the imaginary row, of each k1; out is
// interleaved complex (batch, rows, cols). Same element type T (float or double) in and out.
void twiddle_interleave(const void* zri, bool is_double, int64_t batch, int64_t rows, int64_t cols, int64_t k1_0,
                        int64_t n, void* out, int nthreads);
}  // namespace tgf
