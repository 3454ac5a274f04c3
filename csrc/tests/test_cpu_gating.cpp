// C++ unit tests (ctest): the CPU top-k gating op, called through the torch
// dispatcher, against a naive per-token loop; and the selection helper on ties.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "cpu/routing_math.h"

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

void check_select_ties_and_nan() {
  const float row[6] = {1.f, 3.f, std::numeric_limits<float>::quiet_NaN(), 3.f, 1.f, 5.f};
  int64_t idx[4];
  float val[4];
  mars_kernels::cpu::select_topk<float>(row, 6, 4, idx, val, nullptr);
  expect(idx[0] == 2 && idx[1] == 5 && idx[2] == 1 && idx[3] == 3, "NaN first, ties to the lower index");
}

}  // namespace

int main() {
  check_select_ties_and_nan();
  for (bool ties : {false, true})
    for (auto [T, E, k] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {1, 1, 1}, {33, 7, 2}, {300, 64, 8}, {5, 257, 20}, {4, 9, 9}})
      for (auto [sf, rn] : std::vector<std::pair<bool, bool>>{{true, true}, {true, false}, {false, true}})
        check_op(T, E, k, sf, rn, ties);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
