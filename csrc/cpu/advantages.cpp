// CPU kernels of kl_penalized_advantages and masked_whiten (DESIGN §3.4).
//
// rloo/grpo: at::parallel_for over prompt groups. Per row, one SIMD pass computes the masked
// KL estimate, the token rewards (score added on the last valid token) and R = Σ_t r_t; the
// group's baseline then gives A per row, broadcast over the row's valid tokens.
// gae: at::parallel_for over rows. Per row, one SIMD pass for KL and rewards into a row
// scratch (accumulation dtype), then one reverse pass for the GAE scan.
// whiten: per-row moments (count, mean, Σ(x − mean)²) in float64, merged serially in row order
// (deterministic whatever the thread count), then a parallel pass applies (A − μ)/sqrt(σ² + ε).
// Inputs in any floating dtype; maths in at::opmath_type (float64 for float64); outputs float32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/StorageImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "advantage_checks.h"
#include "common.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "prefcore/advantage_math.h"

namespace prefcore::cpu {
namespace {

template <KlEstimator kEst>
using EstTag = std::integral_constant<KlEstimator, kEst>;

template <typename scalar_t, typename acc_t>
struct AdvArgs {
  const scalar_t* logprobs;  // (B, T)
  const scalar_t* ref;       // (B, T)
  const bool* mask;          // (B, T)
  const acc_t* scores;       // (B,)
  const scalar_t* values;    // (B, T) or nullptr (rloo/grpo)
  int64_t T, k;
  acc_t kl_coef, gamma, gamma_lam, clamp;
  bool grpo, whiten;
  float* adv;  // outputs, (B, T) each; a skipped output (kl, tr, ret) points at a per-task
  float* ret;  // sink row of T floats with a row stride of 0 (it stays in L1: no memory traffic)
  float* tr;
  float* kl;
  int64_t ret_rs, tr_rs, kl_rs;  // row strides: T, or 0 for a skipped output
  double* row_value;        // (B,) rloo/grpo: A per row
  acc_t* adv_acc;           // (B, T) gae advantages in float64 for whitening them, else nullptr
  Moments<double>* moments;  // (B,) per-row moments when whitening, else nullptr
};

#define PREFCORE_SIMD_KERNELS "cpu/advantages_simd.inc"
#include "cpu/simd_namespaces.inc"

PREFCORE_ISA_CLONES(group_rows_isa, group_rows)
PREFCORE_ISA_CLONES(gae_rows_isa, gae_rows)
PREFCORE_ISA_CLONES(whiten_rows_isa, whiten_rows)

template <typename F>
void with_estimator(KlEstimator e, F&& f) {
  switch (e) {
    case KlEstimator::kK1: f(EstTag<KlEstimator::kK1>{}); break;
    case KlEstimator::kK2: f(EstTag<KlEstimator::kK2>{}); break;
    case KlEstimator::kK3: f(EstTag<KlEstimator::kK3>{}); break;
    case KlEstimator::kAbs: f(EstTag<KlEstimator::kAbs>{}); break;
  }
}

Moments<double> merge_in_order(const std::vector<Moments<double>>& parts) {
  Moments<double> total{0.0, 0.0, 0.0};
  for (const auto& m : parts) total = merge_moments(total, m);
  return total;
}

// The four (B, T) float32 outputs, carved from ONE allocation of torch's CPU allocator. In an
// ordinary process (glibc defaults) four separate 2 MiB outputs that the caller frees together
// leave 8 MiB on top of the heap, which glibc trims (its trim threshold follows the 2 MiB
// allocations: 4 MiB), so every call faulted 8 MiB of fresh pages back in: 2016 faults and
// 4.7-4.9 ms thread CPU per rloo call at B=512, T=1024 (1 thread) vs 0 faults and 1.5 ms with
// one block (one 8 MiB free raises the thresholds to 8/16 MiB, and the block is reused). Each
// output is still an ordinary CPU storage of its own (offset 0, never aliasing another, and
// resizable: a resize moves it to a fresh allocation of torch's allocator); the block is freed
// with the last output that uses it. The huge-page block that stood here (posix_memalign +
// madvise + a page-parallel fault-in) cost 2.4-3.1 ms per call (a fresh THP block zeroed every
// call) and stalled where the kernel compacts memory for THP faults (defrag=madvise).
struct BlockRef {
  c10::Storage block;
};

void release_block(void* ctx) { delete static_cast<BlockRef*>(ctx); }

// Outputs not in `wanted` (bit i: output i of advantages, returns, token_rewards, kl) are
// returned as empty (0,) tensors and take no memory.
std::array<at::Tensor, 4> alloc_outputs(int64_t B, int64_t T, const at::TensorOptions& opts, int64_t wanted) {
  const int64_t n = B * T;
  std::array<at::Tensor, 4> outs;
  int64_t count = 0;
  for (int64_t i = 0; i < 4; ++i) {
    if (wanted & (int64_t(1) << i)) ++count;
    else outs[i] = at::empty({0}, opts);
  }
  if (n == 0) {
    for (int64_t i = 0; i < 4; ++i) if (wanted & (int64_t(1) << i)) outs[i] = at::empty({B, T}, opts);
    return outs;
  }
  const int64_t stride = (n + 15) / 16 * 16;  // 64-byte-aligned outputs
  const at::Tensor block = at::empty({count * stride}, opts);
  float* base = block.mutable_data_ptr<float>();
  for (int64_t i = 0, slot = 0; i < 4; ++i) {
    if (!(wanted & (int64_t(1) << i))) continue;
    const int64_t at_slot = slot++;
    c10::DataPtr ptr(base + at_slot * stride, new BlockRef{block.storage()}, &release_block, block.device());
    auto storage = c10::make_intrusive<c10::StorageImpl>(c10::StorageImpl::use_byte_size_t(),
                                                         static_cast<size_t>(n) * sizeof(float), std::move(ptr),
                                                         c10::GetCPUAllocator(), /*resizable=*/true);
    outs[i] = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(std::move(storage)),
                                                       c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                       caffe2::TypeMeta::Make<float>());
    outs[i].unsafeGetTensorImpl()->set_sizes_contiguous({B, T});
  }
  return outs;
}

// Rows per parallel task: about 16K tokens.
int64_t grain_rows(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, T)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_penalized_advantages_cpu(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& mask,
    const at::Tensor& scores, const std::optional<at::Tensor>& values, double kl_coef,
    int64_t estimator, int64_t mode, int64_t group_size, double gamma, double lam, bool whiten,
    std::optional<double> kl_clamp, int64_t outputs) {
  const AdvantageInputs p = prepare_advantages(logprobs, ref_logprobs, mask, scores, values, kl_coef,
                                               estimator, mode, group_size, gamma, lam, whiten, kl_clamp);
  check_advantage_outputs(outputs);
  const auto opts = p.logprobs.options().dtype(at::kFloat);
  auto [adv, ret, tr, kl] = alloc_outputs(p.B, p.T, opts, outputs);
  const bool want_ret = outputs & 2, want_tr = outputs & 4, want_kl = outputs & 8;
  std::vector<Moments<double>> moments(whiten ? static_cast<size_t>(p.B) : 0);
  const bool gae = p.mode == AdvantageMode::kGae;
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logprobs.scalar_type(), "kl_penalized_advantages_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<double> row_value(gae ? 0 : static_cast<size_t>(p.B));
    // Whitened fp64 GAE: the moments and the whitening read the advantages before their rounding
    // to the float32 output (for float32 inputs the output is already the accumulation dtype).
    const bool keep_acc = gae && whiten && !std::is_same_v<acc_t, float>;
    std::vector<acc_t> adv_acc(keep_acc ? static_cast<size_t>(p.B * p.T) : 0);
    AdvArgs<scalar_t, acc_t> a{
        p.logprobs.const_data_ptr<scalar_t>(), p.ref_logprobs.const_data_ptr<scalar_t>(),
        p.mask.const_data_ptr<bool>(), p.scores.const_data_ptr<acc_t>(),
        gae ? p.values.const_data_ptr<scalar_t>() : nullptr, p.T, p.group_size,
        static_cast<acc_t>(p.kl_coef), static_cast<acc_t>(p.gamma), static_cast<acc_t>(p.gamma * p.lam),
        static_cast<acc_t>(p.kl_clamp), p.mode == AdvantageMode::kGrpo, whiten,
        adv.mutable_data_ptr<float>(), want_ret ? ret.mutable_data_ptr<float>() : nullptr,
        want_tr ? tr.mutable_data_ptr<float>() : nullptr, want_kl ? kl.mutable_data_ptr<float>() : nullptr,
        want_ret ? p.T : 0, want_tr ? p.T : 0, want_kl ? p.T : 0,
        row_value.data(), keep_acc ? adv_acc.data() : nullptr, whiten ? moments.data() : nullptr};
    // A task's view of the outputs: skipped ones write into its own sink row (stride 0).
    auto with_sinks = [&](std::vector<float>& sink) {
      AdvArgs<scalar_t, acc_t> t = a;
      if (t.ret == nullptr || t.tr == nullptr || t.kl == nullptr) sink.resize(static_cast<size_t>(3 * p.T));
      if (t.ret == nullptr) t.ret = sink.data();
      if (t.tr == nullptr) t.tr = sink.data() + p.T;
      if (t.kl == nullptr) t.kl = sink.data() + 2 * p.T;
      return t;
    };
    with_estimator(p.estimator, [&](auto est) {
      if (gae) {
        at::parallel_for(0, p.B, grain_rows(p.T), [&](int64_t b0, int64_t b1) {
          std::vector<float> sink;
          gae_rows_isa(isa, est, with_sinks(sink), b0, b1);
        });
      } else {
        const int64_t groups = p.B / p.group_size;
        at::parallel_for(0, groups, std::max<int64_t>(1, grain_rows(p.T) / p.group_size),
                         [&](int64_t g0, int64_t g1) {
                           std::vector<float> sink;
                           group_rows_isa(isa, est, with_sinks(sink), g0, g1);
                         });
      }
    });
    if (!whiten) return;
    const Moments<double> total = merge_in_order(moments);
    check_whiten_count(static_cast<int64_t>(total.n), true, "whiten=True");
    const WhitenAffine<double> w = whiten_affine(total, true, true);
    at::parallel_for(0, p.B, grain_rows(p.T), [&](int64_t b0, int64_t b1) {
      std::vector<float> sink;
      const auto t = with_sinks(sink);
      whiten_rows_isa(isa, t.mask, p.T, gae, t.adv, t.ret, t.ret_rs, static_cast<const double*>(row_value.data()),
                      static_cast<const acc_t*>(a.adv_acc), w, b0, b1);
    });
  });
  return {adv, ret, tr, kl};
}

