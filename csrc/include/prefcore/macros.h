#pragma once
// Scalar maths in csrc/include/prefcore/ is shared by the CPU and CUDA kernels so the two
// paths cannot drift: every function here is PREFCORE_HD (host + device) and header-only.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PREFCORE_HD __host__ __device__ __forceinline__
#else
#define PREFCORE_HD inline
#endif
