// C++ unit tests (ctest): the CPU top-k gating op, called through the torch
// dispatcher, against a naive per-token loop; the selection helper on ties;
// and the vectorised row helpers (routing_math.h, vec8.h) against double
// precision on row lengths around the vector width and non-finite rows.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cpu/routing_math.h"

// The schemas live in Python (mars_kernels/ops/gating.py); this program has no
// Python, so it declares the one it calls, exactly as there. The library's
// CPU kernel registered first (its static initialisers run before this
// program's): the dispatcher takes an implementation before its schema and
// checks it against the schema when that arrives, which is the order
// mars_kernels uses too (mars_kernels._C loads before the op modules).
TORCH_LIBRARY_FRAGMENT(mars_kernels, m) {
  m.def("topk_gating_fwd(Tensor logits, int k, bool softmax_first, bool renormalize)"
        " -> (Tensor weights, Tensor indices, Tensor lse)");
}

// An op without tensor arguments, like cuda_kernels_run_on: its kernel is
// registered for CompositeExplicitAutograd, which the dispatcher runs when
// there is no tensor to take a dispatch key from.
TORCH_LIBRARY_FRAGMENT(mars_kernels_test, m) { m.def("twice(int x) -> int"); }
TORCH_LIBRARY_IMPL(mars_kernels_test, CompositeExplicitAutograd, m) {
  m.impl("twice", [](int64_t x) { return 2 * x; });
}

namespace {

int failures = 0;

void expect(bool ok, const char* what, int64_t t = -1) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s (row %lld)\n", what, static_cast<long long>(t));
  }
}

// Naive reference: repeated arg-max (strictly greater, so the lower index wins
// ties), then softmax over all E or over the chosen k.
void naive_topk(const float* row, int64_t E, int64_t k, bool over_all, std::vector<int64_t>& idx,
                std::vector<double>& w) {
  std::vector<bool> taken(E, false);
  idx.assign(k, -1);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t e = 0; e < E; ++e)
      if (!taken[e] && (idx[j] < 0 || row[e] > row[idx[j]])) idx[j] = e;
    taken[idx[j]] = true;
  }
  double denom = 0;
  if (over_all)
    for (int64_t e = 0; e < E; ++e) denom += std::exp(static_cast<double>(row[e]));
  else
    for (int64_t j = 0; j < k; ++j) denom += std::exp(static_cast<double>(row[idx[j]]));
  w.assign(k, 0);
  for (int64_t j = 0; j < k; ++j) w[j] = std::exp(static_cast<double>(row[idx[j]])) / denom;
}

void check_op(int64_t T, int64_t E, int64_t k, bool softmax_first, bool renormalize, bool ties) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mars_kernels::topk_gating_fwd", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, bool, bool)>();
  at::manual_seed(T * 131 + E * 7 + k);
  at::Tensor logits = ties ? at::randint(-2, 3, {T, E}).to(at::kFloat) : at::randn({T, E});
  auto [weights, indices, lse] = op.call(logits, k, softmax_first, renormalize);
  const bool over_all = softmax_first && !renormalize;
  std::vector<int64_t> idx;
  std::vector<double> w;
  for (int64_t t = 0; t < T; ++t) {
    naive_topk(logits.data_ptr<float>() + t * E, E, k, over_all, idx, w);
    for (int64_t j = 0; j < k; ++j) {
      expect(indices[t][j].item<int64_t>() == idx[j], "index", t);
      expect(std::abs(weights[t][j].item<float>() - w[j]) < 1e-6, "weight", t);
    }
  }
}

void check_op_without_tensors() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mars_kernels_test::twice", "").typed<int64_t(int64_t)>();
  expect(op.call(21) == 42, "an op without tensor arguments runs its CompositeExplicitAutograd kernel");
}

void check_select_ties_and_nan() {
  const float row[6] = {1.f, 3.f, std::numeric_limits<float>::quiet_NaN(), 3.f, 1.f, 5.f};
  int64_t idx[4];
  float val[4];
  mars_kernels::cpu::select_topk<float>(row, 6, 4, idx, val, nullptr);
  expect(idx[0] == 2 && idx[1] == 5 && idx[2] == 1 && idx[3] == 3, "NaN first, ties to the lower index");
}


