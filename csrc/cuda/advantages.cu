// CUDA kernels of kl_penalized_advantages and masked_whiten (DESIGN §3.4).
//
// One warp per row. rloo/grpo: the warp computes KL, token rewards and R = Σ_t r_t (warp
// reduction); one thread per group turns the group's R into per-row advantages; an elementwise
// pass broadcasts them over valid tokens. gae: the warp walks the row right to left in chunks of
// 32·kSeg tokens; each lane owns kSeg consecutive tokens, and two warp scans make the chunk
// parallel: (1) "value of the nearest valid token to my right" (needed for δ), (2) composition of
// the per-lane affine maps g_in ↦ A·g_in + B of the recurrence g ← δ + γλ·g over valid tokens.
// Whitening: per-row (or per-chunk) moments in float64 merged by one block in a fixed tree order
// (deterministic), then an elementwise pass. Maths from advantage_math.h; fp32 accumulation
// (fp64 for fp64 inputs); 64-bit indexing.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "advantage_checks.h"
#include "common.h"
#include "prefcore/advantage_math.h"
#include "cuda/warp.cuh"

namespace prefcore::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kSeg = 8;                  // tokens per lane per GAE chunk
constexpr int kChunk = kWarp * kSeg;     // tokens per GAE chunk
constexpr int kMergeThreads = 256;       // threads of the one-block moments merge
constexpr int64_t kWhitenChunk = 4096;   // elements per masked_whiten moments block
constexpr int kElemThreads = 256;

template <typename scalar_t, typename acc_t>
struct DevArgs {
  const scalar_t* __restrict__ logprobs;
  const scalar_t* __restrict__ ref;
  const bool* __restrict__ mask;
  const acc_t* __restrict__ scores;
  const scalar_t* __restrict__ values;
  int64_t B, T, k;
  acc_t kl_coef, gamma, gamma_lam, clamp;
  float* __restrict__ adv;
  float* __restrict__ ret;
  float* __restrict__ tr;
  float* __restrict__ kl;
  acc_t* __restrict__ row_reward;       // (B,) R (rloo/grpo)
  acc_t* __restrict__ row_count;        // (B,) valid tokens (rloo/grpo)
  acc_t* __restrict__ row_value;        // (B,) A (rloo/grpo)
  Moments<double>* __restrict__ moments;  // (B,) when whitening, else nullptr
  // (B, T) gae advantages in float64 when whitening float64 inputs, else nullptr: as on the CPU,
  // the moments and the whitening read them before their rounding to the float32 output.
  acc_t* __restrict__ adv_acc;
};

template <KlEstimator kEst, typename acc_t>
__device__ __forceinline__ acc_t kl_token(acc_t d, acc_t clamp) {
  const acc_t e = kEst == KlEstimator::kK3 ? ::exp(-d) : acc_t(0);
  return kl_clamp<acc_t, acc_t>(kl_estimate<kEst, acc_t, acc_t>(d, e), clamp);
}

// Index of the last valid token of row `row` (−1 if none), reduced over the warp.
__device__ __forceinline__ int64_t row_last_valid(const bool* __restrict__ mk, int64_t T, int lane) {
  int64_t last = -1;
  for (int64_t t = lane; t < T; t += kWarp) last = mk[t] ? t : last;
  return warp_max<int64_t>(last);
}

// ---- rloo / grpo ---------------------------------------------------------------------------

template <KlEstimator kEst, typename scalar_t, typename acc_t>
__global__ void kl_rewards_kernel(DevArgs<scalar_t, acc_t> a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= a.B) return;
  const int64_t T = a.T, off = row * T;
  const bool* mk = a.mask + off;
  const int64_t last = row_last_valid(mk, T, lane);
  const acc_t score = a.scores[row];
  acc_t sum = acc_t(0), cnt = acc_t(0);
  for (int64_t t = lane; t < T; t += kWarp) {
    acc_t kl = acc_t(0), r = acc_t(0);
    if (mk[t]) {
      const acc_t d = static_cast<acc_t>(a.logprobs[off + t]) - static_cast<acc_t>(a.ref[off + t]);
      kl = kl_token<kEst>(d, a.clamp);
      r = (t == last ? score : acc_t(0)) - a.kl_coef * kl;
      cnt += acc_t(1);
    }
    sum += r;
    a.kl[off + t] = static_cast<float>(kl);
    a.tr[off + t] = static_cast<float>(r);
  }
  sum = warp_sum(sum);
  cnt = warp_sum(cnt);
  if (lane == 0) {
    a.row_reward[row] = sum;
    a.row_count[row] = cnt;
  }
}

