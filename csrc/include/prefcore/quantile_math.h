#pragma once
// Scalar maths of the quantile op family (DESIGN §3.1, §3.3), shared by CPU and CUDA.
#include "prefcore/macros.h"

namespace prefcore {

// --- pinball / quantile-Huber loss for one (target, prediction) pair -------------------
// u = target − pred. The asymmetric weight is |τ − 1[u<0]| (strict: u = 0 takes τ).
// T is the value type (a scalar, or a CPU SIMD vector of E) and E its element type; only
// comparisons, ?: and arithmetic with E scalars are used, so both work.

// κ and its reciprocal, so the per-pair maths multiplies instead of dividing.
template <typename E>
struct HuberScale {
  E kappa;
  E inv_kappa;  // 1/κ (unused when κ = 0)
};

// The scale for a κ ≥ 0 given as a double (host side). A κ whose reciprocal overflows E
// (κ below ~2.9e-39 in float32, ~5.6e-309 in float64: subnormal, or rounding to 0 in E) is
// taken as κ = 0, the plain pinball loss — the κ → 0 limit of H_κ(u)/κ, within κ/2 per pair —
// because u²/2·(1/κ) would compute 0·∞ = NaN at u = 0. Callers select the Huber branch with
// `kappa > 0` on the result, never on the argument.
template <typename E>
inline HuberScale<E> make_huber_scale(double kappa) {
  const E k = static_cast<E>(kappa);
  if (!(k > E(0))) return HuberScale<E>{E(0), E(0)};
  const E inv = E(1) / k;
  if (!(inv - inv == E(0))) return HuberScale<E>{E(0), E(0)};  // 1/κ is ±∞ in E
  return HuberScale<E>{k, inv};
}

template <typename T, typename E>
PREFCORE_HD T pinball_weight(T u, T tau) {
  return u < E(0) ? E(1) - tau : tau;
}

// ρ(u). κ = 0: u·(τ − 1[u<0]) = w·|u|.  κ > 0: w·H_κ(u)/κ with
// H_κ(u) = u²/2 if |u| ≤ κ else κ(|u| − κ/2). kHuber selects the κ > 0 branch at compile time.
template <bool kHuber, typename T, typename E>
PREFCORE_HD T pinball_rho(T u, T tau, HuberScale<E> h) {
  const T w = pinball_weight<T, E>(u, tau);
  const T a = u < E(0) ? -u : u;
  if constexpr (kHuber) {
    return w * (a <= h.kappa ? E(0.5) * a * a * h.inv_kappa : a - E(0.5) * h.kappa);
  } else {
    return w * a;
  }
}

// ∂ρ/∂pred. κ = 0: 1[u<0] − τ.  κ > 0: −w·clamp(u, −κ, κ)/κ.
template <bool kHuber, typename T, typename E>
PREFCORE_HD T pinball_dpred(T u, T tau, HuberScale<E> h) {
  if constexpr (kHuber) {
    const T w = pinball_weight<T, E>(u, tau);
    T c = u > h.kappa ? T{} + h.kappa : u;
    c = c < -h.kappa ? T{} - h.kappa : c;
    return -w * c * h.inv_kappa;
  } else {
    return u < E(0) ? E(1) - tau : -tau;
  }
}

// Σ_n ρ(t_n − pred)·scale with each term scaled before it is added: the overflow-safe
// recomputation of one quantile's loss sum, used where the plain sum overflowed.
template <bool kHuber, typename E>
PREFCORE_HD E pinball_scaled_sum(const E* t, long long n_targets, E pred, E tau, HuberScale<E> h, E scale) {
  E s = E(0);
  for (long long n = 0; n < n_targets; ++n) s += pinball_rho<kHuber, E, E>(t[n] - pred, tau, h) * scale;
  return s;
}

// --- exponential utility / certainty equivalent (QRM eq. 4) -----------------------------
// expm1 for |z| ≤ 0.5 by a degree-10 Horner polynomial (relative error < 1e-10): branch-free
// so the CPU loop vectorises, accurate where exp(z) − 1 would cancel.
template <typename T, typename E = T>
PREFCORE_HD T expm1_small(T z) {
  T p = E(1) + z / E(11);
  p = E(1) + z / E(10) * p;
  p = E(1) + z / E(9) * p;
  p = E(1) + z / E(8) * p;
  p = E(1) + z / E(7) * p;
  p = E(1) + z / E(6) * p;
  p = E(1) + z / E(5) * p;
  p = E(1) + z / E(4) * p;
  p = E(1) + z / E(3) * p;
  p = E(1) + z / E(2) * p;
  return z * p;
}

// Below this max |λ·(x_q − mean)| the certainty equivalent is computed as
// mean − log1p(mean_q expm1(z_q))/λ, which keeps full relative precision as λ → 0.
constexpr double kCeSmallZ = 0.5;

enum class UtilityKind : int { kUtility = 0, kCertaintyEquivalent = 1 };

}  // namespace prefcore
