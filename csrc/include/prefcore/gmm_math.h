#pragma once
// Scalar maths of the Gaussian-mixture op family (DESIGN §3.2), shared by CPU and CUDA.
//
// Per row, with π = softmax(logits), σ_k = exp(log_sigma_k) and z_k = (x − μ_k)/σ_k:
//   a_k(x)   = log π_k − log σ_k − ½ log 2π − ½ z_k²      (log of component k's weighted density)
//   log p(x) = logsumexp_k a_k(x),   r_k(x) = exp(a_k(x) − log p(x))   (responsibilities)
// Row loss −Σ_g w̄_g log p(x_g), or with normalize_grid −Σ_g w̄_g log p(x_g) + logsumexp_g log p(x_g).
// With ω_g = w̄_g (or w̄_g − q_g, q = softmax_g log p, when normalising) the gradient is
//   ∂ℓ/∂a_k(x_g) = −ω_g r_k(x_g), so only three sums per component are needed:
//   R_k = Σ_g ω_g r_gk,  M_k = Σ_g ω_g r_gk z_gk,  S_k = Σ_g ω_g r_gk z_gk²,
// and  ∂ℓ/∂μ_k = −M_k/σ_k,  ∂ℓ/∂log σ_k = −(S_k − R_k),  ∂ℓ/∂logit_j = −(R_j − π_j Σ_g ω_g)
// (Σ_k R_k = Σ_g ω_g because responsibilities sum to 1). No (B, K, G) tensor is ever needed.
//
// T is the value type (a scalar, or a CPU SIMD vector of E) and E its element type, as in
// quantile_math.h: only arithmetic with E scalars is used so both work. The CPU kernel for
// small point sets also instantiates the component and gradient helpers with E a SIMD vector
// (one row per lane).
#include <cmath>

#include "prefcore/macros.h"

namespace prefcore {

// ½ log 2π.
constexpr double kHalfLog2Pi = 0.91893853320467274178;

// The smallest log σ the kernels accept: 1/σ = exp(−log σ) must stay finite in the
// accumulation dtype (exp(80) ≈ 5.5e34 < FLT_MAX; exp(700) < DBL_MAX). Below it, a point at
// x = μ would compute 0·∞ = NaN, so the argument checks reject such log_sigma.
template <typename E>
constexpr E kMinLogSigma = sizeof(E) >= 8 ? E(-700) : E(-80);

// exp / log of one scalar in the accumulation dtype, on the host and on the device.
template <typename E>
PREFCORE_HD E scalar_exp(E x) {
  if constexpr (sizeof(E) >= 8) return ::exp(x);
  else return ::expf(x);
}

template <typename E>
PREFCORE_HD E scalar_log(E x) {
  if constexpr (sizeof(E) >= 8) return ::log(x);
  else return ::logf(x);
}

// One mixture component, prepared once per row.
template <typename E>
struct GmmComponent {
  E log_coef;   // log π_k − log σ_k − ½ log 2π
  E mu;         // μ_k
  E inv_sigma;  // 1/σ_k = exp(−log σ_k)
};

// Log-normaliser of the mixture weights: logsumexp_k logits_k (max-shifted, so any finite
// logits work). `logits` holds K values in the accumulation dtype.
template <typename E>
PREFCORE_HD E logits_logsumexp(const E* logits, long long K) {
  E m = logits[0];
  for (long long k = 1; k < K; ++k) m = logits[k] > m ? logits[k] : m;
  E s = E(0);
  for (long long k = 0; k < K; ++k) s += scalar_exp(logits[k] - m);
  return m + scalar_log(s);
}

template <typename E>
PREFCORE_HD GmmComponent<E> make_component(E logit, E log_norm, E mu, E log_sigma) {
  return GmmComponent<E>{logit - log_norm - log_sigma - E(kHalfLog2Pi), mu, scalar_exp(-log_sigma)};
}

// z_k(x) = (x − μ_k)/σ_k.
template <typename T, typename E>
PREFCORE_HD T gmm_z(T x, const GmmComponent<E>& c) {
  return (x - c.mu) * c.inv_sigma;
}

// a_k(x) from z_k(x). S is the scalar element type (E itself unless the component holds SIMD
// values, one row per lane).
template <typename T, typename E, typename S = E>
PREFCORE_HD T gmm_log_term(T z, const GmmComponent<E>& c) {
  return c.log_coef - S(0.5) * z * z;
}

// Per-component sums of one row's backward (see the header comment).
template <typename T>
struct GmmGradSums {
  T R, M, S;
};

// Adds one point's contribution: t = ω_g r_gk.
template <typename T>
PREFCORE_HD void gmm_accumulate(GmmGradSums<T>& acc, T t, T z) {
  const T tz = t * z;
  acc.R += t;
  acc.M += tz;
  acc.S += tz * z;
}

// Gradients of component k for upstream gradient g, given its sums, π_k and Σ_g ω_g.
template <typename E>
struct GmmComponentGrad {
  E dlogit, dmu, dlog_sigma;
};

template <typename E>
PREFCORE_HD GmmComponentGrad<E> gmm_component_grad(const GmmGradSums<E>& s, E pi, E sum_omega,
                                                   E inv_sigma, E g) {
  return GmmComponentGrad<E>{-g * (s.R - pi * sum_omega), -g * s.M * inv_sigma, -g * (s.S - s.R)};
}

}  // namespace prefcore