// One thread per group: rloo R_i − (Σ_g R − R_i)/(k − 1); grpo (R_i − mean_g)/(std_g + ε).
template <typename scalar_t, typename acc_t>
__global__ void group_baseline_kernel(DevArgs<scalar_t, acc_t> a, bool grpo) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t k = a.k;
  if (g >= a.B / k) return;
  const acc_t* R = a.row_reward + g * k;
  double total = 0.0;
  for (int64_t j = 0; j < k; ++j) total += static_cast<double>(R[j]);
  double mean = 0.0, inv_std = 0.0;
  if (grpo) {
    mean = total / static_cast<double>(k);
    double ss = 0.0;
    for (int64_t j = 0; j < k; ++j) ss += (R[j] - mean) * (R[j] - mean);
    inv_std = 1.0 / (sqrt(ss / static_cast<double>(k - 1)) + kGrpoEps);
  }
  for (int64_t j = 0; j < k; ++j) {
    const double r = static_cast<double>(R[j]);
    const double A = grpo ? (r - mean) * inv_std : r - (total - r) / static_cast<double>(k - 1);
    a.row_value[g * k + j] = static_cast<acc_t>(A);
    if (a.moments != nullptr) a.moments[g * k + j] = Moments<double>{static_cast<double>(a.row_count[g * k + j]), A, 0.0};
  }
}

// adv = mask ? whitened A_row : 0, ret = mask ? A_row : 0 (elementwise, grid-stride).
template <typename acc_t>
__global__ void broadcast_kernel(const bool* __restrict__ mask, const acc_t* __restrict__ row_value, int64_t n,
                                 int64_t T, const WhitenAffine<double>* __restrict__ affine,
                                 float* __restrict__ adv, float* __restrict__ ret) {
  const double mean = affine ? affine->mean : 0.0, scale = affine ? affine->scale : 1.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool m = mask[i];
    const double A = static_cast<double>(row_value[i / T]);
    adv[i] = m ? static_cast<float>((A - mean) * scale) : 0.f;
    ret[i] = m ? static_cast<float>(A) : 0.f;
  }
}

// ---- gae -----------------------------------------------------------------------------------

// Affine map x ↦ A·x + B; (f ∘ g)(x) = f(g(x)).
template <typename acc_t>
struct Affine {
  acc_t A, B;
};

template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> compose(Affine<acc_t> f, Affine<acc_t> g) {
  return Affine<acc_t>{f.A * g.A, f.A * g.B + f.B};
}

