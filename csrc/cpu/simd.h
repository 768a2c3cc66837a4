#pragma once
// Explicit 64-byte SIMD values (GCC/Clang vector extensions) for the CPU hot loops.
// A Simd<float> is 16 lanes: one zmm register in the AVX-512 clone, two ymm in the AVX2 clone,
// four xmm in the baseline clone (see isa.h) — the same source, vectorised for each ISA
// without relying on the auto-vectoriser. The scalar maths in csrc/include/prefcore/ is
// written so it accepts these values as well as scalars (comparisons, ?:, scalar broadcast).
#include <cstdint>
#include <cstring>

namespace prefcore::cpu {

template <typename T>
struct SimdOf;
template <>
struct SimdOf<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct SimdOf<double> {
  typedef double type __attribute__((vector_size(64)));
};

template <typename T>
using Simd = typename SimdOf<T>::type;

template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

template <typename T>
inline __attribute__((always_inline)) Simd<T> simd_load(const T* p) {
  Simd<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline __attribute__((always_inline)) void simd_store(T* p, Simd<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline __attribute__((always_inline)) Simd<T> simd_splat(T x) {
  return Simd<T>{} + x;
}

template <typename T>
inline __attribute__((always_inline)) T simd_sum(Simd<T> v) {
  T s = T(0);
  for (int64_t j = 0; j < kLanes<T>; ++j) s += v[j];
  return s;
}

}  // namespace prefcore::cpu
