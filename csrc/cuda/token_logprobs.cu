// CUDA kernels of token_logprobs and _token_logprobs_backward (DESIGN §3.5).
//
// Same tiling as the CPU path, sized for a GPU: the valid tokens (gathered first) are cut into
// blocks of ≤ kTokenTile rows and the vocabulary into tiles chosen so one float32 logits tile
// holds ≤ kTileElems values (32 MiB), never (n, V). Each tile's products come from cuBLAS
// through ATen (at::mm on the current stream; bf16/fp16 inputs use mm's float32-output variant,
// so logits accumulate and land in float32), then a fused epilogue kernel consumes the tile:
//   forward  — one block per row: block max, Σ exp, Σ exp·(z − m), merged into the token's
//              online log-sum-exp state (prefcore/token_logprobs_math.h), plus the target logit;
//   backward — elementwise ∂L/∂z/T written in float32 (float64 for float64) over the logits
//              tile in place, then grad_hidden += dz · W_tile and grad_weight[tile] =
//              Σ_blocks dzᵀ · h_block as float32 GEMMs for every input dtype: with a mean loss
//              over many tokens dz is ~1e-9, below float16's smallest subnormal (6e-8), so a dz
//              rounded to the input dtype would drop the −E_p[W] term (the CPU path's choice too).
//              bf16/fp16 hidden and weight tiles are widened to float32 for these GEMMs.
// Float32 GEMMs follow torch's float32 matmul precision (torch.backends.cuda.matmul.allow_tf32,
// torch.set_float32_matmul_precision): full float32 by default, TF32 only if the caller enabled
// it. The float32-output bf16/fp16 products (at::mm with out_dtype) need torch >= 2.8 (setup.py).
// The target-range check is one device reduction and one host sync (which also yields the
// number of valid tokens for nonzero_static, so gathering costs no second sync).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero_static.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.h"
#include "cuda/warp.cuh"
#include "prefcore/token_logprobs_math.h"
#include "token_logprobs_checks.h"

namespace prefcore::cuda {
namespace {

constexpr int64_t kTokenTile = 4096;
constexpr int64_t kTileElems = int64_t(1) << 23;
constexpr int kRowThreads = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t vocab_tile_for(int64_t tn, int64_t V) {
  const int64_t cols = std::max<int64_t>(128, (kTileElems / std::max<int64_t>(1, tn)) / 128 * 128);
  return std::min(cols, V);
}

// Block-wide reductions of one value per thread (kRowThreads threads); every thread gets the result.
template <typename T, bool kMax>
__device__ __forceinline__ T block_reduce(T v, T* shared) {
  v = kMax ? warp_max(v) : warp_sum(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  constexpr int kWarps = kRowThreads / kWarp;
  T r = shared[0];
  for (int w = 1; w < kWarps; ++w) r = kMax ? (shared[w] > r ? shared[w] : r) : r + shared[w];
  return r;
}

// z: (rows, cols) float32/float64 raw products of tile [v0, v0 + cols); rows r0 .. r0 + rows of
// the valid tokens.
template <bool kEnt, typename acc_t>
__global__ void forward_tile_kernel(const acc_t* __restrict__ z, int64_t cols, int64_t r0, int64_t v0,
                                    const int64_t* __restrict__ tgt, acc_t inv_t, acc_t* __restrict__ m,
                                    acc_t* __restrict__ s, acc_t* __restrict__ s1, acc_t* __restrict__ zt) {
  __shared__ acc_t shared[kRowThreads / kWarp];
  const int64_t row = r0 + blockIdx.x;
  const acc_t* x = z + static_cast<int64_t>(blockIdx.x) * cols;
  acc_t mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) mx = x[j] > mx ? x[j] : mx;
  mx = block_reduce<acc_t, true>(mx, shared) * inv_t;
  acc_t ls = acc_t(0), ls1 = acc_t(0);
  for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) {
    const acc_t d = x[j] * inv_t - mx;
    const acc_t e = tlp_exp(d);
    ls += e;
    if (kEnt) ls1 += e * d;
  }
  ls = block_reduce<acc_t, false>(ls, shared);
  if (kEnt) ls1 = block_reduce<acc_t, false>(ls1, shared);
  if (threadIdx.x == 0) {
    const LseState<acc_t> st = lse_merge(LseState<acc_t>{m[row], s[row], s1[row]}, LseState<acc_t>{mx, ls, ls1});
    m[row] = st.m;
    s[row] = st.s;
    s1[row] = st.s1;
    const int64_t t = tgt[row] - v0;
    if (t >= 0 && t < cols) zt[row] = x[t] * inv_t;
  }
}

// Final values of the n valid tokens, scattered to their flat positions (idx, or i itself).
template <typename acc_t>
__global__ void finish_kernel(int64_t n, const int64_t* __restrict__ idx, const acc_t* __restrict__ m,
                              const acc_t* __restrict__ s, const acc_t* __restrict__ s1,
                              const acc_t* __restrict__ zt, acc_t* __restrict__ lse, acc_t* __restrict__ lp,
                              acc_t* __restrict__ ent) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const LseState<acc_t> st{m[i], s[i], s1[i]};
  const int64_t o = idx != nullptr ? idx[i] : i;
  const acc_t l = lse_value(st);
  lse[o] = l;
  lp[o] = zt[i] - l;
  if (ent != nullptr) ent[o] = lse_entropy(st);
}

