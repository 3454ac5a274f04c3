// CPU noisy top-k gating (Shazeer et al. 2017), training mode. Tokens are
// processed in fixed blocks of kTokenBlock rows so the importance/load sums
// are deterministic. Contract in csrc/ops.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "routing_math.h"

namespace mars_kernels {
namespace cpu {
namespace {

// Per-row scratch for one thread.
template <typename acc_t>
struct NoisyRow {
  std::vector<acc_t> noisy, stdev, val;
  std::vector<int64_t> sel, order;
  std::vector<char> chosen;
  NoisyRow(int64_t E, int64_t m)
      : noisy(E), stdev(E), val(m), sel(m), order(m > kInsertionSelectMax ? E : 0), chosen(E) {}

  // noisy = clean + noise * (softplus(raw) + eps), then the top m in rank order.
  template <typename scalar_t>
  void load(const scalar_t* clean, const scalar_t* raw, const acc_t* noise, int64_t E, int64_t m,
            acc_t eps) {
    for (int64_t e = 0; e < E; ++e) {
      stdev[e] = softplus(static_cast<acc_t>(raw[e])) + eps;
      noisy[e] = static_cast<acc_t>(clean[e]) + noise[e] * stdev[e];
    }
    select_topk<acc_t>(noisy.data(), E, m, sel.data(), val.data(), order.data());
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> noisy_topk_gating_fwd(
    const at::Tensor& clean_logits, const at::Tensor& noise_logits, const at::Tensor& noise,
    int64_t k, double noise_eps) {
  check_logits(clean_logits, "clean_logits");
  check_same_shape(noise_logits, clean_logits, "noise_logits");
  check_same_shape(noise, clean_logits, "noise");
  TORCH_CHECK(noise_logits.scalar_type() == clean_logits.scalar_type(),
              "noise_logits must have the dtype of clean_logits");
  const int64_t T = clean_logits.size(0), E = clean_logits.size(1);
  check_k(k, E);
  const auto dtype = routing_dtype(clean_logits);
  TORCH_CHECK(noise.scalar_type() == dtype, "noise must be ", dtype, ", got ", noise.scalar_type());
  const auto acc = at::TensorOptions().dtype(dtype);
  const int64_t m = std::min(k + 1, E);
  at::Tensor weights = at::empty({T, k}, acc);
  at::Tensor indices = at::empty({T, k}, at::TensorOptions().dtype(at::kLong));
  at::Tensor threshold_index = at::empty({T}, at::TensorOptions().dtype(at::kLong));
  at::Tensor importance, load;
  const int64_t nblocks = (T + kTokenBlock - 1) / kTokenBlock;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, clean_logits.scalar_type(), "noisy_topk_gating_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* C = clean_logits.const_data_ptr<scalar_t>();
    const scalar_t* R = noise_logits.const_data_ptr<scalar_t>();
    const acc_t* N = noise.const_data_ptr<acc_t>();
    acc_t* W = weights.data_ptr<acc_t>();
    int64_t* I = indices.data_ptr<int64_t>();
    int64_t* TI = threshold_index.data_ptr<int64_t>();
    std::vector<acc_t> imp_part(nblocks * E, acc_t(0)), load_part(nblocks * E, acc_t(0));
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      NoisyRow<acc_t> r(E, m);
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* imp = imp_part.data() + b * E;
        acc_t* ld = load_part.data() + b * E;
        for (int64_t t = b * kTokenBlock; t < std::min(T, (b + 1) * kTokenBlock); ++t) {
          const int64_t off = t * E;
          r.load(C + off, R + off, N + off, E, m, static_cast<acc_t>(noise_eps));
          const acc_t norm = log_sum_exp<acc_t>(k, [&r](int64_t j) { return r.noisy[r.sel[j]]; });
          for (int64_t j = 0; j < k; ++j) {
            const acc_t w = std::exp(r.noisy[r.sel[j]] - norm);
            W[t * k + j] = w;
            I[t * k + j] = r.sel[j];
            imp[r.sel[j]] += w;
          }
          TI[t] = k < E ? r.sel[k] : -1;
          if (k == E) continue;
          std::fill(r.chosen.begin(), r.chosen.end(), 0);
          for (int64_t j = 0; j < k; ++j) r.chosen[r.sel[j]] = 1;
          const acc_t thr_in = r.noisy[r.sel[k]], thr_out = r.noisy[r.sel[k - 1]];
          for (int64_t e = 0; e < E; ++e) {
            const acc_t thr = r.chosen[e] ? thr_in : thr_out;
            ld[e] += normal_cdf((static_cast<acc_t>(C[off + e]) - thr) / r.stdev[e]);
          }
        }
      }
    });
    importance = sum_blocks(imp_part, nblocks, E, dtype);
    load = k == E ? at::full({E}, static_cast<double>(T), acc) : sum_blocks(load_part, nblocks, E, dtype);
  });
  return {weights, indices, threshold_index, importance, load};
}

