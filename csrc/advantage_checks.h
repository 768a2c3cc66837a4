#pragma once
// Argument validation of the KL-penalised advantage family (DESIGN §3.4), shared by the CPU and
// CUDA launchers. Shape/dtype/device errors are RuntimeError (TORCH_CHECK); errors about the
// *values* of an argument (a mask that is not 0/1, too few valid tokens to whiten, a bad scalar)
// are ValueError (TORCH_CHECK_VALUE), matching what the Python wrapper raises for the same
// mistakes it can see without reading data.
#include <ATen/core/Tensor.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/all.h>

#include <cmath>
#include <limits>
#include <optional>

#include "common.h"
#include "prefcore/advantage_math.h"

namespace prefcore {

// A (B, T)-shaped mask as a contiguous bool tensor. Non-bool masks (integer or floating) must
// hold only 0 and 1; checking that reads the data (a device sync on CUDA), so the fast path
// is a bool mask.
inline at::Tensor checked_mask(const at::Tensor& mask, at::IntArrayRef shape, const at::Tensor& ref,
                               const char* ref_name) {
  TORCH_CHECK(mask.sizes() == shape, "mask must have the shape of ", ref_name, " ", shape, ", got ",
              mask.sizes());
  check_same_device(mask, ref, "mask", ref_name);
  if (mask.scalar_type() == at::kBool) return mask.contiguous();
  TORCH_CHECK(!at::isComplexType(mask.scalar_type()), "mask must be a bool or 0/1 tensor, got ",
              mask.scalar_type());
  if (mask.numel() > 0) {
    const bool zero_one = at::logical_or(at::eq(mask, 0), at::eq(mask, 1)).all().item<bool>();
    TORCH_CHECK_VALUE(zero_one, "mask must be bool or hold only 0 and 1, got other values in a ",
                      mask.scalar_type(), " mask");
  }
  return mask.to(at::kBool).contiguous();
}

// Valid-token count check of whitening: the unbiased variance needs two tokens, the biased one.
inline void check_whiten_count(int64_t n_valid, bool unbiased, const char* what) {
  const int64_t need = unbiased ? 2 : 1;
  TORCH_CHECK_VALUE(n_valid >= need, what, " needs at least ", need, " valid token",
                    need > 1 ? "s" : "", " (mask has ", n_valid, ")");
}

// The `outputs` bit set of kl_penalized_advantages: bit 0 advantages (always required), bit 1
// returns, bit 2 token_rewards, bit 3 kl; an output left out comes back as an empty (0,) tensor.
inline void check_advantage_outputs(int64_t outputs) {
  TORCH_CHECK_VALUE(outputs >= 1 && outputs <= 15 && (outputs & 1),
                    "outputs must be a bit set of 1 (advantages, required), 2 (returns), 4 (token_rewards) "
                    "and 8 (kl) that includes 1, got ", outputs);
}

struct AdvantageInputs {
  at::Tensor logprobs, ref_logprobs, mask, scores, values;  // contiguous; values undefined unless gae
  int64_t B, T, group_size;
  KlEstimator estimator;
  AdvantageMode mode;
  double kl_coef, gamma, lam, kl_clamp;  // kl_clamp = +inf when not given
  bool whiten;
};

inline AdvantageInputs prepare_advantages(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                          const at::Tensor& mask, const at::Tensor& scores,
                                          const std::optional<at::Tensor>& values, double kl_coef,
                                          int64_t estimator, int64_t mode, int64_t group_size,
                                          double gamma, double lam, bool whiten,
                                          std::optional<double> kl_clamp) {
  check_floating(logprobs, "logprobs");
  check_dim(logprobs, 2, "logprobs");
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  TORCH_CHECK(ref_logprobs.sizes() == logprobs.sizes(), "ref_logprobs must have the shape of logprobs ",
              logprobs.sizes(), ", got ", ref_logprobs.sizes());
  check_dtype(ref_logprobs, logprobs.scalar_type(), "ref_logprobs", "the dtype of logprobs");
  check_same_device(ref_logprobs, logprobs, "ref_logprobs", "logprobs");
  check_dim(scores, 1, "scores");
  check_size(scores, 0, B, "scores", "logprobs.size(0)");
  check_dtype(scores, opmath_dtype(logprobs), "scores", "the accumulation dtype of logprobs");
  check_same_device(scores, logprobs, "scores", "logprobs");
  TORCH_CHECK(estimator >= 0 && estimator <= 3, "estimator must be 0 (k1), 1 (k2), 2 (k3) or 3 (abs), got ",
              estimator);
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0 (rloo), 1 (grpo) or 2 (gae), got ", mode);
  TORCH_CHECK_VALUE(std::isfinite(kl_coef) && kl_coef >= 0.0, "kl_coef must be a finite number >= 0, got ",
                    kl_coef);
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0.0 && gamma <= 1.0, "gamma must lie in [0, 1], got ",
                    gamma);
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0.0 && lam <= 1.0, "lam must lie in [0, 1], got ", lam);
  double clamp = std::numeric_limits<double>::infinity();
  if (kl_clamp.has_value()) {
    clamp = *kl_clamp;
    TORCH_CHECK_VALUE(clamp >= 0.0, "kl_clamp must be a number >= 0 (or None), got ", clamp);  // NaN fails too
  }
  const auto m = static_cast<AdvantageMode>(mode);
  const bool has_values = values.has_value() && values->defined();
  AdvantageInputs p;
  if (m == AdvantageMode::kGae) {
    TORCH_CHECK_VALUE(has_values, "mode gae needs values (B, T), got None");
    TORCH_CHECK_VALUE(group_size == 0, "group_size is not used by mode gae and must be 0, got ", group_size);
    TORCH_CHECK(values->sizes() == logprobs.sizes(), "values must have the shape of logprobs ",
                logprobs.sizes(), ", got ", values->sizes());
    check_dtype(*values, logprobs.scalar_type(), "values", "the dtype of logprobs");
    check_same_device(*values, logprobs, "values", "logprobs");
    p.values = values->contiguous();
  } else {
    TORCH_CHECK_VALUE(!has_values, "values is only used by mode gae; pass None for rloo/grpo");
    TORCH_CHECK_VALUE(group_size >= 2, "group_size must be >= 2 for rloo/grpo (a baseline needs another "
                      "sample of the same prompt), got ", group_size);
    TORCH_CHECK_VALUE(B % group_size == 0, "group_size must divide the batch: logprobs.size(0) = ", B,
                      " is not a multiple of group_size = ", group_size);
  }
  p.mask = checked_mask(mask, logprobs.sizes(), logprobs, "logprobs");
  p.logprobs = logprobs.contiguous();
  p.ref_logprobs = ref_logprobs.contiguous();
  p.scores = scores.contiguous();
  p.B = B;
  p.T = T;
  p.group_size = group_size;
  p.estimator = static_cast<KlEstimator>(estimator);
  p.mode = m;
  p.kl_coef = kl_coef;
  p.gamma = gamma;
  p.lam = lam;
  p.kl_clamp = clamp;
  p.whiten = whiten;
  return p;
}

struct WhitenInputs {
  at::Tensor x, mask;  // contiguous, mask bool
  int64_t N;
};

inline WhitenInputs prepare_whiten(const at::Tensor& x, const at::Tensor& mask) {
  check_floating(x, "x");
  WhitenInputs p;
  p.mask = checked_mask(mask, x.sizes(), x, "x");
  p.x = x.contiguous();
  p.N = x.numel();
  return p;
}

// The whitening map from merged moments (see WhitenAffine in advantage_math.h).
inline WhitenAffine<double> whiten_affine(const Moments<double>& m, bool unbiased, bool shift_mean) {
  const double var = unbiased ? m.m2 / (m.n - 1.0) : m.m2 / m.n;
  return WhitenAffine<double>{m.mean, 1.0 / std::sqrt(var + kWhitenEps), shift_mean ? 0.0 : m.mean};
}

}  // namespace prefcore