// Row helpers against double: log-sum-exp and softmax for lengths on both
// sides of the vector width, rows with -inf entries, and the rows that give
// NaN (NaN, +inf, all -inf, empty).
void check_row_helpers() {
  namespace mc = mars_kernels::cpu;
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::mt19937 g(7);
  std::normal_distribution<float> d(0.f, 3.f);
  for (int64_t n : {1, 2, 7, 8, 9, 15, 16, 17, 33, 64, 160, 257}) {
    for (int kind = 0; kind < 2; ++kind) {
      std::vector<float> row(n), p(n), acc(n, 1.f), e(n);
      for (auto& v : row) v = d(g);
      if (kind == 1)
        for (int64_t j = 0; j < n; j += 3) row[j] = -inf;  // masked experts (row[0] too)
      if (kind == 1 && n == 1) row[0] = 0.f;
      double mx = -INFINITY, sum = 0;
      for (float v : row) mx = std::max(mx, double(v));
      for (float v : row) sum += std::exp(double(v) - mx);
      const double lse = mx + std::log(sum);
      const float got = mc::row_log_sum_exp<float>(row.data(), n);
      expect(std::abs(got - lse) <= 1e-6 * std::max(1.0, std::abs(lse)), "row_log_sum_exp", n);
      const float got2 = mc::row_softmax<false>(row.data(), n, p.data(), p.data());
      const float got3 = mc::row_softmax<true>(row.data(), n, e.data(), acc.data());
      expect(got2 == got && got3 == got, "row_softmax returns the log-sum-exp", n);
      std::vector<float> q(n);
      mc::row_scaled_exp<false>(row.data(), n, got, -2.f, q.data());
      for (int64_t j = 0; j < n; ++j) {
        const double ref = std::exp(double(row[j]) - lse);
        if (row[j] == -std::numeric_limits<float>::infinity()) {
          expect(p[j] == 0 && acc[j] == 1 && q[j] == 0, "-inf entry -> probability 0", n);
          continue;
        }
        // A few ulp, plus the rounding of row[j] - max (relative 2^-24 |row[j] - max|).
        const double tol = (5e-7 + 1.2e-7 * std::abs(double(row[j]) - lse)) * ref + 1e-30;
        expect(std::abs(p[j] - ref) <= tol, "row_softmax", n);
        expect(std::abs(acc[j] - (1.0 + ref)) <= 1e-6 * (1.0 + ref), "row_softmax accumulates", n);
        // exp(row[j] - lse) with the float lse: its rounding too.
        expect(std::abs(q[j] + 2 * ref) <= 2 * (tol + 1.2e-7 * std::abs(lse) * ref), "row_scaled_exp", n);
      }
    }
    for (float bad : {nan, inf}) {
      std::vector<float> row(n, 0.5f), p(n, 7.f);
      row[n - 1] = bad;
      expect(std::isnan(mc::row_log_sum_exp<float>(row.data(), n)), "NaN/+inf row -> NaN", n);
      expect(std::isnan(mc::row_softmax<false>(row.data(), n, p.data(), p.data())) && p[0] == 7.f,
             "NaN/+inf row: softmax NaN, output untouched", n);
    }
    std::vector<float> ninf(n, -inf);
    expect(std::isnan(mc::row_log_sum_exp<float>(ninf.data(), n)), "all -inf row -> NaN", n);
  }
  expect(std::isnan(mc::row_log_sum_exp<float>(static_cast<const float*>(nullptr), 0)), "empty row -> NaN");
  // bfloat16 rows take the shift-based load; the result must equal the float row's.
  std::vector<c10::BFloat16> rb(37);
  std::vector<float> rf(37);
  for (size_t j = 0; j < rb.size(); ++j) rb[j] = c10::BFloat16(d(g)), rf[j] = static_cast<float>(rb[j]);
  expect(mc::row_log_sum_exp<float>(rb.data(), 37) == mc::row_log_sum_exp<float>(rf.data(), 37), "bfloat16 row");
}