std::tuple<at::Tensor, at::Tensor> noisy_topk_gating_bwd(
    const at::Tensor& grad_weights, const at::Tensor& grad_importance, const at::Tensor& grad_load,
    const at::Tensor& clean_logits, const at::Tensor& noise_logits, const at::Tensor& noise,
    const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& threshold_index,
    double noise_eps) {
  check_logits(clean_logits, "clean_logits");
  check_same_shape(noise_logits, clean_logits, "noise_logits");
  check_same_shape(noise, clean_logits, "noise");
  check_same_shape(grad_weights, weights, "grad_weights");
  check_same_shape(indices, weights, "indices");
  const int64_t T = clean_logits.size(0), E = clean_logits.size(1), k = weights.size(1);
  TORCH_CHECK(grad_importance.numel() == E && grad_load.numel() == E,
              "grad_importance and grad_load must have E=", E, " elements");
  const at::Tensor g_imp = grad_importance.contiguous(), g_load = grad_load.contiguous();
  at::Tensor grad_clean = at::empty_like(clean_logits);
  at::Tensor grad_raw = at::empty_like(noise_logits);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, clean_logits.scalar_type(), "noisy_topk_gating_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* C = clean_logits.const_data_ptr<scalar_t>();
    const scalar_t* R = noise_logits.const_data_ptr<scalar_t>();
    const acc_t* N = noise.const_data_ptr<acc_t>();
    const acc_t* GW = grad_weights.const_data_ptr<acc_t>();
    const acc_t* GI = g_imp.const_data_ptr<acc_t>();
    const acc_t* GL = g_load.const_data_ptr<acc_t>();
    const acc_t* W = weights.const_data_ptr<acc_t>();
    const int64_t* I = indices.const_data_ptr<int64_t>();
    const int64_t* TI = threshold_index.const_data_ptr<int64_t>();
    scalar_t* DC = grad_clean.data_ptr<scalar_t>();
    scalar_t* DR = grad_raw.data_ptr<scalar_t>();
    const acc_t eps = static_cast<acc_t>(noise_eps);
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> d_noisy(E), d_clean(E), d_std(E), stdev(E);
      std::vector<char> chosen(E);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t off = t * E;
        const int64_t* idx = I + t * k;
        std::fill(d_noisy.begin(), d_noisy.end(), acc_t(0));
        std::fill(d_clean.begin(), d_clean.end(), acc_t(0));
        std::fill(d_std.begin(), d_std.end(), acc_t(0));
        // Weights: softmax over the chosen noisy logits.
        acc_t s = 0;
        for (int64_t j = 0; j < k; ++j) s += (GW[t * k + j] + GI[idx[j]]) * W[t * k + j];
        for (int64_t j = 0; j < k; ++j)
          d_noisy[idx[j]] += W[t * k + j] * (GW[t * k + j] + GI[idx[j]] - s);
        for (int64_t e = 0; e < E; ++e) stdev[e] = softplus(static_cast<acc_t>(R[off + e])) + eps;
        if (k < E) {
          // Load: Phi((clean - thr) / std), thr the noisy logit of rank k+1
          // (chosen experts) or rank k (the others).
          const int64_t a = TI[t], b = idx[k - 1];
          auto noisy_at = [&](int64_t e) { return static_cast<acc_t>(C[off + e]) + N[off + e] * stdev[e]; };
          const acc_t thr_in = noisy_at(a), thr_out = noisy_at(b);
          std::fill(chosen.begin(), chosen.end(), 0);
          for (int64_t j = 0; j < k; ++j) chosen[idx[j]] = 1;
          acc_t to_in = 0, to_out = 0;
          for (int64_t e = 0; e < E; ++e) {
            const acc_t z = (static_cast<acc_t>(C[off + e]) - (chosen[e] ? thr_in : thr_out)) / stdev[e];
            const acc_t q = GL[e] * normal_pdf(z) / stdev[e];
            d_clean[e] += q;
            d_std[e] -= q * z;
            (chosen[e] ? to_in : to_out) += q;
          }
          d_noisy[a] -= to_in;
          d_noisy[b] -= to_out;
        }
        for (int64_t e = 0; e < E; ++e) {
          const acc_t dstd = d_std[e] + d_noisy[e] * N[off + e];
          DC[off + e] = static_cast<scalar_t>(d_clean[e] + d_noisy[e]);
          DR[off + e] = static_cast<scalar_t>(dstd * sigmoid(static_cast<acc_t>(R[off + e])));
        }
      }
    });
  });
  return {grad_clean, grad_raw};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CPU, m) {
  m.impl("noisy_topk_gating_fwd", &noisy_topk_gating_fwd);
  m.impl("noisy_topk_gating_bwd", &noisy_topk_gating_bwd);
}

}  // namespace cpu
}  // namespace mars_kernels
