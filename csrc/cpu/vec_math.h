#pragma once
// Elementwise maths on SIMD values (simd.h) for the CPU hot loops. libm's exp is an opaque
// scalar call that blocks vectorisation, so float uses a Cephes-style exp: range reduction by
// ln 2 (rounding via the 1.5·2^23 trick, branch-free), degree-6 polynomial, exponent built in
// the bits; ≤ 2 ulp on [-87, 88], inf above, 0 below, NaN propagates.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/simd.h"

namespace prefcore::cpu {

typedef std::int32_t SimdI32 __attribute__((vector_size(64)));

inline __attribute__((always_inline)) Simd<float> vexp(Simd<float> x) {
  using V = Simd<float>;
  const float kMagic = 12582912.0f, hi = 88.7228f, lo = -87.3365f;
  V xc = x > hi ? V{} + hi : x;
  xc = xc < lo ? V{} + lo : xc;
  const V t = xc * 1.44269504088896341f + kMagic;
  const V n = t - kMagic;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  SimdI32 tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const SimdI32 bits = ((tb - 0x4B400000) + 127) << 23;  // 2^n as float bits
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  y = x > hi ? V{} + std::numeric_limits<float>::infinity() : y;
  y = x < lo ? V{} : y;
  return x != x ? x : y;
}

// float64 keeps libm's exp lane by lane (accuracy over speed for the fp64 path).
inline __attribute__((always_inline)) Simd<double> vexp(Simd<double> x) {
  for (int64_t j = 0; j < kLanes<double>; ++j) x[j] = std::exp(x[j]);
  return x;
}

}  // namespace prefcore::cpu
