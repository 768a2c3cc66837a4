#pragma once
// Runtime ISA dispatch for CPU hot loops.
//
// A torch extension is compiled for baseline x86-64 (SSE2), while torch.compile's C++
// codegen targets the machine's AVX2/AVX-512. To compete, each hot loop is written once as an
// always-inline template on explicit SIMD values (simd.h) and instantiated inside three
// wrappers carrying __attribute__((target(...))), each with its ISA's vector width. Only the
// wrappers carry a target, so inline functions from torch/std headers keep their baseline
// out-of-line copies (no ODR hazard); the compiler inlines them into the wrapper and
// vectorises for that ISA.
// PREFCORE_CPU_ISA=default|avx2|avx512 pins the choice (tests use it to check every clone).
#include <cstdint>

namespace prefcore::cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The ISA the kernels use: the best the CPU supports, capped by PREFCORE_CPU_ISA.
Isa active_isa();
const char* isa_name(Isa isa);

}  // namespace prefcore::cpu

#define PREFCORE_ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PREFCORE_HAS_X86_CLONES 1
#define PREFCORE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PREFCORE_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define PREFCORE_HAS_X86_CLONES 0
#define PREFCORE_TARGET_AVX2
#define PREFCORE_TARGET_AVX512
#endif

// PREFCORE_ISA_CLONES(name, body): defines template <typename... A> void name(Isa, A&&...) that
// calls `body(args...)` compiled for the active ISA, with that ISA's SIMD width: simd64::body
// (AVX-512), simd32::body (AVX2) or simd16::body (baseline), the three copies of the op's
// kernels that simd_namespaces.inc compiles. `body` must be an always-inline template.
#define PREFCORE_ISA_CLONES(name, body)                                                          \
  template <typename... A>                                                                       \
  PREFCORE_TARGET_AVX512 void name##_avx512(A&&... a) { simd64::body(static_cast<A&&>(a)...); }  \
  template <typename... A>                                                                       \
  PREFCORE_TARGET_AVX2 void name##_avx2(A&&... a) { simd32::body(static_cast<A&&>(a)...); }      \
  template <typename... A>                                                                       \
  void name##_default(A&&... a) { simd16::body(static_cast<A&&>(a)...); }                        \
  template <typename... A>                                                                       \
  void name(::prefcore::cpu::Isa isa, A&&... a) {                                                \
    if (PREFCORE_HAS_X86_CLONES && isa == ::prefcore::cpu::Isa::kAvx512) {                       \
      name##_avx512(static_cast<A&&>(a)...);                                                     \
    } else if (PREFCORE_HAS_X86_CLONES && isa == ::prefcore::cpu::Isa::kAvx2) {                  \
      name##_avx2(static_cast<A&&>(a)...);                                                       \
    } else {                                                                                     \
      name##_default(static_cast<A&&>(a)...);                                                    \
    }                                                                                            \
  }
