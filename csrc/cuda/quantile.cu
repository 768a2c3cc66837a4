// CUDA kernels of the quantile op family: pinball_loss (+ backward) and exp_utility (+ backward).
// One warp per row; lanes stride over quantiles; warp-shuffle reductions (deterministic, no
// atomics); fp32 accumulation (fp64 for fp64); 64-bit indexing. Maths from quantile_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "prefcore/quantile_math.h"
#include "quantile_checks.h"
#include "cuda/smem.cuh"
#include "cuda/warp.cuh"

namespace prefcore::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

int64_t blocks_for(int64_t rows) { return (rows + kWarpsPerBlock - 1) / kWarpsPerBlock; }

// ---- pinball ------------------------------------------------------------------------------
// loss (R,) opmath or nullptr; dpred (R, Q) or nullptr; grad_rows scales dpred (backward op).
template <bool kHuber, typename scalar_t, typename acc_t>
__global__ void pinball_kernel(const scalar_t* __restrict__ pred, const acc_t* __restrict__ target,
                               const bool* __restrict__ mask, const acc_t* __restrict__ taus,
                               const acc_t* __restrict__ grad_rows, int64_t R, int64_t Q,
                               int64_t N, HuberScale<acc_t> h, acc_t* __restrict__ loss,
                               scalar_t* __restrict__ dpred) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= R) return;
  const acc_t* tr = target + row * N;
  const bool* mr = mask ? mask + row * N : nullptr;
  int64_t nv = 0;
  for (int64_t n = lane; n < N; n += kWarp) nv += (mr == nullptr || mr[n]) ? 1 : 0;
  nv = warp_sum(nv);
  const acc_t scale = nv > 0 ? acc_t(1) / (static_cast<acc_t>(nv) * static_cast<acc_t>(Q)) : acc_t(0);
  // A row with no valid target has loss 0 and gradient 0 whatever its upstream gradient (as on
  // the CPU): g·grad_rows·0 would be NaN for an inf/NaN grad_rows.
  const acc_t gs = nv == 0 ? acc_t(0) : (grad_rows ? grad_rows[row] * scale : scale);
  acc_t lsum = acc_t(0);
  for (int64_t q = lane; q < Q; q += kWarp) {
    const acc_t p = static_cast<acc_t>(pred[row * Q + q]);
    const acc_t tau = taus[q];
    acc_t l = acc_t(0), g = acc_t(0);
    for (int64_t n = 0; n < N; ++n) {
      if (mr != nullptr && !mr[n]) continue;
      const acc_t u = tr[n] - p;
      l += pinball_rho<kHuber, acc_t, acc_t>(u, tau, h);
      g += pinball_dpred<kHuber, acc_t, acc_t>(u, tau, h);
    }
    // Scaled per quantile before the sum over quantiles (as on the CPU), and redone with every
    // term pre-scaled where the plain sum over targets overflowed: a finite mean stays finite.
    if (loss != nullptr && !isfinite(l)) {
      l = acc_t(0);
      for (int64_t n = 0; n < N; ++n) {
        if (mr != nullptr && !mr[n]) continue;
        l += pinball_rho<kHuber, acc_t, acc_t>(tr[n] - p, tau, h) * scale;
      }
      lsum += l;
    } else {
      lsum += l * scale;
    }
    if (dpred != nullptr) dpred[row * Q + q] = static_cast<scalar_t>(g * gs);
  }
  lsum = warp_sum(lsum);
  if (loss != nullptr && lane == 0) loss[row] = lsum;
}

template <typename scalar_t>
void launch_pinball(const PinballInputs& p, double kappa, const at::Tensor* grad_rows,
                    at::Tensor* loss, at::Tensor* dpred) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.R == 0) return;
  const HuberScale<acc_t> h = make_huber_scale<acc_t>(kappa);  // κ with 1/κ overflowing → 0
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(blocks_for(p.R))), block(kWarp * kWarpsPerBlock);
  const bool* mask = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;
  const acc_t* g = grad_rows ? grad_rows->const_data_ptr<acc_t>() : nullptr;
  acc_t* l = loss ? loss->mutable_data_ptr<acc_t>() : nullptr;
  scalar_t* d = dpred ? dpred->mutable_data_ptr<scalar_t>() : nullptr;
  if (h.kappa > acc_t(0)) {
    pinball_kernel<true><<<grid, block, 0, stream>>>(p.pred.const_data_ptr<scalar_t>(), p.target.const_data_ptr<acc_t>(), mask,
                                                     p.taus.const_data_ptr<acc_t>(), g, p.R, p.Q, p.N, h, l, d);
  } else {
    pinball_kernel<false><<<grid, block, 0, stream>>>(p.pred.const_data_ptr<scalar_t>(), p.target.const_data_ptr<acc_t>(), mask,
                                                      p.taus.const_data_ptr<acc_t>(), g, p.R, p.Q, p.N, h, l, d);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> pinball_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                     const at::Tensor& taus,
                                                     const std::optional<at::Tensor>& target_mask,
                                                     double kappa, bool need_grad) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const PinballInputs p = prepare_pinball(pred, target, taus, target_mask, kappa);
  at::Tensor loss = at::empty({p.R}, pred.options().dtype(opmath_dtype(pred)));
  at::Tensor dpred = need_grad ? at::empty({p.R, p.Q}, pred.options()) : at::empty({0}, pred.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pinball_loss_cuda", [&] {
    launch_pinball<scalar_t>(p, kappa, nullptr, &loss, need_grad ? &dpred : nullptr);
  });
  return {loss, dpred};
}

