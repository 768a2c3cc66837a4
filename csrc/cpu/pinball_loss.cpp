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
  acc_t kappa;
  acc_t* loss;               // (R,) or nullptr
  scalar_t* dpred;           // (R, Q) or nullptr
};

// Q is padded up to whole 64-byte SIMD blocks in scratch (pad lanes compute values that are
// never stored), so the hot loop has no scalar tail and its accumulators stay in registers
// across the loop over targets.
template <bool kHuber, bool kGrad, typename scalar_t, typename acc_t>
PREFCORE_ALWAYS_INLINE void pinball_rows(std::bool_constant<kHuber>, std::bool_constant<kGrad>,
                                         const PinballArgs<scalar_t, acc_t>& a, int64_t r0,
                                         int64_t r1) {
  constexpr int64_t W = kLanes<acc_t>;
  const int64_t Q = a.Q, N = a.N;
  const int64_t Qp = (Q + W - 1) / W * W;
  const HuberScale<acc_t> h{a.kappa, kHuber ? acc_t(1) / a.kappa : acc_t(0)};
  std::vector<acc_t> scratch(4 * Qp + N);
  acc_t* __restrict p = scratch.data();
  acc_t* __restrict taus = p + Qp;
  acc_t* __restrict lacc = taus + Qp;
  acc_t* __restrict gacc = lacc + Qp;
  acc_t* __restrict t = gacc + Qp;
  for (int64_t q = 0; q < Qp; ++q) {
    taus[q] = q < Q ? a.taus[q] : acc_t(0.5);
    p[q] = acc_t(0);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t* tr = a.target + r * N;
    int64_t nv = 0;
    if (a.mask != nullptr) {
      const bool* mr = a.mask + r * N;
      for (int64_t n = 0; n < N; ++n) {
        t[nv] = tr[n];
        nv += mr[n] ? 1 : 0;
      }
    } else {
      for (int64_t n = 0; n < N; ++n) t[n] = tr[n];
      nv = N;
    }
    if (nv == 0) {  // no valid target: loss 0, gradient 0 (DESIGN §3.1)
      if (a.loss) a.loss[r] = acc_t(0);
      if (kGrad) for (int64_t q = 0; q < Q; ++q) a.dpred[r * Q + q] = scalar_t(0);
      continue;
    }
    const scalar_t* pr = a.pred + r * Q;
    for (int64_t q = 0; q < Q; ++q) p[q] = static_cast<acc_t>(pr[q]);
    using V = Simd<acc_t>;
    for (int64_t qb = 0; qb < Qp; qb += W) {
      const V pv = simd_load(p + qb);
      const V tv = simd_load(taus + qb);
      V L{}, G{};
      for (int64_t n = 0; n < nv; ++n) {
        const V u = t[n] - pv;
        L += pinball_rho<kHuber, V, acc_t>(u, tv, h);
        if (kGrad) G += pinball_dpred<kHuber, V, acc_t>(u, tv, h);
      }
      simd_store(lacc + qb, L);
      if (kGrad) simd_store(gacc + qb, G);
    }
    const acc_t scale = acc_t(1) / (static_cast<acc_t>(nv) * static_cast<acc_t>(Q));
    if (a.loss) {
      acc_t s = acc_t(0);
      for (int64_t q = 0; q < Q; ++q) s += lacc[q];
      a.loss[r] = s * scale;
    }
    if (kGrad) {
      const acc_t gs = a.grad_rows ? a.grad_rows[r] * scale : scale;
      for (int64_t q = 0; q < Q; ++q) a.dpred[r * Q + q] = static_cast<scalar_t>(gacc[q] * gs);
    }
  }
}

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
      p.Q, p.N, static_cast<acc_t>(kappa),
      loss ? loss->mutable_data_ptr<acc_t>() : nullptr,
      dpred ? dpred->mutable_data_ptr<scalar_t>() : nullptr};
  const Isa isa = active_isa();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.N * p.Q));
  at::parallel_for(0, p.R, grain, [&](int64_t r0, int64_t r1) {
    const bool huber = kappa > 0.0;
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