// vec8: exp equal bit for bit to the scalar exp_vec; the bfloat16 load and
// store equal c10's conversions; softplus, sigmoid and the normal CDF and
// density close to double precision, with the documented edges.
void check_vec8() {
  namespace mc = mars_kernels::cpu;
  namespace v8 = mars_kernels::cpu::vec8;
  std::mt19937 g(11);
  std::uniform_int_distribution<uint32_t> bits;
  int64_t exp_mismatch = 0, bf16_mismatch = 0;
  for (int i = 0; i < 200000; ++i) {
    float x[8];
    for (auto& v : x) {
      const uint32_t b = i % 2 ? bits(g) : (bits(g) % 400000000u + 0x3A000000u) ^ (bits(g) & 0x80000000u);
      std::memcpy(&v, &b, sizeof(v));
    }
    const v8::f32x8 y = v8::exp(v8::load(x));
    c10::BFloat16 h[8];
    v8::store(h, v8::load(x));
    const v8::f32x8 back = v8::load(h);
    for (int l = 0; l < 8; ++l) {
      const float s = mc::exp_vec(x[l]);
      if (std::memcmp(&s, &y[l], 4) != 0 && !(std::isnan(s) && std::isnan(y[l]))) ++exp_mismatch;
      const c10::BFloat16 ref(x[l]);
      if (h[l].x != ref.x) ++bf16_mismatch;
      const float rb = static_cast<float>(ref);
      if (std::memcmp(&rb, &back[l], 4) != 0) ++bf16_mismatch;
    }
  }
  expect(exp_mismatch == 0, "vec8::exp == exp_vec bit for bit");
  expect(bf16_mismatch == 0, "vec8 bfloat16 load/store == c10::BFloat16");
  double worst[4] = {0, 0, 0, 0};
  for (int i = 0; i <= 80000; i += 8) {
    float x[8];
    for (int l = 0; l < 8; ++l) x[l] = -40.f + 80.f * float(i + l) / 80000.f;
    const v8::f32x8 v = v8::load(x);
    const v8::f32x8 r[4] = {v8::softplus(v), v8::sigmoid(v), v8::normal_cdf(v * v8::splat(0.3f)),
                            v8::normal_pdf(v * v8::splat(0.3f))};
    for (int l = 0; l < 8; ++l) {
      const double xd = x[l], z = double(float(x[l] * 0.3f));
      const double ref[4] = {std::max(xd, 0.0) + std::log1p(std::exp(-std::abs(xd))), 1 / (1 + std::exp(-xd)),
                             0.5 * std::erfc(-z / std::sqrt(2.0)), std::exp(-0.5 * z * z) / std::sqrt(2 * M_PI)};
      for (int f = 0; f < 4; ++f)
        if (ref[f] > 1e-30) worst[f] = std::max(worst[f], std::abs(r[f][l] - ref[f]) / ref[f]);
    }
  }
  // Relative; the CDF and density lose ~|z|^2 ulp to the rounding of z^2, as erfcf and expf do.
  expect(worst[0] < 6e-7, "vec8::softplus");
  expect(worst[1] < 6e-7, "vec8::sigmoid");
  expect(worst[2] < 1e-5, "vec8::normal_cdf");
  expect(worst[3] < 1e-5, "vec8::normal_pdf");
  const float inf = std::numeric_limits<float>::infinity();
  const float e[8] = {std::numeric_limits<float>::quiet_NaN(), inf, -inf, 0.f, -0.f, 100.f, -100.f, -87.6f};
  const v8::f32x8 ev = v8::load(e);
  const v8::f32x8 ex = v8::exp(ev), sp = v8::softplus(ev), sg = v8::sigmoid(ev), cdf = v8::normal_cdf(ev);
  expect(std::isnan(ex[0]) && ex[1] == inf && ex[2] == 0 && ex[3] == 1 && ex[4] == 1 && ex[5] == inf && ex[6] == 0 &&
             ex[7] == 0, "vec8::exp edges");
  expect(std::isnan(sp[0]) && sp[1] == inf && sp[2] == 0 && sp[5] == 100 && sp[6] == 0, "vec8::softplus edges");
  expect(std::isnan(sg[0]) && sg[1] == 1 && sg[2] == 0 && sg[3] == 0.5f, "vec8::sigmoid edges");
  expect(std::isnan(cdf[0]) && cdf[1] == 1 && cdf[2] == 0 && cdf[3] == 0.5f && cdf[5] == 1 && cdf[6] == 0,
         "vec8::normal_cdf edges");
}

}  // namespace

int main() {
  check_op_without_tensors();
  check_select_ties_and_nan();
  check_row_helpers();
  check_vec8();
  for (bool ties : {false, true})
    for (auto [T, E, k] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {1, 1, 1}, {33, 7, 2}, {300, 64, 8}, {5, 257, 20}, {4, 9, 9}})
      for (auto [sf, rn] : std::vector<std::pair<bool, bool>>{{true, true}, {true, false}, {false, true}})
        check_op(T, E, k, sf, rn, ties);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
