// CPU kernels of pinball_loss and _pinball_loss_backward (DESIGN §3.1).
//
// One pass per row: the row's valid targets are compacted into a scratch buffer, then for
// each target the loop over the Q predictions accumulates ρ(u) and ∂ρ/∂pred side by side
// (the (R, N, Q) broadcast of the reference never exists). The q-loop is the vectorised one.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/huge_pages.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "prefcore/quantile_math.h"
#include "quantile_checks.h"

namespace prefcore::cpu {
namespace {

template <typename scalar_t, typename acc_t>
struct PinballArgs {
  const scalar_t* pred;      // (R, Q)
  const acc_t* target;       // (R, N), opmath dtype
  const bool* mask;          // (R, N) or nullptr
  const acc_t* taus;         // (Q,)
  const acc_t* grad_rows;    // (R,) upstream gradient (backward op) or nullptr (= 1)
  int64_t Q, N;
  HuberScale<acc_t> h;       // κ = 0 (h.kappa == 0) selects the plain pinball loss
  acc_t* loss;               // (R,) or nullptr
  scalar_t* dpred;           // (R, Q) or nullptr
};

#define PREFCORE_SIMD_KERNELS "cpu/pinball_loss_simd.inc"
#include "cpu/simd_namespaces.inc"

PREFCORE_ISA_CLONES(pinball_rows_isa, pinball_rows)

template <typename scalar_t>
void launch(const PinballInputs& p, double kappa, const at::Tensor* grad_rows, at::Tensor* loss,
            at::Tensor* dpred) {
  using acc_t = at::opmath_type<scalar_t>;
  PinballArgs<scalar_t, acc_t> a{
      p.pred.const_data_ptr<scalar_t>(),
      p.target.const_data_ptr<acc_t>(),
      p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr,
      p.taus.const_data_ptr<acc_t>(),
      grad_rows ? grad_rows->const_data_ptr<acc_t>() : nullptr,
      p.Q, p.N, make_huber_scale<acc_t>(kappa),
      loss ? loss->mutable_data_ptr<acc_t>() : nullptr,
      dpred ? dpred->mutable_data_ptr<scalar_t>() : nullptr};
  const Isa isa = active_isa();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.N * p.Q));
  at::parallel_for(0, p.R, grain, [&](int64_t r0, int64_t r1) {
    const bool huber = a.h.kappa > acc_t(0);
    if (dpred != nullptr) {
      if (huber) pinball_rows_isa(isa, std::true_type{}, std::true_type{}, a, r0, r1);
      else pinball_rows_isa(isa, std::false_type{}, std::true_type{}, a, r0, r1);
    } else {
      if (huber) pinball_rows_isa(isa, std::true_type{}, std::false_type{}, a, r0, r1);
      else pinball_rows_isa(isa, std::false_type{}, std::false_type{}, a, r0, r1);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pinball_loss_cpu(const at::Tensor& pred,
                                                    const at::Tensor& target,
                                                    const at::Tensor& taus,
                                                    const std::optional<at::Tensor>& target_mask,
                                                    double kappa, bool need_grad) {
  const PinballInputs p = prepare_pinball(pred, target, taus, target_mask, kappa);
  at::Tensor loss = at::empty({p.R}, pred.options().dtype(opmath_dtype(pred)));
  at::Tensor dpred = need_grad ? at::empty({p.R, p.Q}, pred.options()) : at::empty({0}, pred.options());
  advise_huge_pages(dpred);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pinball_loss_cpu", [&] {
    launch<scalar_t>(p, kappa, nullptr, &loss, need_grad ? &dpred : nullptr);
  });
  return {loss, dpred};
}

at::Tensor pinball_loss_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& pred,
                                     const at::Tensor& target, const at::Tensor& taus,
                                     const std::optional<at::Tensor>& target_mask, double kappa) {
  const PinballInputs p = prepare_pinball(pred, target, taus, target_mask, kappa);
  const at::Tensor g = checked_pinball_grad_rows(grad_rows, p);
  at::Tensor dpred = at::empty({p.R, p.Q}, pred.options());
  advise_huge_pages(dpred);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pinball_loss_backward_cpu", [&] {
    launch<scalar_t>(p, kappa, &g, nullptr, &dpred);
  });
  return dpred;
}

}  // namespace
}  // namespace prefcore::cpu

TORCH_LIBRARY_IMPL(prefcore, CPU, m) {
  m.impl("pinball_loss", &prefcore::cpu::pinball_loss_cpu);
  m.impl("_pinball_loss_backward", &prefcore::cpu::pinball_loss_backward_cpu);
}
