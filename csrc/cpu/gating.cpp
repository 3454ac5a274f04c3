// CPU top-k gating: one pass per token row, rows spread over threads with
// at::parallel_for. Contract beside the schemas in mars_kernels/ops/gating.py.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "routing_math.h"

namespace mars_kernels {
namespace cpu {
namespace {

constexpr int64_t kRowGrain = 256;

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating_fwd(const at::Tensor& logits, int64_t k,
                                                               bool softmax_first,
                                                               bool renormalize) {
  check_logits(logits, "logits");
  const int64_t T = logits.size(0), E = logits.size(1);
  check_k(k, E);
  const auto acc = at::TensorOptions().dtype(routing_dtype(logits));
  at::Tensor weights = at::empty({T, k}, acc);
  at::Tensor indices = at::empty({T, k}, at::TensorOptions().dtype(at::kLong));
  at::Tensor lse = at::empty({T}, acc);
  const bool dense = softmax_first && !renormalize;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_gating_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* L = logits.const_data_ptr<scalar_t>();
    acc_t* W = weights.data_ptr<acc_t>();
    int64_t* I = indices.data_ptr<int64_t>();
    acc_t* S = lse.data_ptr<acc_t>();
    at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> val(k);
      std::vector<int64_t> order(k > kInsertionSelectMax ? E : 0);
      std::vector<int64_t> keys(k <= kKeyScanSelectMax ? E : 0);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = L + t * E;
        int64_t* idx = I + t * k;
        if (k <= kKeyScanSelectMax) select_topk_by_keys<acc_t>(row, E, k, idx, keys.data());
        else select_topk<acc_t>(row, E, k, idx, val.data(), order.data());
        const acc_t norm =
            dense ? row_log_sum_exp<acc_t>(row, E)
                  : log_sum_exp<acc_t>(k, [row, idx](int64_t j) { return static_cast<acc_t>(row[idx[j]]); });
        S[t] = norm;
        for (int64_t j = 0; j < k; ++j) W[t * k + j] = exp_vec(static_cast<acc_t>(row[idx[j]]) - norm);
      }
    });
  });
  return {weights, indices, lse};
}

at::Tensor topk_gating_bwd(const at::Tensor& grad_weights, const at::Tensor& logits,
                           const at::Tensor& weights, const at::Tensor& indices,
                           const at::Tensor& lse, bool softmax_first, bool renormalize) {
  check_logits(logits, "logits");
  const int64_t T = logits.size(0), E = logits.size(1);
  const int64_t k = weights.size(1);
  check_same_shape(grad_weights, weights, "grad_weights");
  check_same_shape(indices, weights, "indices");
  const bool dense = softmax_first && !renormalize;
  at::Tensor grad = at::empty_like(logits);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_gating_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* L = logits.const_data_ptr<scalar_t>();
    const acc_t* G = grad_weights.const_data_ptr<acc_t>();
    const acc_t* W = weights.const_data_ptr<acc_t>();
    const int64_t* I = indices.const_data_ptr<int64_t>();
    const acc_t* S = lse.const_data_ptr<acc_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(E);
      for (int64_t t = begin; t < end; ++t) {
        const acc_t* g = G + t * k;
        const acc_t* w = W + t * k;
        const int64_t* idx = I + t * k;
        acc_t s = 0;
        for (int64_t j = 0; j < k; ++j) s += g[j] * w[j];
        if (dense) {
          // d/dl_e of p_idx[j] = p_idx[j] ([e == idx_j] - p_e)
          const scalar_t* row = L + t * E;
          row_scaled_exp<false>(row, E, S[t], -s, buf.data());
          for (int64_t j = 0; j < k; ++j) buf[idx[j]] += w[j] * g[j];
        } else {
          // The weights are a softmax over the k selected logits only.
          std::fill(buf.begin(), buf.end(), acc_t(0));
          for (int64_t j = 0; j < k; ++j) buf[idx[j]] = w[j] * (g[j] - s);
        }
        store_row(buf.data(), E, out + t * E);
      }
    });
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> router_stats_fwd(const at::Tensor& logits) {
  check_logits(logits, "logits");
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto dtype = routing_dtype(logits);
  at::Tensor lse = at::empty({T}, at::TensorOptions().dtype(dtype));
  at::Tensor prob_sum;
  const int64_t nblocks = (T + kTokenBlock - 1) / kTokenBlock;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "router_stats_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* L = logits.const_data_ptr<scalar_t>();
    acc_t* S = lse.data_ptr<acc_t>();
    std::vector<acc_t> partial(nblocks * E, acc_t(0));
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> ex(E);
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* part = partial.data() + b * E;
        for (int64_t t = b * kTokenBlock; t < std::min(T, (b + 1) * kTokenBlock); ++t) {
          const scalar_t* row = L + t * E;
          const acc_t norm = row_softmax<true>(row, E, ex.data(), part);
          if (std::isnan(norm)) {
            // As torch: logsumexp is NaN, +inf or -inf; the softmax row is all NaN.
            S[t] = torch_log_sum_exp_nonfinite<acc_t>(row, E);
            for (int64_t e = 0; e < E; ++e) part[e] = std::numeric_limits<acc_t>::quiet_NaN();
            continue;
          }
          S[t] = norm;
        }
      }
    });
    prob_sum = sum_blocks(partial, nblocks, E, dtype);
  });
  return {lse, prob_sum};
}

// One row of router_stats_bwd: p = exp(row - lse), then
// out = p * (grad_lse + grad_prob_sum - grad_prob_sum . p).
template <typename acc_t, typename scalar_t>
void router_stats_bwd_row(const scalar_t* row, int64_t E, acc_t lse, acc_t gl, const acc_t* gp, acc_t* p,
                          scalar_t* out) {
  row_scaled_exp<false>(row, E, lse, acc_t(1), p);
  const acc_t gp_dot_p = dot(gp, p, E);
  int64_t e = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    const vec8::f32x8 vgl = vec8::splat(gl), vd = vec8::splat(gp_dot_p);
    for (; e + vec8::kLanes <= E; e += vec8::kLanes)
      vec8::store(out + e, vec8::load(p + e) * ((vgl + vec8::load(gp + e)) - vd));
  }
  for (; e < E; ++e) out[e] = static_cast<scalar_t>(p[e] * (gl + gp[e] - gp_dot_p));
}

at::Tensor router_stats_bwd(const at::Tensor& grad_lse, const at::Tensor& grad_prob_sum,
                            const at::Tensor& logits, const at::Tensor& lse) {
  check_logits(logits, "logits");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(grad_lse.numel() == T && grad_prob_sum.numel() == E,
              "router_stats_bwd: grad_lse must have T=", T, " and grad_prob_sum E=", E, " elements");
  const at::Tensor gl = grad_lse.contiguous(), gp = grad_prob_sum.contiguous();
  at::Tensor grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "router_stats_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* L = logits.const_data_ptr<scalar_t>();
    const acc_t* GL = gl.const_data_ptr<acc_t>();
    const acc_t* GP = gp.const_data_ptr<acc_t>();
    const acc_t* S = lse.const_data_ptr<acc_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> p(E);
      for (int64_t t = begin; t < end; ++t)
        router_stats_bwd_row(L + t * E, E, S[t], GL[t], GP, p.data(), out + t * E);
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CPU, m) {
  m.impl("topk_gating_fwd", &topk_gating_fwd);
  m.impl("topk_gating_bwd", &topk_gating_bwd);
  m.impl("router_stats_fwd", &router_stats_fwd);
  m.impl("router_stats_bwd", &router_stats_bwd);
}

}  // namespace cpu
}  // namespace mars_kernels