at::Tensor pinball_loss_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& pred,
                                      const at::Tensor& target, const at::Tensor& taus,
                                      const std::optional<at::Tensor>& target_mask, double kappa) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const PinballInputs p = prepare_pinball(pred, target, taus, target_mask, kappa);
  const at::Tensor g = checked_pinball_grad_rows(grad_rows, p);
  at::Tensor dpred = at::empty({p.R, p.Q}, pred.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pinball_loss_backward_cuda", [&] {
    launch_pinball<scalar_t>(p, kappa, &g, nullptr, &dpred);
  });
  return dpred;
}

// ---- exp_utility --------------------------------------------------------------------------
// Each warp keeps its row's mixed quantiles in shared memory (Q values; opted in up to the
// device's maximum, beyond it row b's slice of a (B, Q) global scratch `xbuf`), computes the
// utility / certainty equivalent and w_q = ∂out/∂Q_mix_q, then writes the output (forward) or
// the gradients (backward).
template <bool kBackward, typename scalar_t, typename acc_t>
__global__ void utility_kernel(const scalar_t* __restrict__ quantiles, const scalar_t* __restrict__ gate,
                               const acc_t* __restrict__ lam, bool lam_per_row, int64_t B, int64_t M,
                               int64_t Q, int kind, const scalar_t* __restrict__ grad,
                               scalar_t* __restrict__ out, scalar_t* __restrict__ grad_q,
                               scalar_t* __restrict__ grad_gate, acc_t* __restrict__ xbuf) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (b >= B) return;
  acc_t* x = xbuf != nullptr ? xbuf + b * Q : smem + static_cast<int64_t>(warp) * Q;
  for (int64_t q = lane; q < Q; q += kWarp) {
    acc_t v = acc_t(0);
    if (gate == nullptr) {
      v = static_cast<acc_t>(quantiles[b * Q + q]);
    } else {
      for (int64_t m = 0; m < M; ++m)
        v += static_cast<acc_t>(gate[b * M + m]) * static_cast<acc_t>(quantiles[(b * M + m) * Q + q]);
    }
    x[q] = v;
  }
  __syncwarp();
  const acc_t l = lam[lam_per_row ? b : 0];
  const acc_t invQ = acc_t(1) / static_cast<acc_t>(Q);
  acc_t value;
  acc_t zmax = acc_t(0), denom = acc_t(1), mean = acc_t(0);
  if (kind == static_cast<int>(UtilityKind::kUtility)) {
    acc_t s = acc_t(0);
    for (int64_t q = lane; q < Q; q += kWarp) s += exp(-l * x[q]);
    value = -warp_sum(s) * invQ;
  } else {
    acc_t s = acc_t(0);
    for (int64_t q = lane; q < Q; q += kWarp) s += x[q];
    mean = warp_sum(s) * invQ;
    if (l == acc_t(0)) {
      value = mean;
    } else {
      acc_t zm = -INFINITY, za = acc_t(0);
      for (int64_t q = lane; q < Q; q += kWarp) {
        const acc_t z = -l * (x[q] - mean);
        zm = z > zm ? z : zm;
        za = fabs(z) > za ? fabs(z) : za;
      }
      zmax = warp_max(zm);
      za = warp_max(za);
      acc_t se = acc_t(0), s1 = acc_t(0);
      for (int64_t q = lane; q < Q; q += kWarp) {
        const acc_t z = -l * (x[q] - mean);
        se += exp(z - zmax);
        s1 += expm1_small(z);
      }
      denom = warp_sum(se);
      s1 = warp_sum(s1);
      const acc_t lme = za <= static_cast<acc_t>(kCeSmallZ) ? log1p(s1 * invQ) : zmax + log(denom * invQ);
      value = mean - lme / l;
    }
  }
  if (!kBackward) {
    if (lane == 0) out[b] = static_cast<scalar_t>(value);
    return;
  }
  // w_q = ∂out/∂Q_mix_q, recomputed per q.
  auto weight = [&](int64_t q) -> acc_t {
    if (kind == static_cast<int>(UtilityKind::kUtility)) return l * invQ * exp(-l * x[q]);
    if (l == acc_t(0)) return invQ;
    return exp(-l * (x[q] - mean) - zmax) / denom;
  };
  const acc_t gb = static_cast<acc_t>(grad[b]);
  if (gate == nullptr) {
    for (int64_t q = lane; q < Q; q += kWarp) grad_q[b * Q + q] = static_cast<scalar_t>(gb * weight(q));
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    const acc_t g = static_cast<acc_t>(gate[b * M + m]);
    acc_t dot = acc_t(0);
    for (int64_t q = lane; q < Q; q += kWarp) {
      const acc_t w = weight(q);
      grad_q[(b * M + m) * Q + q] = static_cast<scalar_t>(gb * g * w);
      dot += static_cast<acc_t>(quantiles[(b * M + m) * Q + q]) * w;
    }
    dot = warp_sum(dot);
    if (lane == 0) grad_gate[b * M + m] = static_cast<scalar_t>(gb * dot);
  }
}

