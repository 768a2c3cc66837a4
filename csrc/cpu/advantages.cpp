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
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <array>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "advantage_checks.h"
#include "common.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "cpu/vec_math.h"
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
  float* adv;  // outputs, (B, T) each
  float* ret;
  float* tr;
  float* kl;
  acc_t* row_value;         // (B,) rloo/grpo: A per row
  Moments<double>* moments;  // (B,) per-row moments when whitening, else nullptr
};

// W lanes of p, converted to the accumulation dtype.
template <typename acc_t, typename scalar_t>
PREFCORE_ALWAYS_INLINE Simd<acc_t> load_as(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return simd_load(p);
  } else {
    Simd<acc_t> v;
    for (int64_t j = 0; j < kLanes<acc_t>; ++j) v[j] = static_cast<acc_t>(p[j]);
    return v;
  }
}

// A mask row as 1/0 values of the accumulation dtype, for SIMD loads. GCC turns a plain
// byte→float loop into vector zero-extensions and conversions, whereas converting one SIMD
// block at a time (lane loop or __builtin_convertvector) compiled to W scalar conversions and
// inserts per block. The row buffer is per thread and stays in L1.
template <typename acc_t>
PREFCORE_ALWAYS_INLINE void mask_row_lanes(const bool* __restrict mk, int64_t T, acc_t* __restrict out) {
  const unsigned char* m = reinterpret_cast<const unsigned char*>(mk);
  for (int64_t t = 0; t < T; ++t) out[t] = static_cast<acc_t>(m[t]);
}

template <typename acc_t>
PREFCORE_ALWAYS_INLINE void store_float(float* out, Simd<acc_t> v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    simd_store(out, v);
  } else {
    for (int64_t j = 0; j < kLanes<acc_t>; ++j) out[j] = static_cast<float>(v[j]);
  }
}

// exp(−d) where k3 needs it (a SIMD exp for SIMD values, libm for scalars), else unused.
template <KlEstimator kEst, typename V>
PREFCORE_ALWAYS_INLINE V exp_neg_for(V d) {
  if constexpr (kEst != KlEstimator::kK3) {
    return V{};
  } else if constexpr (std::is_floating_point_v<V>) {
    return std::exp(-d);
  } else {
    return vexp(-d);
  }
}

// Index of the last valid token of a mask row, or −1.
PREFCORE_ALWAYS_INLINE int64_t last_valid(const bool* m, int64_t T) {
  int64_t t = T - 1;
  while (t >= 0 && !m[t]) --t;
  return t;
}

struct RowSums {
  double reward_sum;  // R = Σ_t r_t
  int64_t count;      // number of valid tokens
};