template <KlEstimator kEst, typename scalar_t, typename acc_t>
__global__ void gae_kernel(DevArgs<scalar_t, acc_t> a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= a.B) return;
  const int64_t T = a.T, off = row * T;
  const bool* mk = a.mask + off;
  const int64_t last = row_last_valid(mk, T, lane);
  const acc_t score = a.scores[row];
  acc_t carry_g = acc_t(0), carry_nv = acc_t(0);  // state entering the chunk from the right
  double sum = 0.0;
  int64_t cnt = 0;
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  for (int64_t ci = nchunks - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * kChunk + static_cast<int64_t>(lane) * kSeg;
    bool m[kSeg];
    acc_t r[kSeg], v[kSeg];
    // Load, KL and rewards; leftmost valid value of this lane's segment.
    int has = 0;  // ints, not bools: __shfl_*_sync has no bool overload
    acc_t first_v = acc_t(0);
#pragma unroll
    for (int j = kSeg - 1; j >= 0; --j) {
      const int64_t t = t0 + j;
      m[j] = t < T && mk[t];
      r[j] = acc_t(0);
      v[j] = acc_t(0);
      acc_t klv = acc_t(0);
      if (m[j]) {
        const acc_t d = static_cast<acc_t>(a.logprobs[off + t]) - static_cast<acc_t>(a.ref[off + t]);
        klv = kl_token<kEst>(d, a.clamp);
        r[j] = (t == last ? score : acc_t(0)) - a.kl_coef * klv;
        v[j] = static_cast<acc_t>(a.values[off + t]);
        first_v = v[j];
        has = 1;
      }
      if (t < T) a.kl[off + t] = static_cast<float>(klv);
    }
    // Scan 1: nearest valid value strictly right of my segment (suffix "first defined").
    int s_has = has;
    acc_t s_v = first_v;
#pragma unroll
    for (int o = 1; o < kWarp; o *= 2) {
      const int oh = __shfl_down_sync(0xffffffffu, s_has, o);
      const acc_t ov = __shfl_down_sync(0xffffffffu, s_v, o);
      if (lane + o < kWarp && !s_has) {
        s_has = oh;
        s_v = ov;
      }
    }
    int e_has = __shfl_down_sync(0xffffffffu, s_has, 1);
    acc_t e_v = __shfl_down_sync(0xffffffffu, s_v, 1);
    if (lane == kWarp - 1) e_has = 0;
    const acc_t nv_in = e_has ? e_v : carry_nv;
    // This lane's map g_in ↦ g_out over its valid tokens, right to left.
    Affine<acc_t> f{acc_t(1), acc_t(0)};
    {
      acc_t nv = nv_in;
#pragma unroll
      for (int j = kSeg - 1; j >= 0; --j) {
        if (m[j]) {
          // gae_step on (g = B, nv) gives δ + γλ·B; the map's slope picks up γλ.
          const GaeState<acc_t> s = gae_step<acc_t, acc_t>(GaeState<acc_t>{f.B, nv}, r[j], v[j], a.gamma, a.gamma_lam);
          f = Affine<acc_t>{a.gamma_lam * f.A, s.g};
          nv = s.nv;
        }
      }
    }
    // Scan 2: suffix composition S_l = f_l ∘ f_{l+1} ∘ … ∘ f_31; my input map is S_{l+1}.
    Affine<acc_t> s = f;
#pragma unroll
    for (int o = 1; o < kWarp; o *= 2) {
      const acc_t oA = __shfl_down_sync(0xffffffffu, s.A, o);
      const acc_t oB = __shfl_down_sync(0xffffffffu, s.B, o);
      if (lane + o < kWarp) s = compose(s, Affine<acc_t>{oA, oB});
    }
    acc_t eA = __shfl_down_sync(0xffffffffu, s.A, 1);
    acc_t eB = __shfl_down_sync(0xffffffffu, s.B, 1);
    if (lane == kWarp - 1) {
      eA = acc_t(1);
      eB = acc_t(0);
    }
    // Walk my segment again with the true incoming state and write the outputs.
    GaeState<acc_t> st{eA * carry_g + eB, nv_in};
#pragma unroll
    for (int j = kSeg - 1; j >= 0; --j) {
      const int64_t t = t0 + j;
      if (t >= T) continue;
      float A = 0.f, Rt = 0.f;
      if (m[j]) {
        st = gae_step<acc_t, acc_t>(st, r[j], v[j], a.gamma, a.gamma_lam);
        A = static_cast<float>(st.g);
        Rt = static_cast<float>(st.g + v[j]);
        sum += a.adv_acc != nullptr ? static_cast<double>(st.g) : static_cast<double>(A);
        ++cnt;
      }
      if (a.adv_acc != nullptr) a.adv_acc[off + t] = m[j] ? st.g : acc_t(0);
      a.adv[off + t] = A;
      a.ret[off + t] = Rt;
      a.tr[off + t] = static_cast<float>(r[j]);
    }
    // Carry to the next chunk on the left: the whole chunk's map, and its leftmost valid value.
    const acc_t A0 = __shfl_sync(0xffffffffu, s.A, 0), B0 = __shfl_sync(0xffffffffu, s.B, 0);
    const int h0 = __shfl_sync(0xffffffffu, s_has, 0);
    const acc_t v0 = __shfl_sync(0xffffffffu, s_v, 0);
    carry_g = A0 * carry_g + B0;
    carry_nv = h0 ? v0 : carry_nv;
  }
  if (a.moments == nullptr) return;
  sum = warp_sum(sum);
  const int64_t n = static_cast<int64_t>(warp_sum(static_cast<double>(cnt)));
  const double mean = n > 0 ? sum / static_cast<double>(n) : 0.0;
  __syncwarp();  // this warp's adv stores are visible to its own lanes below
  double m2 = 0.0;
  for (int64_t t = lane; t < T; t += kWarp) {
    const double x = a.adv_acc != nullptr ? static_cast<double>(a.adv_acc[off + t]) : static_cast<double>(a.adv[off + t]);
    const double dv = mk[t] ? x - mean : 0.0;
    m2 += dv * dv;
  }
  m2 = warp_sum(m2);
  if (lane == 0) a.moments[row] = Moments<double>{static_cast<double>(n), mean, m2};
}

