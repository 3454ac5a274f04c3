// CPU MARS routing: one pass per token over the residual- and feature-router
// logits (softmaxes, divergence, discrepancy-scaled noise, top-k, imitation
// loss, balance statistics). Contract beside the schema in mars_kernels/ops/mars_routing.py; ground truth in
// mars_kernels/reference.py (mars_routing).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "routing_math.h"

namespace mars_kernels {
namespace cpu {
namespace {

// KL(p_r || p_f) = sum_e p_r (a - (l_f - nf)) with a = l_r - nr, p_r = e^a
// (a term is 0 where p_r is); p_r is added to part (the prob_sum partial).
template <typename acc_t, typename scalar_t>
acc_t divergence_row(const scalar_t* lr, const scalar_t* lf, int64_t E, acc_t nr, acc_t nf, acc_t* part) {
  acc_t kl = 0;
  int64_t e = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using vec8::f32x8;
    const f32x8 vnr = vec8::splat(nr), vnf = vec8::splat(nf), zero = {};
    f32x8 acc = {};
    for (; e + vec8::kLanes <= E; e += vec8::kLanes) {
      const f32x8 a = vec8::load(lr + e) - vnr;
      const f32x8 p = vec8::exp(a);
      vec8::store(part + e, vec8::load(part + e) + p);
      const f32x8 term = p * (a - (vec8::load(lf + e) - vnf));
      acc += p == zero ? zero : term;
    }
    kl = vec8::reduce_add(acc);
  }
  for (; e < E; ++e) {
    const acc_t a = static_cast<acc_t>(lr[e]) - nr;
    const acc_t p = exp_vec(a);
    part[e] += p;
    kl += p == 0 ? acc_t(0) : p * (a - (static_cast<acc_t>(lf[e]) - nf));
  }
  return kl;
}

// out = g * (p_f - p_r) with p_f = exp(l_f - nf): the gradient of the
// imitation loss g * KL(stopgrad(p_r) || p_f) with respect to l_f.
template <typename acc_t, typename scalar_t>
void feature_grad_row(const scalar_t* lf, int64_t E, acc_t nf, acc_t g, const acc_t* pr, scalar_t* out) {
  int64_t e = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    const vec8::f32x8 vnf = vec8::splat(nf), vg = vec8::splat(g);
    for (; e + vec8::kLanes <= E; e += vec8::kLanes)
      vec8::store(out + e, vg * (vec8::exp(vec8::load(lf + e) - vnf) - vec8::load(pr + e)));
  }
  for (; e < E; ++e) out[e] = static_cast<scalar_t>(g * (exp_vec(static_cast<acc_t>(lf[e]) - nf) - pr[e]));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mars_routing_fwd(
    const at::Tensor& residual_logits, const at::Tensor& feature_logits, const at::Tensor& noise, int64_t k,
    double sigma_0, double sigma_const, double sigma_max) {
  check_logits(residual_logits, "residual_logits");
  check_same_shape(feature_logits, residual_logits, "feature_logits");
  check_same_shape(noise, residual_logits, "noise");
  TORCH_CHECK(feature_logits.scalar_type() == residual_logits.scalar_type(),
              "feature_logits must have the dtype of residual_logits");
  const int64_t T = residual_logits.size(0), E = residual_logits.size(1);
  check_k(k, E);
  const auto dtype = routing_dtype(residual_logits);
  TORCH_CHECK(noise.scalar_type() == dtype, "noise must be ", dtype, ", got ", noise.scalar_type());
  const auto acc = at::TensorOptions().dtype(dtype);
  at::Tensor weights = at::empty({T, k}, acc), indices = at::empty({T, k}, at::TensorOptions().dtype(at::kLong));
  at::Tensor imitation = at::empty({T}, acc), divergence = at::empty({T}, acc);
  at::Tensor lse_r = at::empty({T}, acc), lse_f = at::empty({T}, acc), prob_sum;
  const int64_t nblocks = (T + kTokenBlock - 1) / kTokenBlock;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual_logits.scalar_type(), "mars_routing_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* LR = residual_logits.const_data_ptr<scalar_t>();
    const scalar_t* LF = feature_logits.const_data_ptr<scalar_t>();
    const acc_t* N = noise.const_data_ptr<acc_t>();
    acc_t* W = weights.data_ptr<acc_t>();
    int64_t* I = indices.data_ptr<int64_t>();
    acc_t *IM = imitation.data_ptr<acc_t>(), *DV = divergence.data_ptr<acc_t>();
    acc_t *SR = lse_r.data_ptr<acc_t>(), *SF = lse_f.data_ptr<acc_t>();
    std::vector<acc_t> partial(nblocks * E, acc_t(0));
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> noisy(E), val(k);
      std::vector<int64_t> order(k > kInsertionSelectMax ? E : 0), keys(k <= kKeyScanSelectMax ? E : 0);
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* part = partial.data() + b * E;
        for (int64_t t = b * kTokenBlock; t < std::min(T, (b + 1) * kTokenBlock); ++t) {
          const scalar_t *lr = LR + t * E, *lf = LF + t * E;
          const acc_t nr = row_log_sum_exp<acc_t>(lr, E), nf = row_log_sum_exp<acc_t>(lf, E);
          SR[t] = nr;
          SF[t] = nf;
          const acc_t kl = divergence_row(lr, lf, E, nr, nf, part);
          DV[t] = kl;
          IM[t] = kl;
          const acc_t sigma = std::min(static_cast<acc_t>(sigma_0) * kl + static_cast<acc_t>(sigma_const),
                                       static_cast<acc_t>(sigma_max));
          for (int64_t e = 0; e < E; ++e) noisy[e] = static_cast<acc_t>(lr[e]) + sigma * N[t * E + e];
          int64_t* idx = I + t * k;
          if (k <= kKeyScanSelectMax) select_topk_by_keys<acc_t>(noisy.data(), E, k, idx, keys.data());
          else select_topk<acc_t>(noisy.data(), E, k, idx, val.data(), order.data());
          const acc_t norm = log_sum_exp<acc_t>(k, [&](int64_t j) { return noisy[idx[j]]; });
          for (int64_t j = 0; j < k; ++j) W[t * k + j] = std::exp(noisy[idx[j]] - norm);
        }
      }
    });
    prob_sum = sum_blocks(partial, nblocks, E, dtype);
  });
  return {weights, indices, imitation, divergence, prob_sum, lse_r, lse_f};
}