// One pass over row b: kl_t (0 where masked) → a.kl; r_t = −kl_coef·kl_t + score·1[t = last]
// → a.tr, and with kToScratch also in the accumulation dtype → scratch (for the GAE scan that
// follows). `lanes` is a per-thread row buffer. Returns Σ r_t and the valid count.
template <KlEstimator kEst, bool kToScratch, typename scalar_t, typename acc_t>
PREFCORE_ALWAYS_INLINE RowSums kl_rewards_row(const AdvArgs<scalar_t, acc_t>& a, int64_t b,
                                              acc_t* __restrict scratch, acc_t* __restrict lanes) {
  using V = Simd<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  const int64_t T = a.T;
  const scalar_t* lp = a.logprobs + b * T;
  const scalar_t* rf = a.ref + b * T;
  const bool* mk = a.mask + b * T;
  float* kl_out = a.kl + b * T;
  float* tr_out = a.tr + b * T;
  mask_row_lanes(mk, T, lanes);
  const int64_t last = last_valid(mk, T);
  const acc_t score = a.scores[b];
  // Local copies: stores through float* may alias a's float members, which would otherwise be
  // reloaded on every iteration.
  const acc_t kl_coef = a.kl_coef, clamp = a.clamp;
  V vsum{}, vcnt{};
  int64_t t = 0;
  for (; t + W <= T; t += W) {
    const V d = load_as<acc_t>(lp + t) - load_as<acc_t>(rf + t);
    const V m = simd_load(lanes + t);
    V kl = kl_clamp<V, acc_t>(kl_estimate<kEst, V, acc_t>(d, exp_neg_for<kEst>(d)), clamp);
    kl = m != acc_t(0) ? kl : V{};  // select, not multiply: masked d may be ±inf/NaN
    V bonus{};
    if (last >= t && last < t + W) bonus[last - t] = score;
    const V r = m != acc_t(0) ? bonus - kl_coef * kl : V{};
    vsum += r;
    vcnt += m;
    store_float<acc_t>(kl_out + t, kl);
    store_float<acc_t>(tr_out + t, r);
    if constexpr (kToScratch) simd_store(scratch + t, r);
  }
  acc_t sum = simd_sum<acc_t>(vsum);
  int64_t count = static_cast<int64_t>(simd_sum<acc_t>(vcnt));
  for (; t < T; ++t) {
    acc_t kl = acc_t(0), r = acc_t(0);
    if (mk[t]) {
      const acc_t d = static_cast<acc_t>(lp[t]) - static_cast<acc_t>(rf[t]);
      kl = kl_clamp<acc_t, acc_t>(kl_estimate<kEst, acc_t, acc_t>(d, exp_neg_for<kEst>(d)), clamp);
      r = (t == last ? score : acc_t(0)) - kl_coef * kl;
      ++count;
    }
    sum += r;
    kl_out[t] = static_cast<float>(kl);
    tr_out[t] = static_cast<float>(r);
    if constexpr (kToScratch) scratch[t] = r;
  }
  return RowSums{static_cast<double>(sum), count};
}

// out[t] = mask[t] ? value : 0 (and out2 likewise with value2) over one row.
PREFCORE_ALWAYS_INLINE void broadcast_row(const bool* __restrict mk, int64_t T, float value,
                                          float* __restrict out, float value2,
                                          float* __restrict out2, float* __restrict lanes) {
  mask_row_lanes(mk, T, lanes);
  using V = Simd<float>;
  constexpr int64_t W = kLanes<float>;
  int64_t t = 0;
  for (; t + W <= T; t += W) {
    const V m = simd_load(lanes + t);
    simd_store(out + t, m != 0.f ? V{} + value : V{});
    simd_store(out2 + t, m != 0.f ? V{} + value2 : V{});
  }
  for (; t < T; ++t) {
    out[t] = mk[t] ? value : 0.f;
    out2[t] = mk[t] ? value2 : 0.f;
  }
}

// rloo/grpo over groups [g0, g1): token rewards and KL, then A per row from the group's R.
// Without whitening the advantages (= returns) are written here while the rows are hot.
template <KlEstimator kEst, typename scalar_t, typename acc_t>
PREFCORE_ALWAYS_INLINE void group_rows(EstTag<kEst>, const AdvArgs<scalar_t, acc_t>& a, int64_t g0,
                                       int64_t g1) {
  const int64_t k = a.k, T = a.T;
  std::vector<double> R(static_cast<size_t>(k));
  std::vector<acc_t> lanes(static_cast<size_t>(T));
  std::vector<float> flanes(static_cast<size_t>(T));
  std::vector<int64_t> count(static_cast<size_t>(k));
  for (int64_t g = g0; g < g1; ++g) {
    double total = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      const RowSums s = kl_rewards_row<kEst, false>(a, g * k + j, static_cast<acc_t*>(nullptr), lanes.data());
      R[j] = s.reward_sum;  // an empty row has R = 0 and still counts in the baseline
      count[j] = s.count;
      total += s.reward_sum;
    }
    double mean = 0.0, inv_std = 0.0;
    if (a.grpo) {
      mean = total / static_cast<double>(k);
      double ss = 0.0;
      for (int64_t j = 0; j < k; ++j) ss += (R[j] - mean) * (R[j] - mean);
      inv_std = 1.0 / (std::sqrt(ss / static_cast<double>(k - 1)) + kGrpoEps);
    }
    for (int64_t j = 0; j < k; ++j) {
      const int64_t b = g * k + j;
      // rloo: R_i − (Σ_g R − R_i)/(k − 1); grpo: (R_i − mean_g)/(std_g + ε).
      const double A = a.grpo ? (R[j] - mean) * inv_std : R[j] - (total - R[j]) / static_cast<double>(k - 1);
      a.row_value[b] = static_cast<acc_t>(A);
      if (a.moments != nullptr) a.moments[b] = Moments<double>{static_cast<double>(count[j]), A, 0.0};
      if (!a.whiten) {
        const float Af = static_cast<float>(A);
        broadcast_row(a.mask + b * T, T, Af, a.adv + b * T, Af, a.ret + b * T, flanes.data());
      }
    }
  }
}