// dz[e] = ∂L/∂x (already /T) in the accumulation dtype for the (rows, cols) tile at rows r0..,
// cols v0.. (dz aliases z: each element is read, then written, by the same thread).
template <bool kEnt, typename acc_t>
__global__ void backward_tile_kernel(const acc_t* z, acc_t* dz, int64_t rows,
                                     int64_t cols, int64_t r0, int64_t v0, const int64_t* __restrict__ tgt,
                                     acc_t inv_t, const acc_t* __restrict__ lse, const acc_t* __restrict__ mu,
                                     const acc_t* __restrict__ a, const acc_t* __restrict__ b) {
  const int64_t total = rows * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = r0 + e / cols, c = e % cols;
    const acc_t zz = z[e] * inv_t;
    const acc_t p = tlp_exp(zz - lse[r]);
    acc_t g = kEnt ? tlp_dz<acc_t, acc_t>(p, zz, mu[r], a[r], b[r]) : -(p * a[r]);
    if (c == tgt[r] - v0) g += a[r];
    dz[e] = g;
  }
}

// out (acc dtype) = / += a · b, with float32 output for bf16/fp16 operands.
void mm_acc(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == out.scalar_type()) {
    if (accumulate) out.addmm_(a, b);
    else at::mm_out(out, a, b);
  } else {
    if (accumulate) at::addmm_out(out, out, a, b, out.scalar_type());
    else at::mm_out(out, a, b, out.scalar_type());
  }
}

struct ValidTokensCuda {
  at::Tensor index;    // (n,) int64, undefined = every token valid
  at::Tensor targets;  // (n,) int64
  int64_t n = 0;
};

ValidTokensCuda gather_valid(const TokenLogprobsInputs& p, bool check_range) {
  ValidTokensCuda v;
  const at::Tensor t = p.targets.to(at::kLong);
  const bool masked = p.mask.defined();
  if (check_range) {
    at::Tensor bad = t.lt(0).logical_or_(t.ge(p.V));
    if (masked) bad.logical_and_(p.mask);
    // One reduction, one host sync: (number of bad targets, number of valid tokens).
    const at::Tensor counts =
        at::stack({bad.sum(), masked ? p.mask.sum() : at::zeros({}, t.options()).fill_(p.N)}).cpu();
    const int64_t* c = counts.const_data_ptr<int64_t>();
    if (c[0] > 0) fail_target_range(t.masked_select(bad).cpu().const_data_ptr<int64_t>()[0], p.V);
    v.n = c[1];
  } else {
    v.n = masked ? p.mask.sum().item<int64_t>() : p.N;
  }
  if (masked && v.n < p.N) {
    v.index = at::nonzero_static(p.mask, v.n, -1).select(1, 0).contiguous();
    v.targets = at::index_select(t, 0, v.index);
  } else {
    v.targets = t;
  }
  return v;
}

at::Tensor valid_rows(const at::Tensor& x, const ValidTokensCuda& v) {
  return (v.index.defined() ? at::index_select(x, 0, v.index) : x).contiguous();
}