std::tuple<at::Tensor, at::Tensor> mars_routing_bwd(const at::Tensor& grad_weights, const at::Tensor& grad_imitation,
                                                    const at::Tensor& grad_prob_sum, const at::Tensor& residual_logits,
                                                    const at::Tensor& feature_logits, const at::Tensor& weights,
                                                    const at::Tensor& indices, const at::Tensor& lse_r,
                                                    const at::Tensor& lse_f) {
  check_logits(residual_logits, "residual_logits");
  check_same_shape(feature_logits, residual_logits, "feature_logits");
  check_same_shape(grad_weights, weights, "grad_weights");
  check_same_shape(indices, weights, "indices");
  const int64_t T = residual_logits.size(0), E = residual_logits.size(1), k = weights.size(1);
  TORCH_CHECK(grad_imitation.numel() == T && grad_prob_sum.numel() == E,
              "grad_imitation must have T=", T, " and grad_prob_sum E=", E, " elements");
  const at::Tensor gim = grad_imitation.contiguous(), gps = grad_prob_sum.contiguous();
  at::Tensor grad_r = at::empty_like(residual_logits), grad_f = at::empty_like(feature_logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual_logits.scalar_type(), "mars_routing_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *LR = residual_logits.const_data_ptr<scalar_t>(), *LF = feature_logits.const_data_ptr<scalar_t>();
    const acc_t *G = grad_weights.const_data_ptr<acc_t>(), *W = weights.const_data_ptr<acc_t>();
    const acc_t *GI = gim.const_data_ptr<acc_t>(), *GP = gps.const_data_ptr<acc_t>();
    const acc_t *SR = lse_r.const_data_ptr<acc_t>(), *SF = lse_f.const_data_ptr<acc_t>();
    const int64_t* I = indices.const_data_ptr<int64_t>();
    scalar_t *DR = grad_r.data_ptr<scalar_t>(), *DF = grad_f.data_ptr<scalar_t>();
    at::parallel_for(0, T, 128, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> pr(E), buf(E);
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t *lr = LR + t * E, *lf = LF + t * E;
        row_scaled_exp<false>(lr, E, SR[t], acc_t(1), pr.data());
        const acc_t gp_dot_p = dot(GP, pr.data(), E);
        for (int64_t e = 0; e < E; ++e) buf[e] = pr[e] * (GP[e] - gp_dot_p);
        acc_t s = 0;
        for (int64_t j = 0; j < k; ++j) s += G[t * k + j] * W[t * k + j];
        for (int64_t j = 0; j < k; ++j) buf[I[t * k + j]] += W[t * k + j] * (G[t * k + j] - s);
        store_row(buf.data(), E, DR + t * E);
        feature_grad_row(lf, E, SF[t], GI[t], pr.data(), DF + t * E);
      }
    });
  });
  return {grad_r, grad_f};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CPU, m) {
  m.impl("mars_routing_fwd", &mars_routing_fwd);
  m.impl("mars_routing_bwd", &mars_routing_bwd);
}

}  // namespace cpu
}  // namespace mars_kernels
