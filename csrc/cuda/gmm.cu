// CUDA kernels of the Gaussian-mixture op family: gmm_nll and _gmm_nll_backward (DESIGN §3.2).
// One warp per row; the row's K components are prepared once into shared memory (opted in up to
// the device's maximum; beyond it, a global scratch buffer, so any K runs); lanes stride
// over the row's points; warp-shuffle reductions (deterministic, no atomics); fp32 accumulation
// (fp64 for fp64); 64-bit indexing. Maths from prefcore/gmm_math.h (shared with the CPU path).
//
// Backward: per point, log p(x) (K exps) and then r_k = exp(a_k − log p) for the components
// of the current chunk of kChunk, accumulated in registers (R_k, M_k, S_k); K > kChunk takes
// ceil(K/kChunk) passes over the points. Nothing of size (B, K, G) is stored.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>

#include "common.h"
#include "gmm_checks.h"
#include "prefcore/gmm_math.h"
#include "cuda/smem.cuh"
#include "cuda/warp.cuh"

namespace prefcore::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kChunk = 8;  // components whose backward sums live in registers at once

template <typename acc_t>
__device__ __forceinline__ acc_t point_at(const GmmArgs<acc_t>& a, int64_t b, int64_t p) {
  return a.points[b * a.pts_row_stride + p * a.pts_col_stride];
}

template <typename acc_t>
__device__ __forceinline__ acc_t weight_at(const GmmArgs<acc_t>& a, int64_t b, int64_t p) {
  return a.weights == nullptr ? acc_t(1) : a.weights[b * a.w_row_stride + p * a.w_col_stride];
}

// log p(x) = logsumexp_k a_k(x) over the row's components in shared memory (−∞ if every
// component underflowed).
template <typename acc_t>
__device__ __forceinline__ acc_t point_logp(acc_t x, const GmmComponent<acc_t>* comp, int64_t K) {
  acc_t m = -INFINITY;
  for (int64_t k = 0; k < K; ++k) {
    const acc_t ak = gmm_log_term<acc_t, acc_t>(gmm_z<acc_t, acc_t>(x, comp[k]), comp[k]);
    m = ak > m ? ak : m;
  }
  if (m == -INFINITY) return m;
  acc_t s = acc_t(0);
  for (int64_t k = 0; k < K; ++k) {
    s += scalar_exp(gmm_log_term<acc_t, acc_t>(gmm_z<acc_t, acc_t>(x, comp[k]), comp[k]) - m);
  }
  return m + scalar_log(s);
}

// logsumexp over the row's points of log p (normalize_grid), combined across the warp.
template <typename acc_t>
__device__ acc_t points_logsumexp(const GmmArgs<acc_t>& a, int64_t b, const GmmComponent<acc_t>* comp,
                                  int lane) {
  acc_t lm = -INFINITY, ls = acc_t(0);  // running max and Σ exp(· − max) of this lane's points
  for (int64_t p = lane; p < a.P; p += kWarp) {
    const acc_t lp = point_logp(point_at(a, b, p), comp, a.K);
    if (lp == -INFINITY) continue;
    if (lp > lm) {
      ls = ls * scalar_exp(lm - lp) + acc_t(1);
      lm = lp;
    } else {
      ls += scalar_exp(lp - lm);
    }
  }
  const acc_t mx = warp_max(lm);
  if (mx == -INFINITY) return mx;
  const acc_t s = warp_sum(lm == -INFINITY ? acc_t(0) : ls * scalar_exp(lm - mx));
  return mx + scalar_log(s);
}

// Prepares the row's components in shared memory; returns log Σ_k exp(logits_k).
template <typename acc_t>
__device__ acc_t prepare_row(const GmmArgs<acc_t>& a, int64_t b, GmmComponent<acc_t>* comp, int lane) {
  const acc_t* lg = a.logits + b * a.K;
  acc_t m = -INFINITY;
  for (int64_t k = lane; k < a.K; k += kWarp) m = lg[k] > m ? lg[k] : m;
  m = warp_max(m);
  acc_t s = acc_t(0);
  for (int64_t k = lane; k < a.K; k += kWarp) s += scalar_exp(lg[k] - m);
  const acc_t log_norm = m + scalar_log(warp_sum(s));
  for (int64_t k = lane; k < a.K; k += kWarp) {
    comp[k] = make_component(lg[k], log_norm, a.mu[b * a.K + k], a.log_sigma[b * a.K + k]);
  }
  __syncwarp();
  return log_norm;
}