at::Tensor scatter_rows(const at::Tensor& vals, const ValidTokensCuda& v, int64_t N, at::ScalarType dt) {
  if (!v.index.defined()) return vals.to(dt);
  auto sizes = vals.sizes().vec();
  sizes[0] = N;
  at::Tensor out = at::zeros(sizes, vals.options().dtype(dt));
  if (v.n > 0) out.index_copy_(0, v.index, vals.to(dt));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                   const at::Tensor& targets,
                                                                   const std::optional<at::Tensor>& mask,
                                                                   double temperature, bool return_entropy) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const TokenLogprobsInputs p = prepare_token_logprobs(hidden, weight, targets, mask, temperature);
  const ValidTokensCuda v = gather_valid(p, /*check_range=*/true);
  const at::ScalarType acc = opmath_dtype(p.hidden);
  const auto opts = p.hidden.options().dtype(acc);
  at::Tensor lse = at::zeros({p.N}, opts), lp = at::zeros({p.N}, opts);
  at::Tensor ent = at::zeros({return_entropy ? p.N : 0}, opts);
  if (v.n == 0) return {lp, ent, lse};
  const at::Tensor hv = valid_rows(p.hidden, v);
  const int64_t n = v.n, V = p.V;
  const int64_t tn = std::min(n, kTokenTile), tv = vocab_tile_for(tn, V);
  at::Tensor state = at::zeros({4, n}, opts);  // m, s, s1, z_target
  at::Tensor tile = at::empty({tn * tv}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* tgt = v.targets.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(acc, "token_logprobs_cuda", [&] {
    using acc_t = scalar_t;
    acc_t* st = state.mutable_data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(p.inv_temperature);
    for (int64_t r0 = 0; r0 < n; r0 += tn) {
      const int64_t rn = std::min(tn, n - r0);
      const at::Tensor hb = hv.narrow(0, r0, rn);
      for (int64_t v0 = 0; v0 < V; v0 += tv) {
        const int64_t vn = std::min(tv, V - v0);
        at::Tensor z = tile.narrow(0, 0, rn * vn).view({rn, vn});
        mm_acc(z, hb, p.weight.narrow(0, v0, vn).t(), false);
        const dim3 grid(static_cast<unsigned>(rn)), block(kRowThreads);
        if (return_entropy) {
          forward_tile_kernel<true><<<grid, block, 0, stream>>>(z.const_data_ptr<acc_t>(), vn, r0, v0, tgt, inv_t, st,
                                                                st + n, st + 2 * n, st + 3 * n);
        } else {
          forward_tile_kernel<false><<<grid, block, 0, stream>>>(z.const_data_ptr<acc_t>(), vn, r0, v0, tgt, inv_t, st,
                                                                 st + n, st + 2 * n, st + 3 * n);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    const int64_t* idx = v.index.defined() ? v.index.const_data_ptr<int64_t>() : nullptr;
    finish_kernel<acc_t><<<static_cast<unsigned>(ceil_div(n, 256)), 256, 0, stream>>>(
        n, idx, st, st + n, st + 2 * n, st + 3 * n, lse.mutable_data_ptr<acc_t>(), lp.mutable_data_ptr<acc_t>(),
        return_entropy ? ent.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {lp, ent, lse};
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_backward_cuda(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& targets, const std::optional<at::Tensor>& mask,
    const at::Tensor& lse, const at::Tensor& entropy, double temperature, bool need_hidden_grad,
    bool need_weight_grad) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const TokenLogprobsInputs p = prepare_token_logprobs(hidden, weight, targets, mask, temperature);
  const at::Tensor gl = checked_token_vector(grad_logprobs, p, "grad_logprobs");
  const at::Tensor l = checked_token_vector(lse, p, "lse");
  const bool has_ge = grad_entropy.has_value() && grad_entropy->defined();
  at::Tensor ge, e;
  if (has_ge) {
    ge = checked_token_vector(*grad_entropy, p, "grad_entropy");
    e = checked_token_vector(entropy, p, "entropy");
  }
  at::Tensor gh_out = at::empty({0}, p.hidden.options()), gw_out = at::empty({0}, p.weight.options());
  if (!need_hidden_grad && !need_weight_grad) return {gh_out, gw_out};
  const ValidTokensCuda v = gather_valid(p, /*check_range=*/false);
  const at::ScalarType acc = opmath_dtype(p.hidden), dt = p.hidden.scalar_type();
  const auto aopts = p.hidden.options().dtype(acc);
  const int64_t n = v.n, V = p.V, H = p.H;
  at::Tensor gh = need_hidden_grad ? at::zeros({n, H}, aopts) : at::Tensor();
  at::Tensor gw = need_weight_grad ? at::zeros({V, H}, p.weight.options()) : at::Tensor();
  if (n > 0) {
    const at::Tensor hv = valid_rows(p.hidden, v);
    const at::Tensor lv = valid_rows(l, v);
    const at::Tensor av = valid_rows(gl, v).mul(p.inv_temperature);
    at::Tensor muv, bv;
    if (has_ge) {
      muv = lv.sub(valid_rows(e, v));
      bv = valid_rows(ge, v).mul(p.inv_temperature);
    }
    const bool widen = dt != acc;  // bf16/fp16: the gradient GEMMs run in float32
    const int64_t tn = std::min(n, kTokenTile);
    // With widening, the float32 weight tile (tv, H) is bounded like the logits tile.
    const int64_t tv = widen ? std::min(vocab_tile_for(tn, V), vocab_tile_for(H, V)) : vocab_tile_for(tn, V);
    const int64_t nb = ceil_div(n, tn);
    at::Tensor tile = at::empty({tn * tv}, aopts);  // logits, then dz in place
    const at::Tensor hva = (widen && need_weight_grad) ? hv.to(acc) : hv;
    at::Tensor wacc = (widen && need_hidden_grad) ? at::empty({tv, H}, aopts) : at::Tensor();
    at::Tensor gwacc = (need_weight_grad && widen) ? at::empty({tv, H}, aopts) : at::Tensor();
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t* tgt = v.targets.const_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "token_logprobs_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t inv_t = static_cast<acc_t>(p.inv_temperature);
      for (int64_t v0 = 0; v0 < V; v0 += tv) {
        const int64_t vn = std::min(tv, V - v0);
        const at::Tensor wt = p.weight.narrow(0, v0, vn);
        at::Tensor wta = wt;
        if (widen && need_hidden_grad) {
          wta = wacc.narrow(0, 0, vn);
          wta.copy_(wt);
        }
        at::Tensor gwt;
        if (need_weight_grad) gwt = widen ? gwacc.narrow(0, 0, vn) : gw.narrow(0, v0, vn);
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t r0 = b * tn, rn = std::min(tn, n - r0);
          const at::Tensor hb = hv.narrow(0, r0, rn);
          at::Tensor z = tile.narrow(0, 0, rn * vn).view({rn, vn});
          at::Tensor& dz = z;
          mm_acc(z, hb, wt.t(), false);
          const int64_t total = rn * vn;
          const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 65535));
          if (has_ge) {
            backward_tile_kernel<true, acc_t><<<blocks, 256, 0, stream>>>(
                z.const_data_ptr<acc_t>(), dz.mutable_data_ptr<acc_t>(), rn, vn, r0, v0, tgt, inv_t,
                lv.const_data_ptr<acc_t>(), muv.const_data_ptr<acc_t>(), av.const_data_ptr<acc_t>(),
                bv.const_data_ptr<acc_t>());
          } else {
            backward_tile_kernel<false, acc_t><<<blocks, 256, 0, stream>>>(
                z.const_data_ptr<acc_t>(), dz.mutable_data_ptr<acc_t>(), rn, vn, r0, v0, tgt, inv_t,
                lv.const_data_ptr<acc_t>(), nullptr, av.const_data_ptr<acc_t>(), nullptr);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          // Both products in the accumulation dtype (float32 dz, widened operands).
          if (need_weight_grad) mm_acc(gwt, dz.t(), hva.narrow(0, r0, rn), b > 0);
          if (need_hidden_grad) {
            at::Tensor ghb = gh.narrow(0, r0, rn);
            mm_acc(ghb, dz, wta, true);
          }
        }
        if (need_weight_grad && widen) gw.narrow(0, v0, vn).copy_(gwt);
      }
    });
  }
  if (need_hidden_grad) gh_out = scatter_rows(gh, v, p.N, p.hidden.scalar_type());
  if (need_weight_grad) gw_out = gw;
  return {gh_out, gw_out};
}

}  // namespace
}  // namespace prefcore::cuda

TORCH_LIBRARY_IMPL(prefcore, CUDA, m) {
  m.impl("token_logprobs", &prefcore::cuda::token_logprobs_cuda);
  m.impl("_token_logprobs_backward", &prefcore::cuda::token_logprobs_backward_cuda);
}
