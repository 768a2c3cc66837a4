// CPU kernels of gmm_nll and _gmm_nll_backward (DESIGN §3.2). Maths: prefcore/gmm_math.h.
//
// One pass over a row's points per direction. Points are processed 64 bytes at a time (16
// float / 8 double lanes, see simd.h); per lane block the K log-terms a_k are formed, their
// max-shifted exps give the mixture log-density (forward) or the responsibilities, which are
// folded straight into three sums per component (backward). Nothing of size (B, K, G) exists:
// per thread the scratch is the row's points, weights and (normalize_grid) log-densities, plus
// O(K) SIMD blocks. With few points per row (raw annotator scores) gmm_tiles puts W rows
// across the lanes instead, so no lane idles and the per-row set-up is vectorised too.
//
// The parameters are (B, K), tiny next to the (B, G) weights, so half/bfloat16 parameters are
// widened to float32 once up front and the row kernels exist only for the two accumulation
// types (× the ISA clones of isa.h). Points and weights arrive in the accumulation dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "cpu/vec_math.h"
#include "gmm_checks.h"
#include "prefcore/gmm_math.h"

namespace prefcore::cpu {
namespace {

// ---- vector log ---------------------------------------------------------------------------
// Cephes logf on 16 lanes (≤ 1 ulp). Domain: positive, normal, finite x — the kernels only
// take the log of Σ_k exp(a_k − max a) ∈ [1, K] and of sums of exps ≥ 1.
PREFCORE_ALWAYS_INLINE Simd<float> vlog_pos(Simd<float> x) {
  using V = Simd<float>;
  SimdI32 bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const SimdI32 mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa scaled into [0.5, 1)
  V m;
  std::memcpy(&m, &mbits, sizeof(m));
  V e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, V);
  const auto small = m < 0.707106781186547524f;  // keep the reduced argument in [√½ − 1, √2 − 1)
  e = small ? e - 1.0f : e;
  const V f = small ? m + m - 1.0f : m - 1.0f;
  const V z = f * f;
  V y = V{} + 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return f + y + e * 0.693359375f;
}

// float64 keeps libm's log lane by lane (accuracy over speed, as vexp does).
PREFCORE_ALWAYS_INLINE Simd<double> vlog_pos(Simd<double> x) {
  for (int64_t j = 0; j < kLanes<double>; ++j) x[j] = std::log(x[j]);
  return x;
}

// ---- row kernels --------------------------------------------------------------------------

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

// For the W points of xv: writes e_k = exp(a_k − m) to e[k·W .. k·W + W) and returns
// S = Σ_k e_k; m = max_k a_k. Where every a_k underflowed to −∞ (|x − μ|/σ beyond ~1e19 in
// float32) the shift uses 0, so e_k = 0 and S = 0 there instead of NaN.
template <int KC, typename acc_t>
PREFCORE_ALWAYS_INLINE Simd<acc_t> block_exps(Simd<acc_t> xv, const GmmComponent<acc_t>* comp,
                                              int64_t K_runtime, acc_t* __restrict e, Simd<acc_t>& m_out) {
  const int64_t K = KC > 0 ? KC : K_runtime;
  using V = Simd<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  V m = V{} - kInf<acc_t>;
  for (int64_t k = 0; k < K; ++k) {
    const V a = gmm_log_term<V, acc_t>(gmm_z<V, acc_t>(xv, comp[k]), comp[k]);
    simd_store(e + k * W, a);
    m = a > m ? a : m;
  }
  const V shift = m == -kInf<acc_t> ? V{} : m;
  V s{};
  for (int64_t k = 0; k < K; ++k) {
    const V ev = vexp(simd_load(e + k * W) - shift);
    simd_store(e + k * W, ev);
    s += ev;
  }
  m_out = m;
  return s;
}

// log p of a block from its max log-term and S (−∞ where every component underflowed).
template <typename acc_t>
PREFCORE_ALWAYS_INLINE Simd<acc_t> block_logp(Simd<acc_t> m, Simd<acc_t> s) {
  const Simd<acc_t> lp = m + vlog_pos(s);
  return m == -kInf<acc_t> ? m : lp;
}

// logsumexp of lp[0 .. Pp) (pad lanes hold −∞).
template <typename acc_t>
PREFCORE_ALWAYS_INLINE acc_t logsumexp_points(const acc_t* __restrict lp, int64_t Pp) {
  using V = Simd<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  V mv = V{} - kInf<acc_t>;
  for (int64_t pb = 0; pb < Pp; pb += W) {
    const V v = simd_load(lp + pb);
    mv = v > mv ? v : mv;
  }
  acc_t mx = mv[0];
  for (int64_t j = 1; j < W; ++j) mx = mv[j] > mx ? mv[j] : mx;
  if (mx == -kInf<acc_t>) return mx;
  V s{};
  for (int64_t pb = 0; pb < Pp; pb += W) s += vexp(simd_load(lp + pb) - mx);
  return mx + std::log(simd_sum<acc_t>(s));
}

template <typename acc_t>
PREFCORE_ALWAYS_INLINE bool is_finite_value(acc_t v) {
  return (v < kInf<acc_t>) & (v > -kInf<acc_t>);  // false for ±∞ and NaN
}

// KC > 0: K is the compile-time constant KC (the component loops unroll and the exp blocks stay
// in registers); KC = 0: any K.
template <bool kBackward, int KC, typename acc_t>
PREFCORE_ALWAYS_INLINE void gmm_rows(std::bool_constant<kBackward>, std::integral_constant<int, KC>,
                                     const GmmArgs<acc_t>& a, int64_t b0, int64_t b1) {
  using V = Simd<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  const int64_t K = KC > 0 ? KC : a.K, P = a.P;
  const int64_t Pp = (P + W - 1) / W * W;
  const bool shared_points = a.pts_row_stride == 0;
  // Scratch: points x, weights w, log-densities lp (Pp each; pad lanes x = 0, w = 0, lp = −∞),
  // the K exp blocks e, and the 3K backward sum blocks.
  std::vector<acc_t> buf(3 * Pp + 4 * K * W, acc_t(0));
  std::vector<GmmComponent<acc_t>> comp(static_cast<size_t>(K));
  acc_t* __restrict x = buf.data();
  acc_t* __restrict w = x + Pp;
  acc_t* __restrict lp = w + Pp;
  acc_t* __restrict e = lp + Pp;
  acc_t* __restrict sums = e + K * W;  // R_k at sums[3kW], M_k at +W, S_k at +2W
  if (shared_points) {
    for (int64_t p = 0; p < P; ++p) x[p] = a.points[p * a.pts_col_stride];
  }
  if (a.weights == nullptr) {
    for (int64_t p = 0; p < P; ++p) w[p] = acc_t(1);
  }
  for (int64_t p = P; p < Pp; ++p) lp[p] = -kInf<acc_t>;

  auto zero_row = [&](int64_t b) {
    if (!kBackward) {
      a.loss[b] = acc_t(0);
      return;
    }
    for (int64_t k = 0; k < K; ++k) a.dlogits[b * K + k] = a.dmu[b * K + k] = a.dlog_sigma[b * K + k] = acc_t(0);
  };

  for (int64_t b = b0; b < b1; ++b) {
    const acc_t* lg = a.logits + b * K;
    const acc_t* mu = a.mu + b * K;
    const acc_t* ls = a.log_sigma + b * K;
    bool ok = true;
    for (int64_t k = 0; k < K; ++k) {
      ok &= is_finite_value(lg[k]) & is_finite_value(mu[k]) & is_finite_value(ls[k]) & (ls[k] >= kMinLogSigma<acc_t>);
    }
    if (!shared_points) {
      const acc_t* pr = a.points + b * a.pts_row_stride;
      bool pts_ok = true;
      for (int64_t p = 0; p < P; ++p) {
        const acc_t v = pr[p * a.pts_col_stride];
        x[p] = v;
        pts_ok &= is_finite_value(v);
      }
      ok &= pts_ok;
    }
    acc_t total = static_cast<acc_t>(P);
    if (a.weights != nullptr) {
      const acc_t* wr = a.weights + b * a.w_row_stride;
      V tv{}, mv{};  // running sum and minimum, for the row total and the sign check
      int64_t p = 0;
      if (a.w_col_stride == 1) {
        for (; p + W <= P; p += W) {  // vectorised copy (the (B, G) weights are the big input)
          const V v = simd_load(wr + p);
          simd_store(w + p, v);
          tv += v;
          mv = v < mv ? v : mv;
        }
      }
      acc_t t = simd_sum<acc_t>(tv), mn = acc_t(0);
      for (int64_t j = 0; j < W; ++j) mn = mv[j] < mn ? mv[j] : mn;
      for (; p < P; ++p) {
        const acc_t v = wr[p * a.w_col_stride];
        w[p] = v;
        t += v;
        mn = v < mn ? v : mn;
      }
      // NaN or ±∞ weights (or an overflowing sum) make the sum non-finite or negative; the
      // minimum catches a negative weight the sum hides.
      const bool w_ok = (t >= acc_t(0)) & (t < kInf<acc_t>) & (mn >= acc_t(0));
      ok &= w_ok;
      total = t;
    }
    if (!ok) {
      int64_t cur = a.first_bad->load(std::memory_order_relaxed);
      while (b < cur && !a.first_bad->compare_exchange_weak(cur, b, std::memory_order_relaxed)) {
      }
      zero_row(b);
      if (!kBackward) a.total[b] = acc_t(0);
      continue;
    }
    if (!kBackward) a.total[b] = total;
    if (!(total > acc_t(0))) {  // all-zero weights: loss 0, gradient 0 (DESIGN §3.2)
      zero_row(b);
      continue;
    }
    const acc_t log_norm = logits_logsumexp(lg, K);
    for (int64_t k = 0; k < K; ++k) comp[k] = make_component(lg[k], log_norm, mu[k], ls[k]);
    const acc_t inv_total = acc_t(1) / total;

    if (!kBackward || a.normalize) {
      // Forward value, or the log-densities the normalised backward needs for q_g.
      V wl{};
      for (int64_t pb = 0; pb < Pp; pb += W) {
        const V xv = simd_load(x + pb);
        V m;
        const V s = block_exps<KC, acc_t>(xv, comp.data(), K, e, m);
        const V logp = block_logp<acc_t>(m, s);
        if (a.normalize) simd_store(lp + pb, logp);
        if (!kBackward) {
          const V wv = simd_load(w + pb);
          wl += wv > acc_t(0) ? wv * logp : V{};  // a zero-weight point adds 0 even at log p = −∞
        }
      }
      if (a.normalize) {
        for (int64_t p = P; p < Pp; ++p) lp[p] = -kInf<acc_t>;
      }
      if (!kBackward) {
        acc_t loss = -simd_sum<acc_t>(wl) * inv_total;
        if (a.normalize) {
          const acc_t lse = logsumexp_points(lp, Pp);
          loss = lse == -kInf<acc_t> ? kInf<acc_t> : loss + lse;
        }
        a.loss[b] = loss;
        continue;
      }
    }

    // Backward: ω_g = w̄_g (− q_g), t_gk = ω_g r_gk folded into R_k, M_k, S_k.
    const acc_t lse = a.normalize ? logsumexp_points(lp, Pp) : acc_t(0);
    for (int64_t i = 0; i < 3 * K * W; ++i) sums[i] = acc_t(0);
    V omega_sum{};
    constexpr acc_t kBig = std::numeric_limits<acc_t>::max();
    for (int64_t pb = 0; pb < Pp; pb += W) {
      const V xv = simd_load(x + pb);
      V m;
      const V s = block_exps<KC, acc_t>(xv, comp.data(), K, e, m);
      V omega = simd_load(w + pb) * inv_total;
      if (a.normalize) omega -= vexp(simd_load(lp + pb) - lse);  // q_g; pad lanes: exp(−∞) = 0
      omega_sum += omega;
      const V os = omega != acc_t(0) ? omega / s : V{};
      for (int64_t k = 0; k < K; ++k) {
        const V t = os * simd_load(e + k * W);
        // z is clamped to a finite value: where it overflows, e_k = 0 and so t = 0, and the
        // products below must stay 0 rather than 0·∞ = NaN.
        V z = gmm_z<V, acc_t>(xv, comp[k]);
        z = z > kBig ? V{} + kBig : z;
        z = z < -kBig ? V{} - kBig : z;
        acc_t* sk = sums + 3 * k * W;
        GmmGradSums<V> acc{simd_load(sk), simd_load(sk + W), simd_load(sk + 2 * W)};
        gmm_accumulate(acc, t, z);
        simd_store(sk, acc.R);
        simd_store(sk + W, acc.M);
        simd_store(sk + 2 * W, acc.S);
      }
    }
    const acc_t g = a.grad_rows[b];
    const acc_t osum = simd_sum<acc_t>(omega_sum);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* sk = sums + 3 * k * W;
      const GmmGradSums<acc_t> sk_sum{simd_sum<acc_t>(simd_load(sk)), simd_sum<acc_t>(simd_load(sk + W)),
                                      simd_sum<acc_t>(simd_load(sk + 2 * W))};
      const acc_t pi = std::exp(lg[k] - log_norm);
      const GmmComponentGrad<acc_t> gr = gmm_component_grad(sk_sum, pi, osum, comp[k].inv_sigma, g);
      a.dlogits[b * K + k] = gr.dlogit;
      a.dmu[b * K + k] = gr.dmu;
      a.dlog_sigma[b * K + k] = gr.dlog_sigma;
    }
  }
}