// Lane shifts for the in-chunk scan: out[j] = x[j + S] for j + S < W, else fill (lane 0 of it).
template <typename acc_t>
struct SimdIndexOf;
template <>
struct SimdIndexOf<float> {
  typedef std::int32_t type __attribute__((vector_size(64)));
};
template <>
struct SimdIndexOf<double> {
  typedef std::int64_t type __attribute__((vector_size(64)));
};

// The index vector is a literal (built from an index pack) so that GCC sees a constant mask
// when it lowers the shuffle: a mask filled by a loop is lowered lane by lane.
template <int64_t S, typename acc_t, int64_t... J>
PREFCORE_ALWAYS_INLINE Simd<acc_t> shift_down_impl(Simd<acc_t> x, Simd<acc_t> fill,
                                                   std::integer_sequence<int64_t, J...>) {
  using I = typename SimdIndexOf<acc_t>::type;
  constexpr int64_t W = kLanes<acc_t>;
  return __builtin_shuffle(x, fill, I{(J + S < W ? J + S : W)...});
}

template <typename acc_t, int64_t... J>
PREFCORE_ALWAYS_INLINE Simd<acc_t> iota_impl(std::integer_sequence<int64_t, J...>) {
  return Simd<acc_t>{static_cast<acc_t>(J)...};
}

// (0, 1, …, W − 1).
template <typename acc_t>
PREFCORE_ALWAYS_INLINE Simd<acc_t> simd_iota() {
  return iota_impl<acc_t>(std::make_integer_sequence<int64_t, kLanes<acc_t>>{});
}

template <int64_t S, typename acc_t>
PREFCORE_ALWAYS_INLINE Simd<acc_t> shift_down(Simd<acc_t> x, Simd<acc_t> fill) {
  return shift_down_impl<S, acc_t>(x, fill, std::make_integer_sequence<int64_t, kLanes<acc_t>>{});
}

// First/last valid index and the count of a mask row, 8 bytes at a time (bool bytes are 0/1).
struct MaskSpan {
  int64_t first, last, count;  // count = 0: no valid token (first/last unspecified)
};

PREFCORE_ALWAYS_INLINE MaskSpan mask_span(const bool* mk, int64_t T) {
  const unsigned char* m = reinterpret_cast<const unsigned char*>(mk);
  auto word = [m](int64_t i) {
    std::uint64_t w;
    std::memcpy(&w, m + i, 8);
    return w;
  };
  int64_t l = T - 1;
  while (l >= 7 && word(l - 7) == 0) l -= 8;
  while (l >= 0 && !m[l]) --l;
  if (l < 0) return MaskSpan{0, -1, 0};
  int64_t f = 0;
  while (f + 8 <= l && word(f) == 0) f += 8;
  while (!m[f]) ++f;
  int64_t count = 0, i = f;
  // Each byte is 0 or 1, so the byte sum (≤ 8) is the top byte of w·0x0101…01.
  for (; i + 8 <= l + 1; i += 8) count += static_cast<int64_t>((word(i) * 0x0101010101010101ull) >> 56);
  for (; i <= l; ++i) count += m[i];
  return MaskSpan{f, l, count};
}

