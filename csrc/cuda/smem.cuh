#pragma once
// Dynamic shared memory beyond the 48 KiB a kernel gets by default. A kernel may opt in (once
// per size, cudaFuncSetAttribute) to the device's per-block maximum
// (cudaDevAttrMaxSharedMemoryPerBlockOptin, less the kernel's static shared memory: 227 KiB on
// sm_80/sm_90); beyond that the callers switch to a global-memory scratch buffer, so no size
// the CPU accepts is refused on the GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace prefcore::cuda {

constexpr size_t kDefaultDynamicSmem = 48 * 1024;

// Whether `bytes` of dynamic shared memory fit one block of `kernel` on the current device;
// where they fit but exceed the default, the kernel is opted in to exactly `bytes`.
template <typename Kernel>
bool fit_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= kDefaultDynamicSmem) return true;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (bytes + attr.sharedSizeBytes > static_cast<size_t>(optin)) return false;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return true;
}

}  // namespace prefcore::cuda
