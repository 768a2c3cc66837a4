#pragma once
// Elementwise maths the CPU hot loops need in a form the compiler can vectorise: libm's exp
// is an opaque call that blocks auto-vectorisation, so float uses a Cephes-style exp
// (range reduction by ln 2, degree-6 minimax polynomial, ≤ 2 ulp on [-87, 88]).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace prefcore::cpu {

inline float vexp(float x) {
  const float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, branch-free
  const float hi = 88.7228f, lo = -87.3365f;
  float xc = x > hi ? hi : (x < lo ? lo : x);
  const float t = xc * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  std::int32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const std::int32_t e = (tb - 0x4B400000) + 127;  // integer n, biased
  const std::int32_t bits = e << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  y = x > hi ? std::numeric_limits<float>::infinity() : y;
  y = x < lo ? 0.0f : y;
  return x != x ? x : y;  // NaN propagates
}

inline double vexp(double x) { return std::exp(x); }

// The same exp on a 16-lane float vector (simd.h); identical maths lane by lane.
typedef float VecF32 __attribute__((vector_size(64)));
typedef std::int32_t VecI32 __attribute__((vector_size(64)));
typedef double VecF64 __attribute__((vector_size(64)));

inline __attribute__((always_inline)) VecF32 vexp(VecF32 x) {
  const float kMagic = 12582912.0f, hi = 88.7228f, lo = -87.3365f;
  VecF32 xc = x > hi ? VecF32{} + hi : x;
  xc = xc < lo ? VecF32{} + lo : xc;
  const VecF32 t = xc * 1.44269504088896341f + kMagic;
  const VecF32 n = t - kMagic;
  VecF32 r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VecF32 y = VecF32{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const VecI32 bits = ((reinterpret_cast<const VecI32&>(t) - 0x4B400000) + 127) << 23;
  y = y * reinterpret_cast<const VecF32&>(bits);
  y = x > hi ? VecF32{} + std::numeric_limits<float>::infinity() : y;
  y = x < lo ? VecF32{} : y;
  return x != x ? x : y;
}

inline __attribute__((always_inline)) VecF64 vexp(VecF64 x) {
  for (int j = 0; j < 8; ++j) x[j] = std::exp(x[j]);
  return x;
}

}  // namespace prefcore::cpu
