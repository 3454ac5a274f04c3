// Element-wise expert activations and their derivatives, written so that a loop
// over a row vectorises: float uses a branch-free exp (Cody-Waite reduction and
// a degree-5 polynomial, ~1 ulp) and erf from it (Abramowitz & Stegun 7.1.26,
// |error| < 1.5e-7, the same formula ATen's vectorised erf uses); double uses
// the C library, so float64 gradchecks see exact derivatives.
// Header-only and free of torch so the ctest executable can check it directly.
#pragma once

#include <cmath>
#include <cstdint>
#include <bit>
#include <cstring>

namespace mars_kernels {
namespace cpu {

// e^x for float. x is clamped to [-87.3, 88.37] so 2^n stays a normal float:
// below, the result is ~1e-38 instead of a denormal or 0. NaN gives NaN.
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3762626647949f ? 88.3762626647949f : x);
  // n = round(x / ln 2) by adding and removing 1.5 * 2^23.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for an exact reduction
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = (p * r) * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return er * std::bit_cast<float>(bits);
}

// Phi(x) (the standard normal CDF) and phi(x) (its density).
template <typename T>
inline void normal_cdf_pdf(T x, T& cdf, T& pdf);

template <>
inline void normal_cdf_pdf<double>(double x, double& cdf, double& pdf) {
  cdf = 0.5 * std::erfc(-x * M_SQRT1_2);
  pdf = std::exp(-0.5 * x * x) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
}

template <>
inline void normal_cdf_pdf<float>(float x, float& cdf, float& pdf) {
  const float z = std::fabs(x) * static_cast<float>(M_SQRT1_2);
  const float e = fast_exp(-z * z);  // e^{-x^2/2}
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  const float tail = 0.5f * (q * t) * e;  // 0.5 * erfc(|x| / sqrt 2) = Phi(-|x|)
  cdf = x >= 0.0f ? 1.0f - tail : tail;
  pdf = e * static_cast<float>(0.5 * M_2_SQRTPI * M_SQRT1_2);
}

template <typename T>
inline T sigmoid(T x);
template <>
inline double sigmoid<double>(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}
template <>
inline float sigmoid<float>(float x) {
  return 1.0f / (1.0f + fast_exp(-x));
}

// gelu(x) = x Phi(x) (exact, erf form); gelu'(x) = Phi(x) + x phi(x).
template <typename T>
inline T gelu(T x) {
  T cdf, pdf;
  normal_cdf_pdf<T>(x, cdf, pdf);
  return x * cdf;
}
template <typename T>
inline void gelu_and_grad(T x, T& a, T& da) {
  T cdf, pdf;
  normal_cdf_pdf<T>(x, cdf, pdf);
  a = x * cdf;
  da = cdf + x * pdf;
}

// gelu, tanh form (PyTorch's approximate="tanh", HF's gelu_pytorch_tanh /
// gelu_new): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).
// tanh(u) = 1 - 2 / (e^{2u} + 1), which saturates cleanly with fast_exp's clamp.
template <typename T>
inline T tanh_fn(T u);
template <>
inline double tanh_fn<double>(double u) {
  return std::tanh(u);
}
template <>
inline float tanh_fn<float>(float u) {
  return 1.0f - 2.0f / (fast_exp(2.0f * u) + 1.0f);
}
template <typename T>
inline void gelu_tanh_and_grad(T x, T& a, T& da) {
  const T c = T(0.79788456080286535588), k = T(0.044715);
  const T t = tanh_fn<T>(c * (x + k * x * x * x));
  a = T(0.5) * x * (T(1) + t);
  da = T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * c * (T(1) + T(3) * k * x * x);
}

// relu(x) = max(x, 0); relu'(x) = [x > 0] (NaN stays NaN, as torch.relu).
template <typename T>
inline void relu_and_grad(T x, T& a, T& da) {
  a = x > T(0) ? x : (x != x ? x : T(0));
  da = x > T(0) ? T(1) : T(0);
}

// relu(x)^2 (squared ReLU, NemotronH's experts); derivative 2 relu(x).
template <typename T>
inline void relu2_and_grad(T x, T& a, T& da) {
  const T r = x > T(0) ? x : (x != x ? x : T(0));
  a = r * r;
  da = T(2) * (x > T(0) ? x : T(0));
}

// x sigmoid(alpha x) (the gate of the clamped SwiGLU of GPT-OSS-style experts;
// alpha = 1 is silu); derivative s + alpha x s (1 - s).
template <typename T>
inline void silu_alpha_and_grad(T x, T alpha, T& a, T& da) {
  const T s = sigmoid<T>(alpha * x);
  a = x * s;
  da = s + alpha * x * s * (T(1) - s);
}

// silu(x) = x sigmoid(x); silu'(x) = s (1 + x (1 - s)).
template <typename T>
inline T silu(T x) {
  return x * sigmoid<T>(x);
}
template <typename T>
inline void silu_and_grad(T x, T& a, T& da) {
  const T s = sigmoid<T>(x);
  a = x * s;
  da = s * (T(1) + x * (T(1) - s));
}

}  // namespace cpu
}  // namespace mars_kernels