// gae over one row whose valid tokens are exactly [f, l] (right- or left-padded, no interior
// zeros), in one reverse pass of W-token chunks that computes kl and token rewards and runs
// the scan. With no masked token inside [f, l], nv at a valid t is V[t+1] (0 at l) and the
// scan is g_t = δ_t + c·g_{t+1} with a constant c = γλ; δ is set to 0 outside [f, l], which
// keeps g = 0 right of l and is harmless left of f (output 0 there). Within a chunk the scan is
// a log-step one (x_j += c^s·x_{j+s}, s = 1, 2, 4, …), then the carry g_{t+W} enters with the
// weights c^{W−j}: one FMA and a broadcast on the dependency chain per chunk instead of W FMAs.
// Masked inputs may be ±inf/NaN: every use of them is a select, never a multiply.
template <KlEstimator kEst, typename scalar_t, typename acc_t>
PREFCORE_ALWAYS_INLINE void gae_row_span(const AdvArgs<scalar_t, acc_t>& a, int64_t b, int64_t f, int64_t l,
                                         const Simd<acc_t>* cpow, Simd<acc_t> carry_w) {
  using V = Simd<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  const int64_t T = a.T;
  const scalar_t* lp = a.logprobs + b * T;
  const scalar_t* rf = a.ref + b * T;
  const scalar_t* vr = a.values + b * T;
  float* kl_out = a.kl + b * T;
  float* tr_out = a.tr + b * T;
  float* adv = a.adv + b * T;
  float* ret = a.ret + b * T;
  const acc_t score = a.scores[b];
  const acc_t kl_coef = a.kl_coef, clamp = a.clamp, gamma = a.gamma, c = a.gamma_lam;
  // Scalar tail [Tv, T) first (the scan runs right to left).
  const int64_t Tv = T - T % W;
  acc_t g = acc_t(0);
  for (int64_t t = T - 1; t >= Tv; --t) {
    if (t < f || t > l) {
      kl_out[t] = tr_out[t] = adv[t] = ret[t] = 0.f;
      continue;
    }
    const acc_t d = static_cast<acc_t>(lp[t]) - static_cast<acc_t>(rf[t]);
    const acc_t kl = kl_clamp<acc_t, acc_t>(kl_estimate<kEst, acc_t, acc_t>(d, exp_neg_for<kEst>(d)), clamp);
    const acc_t r = (t == l ? score : acc_t(0)) - kl_coef * kl;
    const acc_t v = static_cast<acc_t>(vr[t]);
    const acc_t nv = t < l ? static_cast<acc_t>(vr[t + 1]) : acc_t(0);
    g = (r + gamma * nv - v) + c * g;
    kl_out[t] = static_cast<float>(kl);
    tr_out[t] = static_cast<float>(r);
    adv[t] = static_cast<float>(g);
    ret[t] = static_cast<float>(g + v);
  }
  const V iota = simd_iota<acc_t>();
  // Lane positions relative to the chunk start, compared in the accumulation dtype (exact:
  // T < 2^24 tokens per row for float is far beyond any sequence length here).
  V carry = V{} + g;
  for (int64_t t = Tv - W; t >= 0; t -= W) {
    const V pos = iota + static_cast<acc_t>(t);
    // f ≤ pos ≤ l ⇔ (pos − f)·(l − pos) ≥ 0 (rounding keeps signs): one comparison, since GCC
    // lowered the `&` of two vector comparisons lane by lane here.
    const auto valid = (pos - static_cast<acc_t>(f)) * (static_cast<acc_t>(l) - pos) >= acc_t(0);
    const V d = load_as<acc_t>(lp + t) - load_as<acc_t>(rf + t);
    const V kl = valid ? kl_clamp<V, acc_t>(kl_estimate<kEst, V, acc_t>(d, exp_neg_for<kEst>(d)), clamp) : V{};
    V bonus{};
    if (l >= t && l < t + W) bonus[l - t] = score;
    const V r = valid ? bonus - kl_coef * kl : V{};
    store_float<acc_t>(kl_out + t, kl);
    store_float<acc_t>(tr_out + t, r);
    const V v = load_as<acc_t>(vr + t);
    const V vnext = t + W < T ? load_as<acc_t>(vr + t + 1)
                              : shift_down<1, acc_t>(v, V{});
    const V nv = pos < static_cast<acc_t>(l) ? vnext : V{};
    V x = valid ? r + gamma * nv - v : V{};
    x += cpow[0] * shift_down<1, acc_t>(x, V{});
    x += cpow[1] * shift_down<2, acc_t>(x, V{});
    x += cpow[2] * shift_down<4, acc_t>(x, V{});
    if constexpr (W > 8) x += cpow[3] * shift_down<8, acc_t>(x, V{});
    const V gv = x + carry_w * carry;
    carry = V{} + gv[0];
    store_float<acc_t>(adv + t, valid ? gv : V{});
    store_float<acc_t>(ret + t, valid ? gv + v : V{});
  }
}

