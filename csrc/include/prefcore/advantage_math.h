#pragma once
// Scalar maths of the KL-penalised advantage family (DESIGN §3.4), shared by CPU and CUDA.
// T is the value type (a scalar, or a CPU SIMD vector of E) and E its element type; only
// comparisons, ?: and arithmetic with E scalars are used, so both work (as in quantile_math.h).
#include <cstdint>

#include "prefcore/macros.h"

namespace prefcore {

enum class KlEstimator : int { kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3 };
enum class AdvantageMode : int { kRloo = 0, kGrpo = 1, kGae = 2 };

// Added to the variance before the square root when whitening: (x − μ)/sqrt(σ² + kWhitenEps).
constexpr double kWhitenEps = 1e-8;
// Added to the group standard deviation in GRPO: (R − mean_g)/(std_g + kGrpoEps).
constexpr double kGrpoEps = 1e-6;

// k3 = exp(−d) − 1 + d. For |d| ≤ 0.5 this cancels (the result is ~d²/2 while each term is
// ~1), so it is evaluated there as d²·Σ_{j≥0} (−d)^j/(j+2)! (Horner, 14 terms: relative error
// < 1e-16 for |d| ≤ 0.5); elsewhere directly from exp_neg_d = exp(−d), which the caller
// computes with its own exp (a SIMD exp on the CPU, ::exp on the GPU). Branch-free.
template <typename T, typename E>
PREFCORE_HD T kl_k3(T d, T exp_neg_d) {
  const T z = -d;
  // 1/(j+2)! for j = 13 … 0.
  T p = T{} + E(1.0 / 1307674368000.0);           // 1/15!
  p = p * z + E(1.0 / 87178291200.0);             // 1/14!
  p = p * z + E(1.0 / 6227020800.0);              // 1/13!
  p = p * z + E(1.0 / 479001600.0);               // 1/12!
  p = p * z + E(1.0 / 39916800.0);                // 1/11!
  p = p * z + E(1.0 / 3628800.0);                 // 1/10!
  p = p * z + E(1.0 / 362880.0);                  // 1/9!
  p = p * z + E(1.0 / 40320.0);                   // 1/8!
  p = p * z + E(1.0 / 5040.0);                    // 1/7!
  p = p * z + E(1.0 / 720.0);                     // 1/6!
  p = p * z + E(1.0 / 120.0);                     // 1/5!
  p = p * z + E(1.0 / 24.0);                      // 1/4!
  p = p * z + E(1.0 / 6.0);                       // 1/3!
  p = p * z + E(0.5);                             // 1/2!
  const T small = d * d * p;
  const T direct = exp_neg_d - E(1) + d;
  const T ad = d < E(0) ? -d : d;
  return ad <= E(0.5) ? small : direct;
}

// The per-token KL estimate of d = logprob − ref_logprob, before clamping:
// k1 = d, k2 = d²/2, k3 = exp(−d) − 1 + d, abs = |d|. kEst is a compile-time choice so the
// token loop carries no switch. exp_neg_d is only read for k3.
template <KlEstimator kEst, typename T, typename E>
PREFCORE_HD T kl_estimate(T d, T exp_neg_d) {
  if constexpr (kEst == KlEstimator::kK1) {
    return d;
  } else if constexpr (kEst == KlEstimator::kK2) {
    return E(0.5) * d * d;
  } else if constexpr (kEst == KlEstimator::kK3) {
    return kl_k3<T, E>(d, exp_neg_d);
  } else {
    return d < E(0) ? -d : d;
  }
}

// kl_clamp = c clamps the estimate to [−c, c]; c = +inf (no clamp) leaves it unchanged.
// NaN is kept (both comparisons are false), matching torch.clamp.
template <typename T, typename E>
PREFCORE_HD T kl_clamp(T kl, E c) {
  T out = kl > c ? T{} + c : kl;
  return out < -c ? T{} - c : out;
}

// One step of the reverse GAE scan over a valid token t (DESIGN §3.4):
//   δ = r_t + γ·nv − V_t,   g ← δ + γλ·g,   nv ← V_t.
// A masked token leaves (g, nv) unchanged, so the caller only calls this on valid tokens.
template <typename T>
struct GaeState {
  T g;   // the advantage of the nearest valid token to the right (0 past the last one)
  T nv;  // the value V of that token (0 past the last one)
};

template <typename T, typename E>
PREFCORE_HD GaeState<T> gae_step(GaeState<T> s, T reward, T value, E gamma, E gamma_lam) {
  const T delta = reward + gamma * s.nv - value;
  return GaeState<T>{delta + gamma_lam * s.g, value};
}

// --- deterministic moments for whitening -------------------------------------------------
// Count, mean and sum of squared deviations of a set of values. Chunks are summarised
// independently and merged in a fixed order (Chan et al.'s pairwise update), so the result
// does not depend on how many threads or blocks did the work, and there is no cancellation
// of the E[x²] − E[x]² kind.
template <typename A>
struct Moments {
  A n;     // count (held as a float so the merge is pure arithmetic)
  A mean;
  A m2;    // Σ (x − mean)²
};

template <typename A>
PREFCORE_HD Moments<A> merge_moments(Moments<A> a, Moments<A> b) {
  const A n = a.n + b.n;
  if (n == A(0)) return Moments<A>{A(0), A(0), A(0)};
  const A delta = b.mean - a.mean;
  const A wb = b.n / n;
  return Moments<A>{n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// The affine map x ↦ (x − mean)·scale (+ mean again when the mean is not to be shifted,
// TRL's and verl's `shift_mean=False`), with scale = 1/sqrt(σ² + kWhitenEps) and σ² the
// unbiased (m2/(n−1)) or biased (m2/n) variance.
template <typename A>
struct WhitenAffine {
  A mean;
  A scale;
  A add_back;  // mean when shift_mean is false, else 0
};

}  // namespace prefcore