template <bool kBackward, typename scalar_t>
void launch_utility(const UtilityInputs& p, const at::Tensor* grad, at::Tensor* out, at::Tensor* grad_q,
                    at::Tensor* grad_gate) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.B == 0) return;
  size_t smem = sizeof(acc_t) * static_cast<size_t>(p.Q) * kWarpsPerBlock;
  const auto kernel = utility_kernel<kBackward, scalar_t, acc_t>;
  at::Tensor scratch;
  acc_t* xbuf = nullptr;
  if (!fit_dynamic_smem(kernel, smem)) {
    scratch = at::empty({p.B * p.Q}, p.quantiles.options().dtype(opmath_dtype(p.quantiles)));
    xbuf = scratch.mutable_data_ptr<acc_t>();
    smem = 0;
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<static_cast<unsigned>(blocks_for(p.B)), kWarp * kWarpsPerBlock, smem, stream>>>(
      p.quantiles.const_data_ptr<scalar_t>(), p.gate.defined() ? p.gate.const_data_ptr<scalar_t>() : nullptr,
      p.lam.const_data_ptr<acc_t>(), p.lam.size(0) != 1 || p.B == 1, p.B, p.M, p.Q, static_cast<int>(p.kind),
      grad ? grad->const_data_ptr<scalar_t>() : nullptr, out ? out->mutable_data_ptr<scalar_t>() : nullptr,
      grad_q ? grad_q->mutable_data_ptr<scalar_t>() : nullptr,
      (grad_gate && grad_gate->numel() > 0) ? grad_gate->mutable_data_ptr<scalar_t>() : nullptr, xbuf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor exp_utility_cuda(const at::Tensor& quantiles, const at::Tensor& lam, const std::optional<at::Tensor>& gate,
                            int64_t kind) {
  const c10::cuda::CUDAGuard guard(quantiles.device());
  const UtilityInputs p = prepare_utility(quantiles, lam, gate, kind);
  at::Tensor out = at::empty({p.B}, quantiles.options());
  if (utility_gate_is_empty(p)) return out.fill_(empty_mixture_value(p.kind));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, quantiles.scalar_type(), "exp_utility_cuda", [&] {
    launch_utility<false, scalar_t>(p, nullptr, &out, nullptr, nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> exp_utility_backward_cuda(const at::Tensor& grad, const at::Tensor& quantiles,
                                                             const at::Tensor& lam,
                                                             const std::optional<at::Tensor>& gate, int64_t kind) {
  const c10::cuda::CUDAGuard guard(quantiles.device());
  const UtilityInputs p = prepare_utility(quantiles, lam, gate, kind);
  const at::Tensor g = checked_utility_grad(grad, p);
  at::Tensor grad_q = at::empty(quantiles.sizes(), quantiles.options());
  at::Tensor grad_gate = p.gate.defined() ? at::empty({p.B, p.M}, quantiles.options()) : at::empty({0}, quantiles.options());
  if (utility_gate_is_empty(p)) return {grad_q, grad_gate};  // both have no elements
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, quantiles.scalar_type(), "exp_utility_backward_cuda", [&] {
    launch_utility<true, scalar_t>(p, &g, nullptr, &grad_q, &grad_gate);
  });
  return {grad_q, grad_gate};
}

}  // namespace
}  // namespace prefcore::cuda

TORCH_LIBRARY_IMPL(prefcore, CUDA, m) {
  m.impl("pinball_loss", &prefcore::cuda::pinball_loss_cuda);
  m.impl("_pinball_loss_backward", &prefcore::cuda::pinball_loss_backward_cuda);
  m.impl("exp_utility", &prefcore::cuda::exp_utility_cuda);
  m.impl("_exp_utility_backward", &prefcore::cuda::exp_utility_backward_cuda);
}