// Per-row moments (count, mean, Σ(A − mean)²) of a finished advantage row, in float64.
PREFCORE_ALWAYS_INLINE Moments<double> row_moments(const bool* mk, const float* adv, int64_t T, int64_t count) {
  double sum = 0.0;
  for (int64_t t = 0; t < T; ++t) sum += mk[t] ? static_cast<double>(adv[t]) : 0.0;
  const double n = static_cast<double>(count);
  const double mean = count > 0 ? sum / n : 0.0;
  double m2 = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const double dv = mk[t] ? static_cast<double>(adv[t]) - mean : 0.0;
    m2 += dv * dv;
  }
  return Moments<double>{n, mean, m2};
}

// gae over rows [b0, b1). A row whose valid tokens are one contiguous span takes the fused
// chunked pass (gae_row_span); any other row (interior zeros, or no valid token) computes KL
// and rewards into the scratch row, then runs the sequential reverse scan.
template <KlEstimator kEst, typename scalar_t, typename acc_t>
PREFCORE_ALWAYS_INLINE void gae_rows(EstTag<kEst>, const AdvArgs<scalar_t, acc_t>& a, int64_t b0,
                                     int64_t b1) {
  using V = Simd<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  const int64_t T = a.T;
  std::vector<acc_t> scratch(static_cast<size_t>(T)), lanes(static_cast<size_t>(T));
  acc_t* __restrict r = scratch.data();
  // c^1, c^2, c^4, c^8 and the carry weights c^{W−j} of the chunked scan, c = γλ.
  V cpow[4], carry_w;
  {
    const double c = static_cast<double>(a.gamma_lam);
    double p = c;
    for (int i = 0; i < 4; ++i, p *= p) cpow[i] = V{} + static_cast<acc_t>(p);
    for (int64_t j = 0; j < W; ++j) {
      double w = 1.0;
      for (int64_t i = j; i < W; ++i) w *= c;
      carry_w[j] = static_cast<acc_t>(w);
    }
  }
  for (int64_t b = b0; b < b1; ++b) {
    const bool* mk = a.mask + b * T;
    const MaskSpan span = mask_span(mk, T);
    if (span.count > 0 && span.count == span.last - span.first + 1) {
      gae_row_span<kEst>(a, b, span.first, span.last, cpow, carry_w);
      if (a.moments != nullptr) a.moments[b] = row_moments(mk, a.adv + b * T, T, span.count);
      continue;
    }
    const RowSums s = kl_rewards_row<kEst, true>(a, b, r, lanes.data());
    const scalar_t* vr = a.values + b * T;
    float* adv = a.adv + b * T;
    float* ret = a.ret + b * T;
    const acc_t gamma = a.gamma, gamma_lam = a.gamma_lam;
    GaeState<acc_t> st{acc_t(0), acc_t(0)};
    // Branch-free: a masked token computes a candidate step and discards it (select), so
    // garbage values under the mask never reach the state.
    for (int64_t t = T - 1; t >= 0; --t) {
      const bool m = mk[t];
      const acc_t v = m ? static_cast<acc_t>(vr[t]) : acc_t(0);
      const GaeState<acc_t> next = gae_step<acc_t, acc_t>(st, r[t], v, gamma, gamma_lam);
      st = m ? next : st;
      adv[t] = m ? static_cast<float>(next.g) : 0.f;
      ret[t] = m ? static_cast<float>(next.g + v) : 0.f;
    }
    if (a.moments != nullptr) a.moments[b] = row_moments(mk, adv, T, s.count);
  }
}