// ---- masked_whiten ------------------------------------------------------------------------

constexpr int64_t kWhitenChunk = 4096;  // fixed: the reduction order never depends on threads

template <typename scalar_t>
Moments<double> chunk_moments(const scalar_t* x, const bool* m, int64_t n) {
  double sum = 0.0;
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (m[i]) {
      sum += static_cast<double>(x[i]);
      ++cnt;
    }
  }
  if (cnt == 0) return Moments<double>{0.0, 0.0, 0.0};
  const double mean = sum / static_cast<double>(cnt);
  double m2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = m[i] ? static_cast<double>(x[i]) - mean : 0.0;
    m2 += d * d;
  }
  return Moments<double>{static_cast<double>(cnt), mean, m2};
}

at::Tensor masked_whiten_cpu(const at::Tensor& x, const at::Tensor& mask, bool unbiased, bool shift_mean) {
  const WhitenInputs p = prepare_whiten(x, mask);
  at::Tensor out = at::empty(p.x.sizes(), p.x.options());
  const int64_t chunks = (p.N + kWhitenChunk - 1) / kWhitenChunk;
  std::vector<Moments<double>> parts(static_cast<size_t>(chunks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "masked_whiten_cpu", [&] {
    const scalar_t* xs = p.x.const_data_ptr<scalar_t>();
    const bool* ms = p.mask.const_data_ptr<bool>();
    scalar_t* os = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = c * kWhitenChunk, n = std::min(kWhitenChunk, p.N - i0);
        parts[c] = chunk_moments(xs + i0, ms + i0, n);
      }
    });
    const Moments<double> total = merge_in_order(parts);
    check_whiten_count(static_cast<int64_t>(total.n), unbiased, "masked_whiten");
    const WhitenAffine<double> w = whiten_affine(total, unbiased, shift_mean);
    // In float64: the batch mean rounded to the input dtype first lost the digits that tell
    // nearby values apart (10000 + 1e-3·i whitened to multiples of 0.77 in float32).
    const double mean = w.mean, scale = w.scale, add = w.add_back;
    at::parallel_for(0, p.N, kWhitenChunk, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        os[i] = ms[i] ? static_cast<scalar_t>((static_cast<double>(xs[i]) - mean) * scale + add) : scalar_t(0);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace prefcore::cpu

TORCH_LIBRARY_IMPL(prefcore, CPU, m) {
  m.impl("kl_penalized_advantages", &prefcore::cpu::kl_penalized_advantages_cpu);
  m.impl("masked_whiten", &prefcore::cpu::masked_whiten_cpu);
}
