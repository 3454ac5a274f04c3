// C++ unit tests (ctest): the float activations of cpu/activation_math.h
// (vectorisable exp, erf- and tanh-form GELU, SiLU, x sigmoid(alpha x), ReLU and their derivatives) against the
// double versions, which use the C library, over [-100, 100] and at the edges.
#include <cmath>
#include <cstdio>
#include <limits>

#include "cpu/activation_math.h"

namespace {

int failures = 0;

void expect_within(double got, double want, double tol, const char* what, double x) {
  if (!(std::fabs(got - want) <= tol)) {
    ++failures;
    std::printf("FAIL: %s at x=%.9g: got %.9g, want %.9g (tol %.3g)\n", what, x, got, want, tol);
  }
}

}  // namespace

int main() {
  using namespace mars_kernels::cpu;
  for (double xd = -100.0; xd <= 100.0; xd += 1.0 / 1024 + 1e-7) {
    const float x = static_cast<float>(xd);
    const double xe = x;
    if (xe > -87.0 && xe < 88.0) expect_within(fast_exp(x) / std::exp(xe), 1.0, 2e-7, "fast_exp relative", xe);
    float a, da;
    double A, DA;
    gelu_and_grad<float>(x, a, da);
    gelu_and_grad<double>(xe, A, DA);
    const double scale = std::fmax(1.0, std::fabs(A));
    expect_within(a, A, 4e-7 * scale, "gelu", xe);
    expect_within(gelu<float>(x), a, 0.0, "gelu == gelu_and_grad's value", xe);
    expect_within(da, DA, 4e-7, "gelu'", xe);
    silu_and_grad<float>(x, a, da);
    silu_and_grad<double>(xe, A, DA);
    expect_within(a, A, 2e-6 * std::fmax(1.0, std::fabs(A)), "silu", xe);
    expect_within(silu<float>(x), a, 0.0, "silu == silu_and_grad's value", xe);
    expect_within(da, DA, 2e-6, "silu'", xe);
    gelu_tanh_and_grad<float>(x, a, da);
    gelu_tanh_and_grad<double>(xe, A, DA);
    expect_within(a, A, 2e-6 * std::fmax(1.0, std::fabs(A)), "gelu_tanh", xe);
    expect_within(da, DA, 4e-6, "gelu_tanh'", xe);
    relu2_and_grad<float>(x, a, da);
    relu2_and_grad<double>(xe, A, DA);
    expect_within(a, A, 1e-6 * std::fmax(1.0, std::fabs(A)), "relu^2", xe);
    expect_within(da, DA, 1e-6 * std::fmax(1.0, std::fabs(DA)), "relu^2'", xe);
    silu_alpha_and_grad<float>(x, 1.702f, a, da);
    silu_alpha_and_grad<double>(xe, 1.702, A, DA);
    expect_within(a, A, 2e-6 * std::fmax(1.0, std::fabs(A)), "x sigmoid(1.702 x)", xe);
    expect_within(da, DA, 4e-6, "d/dx x sigmoid(1.702 x)", xe);
  }
  // Saturation: no inf or NaN from the clamp, NaN propagates through the activations.
  expect_within(fast_exp(-1000.0f), 0.0, 1e-37, "fast_exp(-1000)", -1000);
  const float big = fast_exp(1000.0f);
  if (!(std::isfinite(big) && big > 1e38f)) ++failures, std::printf("FAIL: fast_exp(1000) = %g\n", big);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  float relu_nan, relu_nan_grad;
  relu_and_grad<float>(nan, relu_nan, relu_nan_grad);
  if (!std::isnan(gelu<float>(nan)) || !std::isnan(silu<float>(nan)) || !std::isnan(relu_nan))
    ++failures, std::printf("FAIL: NaN input must give NaN\n");
  expect_within(gelu<float>(0.0f), 0.0, 0.0, "gelu(0)", 0);
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