// x[t] ← mask[t] ? (x[t] − μ)·s + add : 0 over one float row (in place).
PREFCORE_ALWAYS_INLINE void whiten_row_inplace(const bool* __restrict mk, int64_t T, float* __restrict x,
                                               const WhitenAffine<double>& w, float* __restrict lanes) {
  mask_row_lanes(mk, T, lanes);
  using V = Simd<float>;
  constexpr int64_t W = kLanes<float>;
  const float mean = static_cast<float>(w.mean), scale = static_cast<float>(w.scale),
              add = static_cast<float>(w.add_back);
  int64_t t = 0;
  for (; t + W <= T; t += W) {
    const V m = simd_load(lanes + t);
    const V y = (simd_load(x + t) - mean) * scale + add;
    simd_store(x + t, m != 0.f ? y : V{});
  }
  for (; t < T; ++t) x[t] = mk[t] ? (x[t] - mean) * scale + add : 0.f;
}

PREFCORE_ISA_CLONES(group_rows_isa, group_rows)
PREFCORE_ISA_CLONES(gae_rows_isa, gae_rows)

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

// The four (B, T) float32 outputs. Where every large allocation is a fresh mmap (glibc with a
// low mmap threshold, or any allocation above its 32 MiB maximum), first-touching fresh 4 KiB
// pages cost ~90% of writing the outputs (8 MB: ~2 ms fresh vs ~0.2 ms rewritten). From 1 MiB
// in all they are therefore carved from one 2 MiB-aligned block, rounded up to whole 2 MiB
// pages (< 2 MiB of slack in all) that are advised to be transparent huge pages (Linux
// "madvise" mode; advice only, values unaffected; cf. huge_pages.h, whose helper can only use
// the aligned interior of an allocation). One block is one mmap and one munmap per call instead
// of four. Where the allocator reuses its heap the block comes back already faulted in. Each
// output is its own storage at offset 0, as the fake kernel says: they never alias; the block
// is freed with the last of them, so keeping one output keeps the whole block (4× its size)
// alive. Such storages are not resizable. (Where the allocator reuses heap memory, the huge-page
// advice stays on that range after the block is freed: harmless, it only lets the kernel back
// it with huge pages.)
std::array<at::Tensor, 4> alloc_outputs(int64_t B, int64_t T, const at::TensorOptions& opts) {
  constexpr std::size_t kHuge = std::size_t(1) << 21;
  const std::size_t bytes = static_cast<std::size_t>(B * T) * sizeof(float);
  const std::size_t stride = (bytes + 63) & ~std::size_t(63);  // 64-byte-aligned outputs
  const std::size_t total = (4 * stride + kHuge - 1) & ~(kHuge - 1);
  void* ptr = nullptr;
  if (4 * bytes < kHuge / 2 || posix_memalign(&ptr, kHuge, total) != 0) {
    return {at::empty({B, T}, opts), at::empty({B, T}, opts), at::empty({B, T}, opts), at::empty({B, T}, opts)};
  }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  (void)madvise(ptr, total, MADV_HUGEPAGE);
#endif
  const std::shared_ptr<void> block(ptr, [](void* p) { std::free(p); });
  // Fault the block in before the kernels write it, one 2 MiB page per task. The kernels split
  // rows across threads, so every thread writes into every page, and each page is zeroed in
  // full by whichever fault wins it (threads faulting the same page at once zero copies and
  // discard all but one): the zeroing ran serially (~0.2 ms per 2 MiB page here). Touching distinct pages on distinct threads zeroes them concurrently. One
  // byte per 2 MiB: where no huge page is granted this faults one small page and the rest fault
  // in the kernels as before; where the block is already resident it costs nothing.
  char* base = static_cast<char*>(ptr);
  at::parallel_for(0, static_cast<int64_t>(total / kHuge), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) *reinterpret_cast<volatile char*>(base + i * kHuge) = 0;
  });
  std::array<at::Tensor, 4> outs;
  for (std::size_t i = 0; i < 4; ++i) {
    outs[i] = at::from_blob(base + i * stride, {B, T}, [block](void*) {}, opts);
  }
  return outs;
}

