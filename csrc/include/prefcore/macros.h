#pragma once
// Scalar maths in csrc/include/prefcore/ is shared by the CPU and CUDA kernels so the two
// paths cannot drift: every function here is PREFCORE_HD (host + device) and header-only.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PREFCORE_HD __host__ __device__ __forceinline__
#else
// Always inlined on the host: the CPU kernels call these with SIMD values (16 to 64 bytes, one
// width per ISA clone) from inside ISA-targeted clones, and an out-of-line copy would use the
// baseline ABI for those values.
#define PREFCORE_HD inline __attribute__((always_inline))
#endif