template <typename acc_t>
__device__ acc_t row_weight_total(const GmmArgs<acc_t>& a, int64_t b, int lane) {
  if (a.weights == nullptr) return static_cast<acc_t>(a.P);
  acc_t t = acc_t(0);
  for (int64_t p = lane; p < a.P; p += kWarp) t += weight_at(a, b, p);
  return warp_sum(t);
}

// The row's component buffer: shared memory (per warp), or row b's slice of `global` (B, K) when
// the components of kWarpsPerBlock rows do not fit a block's shared memory.
template <typename acc_t>
__device__ __forceinline__ GmmComponent<acc_t>* row_components(unsigned char* smem_raw, GmmComponent<acc_t>* global,
                                                               int warp, int64_t b, int64_t K) {
  return global != nullptr ? global + b * K : reinterpret_cast<GmmComponent<acc_t>*>(smem_raw) + static_cast<int64_t>(warp) * K;
}

template <typename acc_t>
__global__ void gmm_forward_kernel(GmmArgs<acc_t> a, GmmComponent<acc_t>* global_comp) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (b >= a.B) return;
  GmmComponent<acc_t>* comp = row_components(smem_raw, global_comp, warp, b, a.K);
  const acc_t total = row_weight_total(a, b, lane);
  if (!(total > acc_t(0))) {  // all-zero weights: loss 0 (DESIGN §3.2)
    if (lane == 0) {
      a.loss[b] = acc_t(0);
      a.total[b] = total;
    }
    return;
  }
  prepare_row(a, b, comp, lane);
  // normalize_grid: log q_g = log p(x_g) − lse is formed per point before weighting (as on the
  // CPU), so a one-point grid gives exactly 0 rather than a cancelling −w̄·log p + lse.
  const acc_t lse = a.normalize ? points_logsumexp(a, b, comp, lane) : acc_t(0);
  acc_t wl = acc_t(0);
  for (int64_t p = lane; p < a.P; p += kWarp) {
    const acc_t w = weight_at(a, b, p);
    if (w > acc_t(0)) wl += w * (point_logp(point_at(a, b, p), comp, a.K) - lse);  // zero weight adds 0
  }
  acc_t loss = -warp_sum(wl) / total;
  if (a.normalize && lse == -INFINITY) loss = acc_t(INFINITY);
  if (lane == 0) {
    a.loss[b] = loss;
    a.total[b] = total;
  }
}

template <typename acc_t>
__global__ void gmm_backward_kernel(GmmArgs<acc_t> a, GmmComponent<acc_t>* global_comp) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (b >= a.B) return;
  GmmComponent<acc_t>* comp = row_components(smem_raw, global_comp, warp, b, a.K);
  const int64_t K = a.K;
  const acc_t total = row_weight_total(a, b, lane);
  // All-zero weights: zero gradient. One-point normalised grid: q ≡ 1, the forward is exactly 0
  // for every parameter value, so its gradient is exactly 0 (as on the CPU).
  if (!(total > acc_t(0)) || (a.normalize && a.P == 1)) {
    for (int64_t k = lane; k < K; k += kWarp) a.dlogits[b * K + k] = a.dmu[b * K + k] = a.dlog_sigma[b * K + k] = acc_t(0);
    return;
  }
  const acc_t log_norm = prepare_row(a, b, comp, lane);
  const acc_t lse = a.normalize ? points_logsumexp(a, b, comp, lane) : acc_t(0);
  const acc_t inv_total = acc_t(1) / total;
  const acc_t g = a.grad_rows[b];
  // The largest finite value of acc_t (selected in double, so float never sees DBL_MAX).
  const acc_t kBig = static_cast<acc_t>(sizeof(acc_t) >= 8 ? DBL_MAX : double(FLT_MAX));
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    GmmGradSums<acc_t> sums[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) sums[j] = GmmGradSums<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
    acc_t omega_sum = acc_t(0);
    for (int64_t p = lane; p < a.P; p += kWarp) {
      const acc_t x = point_at(a, b, p);
      const acc_t logp = point_logp(x, comp, K);
      acc_t omega = weight_at(a, b, p) * inv_total;
      if (a.normalize) omega -= scalar_exp(logp - lse);  // q_g
      omega_sum += omega;
      if (omega == acc_t(0)) continue;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        if (k0 + j < K) {
          const GmmComponent<acc_t> c = comp[k0 + j];
          acc_t z = gmm_z<acc_t, acc_t>(x, c);
          const acc_t t = omega * scalar_exp(gmm_log_term<acc_t, acc_t>(z, c) - logp);
          z = z > kBig ? kBig : (z < -kBig ? -kBig : z);  // where z overflows t = 0: keep 0·z = 0
          gmm_accumulate(sums[j], t, z);
        }
      }
    }
    omega_sum = warp_sum(omega_sum);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (k0 + j < K) {
        const GmmGradSums<acc_t> s{warp_sum(sums[j].R), warp_sum(sums[j].M), warp_sum(sums[j].S)};
        if (lane == 0) {
          const int64_t k = k0 + j;
          const acc_t pi = scalar_exp(a.logits[b * K + k] - log_norm);
          const GmmComponentGrad<acc_t> gr = gmm_component_grad(s, pi, omega_sum, comp[k].inv_sigma, g);
          a.dlogits[b * K + k] = gr.dlogit;
          a.dmu[b * K + k] = gr.dmu;
          a.dlog_sigma[b * K + k] = gr.dlog_sigma;
        }
      }
    }
  }
}

