// Eight float lanes as a GCC/Clang vector extension type, and the exp the
// dense routing loops run on them. Written with explicit vectors rather than
// left to the auto-vectoriser: a scalar exp with edge selects does not
// vectorise under the default -ftrapping-math (GCC sinks the float-to-int
// conversion and the polynomial into the branch that uses them, and then
// cannot if-convert a statement that may trap), so such loops ran one element
// at a time. With -mavx2 (-march=native) a vector is one ymm register;
// without AVX the compiler splits it into two SSE halves.
// Header-only and free of torch so the ctest executables can use it directly.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

// Without -mavx GCC warns (-Wpsabi) that 32-byte vectors are passed
// differently than with AVX. The functions here are always inlined and the
// vectors never cross a library boundary, so the warning is off for the
// translation units that use them.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define MK_VEC8_HAS_SHUFFLE 1
#endif
#endif

namespace mars_kernels {
namespace cpu {
namespace vec8 {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
constexpr int64_t kLanes = 8;

#define MK_VEC8_INLINE __attribute__((always_inline)) inline

MK_VEC8_INLINE f32x8 splat(float v) { return f32x8{v, v, v, v, v, v, v, v}; }

// A 2-byte type with bfloat16's layout (the top half of a float), such as
// c10::BFloat16: converted with shifts instead of one element at a time.
template <typename T>
constexpr bool kIsBFloat16 = sizeof(T) == 2 && std::numeric_limits<T>::is_specialized &&
                             std::numeric_limits<T>::digits == 8 && std::is_trivially_copyable_v<T>;

// Eight consecutive elements as float (the value of static_cast<float>).
template <typename scalar_t>
MK_VEC8_INLINE f32x8 load(const scalar_t* p) {
  f32x8 v;
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (kIsBFloat16<scalar_t>) {
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    v = (f32x8)(__builtin_convertvector(h, u32x8) << 16);
  } else {
    float t[kLanes];
    for (int l = 0; l < kLanes; ++l) t[l] = static_cast<float>(p[l]);
    std::memcpy(&v, t, sizeof(v));
  }
  return v;
}

// The first n < 8 elements, the other lanes set to `fill`.
template <typename scalar_t>
MK_VEC8_INLINE f32x8 load_part(const scalar_t* p, int64_t n, float fill) {
  float t[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) t[l] = l < n ? static_cast<float>(p[l]) : fill;
  f32x8 v;
  std::memcpy(&v, t, sizeof(v));
  return v;
}

// min(n, 8) elements from p (the other lanes `fill`), for loops whose last
// step may be short.
template <typename scalar_t>
MK_VEC8_INLINE f32x8 load_n(const scalar_t* p, int64_t n, float fill = 0.0f) {
  return n >= kLanes ? vec8::load(p) : vec8::load_part(p, n, fill);
}

// Stores eight lanes, each as static_cast<scalar_t> would (bfloat16: round to
// nearest even, NaN -> 0x7FC0, the rule of c10::BFloat16).
template <typename scalar_t>
MK_VEC8_INLINE void store(scalar_t* p, f32x8 v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(p, &v, sizeof(v));
  } else if constexpr (kIsBFloat16<scalar_t>) {
    const u32x8 u = (u32x8)v;
    u32x8 r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    r = (u32x8)(v != v ? (i32x8)(u32x8{} + 0x7FC0u) : (i32x8)r);
    const u16x8 h = __builtin_convertvector(r, u16x8);
    std::memcpy(p, &h, sizeof(h));
  } else {
    float t[kLanes];
    std::memcpy(t, &v, sizeof(v));
    for (int l = 0; l < kLanes; ++l) p[l] = static_cast<scalar_t>(t[l]);
  }
}

// Stores the first n < 8 lanes.
template <typename scalar_t>
MK_VEC8_INLINE void store_part(scalar_t* p, f32x8 v, int64_t n) {
  float t[kLanes];
  std::memcpy(t, &v, sizeof(v));
  for (int64_t l = 0; l < n; ++l) p[l] = static_cast<scalar_t>(t[l]);
}

// Stores the first min(n, 8) lanes.
template <typename scalar_t>
MK_VEC8_INLINE void store_n(scalar_t* p, f32x8 v, int64_t n) {
  if (n >= kLanes) vec8::store(p, v);
  else vec8::store_part(p, v, n);
}

// a > b ? a : b and a < b ? a : b lane-wise (b where either is NaN): the
// x86 max/min instructions, which the compiler does not always pick for the
// selects.
MK_VEC8_INLINE f32x8 max(f32x8 a, f32x8 b) {
#if defined(__AVX__)
  return (f32x8)_mm256_max_ps((__m256)a, (__m256)b);
#else
  return a > b ? a : b;
#endif
}
MK_VEC8_INLINE f32x8 min(f32x8 a, f32x8 b) {
#if defined(__AVX__)
  return (f32x8)_mm256_min_ps((__m256)a, (__m256)b);
#else
  return a < b ? a : b;
#endif
}

// Maximum of the lanes, for lanes without NaN.
MK_VEC8_INLINE float reduce_max(f32x8 v) {
#ifdef MK_VEC8_HAS_SHUFFLE
  typedef float f32x4 __attribute__((vector_size(16)));
  f32x4 h = __builtin_shufflevector(v, v, 0, 1, 2, 3);
  const f32x4 hi = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  h = h > hi ? h : hi;
  const f32x4 s = __builtin_shufflevector(h, h, 2, 3, 0, 1);
  h = h > s ? h : s;
  return h[0] > h[1] ? h[0] : h[1];
#else
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
#endif
}

// Sum of the lanes in a fixed order: ((0+4) + (2+6)) + ((1+5) + (3+7)).
MK_VEC8_INLINE float reduce_add(f32x8 v) {
#ifdef MK_VEC8_HAS_SHUFFLE
  typedef float f32x4 __attribute__((vector_size(16)));
  f32x4 h = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  h = h + __builtin_shufflevector(h, h, 2, 3, 0, 1);
  return h[0] + h[1];
#else
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
#endif
}

// e^x lane-wise, bit for bit the scalar exp_vec of routing_math.h.
// Cody-Waite reduction x = n ln2 + r with n = round(x / ln2) clamped to
// [-127, 127] (|r| <= ln2/2 for -87.5 <= x <= 88.38), and the degree-7
// Taylor polynomial of e^r evaluated in Estrin's scheme for a short
// dependency chain (error < 2e-7 relative). Exact at the edges: x < -87.5
// (and -inf) -> 0, x > 88.7 (and +inf) -> inf, NaN -> NaN (it reaches the
// result through r). The rounding adds and removes 1.5 * 2^23, which is
// round-to-nearest-even for |x / ln2| < 2^22; beyond that the clamp and the
// edge selects decide.
MK_VEC8_INLINE f32x8 exp(f32x8 x) {
  const f32x8 magic = splat(12582912.0f);
  f32x8 n = (x * splat(1.44269504088896341f) + magic) - magic;
  n = max(min(n, splat(127.0f)), splat(-127.0f));  // NaN -> 127: the conversion stays in range
  const f32x8 r = (x - n * splat(0.693145751953125f)) - n * splat(1.428606765330187045e-06f);
  const f32x8 r2 = r * r;
  const f32x8 p01 = r + splat(1.0f);
  const f32x8 p23 = r * splat(1.0f / 6.0f) + splat(0.5f);
  const f32x8 p45 = r * splat(1.0f / 120.0f) + splat(1.0f / 24.0f);
  const f32x8 p67 = r * splat(1.0f / 5040.0f) + splat(1.0f / 720.0f);
  const f32x8 p = (p01 + r2 * p23) + (r2 * r2) * (p45 + r2 * p67);
  const i32x8 bits = (__builtin_convertvector(n, i32x8) + 127) << 23;  // 2^n, n >= -126 where kept
  const f32x8 y = p * (f32x8)bits;
  return x < splat(-87.5f) ? splat(0.0f) : (x > splat(88.7f) ? splat(std::numeric_limits<float>::infinity()) : y);
}

// log(1 + u) for 0 <= u <= 1 (NaN -> NaN): 1 + u = 2^m f with m = 0 or 1 and
// f in [0.707, 1.414], log f = 2 atanh(s) with s = (f - 1) / (f + 1), |s| <=
// 0.1716, summed to s^9 (truncation < 3e-9 relative). f - 1 is u itself or
// (u - 1) / 2, so small u keeps its full precision. About 2 ulp.
MK_VEC8_INLINE f32x8 log1p_unit(f32x8 u) {
  const i32x8 big = u > splat(0.41421356f);
  const f32x8 s = (big ? u - splat(1.0f) : u) / (big ? u + splat(3.0f) : u + splat(2.0f));
  const f32x8 s2 = s * s;
  f32x8 p = s2 * splat(2.0f / 9.0f) + splat(2.0f / 7.0f);
  p = p * s2 + splat(2.0f / 5.0f);
  p = p * s2 + splat(2.0f / 3.0f);
  p = p * s2 + splat(2.0f);
  const f32x8 r = s * p;
  return big ? r + splat(0.693147180559945309f) : r;
}

// |x| (clears the sign bit).
MK_VEC8_INLINE f32x8 abs(f32x8 x) { return (f32x8)((i32x8)x & 0x7FFFFFFF); }

// softplus(x) = max(x, 0) + log(1 + e^-|x|). NaN -> NaN, -inf -> 0, +inf -> inf.
MK_VEC8_INLINE f32x8 softplus(f32x8 x) {
  const f32x8 zero = {};
  return (x > zero ? x : zero) + log1p_unit(exp(-abs(x)));
}

// 1 / (1 + e^-x).
MK_VEC8_INLINE f32x8 sigmoid(f32x8 x) { return splat(1.0f) / (splat(1.0f) + exp(-x)); }

// The standard normal density e^(-z^2/2) / sqrt(2 pi).
MK_VEC8_INLINE f32x8 normal_pdf(f32x8 z) {
  return splat(0.39894228040143267794f) * exp(splat(-0.5f) * z * z);
}

// The standard normal CDF Phi(z). Phi(-|z|) = erfc(x) / 2 with x = |z| /
// sqrt 2 and erfc(x) = e^(-x^2) t P(2t - 1), t = 1 / (1 + x / 2): P of degree
// 9 fitted here to erfc(x) e^(x^2) / t on [0, 9.5] for relative error (3.7e-8
// with these float coefficients), so the tail keeps its relative accuracy
// down to the underflow of e^(-x^2) (about z = -13.2, where Phi is 0); there
// the rounding of z^2 dominates, as it does for erfcf. Phi(z) = 1 - Phi(-z)
// for z > 0. NaN -> NaN, -inf -> 0, +inf -> 1.
MK_VEC8_INLINE f32x8 normal_cdf(f32x8 z) {
  const f32x8 x = abs(z) * splat(0.70710678118654752440f);
  const f32x8 t = splat(1.0f) / (splat(1.0f) + splat(0.5f) * x);
  const f32x8 v = splat(2.0f) * t - splat(1.0f);
  f32x8 p = v * splat(2.705425504e-05f) + splat(-2.706365776e-04f);
  p = p * v + splat(3.623183875e-04f);
  p = p * v + splat(1.526397769e-03f);
  p = p * v + splat(-3.218290396e-03f);
  p = p * v + splat(-1.075269654e-02f);
  p = p * v + splat(1.821815595e-02f);
  p = p * v + splat(1.397358775e-01f);
  p = p * v + splat(3.435804546e-01f);
  p = p * v + splat(5.107913613e-01f);
  const f32x8 tail = splat(0.5f) * (t * p) * exp(splat(-0.5f) * z * z);
  return z > f32x8{} ? splat(1.0f) - tail : tail;
}

#undef MK_VEC8_INLINE

}  // namespace vec8
}  // namespace cpu
}  // namespace mars_kernels

#undef MK_VEC8_HAS_SHUFFLE
