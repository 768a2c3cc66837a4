#pragma once
// Scalar maths of token_logprobs (DESIGN §3.5), shared by the CPU and CUDA kernels.
//
// Per valid token, with z_v = (hidden · weight_vᵀ)/T over the vocabulary, the kernels stream
// over vocabulary tiles keeping an online log-sum-exp state relative to the running max m:
//   s  = Σ_v exp(z_v − m),     s1 = Σ_v exp(z_v − m)·(z_v − m).
// At the end  lse = m + log s,  μ = Σ_v softmax(z)_v z_v = m + s1/s,  and
//   logprob = z_target − lse,   entropy = lse − μ = log s − s1/s
// (both terms of the entropy are ≥ 0 since s ≥ 1 and s1 ≤ 0, so it is never negative).
// Gradient of  L = g_ℓ·logprob + g_H·entropy  w.r.t. z_v, with p_v = exp(z_v − lse):
//   ∂L/∂z_v = g_ℓ·(1[v = target] − p_v) − g_H·p_v·(z_v − μ),
// and ∂L/∂hidden = (∂L/∂z)·weight / T, ∂L/∂weight = (∂L/∂z)ᵀ·hidden / T.
//
// T is the value type (a scalar or a CPU SIMD vector of E), E its element type.
#include <cmath>

#include "prefcore/macros.h"

namespace prefcore {

template <typename E>
PREFCORE_HD E tlp_exp(E x) {
  if constexpr (sizeof(E) >= 8) return ::exp(x);
  else return ::expf(x);
}

template <typename E>
PREFCORE_HD E tlp_log(E x) {
  if constexpr (sizeof(E) >= 8) return ::log(x);
  else return ::logf(x);
}

// Online log-sum-exp state of one token (module comment). Empty: s = 0 (m is then ignored).
template <typename E>
struct LseState {
  E m, s, s1;
};

template <typename E>
PREFCORE_HD LseState<E> lse_empty() {
  return LseState<E>{E(0), E(0), E(0)};
}

// Merges block b (its own max b.m, sums relative to it) into a. Rescaling the smaller-max side
// by exp(Δm) ≤ 1 keeps every term bounded; s1 shifts by Δm·s because (z − m') = (z − m) + (m − m').
template <typename E>
PREFCORE_HD LseState<E> lse_merge(LseState<E> a, LseState<E> b) {
  if (b.s == E(0)) return a;
  if (a.s == E(0)) return b;
  if (b.m > a.m) {
    const LseState<E> t = a;
    a = b;
    b = t;
  }
  const E d = b.m - a.m;  // ≤ 0
  const E alpha = tlp_exp(d);
  return LseState<E>{a.m, a.s + alpha * b.s, a.s1 + alpha * (b.s1 + d * b.s)};
}

template <typename E>
PREFCORE_HD E lse_value(LseState<E> st) {
  return st.m + tlp_log(st.s);
}

// entropy = log s − s1/s ≥ 0.
template <typename E>
PREFCORE_HD E lse_entropy(LseState<E> st) {
  return tlp_log(st.s) - st.s1 / st.s;
}

// ∂L/∂z_v without the target term, already divided by T: with a = g_ℓ/T, b = g_H/T,
//   −p·(a + b·(z − μ)).   The kernels add a at v = target.
template <typename T, typename E>
PREFCORE_HD T tlp_dz(T p, T z, E mu, E a, E b) {
  return -(p * ((z - mu) * b + a));
}

}  // namespace prefcore