PREFCORE_ISA_CLONES(gmm_rows_isa, gmm_rows)

// ---- small point sets: rows across SIMD lanes ----------------------------------------------
// With few points per row (e.g. N ≈ 10 raw annotator scores) the point-lane kernel above
// leaves most lanes idle and its per-row set-up (scalar exp/log) dominates. Here W rows share
// each SIMD value (lane j = row r0 + j): the set-up, every point's K log-terms, the sums and the
// gradients all run W rows at a time, with the components in registers (compile-time K only).
// A tile with an invalid value or an overflowing weight sum, and the last partial tile, go
// through gmm_rows, which records the error / handles them row by row. No normalize_grid here.
constexpr int64_t kMaxTilePoints = 64;

template <bool kBackward, int KC, typename acc_t>
PREFCORE_ALWAYS_INLINE void gmm_tiles(std::bool_constant<kBackward> dir, std::integral_constant<int, KC> kc,
                                      const GmmArgs<acc_t>& a, int64_t b0, int64_t b1) {
  static_assert(KC > 0, "the row-tile kernel needs a compile-time K");
  using V = Simd<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  constexpr int64_t K = KC;
  const int64_t P = a.P;
  // Scratch [item][lane]: logits, μ, log σ (K each), points and weights (P each).
  std::vector<acc_t> buf((3 * K + 2 * P) * W);
  acc_t* __restrict L = buf.data();
  acc_t* __restrict MU = L + K * W;
  acc_t* __restrict LS = MU + K * W;
  acc_t* __restrict X = LS + K * W;
  acc_t* __restrict WT = X + P * W;
  int64_t r0 = b0;
  for (; r0 + W <= b1; r0 += W) {
    bool ok = true;
    for (int64_t j = 0; j < W; ++j) {  // transpose the tile's rows into lanes
      const int64_t b = r0 + j;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t l = a.logits[b * K + k], m = a.mu[b * K + k], s = a.log_sigma[b * K + k];
        L[k * W + j] = l;
        MU[k * W + j] = m;
        LS[k * W + j] = s;
        ok &= is_finite_value(l) & is_finite_value(m) & is_finite_value(s) & (s >= kMinLogSigma<acc_t>);
      }
      const acc_t* pr = a.points + b * a.pts_row_stride;
      for (int64_t p = 0; p < P; ++p) {
        const acc_t v = pr[p * a.pts_col_stride];
        X[p * W + j] = v;
        ok &= is_finite_value(v);
      }
      if (a.weights != nullptr) {
        const acc_t* wr = a.weights + b * a.w_row_stride;
        for (int64_t p = 0; p < P; ++p) {
          const acc_t v = wr[p * a.w_col_stride];
          WT[p * W + j] = v;
          ok &= (v >= acc_t(0)) & (v < kInf<acc_t>);
        }
      }
    }
    V total = simd_splat(static_cast<acc_t>(P));
    if (ok && a.weights != nullptr) {
      total = V{};
      for (int64_t p = 0; p < P; ++p) total += simd_load(WT + p * W);
      for (int64_t j = 0; j < W; ++j) ok &= total[j] < kInf<acc_t>;
    }
    if (!ok) {
      gmm_rows(dir, kc, a, r0, r0 + W);
      continue;
    }
    const V inv_total = total > acc_t(0) ? acc_t(1) / total : V{};  // all-zero rows: ω = 0
    // Row set-up, W rows at once: log-softmax of the logits, log-coefficients, 1/σ.
    V lmax = simd_load(L);
    for (int64_t k = 1; k < K; ++k) {
      const V v = simd_load(L + k * W);
      lmax = v > lmax ? v : lmax;
    }
    V lsum{};
    for (int64_t k = 0; k < K; ++k) lsum += vexp(simd_load(L + k * W) - lmax);
    const V log_norm = lmax + vlog_pos(lsum);
    GmmComponent<V> comp[K];
    for (int64_t k = 0; k < K; ++k) {
      const V ls = simd_load(LS + k * W);
      comp[k] = GmmComponent<V>{simd_load(L + k * W) - log_norm - ls - acc_t(kHalfLog2Pi), simd_load(MU + k * W),
                                vexp(-ls)};
    }
    V wl{}, omega_sum{};
    GmmGradSums<V> sums[K];
    for (int64_t k = 0; k < K; ++k) sums[k] = GmmGradSums<V>{V{}, V{}, V{}};
    constexpr acc_t kBig = std::numeric_limits<acc_t>::max();
    for (int64_t p = 0; p < P; ++p) {
      const V xv = simd_load(X + p * W);
      const V wv = a.weights != nullptr ? simd_load(WT + p * W) : simd_splat(acc_t(1));
      V e[K];
      V m = V{} - kInf<acc_t>;
      for (int64_t k = 0; k < K; ++k) {
        e[k] = gmm_log_term<V, V, acc_t>(gmm_z<V, V>(xv, comp[k]), comp[k]);
        m = e[k] > m ? e[k] : m;
      }
      const V shift = m == -kInf<acc_t> ? V{} : m;
      V s{};
      for (int64_t k = 0; k < K; ++k) {
        e[k] = vexp(e[k] - shift);
        s += e[k];
      }
      if (!kBackward) {
        wl += wv > acc_t(0) ? wv * block_logp<acc_t>(m, s) : V{};
        continue;
      }
      const V omega = wv * inv_total;
      omega_sum += omega;
      const V os = omega != acc_t(0) ? omega / s : V{};
      for (int64_t k = 0; k < K; ++k) {
        V z = gmm_z<V, V>(xv, comp[k]);
        z = z > kBig ? V{} + kBig : z;  // see gmm_rows: keeps 0·z = 0 where z overflows
        z = z < -kBig ? V{} - kBig : z;
        gmm_accumulate(sums[k], os * e[k], z);
      }
    }
    if (!kBackward) {
      const V loss = -wl * inv_total;
      for (int64_t j = 0; j < W; ++j) {
        a.loss[r0 + j] = loss[j];
        a.total[r0 + j] = total[j];
      }
      continue;
    }
    const V g = simd_load(a.grad_rows + r0);
    for (int64_t k = 0; k < K; ++k) {
      const V pi = vexp(simd_load(L + k * W) - log_norm);
      const GmmComponentGrad<V> gr = gmm_component_grad<V>(sums[k], pi, omega_sum, comp[k].inv_sigma, g);
      for (int64_t j = 0; j < W; ++j) {
        a.dlogits[(r0 + j) * K + k] = gr.dlogit[j];
        a.dmu[(r0 + j) * K + k] = gr.dmu[j];
        a.dlog_sigma[(r0 + j) * K + k] = gr.dlog_sigma[j];
      }
    }
  }
  if (r0 < b1) gmm_rows(dir, kc, a, r0, b1);
}

