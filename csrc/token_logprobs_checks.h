#pragma once
// Argument validation of token_logprobs (DESIGN §3.5), shared by the CPU and CUDA launchers.
// Shape, dtype and device checks only; the target-range check needs the data and is done by
// each device (one pass on the CPU, one reduction and one host sync on CUDA) with the message
// built here.
#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

#include "common.h"

namespace prefcore {

struct TokenLogprobsInputs {
  at::Tensor hidden;   // (N, H), contiguous, floating
  at::Tensor weight;   // (V, H), contiguous, the dtype of hidden
  at::Tensor targets;  // (N,), contiguous, int64 or int32
  at::Tensor mask;     // (N,) bool, contiguous; undefined = every token valid
  int64_t N, H, V;
  double inv_temperature;
};

inline TokenLogprobsInputs prepare_token_logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                                  const at::Tensor& targets,
                                                  const std::optional<at::Tensor>& mask,
                                                  double temperature) {
  check_floating(hidden, "hidden");
  check_dim(hidden, 2, "hidden");
  check_dim(weight, 2, "weight");
  check_dtype(weight, hidden.scalar_type(), "weight", "the dtype of hidden");
  check_same_device(weight, hidden, "weight", "hidden");
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(weight.size(1) == H, "weight must have shape (V, H) with H = hidden.size(-1) = ", H,
              ", got ", weight.sizes());
  TORCH_CHECK(V >= 1, "weight must have at least one vocabulary row (V >= 1), got shape ", weight.sizes());
  check_dim(targets, 1, "targets");
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
              "targets must be an integer tensor (int64 or int32), got ", targets.scalar_type());
  check_size(targets, 0, N, "targets", "hidden.size(0)");
  check_same_device(targets, hidden, "targets", "hidden");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "temperature must be a finite number > 0, got ", temperature);
  // Detached: the kernels call ATen (mm, index_select) on these, which must not record autograd
  // history when an input requires grad (the op's own autograd formula is registered in Python).
  TokenLogprobsInputs p{hidden.detach().contiguous(), weight.detach().contiguous(), targets.contiguous(),
                        at::Tensor(), N, H, V, 1.0 / temperature};
  if (mask.has_value() && mask->defined()) {
    const auto& m = *mask;
    check_dtype(m, at::kBool, "mask", "a boolean mask");
    check_dim(m, 1, "mask");
    check_size(m, 0, N, "mask", "hidden.size(0)");
    check_same_device(m, hidden, "mask", "hidden");
    p.mask = m.contiguous();
  }
  return p;
}

// A (N,) per-token tensor handed to the backward op (saved statistics or upstream gradients):
// the accumulation dtype, on hidden's device.
inline at::Tensor checked_token_vector(const at::Tensor& t, const TokenLogprobsInputs& p, const char* name) {
  check_dim(t, 1, name);
  check_size(t, 0, p.N, name, "hidden.size(0)");
  check_dtype(t, opmath_dtype(p.hidden), name, "the accumulation dtype of hidden");
  check_same_device(t, p.hidden, name, "hidden");
  return t.contiguous();
}

[[noreturn]] inline void fail_target_range(int64_t value, int64_t V) {
  TORCH_CHECK(false, "targets must lie in [0, V) = [0, ", V, ") on every valid (unmasked) token, got ",
              value);
}

}  // namespace prefcore
