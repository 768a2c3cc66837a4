#pragma once
// Host-side argument checks shared by the CPU and CUDA launchers. Every message names the
// argument and says what was expected and what was received.
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <string>

namespace prefcore {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()),
              name, " must be a floating tensor (float32/float64/bfloat16/float16), got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t d, int64_t expected, const char* name,
                       const char* what) {
  TORCH_CHECK(t.size(d) == expected, name, ".size(", d, ") must equal ", what, " = ", expected,
              ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

// The accumulation dtype of `t`'s dtype (float for half/bfloat16/float, double for double).
inline at::ScalarType opmath_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* name,
                        const char* why) {
  TORCH_CHECK(t.scalar_type() == expected, name, " must have dtype ", expected, " (", why,
              "), got ", t.scalar_type());
}

}  // namespace prefcore
