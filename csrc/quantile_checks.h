#pragma once
// Argument validation of the quantile op family, shared by the CPU and CUDA launchers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>

#include <cmath>
#include <optional>

#include "common.h"
#include "prefcore/quantile_math.h"

namespace prefcore {

struct PinballInputs {
  at::Tensor pred, target, taus, mask;
  int64_t R, Q, N;
};

inline PinballInputs prepare_pinball(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& taus,
                 const std::optional<at::Tensor>& target_mask, double kappa) {
  check_floating(pred, "pred");
  check_dim(pred, 2, "pred");
  check_dim(target, 2, "target");
  check_dim(taus, 1, "taus");
  const int64_t R = pred.size(0), Q = pred.size(1), N = target.size(1);
  TORCH_CHECK(Q >= 1, "pred must have at least one quantile (Q >= 1), got shape ", pred.sizes());
  check_size(target, 0, R, "target", "pred.size(0)");
  check_size(taus, 0, Q, "taus", "pred.size(1)");
  const auto acc = opmath_dtype(pred);
  check_dtype(target, acc, "target", "the accumulation dtype of pred");
  check_dtype(taus, acc, "taus", "the accumulation dtype of pred");
  check_same_device(target, pred, "target", "pred");
  check_same_device(taus, pred, "taus", "pred");
  TORCH_CHECK(std::isfinite(kappa) && kappa >= 0.0, "kappa must be a finite number >= 0, got ",
              kappa);
  {
    // One reduction and one host sync (a device taus would otherwise sync twice).
    const auto [lo, hi] = at::aminmax(taus);
    const at::Tensor range = at::stack({lo, hi}).to(at::kDouble).cpu();
    const double lo_v = range.const_data_ptr<double>()[0], hi_v = range.const_data_ptr<double>()[1];
    TORCH_CHECK(lo_v > 0.0 && hi_v < 1.0,
                "taus must lie strictly inside (0, 1), got values in [", lo_v, ", ", hi_v, "]");
  }
  PinballInputs p{pred.contiguous(), target.contiguous(), taus.contiguous(), at::Tensor(), R, Q, N};
  if (target_mask.has_value() && target_mask->defined()) {
    const auto& m = *target_mask;
    check_dtype(m, at::kBool, "target_mask", "a boolean mask");
    TORCH_CHECK(m.sizes() == target.sizes(), "target_mask must have the shape of target ",
                target.sizes(), ", got ", m.sizes());
    check_same_device(m, pred, "target_mask", "pred");
    p.mask = m.contiguous();
  }
  return p;
}

struct UtilityInputs {
  at::Tensor quantiles, lam, gate;
  int64_t B, M, Q;
  UtilityKind kind;
};

inline UtilityInputs prepare_utility(const at::Tensor& quantiles, const at::Tensor& lam,
                 const std::optional<at::Tensor>& gate, int64_t kind) {
  check_floating(quantiles, "quantiles");
  TORCH_CHECK(kind == 0 || kind == 1, "kind must be 0 (utility) or 1 (certainty equivalent), got ",
              kind);
  const bool gated = gate.has_value() && gate->defined();
  UtilityInputs p;
  p.kind = static_cast<UtilityKind>(kind);
  if (gated) {
    check_dim(quantiles, 3, "quantiles (with gate)");
    p.B = quantiles.size(0);
    p.M = quantiles.size(1);
    p.Q = quantiles.size(2);
    const auto& g = *gate;
    check_dim(g, 2, "gate");
    TORCH_CHECK(g.size(0) == p.B && g.size(1) == p.M, "gate must have shape (B, M) = (", p.B,
                ", ", p.M, ") to match quantiles ", quantiles.sizes(), ", got ", g.sizes());
    check_dtype(g, quantiles.scalar_type(), "gate", "the dtype of quantiles");
    check_same_device(g, quantiles, "gate", "quantiles");
    p.gate = g.contiguous();
  } else {
    check_dim(quantiles, 2, "quantiles (without gate)");
    p.B = quantiles.size(0);
    p.M = 1;
    p.Q = quantiles.size(1);
  }
  TORCH_CHECK(p.Q >= 1, "quantiles must have at least one quantile (Q >= 1), got shape ",
              quantiles.sizes());
  check_dim(lam, 1, "lam");
  TORCH_CHECK(lam.size(0) == p.B || lam.size(0) == 1, "lam must have shape (B,) = (", p.B,
              ",) or (1,), got ", lam.sizes());
  check_dtype(lam, opmath_dtype(quantiles), "lam", "the accumulation dtype of quantiles");
  check_same_device(lam, quantiles, "lam", "quantiles");
  p.quantiles = quantiles.contiguous();
  p.lam = lam.contiguous();
  return p;
}

// The upstream gradient of a backward op: (R,) in the accumulation dtype, on pred's device.
inline at::Tensor checked_pinball_grad_rows(const at::Tensor& grad_rows, const PinballInputs& p) {
  check_dim(grad_rows, 1, "grad_rows");
  check_size(grad_rows, 0, p.R, "grad_rows", "pred.size(0)");
  check_dtype(grad_rows, opmath_dtype(p.pred), "grad_rows", "the accumulation dtype of pred");
  check_same_device(grad_rows, p.pred, "grad_rows", "pred");
  return grad_rows.contiguous();
}

// A gate with M = 0 attributes: the mixture is the empty sum, Q_mix = 0 on every quantile, so
// exp_utility is the utility of zeros for any λ (utility −1, certainty equivalent 0) and both
// gradients have no elements. Handled before any kernel (an empty gate has no data pointer).
inline bool utility_gate_is_empty(const UtilityInputs& p) { return p.gate.defined() && p.M == 0; }
inline double empty_mixture_value(UtilityKind kind) { return kind == UtilityKind::kUtility ? -1.0 : 0.0; }

// The upstream gradient of exp_utility: (B,) in the dtype of quantiles, on their device.
inline at::Tensor checked_utility_grad(const at::Tensor& grad, const UtilityInputs& p) {
  check_dim(grad, 1, "grad");
  check_size(grad, 0, p.B, "grad", "quantiles.size(0)");
  check_dtype(grad, p.quantiles.scalar_type(), "grad", "the dtype of quantiles");
  check_same_device(grad, p.quantiles, "grad", "quantiles");
  return grad.contiguous();
}

}  // namespace prefcore
