// Shared helpers for the CPU kernels: dtype codes, element loads, thread count.
#pragma once
#include <cstdint>
#include <cstdlib>
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

// Instruction sets of the vectorised loops. Every kernel with a vectorised path is compiled once per level and picks
// the widest one the CPU has at run time; TGF_NO_AVX512=1 caps the choice at AVX2 (moments' AVX2 bodies, the
// portable loops elsewhere), in every kernel, so the two paths can be compared on one machine.
enum Isa : int { ISA_DEFAULT = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

#if defined(__x86_64__) && defined(__GNUC__)
#define TGF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define TGF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TGF_X86 1
#else
#define TGF_TARGET_AVX512
#define TGF_TARGET_AVX2
#endif
#define TGF_ALWAYS_INLINE inline __attribute__((always_inline))

inline bool avx512_disabled() {
  const char* v = std::getenv("TGF_NO_AVX512");
  return v && v[0] == '1';
}

inline int isa_level() {
  static const int level = [] {
#ifdef TGF_X86
    __builtin_cpu_init();
    if (!avx512_disabled() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c"))
      return int(ISA_AVX512);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return int(ISA_AVX2);
#endif
    return int(ISA_DEFAULT);
  }();
  return level;
}

inline const char* isa_name() {
  switch (isa_level()) {
    case ISA_AVX512: return "avx512";
    case ISA_AVX2: return "avx2";
    default: return "default";
  }
}

// Pick one of three builds of a function by isa_level().
template <typename F>
F pick_isa(F avx512, F avx2, F fallback) {
  const int l = isa_level();
  return l == ISA_AVX512 ? avx512 : l == ISA_AVX2 ? avx2 : fallback;
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
