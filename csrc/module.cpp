// pybind11 module tensorguard_fast._C. Tensors arrive as (data pointer, sizes, strides, dtype code): the extension never
// links against libtorch, so it builds in seconds. These functions are raw: call them only through
// tensorguard_fast/ops/_cpp.py, which checks every tensor (CPU, dtype, shape, layout) and derives the sizes and strides
// from it. The checks here only catch sizes that cannot be right whatever the memory behind them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "common.h"
#include "fft_entropy.h"
#include "gradient_sketch.h"
#include "gram_entropy.h"
#include "moments.h"

namespace py = pybind11;
using namespace tgf;

namespace {
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

void check_rows(const char* op, int64_t rows, int64_t cols, int64_t row_stride) {
  if (rows < 0 || cols < 0 || (rows > 1 && row_stride < cols))
    throw std::invalid_argument(std::string(op) + ": negative size or overlapping rows (row_stride < cols)");
}

py::tuple state_tuple(const MomentState& s) {
  return py::make_tuple(s.n, s.mean, s.m2, s.m3, s.m4_, s.mn, s.mx, s.l1, s.sumsq, s.nonfinite);
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tensorguard-fast CPU kernels";
  m.def("has_openmp", &has_openmp);
  m.def("max_threads", &max_threads);
  m.def("isa", &isa_name, "instruction set of the vectorised loops here: avx512, avx2 or default (TGF_NO_AVX512=1 caps it "
        "at avx2)");
  m.def(
      "moments",
      [](uintptr_t data, int64_t n, int dtype, int nthreads) {
        MomentState s;
        {
          py::gil_scoped_release nogil;
          s = moments(ptr<const void>(data), n, dtype, nthreads);
        }
        return state_tuple(s);
      },
      py::arg("data"), py::arg("n"), py::arg("dtype"), py::arg("nthreads") = 0,
      "(n, mean, m2, m3, m4, min, max, l1, sumsq, nonfinite) of the finite values; m2..m4 are central sums");
  m.def(
      "moments_many",
      [](const std::vector<std::tuple<uintptr_t, int64_t, int>>& items, int nthreads) {
        std::vector<MomentState> out(items.size());
        {
          py::gil_scoped_release nogil;
          for (size_t i = 0; i < items.size(); ++i) {
            auto [d, n, dt] = items[i];
            out[i] = moments(ptr<const void>(d), n, dt, nthreads);
          }
        }
        py::list res;
        for (auto& s : out) res.append(state_tuple(s));
        return res;
      },
      py::arg("items"), py::arg("nthreads") = 0);
  m.def(
      "fft_power_entropy",
      [](uintptr_t data, bool is_double, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t limit,
         int nthreads) {
        check_rows("fft_power_entropy", rows, cols, row_stride);
        PowerSums s;
        {
          py::gil_scoped_release nogil;
          s = fft_power_entropy(ptr<const void>(data), is_double, rows, cols, row_stride, ptr<const int64_t>(limit),
                                nthreads);
        }
        return py::make_tuple(s.s, s.splnp, s.nonfinite);
      },
      py::arg("data"), py::arg("is_double"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"),
      py::arg("limit") = 0, py::arg("nthreads") = 0,
      "(S, sum P ln P, non-finite count) of P = |X|^2 over a complex tile; row r keeps columns 0..limit[r]");
  m.def(
      "twiddle_interleave",
      [](uintptr_t zri, bool is_double, int64_t batch, int64_t rows, int64_t cols, int64_t k1_0, int64_t n,
         uintptr_t out, int nthreads) {
        require(batch >= 0 && rows >= 0 && cols >= 0 && k1_0 >= 0 && n >= 1, "twiddle_interleave: bad size");
        py::gil_scoped_release nogil;
        twiddle_interleave(ptr<const void>(zri), is_double, batch, rows, cols, k1_0, n, ptr<void>(out), nthreads);
      },
      py::arg("zri"), py::arg("is_double"), py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("k1_0"),
      py::arg("n"), py::arg("out"), py::arg("nthreads") = 0,
      "four-step twiddle: out[b,j,c] = (zr + i zi)[b,j,c] * exp(-2 pi i (k1_0 + j) c / n), re/im rows -> complex");
  m.def(
      "logsumexp_update",
      [](uintptr_t z, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t m, uintptr_t s, uintptr_t bad,
         int nthreads) {
        check_rows("logsumexp_update", rows, cols, row_stride);
        py::gil_scoped_release nogil;
        logsumexp_update(ptr<const float>(z), rows, cols, row_stride, ptr<double>(m), ptr<double>(s),
                         ptr<int64_t>(bad), nthreads);
      },
      py::arg("z"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("m"), py::arg("s"),
      py::arg("bad"), py::arg("nthreads") = 0,
      "online logsumexp over a float32 logits chunk: updates running max m, sum s (float64) and non-finite count");
  m.def(
      "crop_error_rows",
      [](uintptr_t z, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t lse, uintptr_t labels,
         int nthreads) {
        check_rows("crop_error_rows", rows, cols, row_stride);
        py::gil_scoped_release nogil;
        crop_error_rows(ptr<float>(z), rows, cols, row_stride, ptr<const double>(lse), ptr<const int64_t>(labels),
                        nthreads);
      },
      py::arg("z"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("lse"), py::arg("labels"),
      py::arg("nthreads") = 0, "E = exp(z - lse) - onehot(label) over float32 cropped logits, in place");
  m.def(
      "pivoted_cholesky",
      [](uintptr_t m, int64_t batch, int64_t n, double rel_tol, uintptr_t l, uintptr_t rank, int nthreads) {
        require(batch >= 0 && n >= 0, "pivoted_cholesky: negative size");
        py::gil_scoped_release nogil;
        pivoted_cholesky(ptr<const double>(m), batch, n, rel_tol, ptr<double>(l), ptr<int64_t>(rank), nthreads);
      },
      py::arg("m"), py::arg("batch"), py::arg("n"), py::arg("rel_tol"), py::arg("l"), py::arg("rank"),
      py::arg("nthreads") = 0, "rank-revealing Cholesky M = L L^T of each symmetric PSD float64 n x n matrix");
  m.def(
      "spectrum_entropy",
      [](uintptr_t svals, int64_t batch, int64_t n, int64_t q, bool squared, uintptr_t out) {
        require(batch >= 0 && n >= 0 && q >= 2, "spectrum_entropy: negative size or q < 2");
        py::gil_scoped_release nogil;
        spectrum_entropy(ptr<const double>(svals), batch, n, q, squared, ptr<double>(out));
      },
      py::arg("svals"), py::arg("batch"), py::arg("n"), py::arg("q"), py::arg("squared"), py::arg("out"),
      "normalised entropy of the top q singular values per row (float64); NaN rows give NaN");
  m.def(
      "sketch_exp_update",
      [](uintptr_t z, int64_t rows, int64_t cols, int64_t z_stride, uintptr_t out, int64_t out_stride,
         uintptr_t labels, int64_t v0, uintptr_t m, uintptr_t s, uintptr_t bad, uintptr_t f_old, uintptr_t f_new,
         uintptr_t c, int nthreads) {
        require(rows >= 0 && cols >= 0 && z_stride >= cols && out_stride >= cols, "sketch_exp_update: bad size");
        py::gil_scoped_release nogil;
        sketch_exp_update(ptr<const float>(z), rows, cols, z_stride, ptr<float>(out), out_stride,
                          ptr<const int64_t>(labels), v0, ptr<double>(m), ptr<double>(s), ptr<int64_t>(bad),
                          ptr<double>(f_old), ptr<double>(f_new), ptr<double>(c), nthreads);
      },
      py::arg("z"), py::arg("rows"), py::arg("cols"), py::arg("z_stride"), py::arg("out"), py::arg("out_stride"),
      py::arg("labels"), py::arg("v0"), py::arg("m"), py::arg("s"), py::arg("bad"), py::arg("f_old"),
      py::arg("f_new"), py::arg("c"), py::arg("nthreads") = 0,
      "gradient sketch chunk: online logsumexp update, exp(z - m) to out (target column 0), its sum c, rescale factors");
  m.def(
      "sketch_acc_update",
      [](uintptr_t z, int64_t rows, int64_t cols, int64_t z_stride, uintptr_t r, int64_t r_stride, int64_t kk,
         uintptr_t labels, int64_t v0, uintptr_t m, uintptr_t s, uintptr_t bad, uintptr_t acc, int nthreads) {
        require(rows >= 0 && cols >= 0 && kk >= 1 && z_stride >= cols && r_stride >= kk,
                "sketch_acc_update: bad size");
        py::gil_scoped_release nogil;
        sketch_acc_update(ptr<const float>(z), rows, cols, z_stride, ptr<const float>(r), r_stride, kk,
                          ptr<const int64_t>(labels), v0, ptr<double>(m), ptr<double>(s), ptr<int64_t>(bad),
                          ptr<double>(acc), nthreads);
      },
      py::arg("z"), py::arg("rows"), py::arg("cols"), py::arg("z_stride"), py::arg("r"), py::arg("r_stride"),
      py::arg("kk"), py::arg("labels"), py::arg("v0"), py::arg("m"), py::arg("s"), py::arg("bad"), py::arg("acc"),
      py::arg("nthreads") = 0, "gradient sketch chunk with the (chunk x kk) product accumulated in the kernel");
}
