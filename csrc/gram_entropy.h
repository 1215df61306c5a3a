#pragma once
#include <cstdint>

namespace tgf {
void crop_error_rows(float* z, int64_t rows, int64_t cols, int64_t row_stride, const float* lse, const int64_t* labels);
void spectrum_entropy(const double* evals, int64_t batch, int64_t n, int64_t q, bool squared, double* out);
}  // namespace tgf
