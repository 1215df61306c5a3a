// Shared helpers for the CPU kernels: dtype codes, element loads, thread count.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#ifdef TGF_HAVE_OPENMP
#include <omp.h>
#endif

namespace tgf {

// Must match tensorguard_fast/_backend.py::DTYPE_CODES.
enum DType : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };

inline float bits_to_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

// bf16 is the top half of an fp32.
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Branch-free IEEE half -> float (normals and subnormals by one rebiasing multiply; inf/nan keep their payload),
// written so the compiler can vectorise it without F16C.
inline float f16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  float mag = bits_to_float(em << 13) * 0x1p112f;
  uint32_t special = (em << 13) | 0x7f800000u;
  uint32_t out = em >= 0x7c00u ? special : float_to_bits(mag);
  return bits_to_float(out | sign);
}

inline int max_threads() {
#ifdef TGF_HAVE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline bool has_openmp() {
#ifdef TGF_HAVE_OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace tgf