// ---- whitening -----------------------------------------------------------------------------

// One block: merges n moments in a fixed order (strided per thread, then a fixed tree) and
// writes {mean, scale, add_back} and the total count.
__global__ void merge_moments_kernel(const Moments<double>* __restrict__ parts, int64_t n, bool unbiased,
                                     bool shift_mean, WhitenAffine<double>* __restrict__ affine,
                                     double* __restrict__ count) {
  __shared__ Moments<double> sh[kMergeThreads];
  Moments<double> m{0.0, 0.0, 0.0};
  for (int64_t i = threadIdx.x; i < n; i += kMergeThreads) m = merge_moments(m, parts[i]);
  sh[threadIdx.x] = m;
  __syncthreads();
  for (int s = kMergeThreads / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) sh[threadIdx.x] = merge_moments(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const Moments<double> t = sh[0];
    const double denom = unbiased ? t.n - 1.0 : t.n;
    const double var = denom > 0.0 ? t.m2 / denom : 0.0;
    *affine = WhitenAffine<double>{t.mean, 1.0 / sqrt(var + kWhitenEps), shift_mean ? 0.0 : t.mean};
    *count = t.n;
  }
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* sh) {  // sh: kElemThreads / kWarp entries
  v = warp_sum(v);
  const int w = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) sh[w] = v;
  __syncthreads();
  T total = T(0);
  for (int i = 0; i < kElemThreads / kWarp; ++i) total += sh[i];  // fixed order
  __syncthreads();
  return total;
}

// One block per chunk of kWhitenChunk elements: count, mean, Σ(x − mean)² in float64.
template <typename scalar_t>
__global__ void chunk_moments_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ mask, int64_t N,
                                     Moments<double>* __restrict__ parts) {
  __shared__ double sh[kElemThreads / kWarp];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kWhitenChunk;
  const int64_t i1 = i0 + kWhitenChunk < N ? i0 + kWhitenChunk : N;
  double s = 0.0, c = 0.0;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += kElemThreads) {
    if (mask[i]) {
      s += static_cast<double>(x[i]);
      c += 1.0;
    }
  }
  const double sum = block_sum(s, sh), cnt = block_sum(c, sh);
  const double mean = cnt > 0.0 ? sum / cnt : 0.0;
  double q = 0.0;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += kElemThreads) {
    const double d = mask[i] ? static_cast<double>(x[i]) - mean : 0.0;
    q += d * d;
  }
  const double m2 = block_sum(q, sh);
  if (threadIdx.x == 0) parts[blockIdx.x] = Moments<double>{cnt, mean, m2};
}

// out = mask ? (x − μ)·s + add : 0 (elementwise; out may alias x), in float64 as on CPU: the
// float64 batch mean rounded to float first lost the digits that tell nearby values apart.
template <typename in_t, typename out_t, typename acc_t>
__global__ void apply_whiten_kernel(const in_t* x, const bool* __restrict__ mask, int64_t n,
                                    const WhitenAffine<double>* __restrict__ affine, out_t* out) {
  const double mean = affine->mean, scale = affine->scale, add = affine->add_back;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = mask[i] ? static_cast<out_t>((static_cast<double>(x[i]) - mean) * scale + add) : static_cast<out_t>(0);
  }
}