PREFCORE_ISA_CLONES(gmm_tiles_isa, gmm_tiles)

// ---- launchers ----------------------------------------------------------------------------

int64_t grain_for(const GmmInputs& p) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.P * p.K));
}

// Runs the row kernel over all rows; raises the first value error if a row had one.
template <bool kBackward, typename acc_t>
void run_rows(const GmmInputs& p, GmmArgs<acc_t>& a, std::atomic<int64_t>& first_bad) {
  if (!p.per_row) {  // the shared grid is checked once here, not per row
    const acc_t* pts = a.points;
    for (int64_t i = 0; i < p.P; ++i) {
      if (!is_finite_value(pts[i * a.pts_col_stride])) check_gmm_values(p);
    }
  }
  const Isa isa = active_isa();
  // The paper's K = 3 (and its neighbours) get unrolled kernels; other K the generic one. Few
  // points per row (and no grid normalisation) put rows across the SIMD lanes instead.
  const bool tiles = !p.normalize && p.P <= kMaxTilePoints && p.K >= 2 && p.K <= 4;
  at::parallel_for(0, p.B, tiles ? std::max<int64_t>(grain_for(p), 64) : grain_for(p), [&](int64_t b0, int64_t b1) {
    const std::bool_constant<kBackward> dir{};
    switch (tiles ? p.K : -p.K) {
      case 2: gmm_tiles_isa(isa, dir, std::integral_constant<int, 2>{}, a, b0, b1); break;
      case 3: gmm_tiles_isa(isa, dir, std::integral_constant<int, 3>{}, a, b0, b1); break;
      case 4: gmm_tiles_isa(isa, dir, std::integral_constant<int, 4>{}, a, b0, b1); break;
      case -2: gmm_rows_isa(isa, dir, std::integral_constant<int, 2>{}, a, b0, b1); break;
      case -3: gmm_rows_isa(isa, dir, std::integral_constant<int, 3>{}, a, b0, b1); break;
      case -4: gmm_rows_isa(isa, dir, std::integral_constant<int, 4>{}, a, b0, b1); break;
      default: gmm_rows_isa(isa, dir, std::integral_constant<int, 0>{}, a, b0, b1); break;
    }
  });
  const int64_t bad = first_bad.load();
  if (bad < p.B) {
    check_gmm_values(p);
    TORCH_CHECK(false, "gmm_nll: invalid parameter, point or weight value in row ", bad);
  }
}