// Rows per parallel task: about 16K tokens.
int64_t grain_rows(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, T)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_penalized_advantages_cpu(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& mask,
    const at::Tensor& scores, const std::optional<at::Tensor>& values, double kl_coef,
    int64_t estimator, int64_t mode, int64_t group_size, double gamma, double lam, bool whiten,
    std::optional<double> kl_clamp) {
  const AdvantageInputs p = prepare_advantages(logprobs, ref_logprobs, mask, scores, values, kl_coef,
                                               estimator, mode, group_size, gamma, lam, whiten, kl_clamp);
  const auto opts = p.logprobs.options().dtype(at::kFloat);
  auto [adv, ret, tr, kl] = alloc_outputs(p.B, p.T, opts);
  std::vector<Moments<double>> moments(whiten ? static_cast<size_t>(p.B) : 0);
  const bool gae = p.mode == AdvantageMode::kGae;
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logprobs.scalar_type(), "kl_penalized_advantages_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> row_value(gae ? 0 : static_cast<size_t>(p.B));
    AdvArgs<scalar_t, acc_t> a{
        p.logprobs.const_data_ptr<scalar_t>(), p.ref_logprobs.const_data_ptr<scalar_t>(),
        p.mask.const_data_ptr<bool>(), p.scores.const_data_ptr<acc_t>(),
        gae ? p.values.const_data_ptr<scalar_t>() : nullptr, p.T, p.group_size,
        static_cast<acc_t>(p.kl_coef), static_cast<acc_t>(p.gamma), static_cast<acc_t>(p.gamma * p.lam),
        static_cast<acc_t>(p.kl_clamp), p.mode == AdvantageMode::kGrpo, whiten,
        adv.mutable_data_ptr<float>(), ret.mutable_data_ptr<float>(), tr.mutable_data_ptr<float>(),
        kl.mutable_data_ptr<float>(), row_value.data(), whiten ? moments.data() : nullptr};
    with_estimator(p.estimator, [&](auto est) {
      if (gae) {
        at::parallel_for(0, p.B, grain_rows(p.T), [&](int64_t b0, int64_t b1) { gae_rows_isa(isa, est, a, b0, b1); });
      } else {
        const int64_t groups = p.B / p.group_size;
        at::parallel_for(0, groups, std::max<int64_t>(1, grain_rows(p.T) / p.group_size),
                         [&](int64_t g0, int64_t g1) { group_rows_isa(isa, est, a, g0, g1); });
      }
    });
    if (!whiten) return;
    const Moments<double> total = merge_in_order(moments);
    check_whiten_count(static_cast<int64_t>(total.n), true, "whiten=True");
    const WhitenAffine<double> w = whiten_affine(total, true, true);
    const bool* mk = a.mask;
    const int64_t T = p.T;
    at::parallel_for(0, p.B, grain_rows(T), [&](int64_t b0, int64_t b1) {
      std::vector<float> flanes(static_cast<size_t>(T));
      for (int64_t b = b0; b < b1; ++b) {
        if (gae) {
          whiten_row_inplace(mk + b * T, T, a.adv + b * T, w, flanes.data());
        } else {  // returns keep the un-whitened A
          const double A = static_cast<double>(row_value[b]);
          const float Aw = static_cast<float>((A - w.mean) * w.scale);
          broadcast_row(mk + b * T, T, Aw, a.adv + b * T, static_cast<float>(A), a.ret + b * T, flanes.data());
        }
      }
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
    using acc_t = at::opmath_type<scalar_t>;
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
    const acc_t mean = static_cast<acc_t>(w.mean), scale = static_cast<acc_t>(w.scale),
                add = static_cast<acc_t>(w.add_back);
    at::parallel_for(0, p.N, kWhitenChunk, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        os[i] = ms[i] ? static_cast<scalar_t>((static_cast<acc_t>(xs[i]) - mean) * scale + add) : scalar_t(0);
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
