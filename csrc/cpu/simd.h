#pragma once
// Explicit SIMD values (GCC/Clang vector extensions) for the CPU hot loops, one width per ISA
// clone (isa.h): 64 bytes in the AVX-512 clone (one zmm), 32 in the AVX2 clone (one ymm), 16 in
// the baseline clone (one xmm / NEON register). The width must match the clone: on a 64-byte
// vector without AVX-512, GCC 12 expands every comparison and `?:` select element by element
// (-Wvector-operation-performance), which made the AVX2 clone 3–23× slower than the AVX-512 one.
//
// The width-dependent kernels are written once, in a `<op>_simd.inc` file, and compiled three
// times by simd_namespaces.inc, inside namespaces simd64 / simd32 / simd16 that each fix
// `kSimdBytes`; simd_width.inc then gives each namespace its `Simd<T>`, `kLanes<T>`, loads,
// stores and elementwise maths. The scalar maths in csrc/include/prefcore/ accepts these values
// as well as scalars (comparisons, ?:, scalar broadcast).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace prefcore::cpu {

template <typename T, int kBytes>
struct SimdOfN {
  typedef T type __attribute__((vector_size(kBytes)));
};

template <typename T, int kBytes>
using SimdN = typename SimdOfN<T, kBytes>::type;

}  // namespace prefcore::cpu
