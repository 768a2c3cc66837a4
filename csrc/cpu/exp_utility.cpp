// CPU kernels of exp_utility and _exp_utility_backward (DESIGN §3.3).
//
// Per row: mix the gated attribute quantiles (Q_mix = Σ_m g_m·Q_m), then the utility or the
// certainty equivalent and its weights w_q = ∂out/∂Q_mix_q. The backward recomputes the
// (cheap) mix instead of saving it and writes ∂/∂quantiles and ∂/∂gate in one pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/huge_pages.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "cpu/vec_math.h"
#include "prefcore/quantile_math.h"
#include "quantile_checks.h"

namespace prefcore::cpu {
namespace {

template <typename scalar_t, typename acc_t>
struct UtilityArgs {
  const scalar_t* quantiles;  // (B, M, Q) or (B, Q)
  const scalar_t* gate;       // (B, M) or nullptr
  const acc_t* lam;           // (B,) or (1,)
  bool lam_per_row;
  int64_t M, Q;
  UtilityKind kind;
  const scalar_t* grad;       // (B,) upstream gradient (backward) or nullptr
  scalar_t* out;              // (B,) forward output or nullptr
  scalar_t* grad_quantiles;   // backward outputs or nullptr
  scalar_t* grad_gate;
};

// 1 on lanes qb + j < Q, else 0.
template <typename acc_t>
PREFCORE_ALWAYS_INLINE Simd<acc_t> lane_valid(Simd<acc_t> iota, int64_t qb, int64_t Q) {
  return iota + static_cast<acc_t>(qb) < static_cast<acc_t>(Q) ? Simd<acc_t>{} + acc_t(1) : Simd<acc_t>{};
}

template <typename acc_t>
PREFCORE_ALWAYS_INLINE acc_t simd_max(Simd<acc_t> v) {
  acc_t m = v[0];
  for (int64_t j = 1; j < kLanes<acc_t>; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

// out = utility/CE of x[0..Q); if kWeights, w[q] = ∂out/∂x[q]. x and w hold Qp (a multiple of
// the SIMD width) values; x's pad lanes [Q, Qp) must be 0. Every loop runs on whole SIMD blocks,
// pad lanes masked out of the sums (and z = 0 there, which never exceeds max z ≥ 0).
template <bool kWeights, typename acc_t>
PREFCORE_ALWAYS_INLINE acc_t utility_and_weights(const acc_t* __restrict x, acc_t* __restrict w,
                                                 int64_t Q, int64_t Qp, acc_t lam,
                                                 UtilityKind kind) {
  using V = Simd<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  V iota{};
  for (int64_t j = 0; j < W; ++j) iota[j] = static_cast<acc_t>(j);
  const acc_t invQ = acc_t(1) / static_cast<acc_t>(Q);
  if (kind == UtilityKind::kUtility) {  // U = −(1/Q) Σ exp(−λ x_q), ∂U/∂x_q = (λ/Q) exp(−λ x_q)
    V s{};
    for (int64_t qb = 0; qb < Qp; qb += W) {
      const V e = vexp(-lam * simd_load(x + qb)) * lane_valid<acc_t>(iota, qb, Q);
      if (kWeights) simd_store(w + qb, (lam * invQ) * e);
      s += e;
    }
    return -simd_sum<acc_t>(s) * invQ;
  }
  V sx{};
  for (int64_t qb = 0; qb < Qp; qb += W) sx += simd_load(x + qb);
  const acc_t mean = simd_sum<acc_t>(sx) * invQ;
  if (lam == acc_t(0)) {  // CE at λ = 0 is the mean, exactly
    if (kWeights) for (int64_t qb = 0; qb < Qp; qb += W) simd_store(w + qb, invQ * lane_valid<acc_t>(iota, qb, Q));
    return mean;
  }
  // z_q = −λ (x_q − mean); CE = mean − log(mean_q exp(z_q)) / λ; ∂CE/∂x = softmax(z).
  V zmax_v = V{} - std::numeric_limits<acc_t>::infinity(), zabs_v{};
  for (int64_t qb = 0; qb < Qp; qb += W) {
    const V z = (-lam) * (simd_load(x + qb) - mean) * lane_valid<acc_t>(iota, qb, Q);
    zmax_v = z > zmax_v ? z : zmax_v;
    const V az = z < acc_t(0) ? -z : z;
    zabs_v = az > zabs_v ? az : zabs_v;
  }
  const acc_t zmax = simd_max<acc_t>(zmax_v), zabs = simd_max<acc_t>(zabs_v);
  V s{}, s1{};
  for (int64_t qb = 0; qb < Qp; qb += W) {
    const V z = (-lam) * (simd_load(x + qb) - mean) * lane_valid<acc_t>(iota, qb, Q);
    const V e = vexp(z - zmax) * lane_valid<acc_t>(iota, qb, Q);
    if (kWeights) simd_store(w + qb, e);
    s += e;
    s1 += expm1_small<V, acc_t>(z);  // pad lanes: z = 0, expm1 = 0
  }
  const acc_t ssum = simd_sum<acc_t>(s);
  if (kWeights) {
    const acc_t inv_s = acc_t(1) / ssum;
    for (int64_t qb = 0; qb < Qp; qb += W) simd_store(w + qb, simd_load(w + qb) * inv_s);
  }
  // Small λ: log1p of the mean expm1 keeps full precision (exp(z) − 1 would cancel).
  const acc_t log_mean_exp = zabs <= static_cast<acc_t>(kCeSmallZ)
                                 ? std::log1p(simd_sum<acc_t>(s1) * invQ)
                                 : zmax + std::log(ssum * invQ);
  return mean - log_mean_exp / lam;
}

// The M×Q loops (mixing, backward) run on 64-byte SIMD blocks when the input is already in
// the accumulation dtype and Q ≥ one block: full blocks, then one last block ending at Q that
// overlaps the previous one (recomputed lanes store identical values; the dot product masks
// them out), so there is no scalar tail.
template <typename scalar_t, typename acc_t>
constexpr bool kSimdRows = std::is_same_v<scalar_t, acc_t>;

template <typename acc_t>
struct BlockPlan {
  int64_t last;       // start of the last block (Q − W when it overlaps)
  Simd<acc_t> fresh;  // 1 for lanes of the last block not covered by an earlier block, else 0
};

template <typename acc_t>
PREFCORE_ALWAYS_INLINE BlockPlan<acc_t> plan_blocks(int64_t Q) {
  constexpr int64_t W = kLanes<acc_t>;
  BlockPlan<acc_t> plan{Q - W, Simd<acc_t>{}};
  const int64_t covered = (Q / W) * W;  // lanes [0, covered) are done by full blocks
  for (int64_t j = 0; j < W; ++j) plan.fresh[j] = (plan.last + j >= covered) ? acc_t(1) : acc_t(0);
  if (covered == Q) plan.fresh = simd_splat(acc_t(1));
  return plan;
}

// Mixes row b into x[0..Q) (opmath).
template <typename scalar_t, typename acc_t>
PREFCORE_ALWAYS_INLINE void mix_row(const UtilityArgs<scalar_t, acc_t>& a, int64_t b,
                                    acc_t* __restrict x) {
  const int64_t Q = a.Q, M = a.M;
  if (a.gate == nullptr) {
    const scalar_t* qr = a.quantiles + b * Q;
    for (int64_t q = 0; q < Q; ++q) x[q] = static_cast<acc_t>(qr[q]);
    return;
  }
  if constexpr (kSimdRows<scalar_t, acc_t>) {
    constexpr int64_t W = kLanes<acc_t>;
    if (Q >= W) {
      const acc_t* g = a.gate + b * M;
      const acc_t* base = a.quantiles + b * M * Q;
      for (int64_t qb = 0;; qb += W) {
        if (qb + W > Q) qb = Q - W;
        Simd<acc_t> acc{};
        for (int64_t m = 0; m < M; ++m) acc += g[m] * simd_load(base + m * Q + qb);
        simd_store(x + qb, acc);
        if (qb + W >= Q) break;
      }
      return;
    }
  }
  for (int64_t q = 0; q < Q; ++q) x[q] = acc_t(0);
  for (int64_t m = 0; m < M; ++m) {
    const acc_t g = static_cast<acc_t>(a.gate[b * M + m]);
    const scalar_t* qm = a.quantiles + (b * M + m) * Q;
    for (int64_t q = 0; q < Q; ++q) x[q] += g * static_cast<acc_t>(qm[q]);
  }
}

// ∂/∂quantiles and ∂/∂gate of row b given w = ∂out/∂Q_mix and the upstream gradient gb.
template <typename scalar_t, typename acc_t>
PREFCORE_ALWAYS_INLINE void gated_backward_row(const UtilityArgs<scalar_t, acc_t>& a, int64_t b,
                                               const acc_t* __restrict w, acc_t gb,
                                               const BlockPlan<acc_t>& plan) {
  const int64_t Q = a.Q, M = a.M;
  if constexpr (kSimdRows<scalar_t, acc_t>) {
    constexpr int64_t W = kLanes<acc_t>;
    if (Q >= W) {
      for (int64_t m = 0; m < M; ++m) {
        const acc_t scale = gb * a.gate[b * M + m];
        const acc_t* qm = a.quantiles + (b * M + m) * Q;
        acc_t* gq = a.grad_quantiles + (b * M + m) * Q;
        Simd<acc_t> dot{};
        for (int64_t qb = 0;; qb += W) {
          const bool last = qb + W >= Q;
          if (last) qb = plan.last;
          const Simd<acc_t> wv = simd_load(w + qb);
          const Simd<acc_t> prod = simd_load(qm + qb) * wv;
          dot += last ? prod * plan.fresh : prod;
          if (last) break;
        }
        // Plain (non-overlapping) stores: overlapped unaligned block stores into freshly
        // allocated pages measured ~2× slower than this loop.
        for (int64_t q = 0; q < Q; ++q) gq[q] = scale * w[q];
        a.grad_gate[b * M + m] = gb * simd_sum<acc_t>(dot);
      }
      return;
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const acc_t g = static_cast<acc_t>(a.gate[b * M + m]);
    const scalar_t* qm = a.quantiles + (b * M + m) * Q;
    scalar_t* gq = a.grad_quantiles + (b * M + m) * Q;
    const acc_t scale = gb * g;
    acc_t dot = acc_t(0);
    for (int64_t q = 0; q < Q; ++q) {
      gq[q] = static_cast<scalar_t>(scale * w[q]);
      dot += static_cast<acc_t>(qm[q]) * w[q];
    }
    a.grad_gate[b * M + m] = static_cast<scalar_t>(gb * dot);
  }
}

template <bool kBackward, typename scalar_t, typename acc_t>
PREFCORE_ALWAYS_INLINE void utility_rows(std::bool_constant<kBackward>,
                                         const UtilityArgs<scalar_t, acc_t>& a, int64_t b0,
                                         int64_t b1) {
  const int64_t Q = a.Q;
  const int64_t Qp = (Q + kLanes<acc_t> - 1) / kLanes<acc_t> * kLanes<acc_t>;
  std::vector<acc_t> scratch(2 * Qp, acc_t(0));  // x's pad lanes stay 0 (mix_row writes [0, Q))
  acc_t* __restrict x = scratch.data();
  acc_t* __restrict w = x + Qp;
  const BlockPlan<acc_t> plan = Q >= kLanes<acc_t> ? plan_blocks<acc_t>(Q) : BlockPlan<acc_t>{0, Simd<acc_t>{}};
  for (int64_t b = b0; b < b1; ++b) {
    mix_row(a, b, x);
    const acc_t lam = a.lam[a.lam_per_row ? b : 0];
    const acc_t value = utility_and_weights<kBackward>(x, w, Q, Qp, lam, a.kind);
    if (!kBackward) {
      a.out[b] = static_cast<scalar_t>(value);
      continue;
    }
    const acc_t gb = static_cast<acc_t>(a.grad[b]);
    if (a.gate == nullptr) {
      scalar_t* gq = a.grad_quantiles + b * Q;
      for (int64_t q = 0; q < Q; ++q) gq[q] = static_cast<scalar_t>(gb * w[q]);
      continue;
    }
    gated_backward_row(a, b, w, gb, plan);
  }
}

PREFCORE_ISA_CLONES(utility_rows_isa, utility_rows)

template <typename scalar_t>
UtilityArgs<scalar_t, at::opmath_type<scalar_t>> make_args(const UtilityInputs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  return UtilityArgs<scalar_t, acc_t>{
      p.quantiles.const_data_ptr<scalar_t>(),
      p.gate.defined() ? p.gate.const_data_ptr<scalar_t>() : nullptr,
      p.lam.const_data_ptr<acc_t>(), p.lam.size(0) != 1 || p.B == 1, p.M, p.Q, p.kind,
      nullptr, nullptr, nullptr, nullptr};
}

int64_t grain_for(const UtilityInputs& p) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.M * p.Q));
}

at::Tensor exp_utility_cpu(const at::Tensor& quantiles, const at::Tensor& lam,
                           const std::optional<at::Tensor>& gate, int64_t kind) {
  const UtilityInputs p = prepare_utility(quantiles, lam, gate, kind);
  at::Tensor out = at::empty({p.B}, quantiles.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, quantiles.scalar_type(), "exp_utility_cpu", [&] {
    auto a = make_args<scalar_t>(p);
    a.out = out.mutable_data_ptr<scalar_t>();
    const Isa isa = active_isa();
    at::parallel_for(0, p.B, grain_for(p), [&](int64_t b0, int64_t b1) {
      utility_rows_isa(isa, std::false_type{}, a, b0, b1);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> exp_utility_backward_cpu(const at::Tensor& grad,
                                                            const at::Tensor& quantiles,
                                                            const at::Tensor& lam,
                                                            const std::optional<at::Tensor>& gate,
                                                            int64_t kind) {
  const UtilityInputs p = prepare_utility(quantiles, lam, gate, kind);
  const at::Tensor g = checked_utility_grad(grad, p);
  at::Tensor grad_q = at::empty(quantiles.sizes(), quantiles.options());
  advise_huge_pages(grad_q);
  at::Tensor grad_gate = p.gate.defined() ? at::empty({p.B, p.M}, quantiles.options())
                                          : at::empty({0}, quantiles.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, quantiles.scalar_type(), "exp_utility_backward_cpu", [&] {
    auto a = make_args<scalar_t>(p);
    a.grad = g.const_data_ptr<scalar_t>();
    a.grad_quantiles = grad_q.mutable_data_ptr<scalar_t>();
    a.grad_gate = p.gate.defined() ? grad_gate.mutable_data_ptr<scalar_t>() : nullptr;
    const Isa isa = active_isa();
    at::parallel_for(0, p.B, grain_for(p), [&](int64_t b0, int64_t b1) {
      utility_rows_isa(isa, std::true_type{}, a, b0, b1);
    });
  });
  return {grad_q, grad_gate};
}

}  // namespace
}  // namespace prefcore::cpu

TORCH_LIBRARY_IMPL(prefcore, CPU, m) {
  m.impl("exp_utility", &prefcore::cpu::exp_utility_cpu);
  m.impl("_exp_utility_backward", &prefcore::cpu::exp_utility_backward_cpu);
}