unsigned elem_blocks(int64_t n) {
  const int64_t b = (n + kElemThreads - 1) / kElemThreads;
  return static_cast<unsigned>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

// Merges `parts` on the device, checks the count on the host (one sync), returns the affine
// map (device memory) inside `scratch`.
WhitenAffine<double>* merge_and_check(const at::Tensor& parts, int64_t n, bool unbiased, bool shift_mean,
                                      at::Tensor& scratch, const char* what) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  scratch = at::empty({4}, parts.options());  // mean, scale, add_back, count (float64)
  auto* affine = reinterpret_cast<WhitenAffine<double>*>(scratch.mutable_data_ptr<double>());
  double* count = scratch.mutable_data_ptr<double>() + 3;
  merge_moments_kernel<<<1, kMergeThreads, 0, stream>>>(
      reinterpret_cast<const Moments<double>*>(parts.const_data_ptr<double>()), n, unbiased, shift_mean, affine, count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  check_whiten_count(static_cast<int64_t>(scratch[3].item<double>()), unbiased, what);
  return affine;
}

template <typename F>
void with_estimator(KlEstimator e, F&& f) {
  switch (e) {
    case KlEstimator::kK1: f(std::integral_constant<KlEstimator, KlEstimator::kK1>{}); break;
    case KlEstimator::kK2: f(std::integral_constant<KlEstimator, KlEstimator::kK2>{}); break;
    case KlEstimator::kK3: f(std::integral_constant<KlEstimator, KlEstimator::kK3>{}); break;
    case KlEstimator::kAbs: f(std::integral_constant<KlEstimator, KlEstimator::kAbs>{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_penalized_advantages_cuda(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& mask,
    const at::Tensor& scores, const std::optional<at::Tensor>& values, double kl_coef,
    int64_t estimator, int64_t mode, int64_t group_size, double gamma, double lam, bool whiten,
    std::optional<double> kl_clamp, int64_t outputs) {
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const AdvantageInputs p = prepare_advantages(logprobs, ref_logprobs, mask, scores, values, kl_coef,
                                               estimator, mode, group_size, gamma, lam, whiten, kl_clamp);
  check_advantage_outputs(outputs);  // on CUDA every output is computed; the skipped ones are dropped
  const auto opts = p.logprobs.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({p.B, p.T}, opts), ret = at::empty({p.B, p.T}, opts),
             tr = at::empty({p.B, p.T}, opts), kl = at::empty({p.B, p.T}, opts);
  const bool gae = p.mode == AdvantageMode::kGae;
  const auto acc = opmath_dtype(p.logprobs);
  at::Tensor rows = at::empty({gae ? 0 : 3 * p.B}, p.logprobs.options().dtype(acc));
  at::Tensor moments = at::empty({whiten ? 3 * p.B : 0}, p.logprobs.options().dtype(at::kDouble));
  const bool keep_acc = gae && whiten && acc == at::kDouble;
  at::Tensor adv_acc = at::empty({keep_acc ? p.B * p.T : 0}, p.logprobs.options().dtype(at::kDouble));
  at::Tensor scratch;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 row_grid(static_cast<unsigned>(std::max<int64_t>(1, (p.B + kWarpsPerBlock - 1) / kWarpsPerBlock)));
  const dim3 row_block(kWarp * kWarpsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logprobs.scalar_type(), "kl_penalized_advantages_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* rv = gae ? nullptr : rows.mutable_data_ptr<acc_t>();
    DevArgs<scalar_t, acc_t> a{
        p.logprobs.const_data_ptr<scalar_t>(), p.ref_logprobs.const_data_ptr<scalar_t>(),
        p.mask.const_data_ptr<bool>(), p.scores.const_data_ptr<acc_t>(),
        gae ? p.values.const_data_ptr<scalar_t>() : nullptr, p.B, p.T, p.group_size,
        static_cast<acc_t>(p.kl_coef), static_cast<acc_t>(p.gamma), static_cast<acc_t>(p.gamma * p.lam),
        static_cast<acc_t>(p.kl_clamp), adv.mutable_data_ptr<float>(), ret.mutable_data_ptr<float>(),
        tr.mutable_data_ptr<float>(), kl.mutable_data_ptr<float>(), rv, rv ? rv + p.B : nullptr,
        rv ? rv + 2 * p.B : nullptr,
        whiten ? reinterpret_cast<Moments<double>*>(moments.mutable_data_ptr<double>()) : nullptr,
        keep_acc ? reinterpret_cast<acc_t*>(adv_acc.mutable_data_ptr<double>()) : nullptr};
    if (p.B == 0) return;
    with_estimator(p.estimator, [&](auto est) {
      constexpr KlEstimator kEst = decltype(est)::value;
      if (gae) {
        gae_kernel<kEst, scalar_t, acc_t><<<row_grid, row_block, 0, stream>>>(a);
      } else {
        kl_rewards_kernel<kEst, scalar_t, acc_t><<<row_grid, row_block, 0, stream>>>(a);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (!gae) {
      const int64_t groups = p.B / p.group_size;
      group_baseline_kernel<scalar_t, acc_t><<<static_cast<unsigned>((groups + 127) / 128), 128, 0, stream>>>(
          a, p.mode == AdvantageMode::kGrpo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const WhitenAffine<double>* affine =
        whiten ? merge_and_check(moments, p.B, true, true, scratch, "whiten=True") : nullptr;
    const int64_t n = p.B * p.T;
    if (n == 0) return;
    if (!gae) {
      broadcast_kernel<acc_t><<<elem_blocks(n), kElemThreads, 0, stream>>>(a.mask, a.row_value, n, p.T, affine,
                                                                           a.adv, a.ret);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (keep_acc) {
      apply_whiten_kernel<double, float, double><<<elem_blocks(n), kElemThreads, 0, stream>>>(
          adv_acc.const_data_ptr<double>(), a.mask, n, affine, a.adv);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (whiten) {
      apply_whiten_kernel<float, float, float><<<elem_blocks(n), kElemThreads, 0, stream>>>(a.adv, a.mask, n, affine, a.adv);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (whiten && p.B == 0) check_whiten_count(0, true, "whiten=True");
  const auto keep = [&](at::Tensor& t, int64_t bit) { return (outputs & bit) ? t : at::empty({0}, opts); };
  return {adv, keep(ret, 2), keep(tr, 4), keep(kl, 8)};
}

at::Tensor masked_whiten_cuda(const at::Tensor& x, const at::Tensor& mask, bool unbiased, bool shift_mean) {
  const c10::cuda::CUDAGuard guard(x.device());
  const WhitenInputs p = prepare_whiten(x, mask);
  at::Tensor out = at::empty(p.x.sizes(), p.x.options());
  const int64_t chunks = (p.N + kWhitenChunk - 1) / kWhitenChunk;
  if (chunks == 0) {
    check_whiten_count(0, unbiased, "masked_whiten");
    return out;
  }
  at::Tensor parts = at::empty({3 * chunks}, p.x.options().dtype(at::kDouble));
  at::Tensor scratch;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "masked_whiten_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    chunk_moments_kernel<scalar_t><<<static_cast<unsigned>(chunks), kElemThreads, 0, stream>>>(
        p.x.const_data_ptr<scalar_t>(), p.mask.const_data_ptr<bool>(), p.N,
        reinterpret_cast<Moments<double>*>(parts.mutable_data_ptr<double>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const WhitenAffine<double>* affine = merge_and_check(parts, chunks, unbiased, shift_mean, scratch, "masked_whiten");
    apply_whiten_kernel<scalar_t, scalar_t, acc_t><<<elem_blocks(p.N), kElemThreads, 0, stream>>>(
        p.x.const_data_ptr<scalar_t>(), p.mask.const_data_ptr<bool>(), p.N, affine, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace prefcore::cuda

TORCH_LIBRARY_IMPL(prefcore, CUDA, m) {
  m.impl("kl_penalized_advantages", &prefcore::cuda::kl_penalized_advantages_cuda);
  m.impl("masked_whiten", &prefcore::cuda::masked_whiten_cuda);
}