std::tuple<at::Tensor, at::Tensor> gmm_nll_cpu(const at::Tensor& logits, const at::Tensor& mu,
                                               const at::Tensor& log_sigma, const at::Tensor& points,
                                               const std::optional<at::Tensor>& weights, bool normalize_grid) {
  const GmmInputs p = prepare_gmm(logits, mu, log_sigma, points, weights, normalize_grid);
  const auto acc = opmath_dtype(logits);
  at::Tensor loss = at::empty({p.B}, logits.options().dtype(acc));
  at::Tensor total = at::empty({p.B}, logits.options().dtype(acc));
  if (p.B == 0) return {loss, total};
  const at::Tensor l = p.logits.to(acc), m = p.mu.to(acc), s = p.log_sigma.to(acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "gmm_nll_cpu", [&] {
    std::atomic<int64_t> first_bad{p.B};
    auto a = make_gmm_args<scalar_t>(p, l, m, s);
    a.first_bad = &first_bad;
    a.loss = loss.mutable_data_ptr<scalar_t>();
    a.total = total.mutable_data_ptr<scalar_t>();
    run_rows<false>(p, a, first_bad);
  });
  return {loss, total};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gmm_nll_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& points, const std::optional<at::Tensor>& weights, bool normalize_grid) {
  const GmmInputs p = prepare_gmm(logits, mu, log_sigma, points, weights, normalize_grid);
  const at::Tensor g = checked_gmm_grad_rows(grad_rows, p);
  const auto acc = opmath_dtype(logits);
  at::Tensor dl = at::empty({p.B, p.K}, logits.options().dtype(acc));
  at::Tensor dm = at::empty({p.B, p.K}, logits.options().dtype(acc));
  at::Tensor ds = at::empty({p.B, p.K}, logits.options().dtype(acc));
  if (p.B > 0) {
    const at::Tensor l = p.logits.to(acc), m = p.mu.to(acc), s = p.log_sigma.to(acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "gmm_nll_backward_cpu", [&] {
      std::atomic<int64_t> first_bad{p.B};
      auto a = make_gmm_args<scalar_t>(p, l, m, s);
      a.first_bad = &first_bad;
      a.grad_rows = g.const_data_ptr<scalar_t>();
      a.dlogits = dl.mutable_data_ptr<scalar_t>();
      a.dmu = dm.mutable_data_ptr<scalar_t>();
      a.dlog_sigma = ds.mutable_data_ptr<scalar_t>();
      run_rows<true>(p, a, first_bad);
    });
  }
  const auto out = logits.scalar_type();
  return {dl.to(out), dm.to(out), ds.to(out)};
}

}  // namespace
}  // namespace prefcore::cpu

TORCH_LIBRARY_IMPL(prefcore, CPU, m) {
  m.impl("gmm_nll", &prefcore::cpu::gmm_nll_cpu);
  m.impl("_gmm_nll_backward", &prefcore::cpu::gmm_nll_backward_cpu);
}