unsigned blocks_for(int64_t rows) { return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }

// Launches `kernel` with the rows' components in shared memory when they fit a block (opting in
// beyond 48 KiB), else in a (B, K) global scratch buffer.
template <typename acc_t, typename Kernel>
void launch_gmm(Kernel kernel, const GmmArgs<acc_t>& a, const at::Tensor& like) {
  const size_t bytes = sizeof(GmmComponent<acc_t>) * static_cast<size_t>(a.K) * kWarpsPerBlock;
  at::Tensor scratch;
  GmmComponent<acc_t>* global = nullptr;
  size_t smem = bytes;
  if (!fit_dynamic_smem(kernel, bytes)) {
    scratch = at::empty({static_cast<int64_t>(sizeof(GmmComponent<acc_t>)) * a.B * a.K}, like.options().dtype(at::kByte));
    global = reinterpret_cast<GmmComponent<acc_t>*>(scratch.mutable_data_ptr<uint8_t>());
    smem = 0;
  }
  kernel<<<blocks_for(a.B), kWarp * kWarpsPerBlock, smem, c10::cuda::getCurrentCUDAStream()>>>(a, global);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> gmm_nll_cuda(const at::Tensor& logits, const at::Tensor& mu,
                                                const at::Tensor& log_sigma, const at::Tensor& points,
                                                const std::optional<at::Tensor>& weights, bool normalize_grid) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const GmmInputs p = prepare_gmm(logits, mu, log_sigma, points, weights, normalize_grid);
  const auto acc = opmath_dtype(logits);
  at::Tensor loss = at::empty({p.B}, logits.options().dtype(acc));
  at::Tensor total = at::empty({p.B}, logits.options().dtype(acc));
  if (p.B == 0) return {loss, total};
  check_gmm_values(p);
  const at::Tensor l = p.logits.to(acc), m = p.mu.to(acc), s = p.log_sigma.to(acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "gmm_nll_cuda", [&] {
    auto a = make_gmm_args<scalar_t>(p, l, m, s);
    a.loss = loss.mutable_data_ptr<scalar_t>();
    a.total = total.mutable_data_ptr<scalar_t>();
    launch_gmm<scalar_t>(gmm_forward_kernel<scalar_t>, a, l);
  });
  return {loss, total};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gmm_nll_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& points, const std::optional<at::Tensor>& weights, bool normalize_grid) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const GmmInputs p = prepare_gmm(logits, mu, log_sigma, points, weights, normalize_grid);
  const at::Tensor g = checked_gmm_grad_rows(grad_rows, p);
  const auto acc = opmath_dtype(logits);
  at::Tensor dl = at::empty({p.B, p.K}, logits.options().dtype(acc));
  at::Tensor dm = at::empty({p.B, p.K}, logits.options().dtype(acc));
  at::Tensor ds = at::empty({p.B, p.K}, logits.options().dtype(acc));
  if (p.B > 0) {
    check_gmm_values(p);
    const at::Tensor l = p.logits.to(acc), m = p.mu.to(acc), s = p.log_sigma.to(acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "gmm_nll_backward_cuda", [&] {
      auto a = make_gmm_args<scalar_t>(p, l, m, s);
      a.grad_rows = g.const_data_ptr<scalar_t>();
      a.dlogits = dl.mutable_data_ptr<scalar_t>();
      a.dmu = dm.mutable_data_ptr<scalar_t>();
      a.dlog_sigma = ds.mutable_data_ptr<scalar_t>();
      launch_gmm<scalar_t>(gmm_backward_kernel<scalar_t>, a, l);
    });
  }
  const auto out = logits.scalar_type();
  return {dl.to(out), dm.to(out), ds.to(out)};
}

}  // namespace
}  // namespace prefcore::cuda

TORCH_LIBRARY_IMPL(prefcore, CUDA, m) {
  m.impl("gmm_nll", &prefcore::cuda::gmm_nll_cuda);
  m.impl("_gmm_nll_backward", &prefcore::cuda::gmm_nll_backward_cuda);
}
