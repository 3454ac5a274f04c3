// CPU noisy top-k gating (Shazeer et al. 2017), training mode. Tokens are
// processed in fixed blocks of kTokenBlock rows so the importance/load sums
// are deterministic. Contract beside the schema in mars_kernels/ops/noisy_gating.py.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "routing_math.h"

namespace mars_kernels {
namespace cpu {
namespace {

// The per-element loops of a row. The float versions run on eight lanes
// (vec8.h: exp, softplus, sigmoid and the normal CDF and density written so
// they vectorise; libm's erfcf, log1pf and expf were most of the time); the
// double versions keep the C library functions.

// stdev = softplus(raw) + eps and noisy = clean + noise * stdev.
template <typename acc_t, typename scalar_t>
void noisy_row(const scalar_t* clean, const scalar_t* raw, const acc_t* noise, int64_t E, acc_t eps, acc_t* stdev,
               acc_t* noisy) {
  if constexpr (std::is_same_v<acc_t, float>) {
    const vec8::f32x8 veps = vec8::splat(eps);
    for (int64_t e = 0; e < E; e += vec8::kLanes) {
      const int64_t n = E - e;
      const vec8::f32x8 sd = vec8::softplus(vec8::load_n(raw + e, n)) + veps;
      vec8::store_n(stdev + e, sd, n);
      vec8::store_n(noisy + e, vec8::load_n(clean + e, n) + vec8::load_n(noise + e, n) * sd, n);
    }
  } else {
    for (int64_t e = 0; e < E; ++e) {
      stdev[e] = softplus(static_cast<acc_t>(raw[e])) + eps;
      noisy[e] = static_cast<acc_t>(clean[e]) + noise[e] * stdev[e];
    }
  }
}

// stdev = softplus(raw) + eps.
template <typename acc_t, typename scalar_t>
void stdev_row(const scalar_t* raw, int64_t E, acc_t eps, acc_t* stdev) {
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t e = 0; e < E; e += vec8::kLanes)
      vec8::store_n(stdev + e, vec8::softplus(vec8::load_n(raw + e, E - e)) + vec8::splat(eps), E - e);
  } else {
    for (int64_t e = 0; e < E; ++e) stdev[e] = softplus(static_cast<acc_t>(raw[e])) + eps;
  }
}

// ld[e] += Phi((clean[e] - thr) / stdev[e]), thr = thr_in for a chosen expert, else thr_out.
template <typename acc_t, typename scalar_t>
void add_load_row(const scalar_t* clean, const acc_t* stdev, const acc_t* chosen, acc_t thr_in, acc_t thr_out,
                  int64_t E, acc_t* ld) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using vec8::f32x8;
    const f32x8 vin = vec8::splat(thr_in), vout = vec8::splat(thr_out), zero = {};
    for (int64_t e = 0; e < E; e += vec8::kLanes) {
      const int64_t n = E - e;
      const f32x8 thr = vec8::load_n(chosen + e, n) != zero ? vin : vout;
      const f32x8 z = (vec8::load_n(clean + e, n) - thr) / vec8::load_n(stdev + e, n, 1.0f);
      vec8::store_n(ld + e, vec8::load_n(ld + e, n) + vec8::normal_cdf(z), n);
    }
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const acc_t thr = chosen[e] != 0 ? thr_in : thr_out;
      ld[e] += normal_cdf((static_cast<acc_t>(clean[e]) - thr) / stdev[e]);
    }
  }
}

// The load's gradient for one row: with z = (clean - thr) / stdev and
// q = grad_load phi(z) / stdev, d_clean = q and d_std = -q z; returns in
// *to_in and *to_out the sums of q over the chosen and the other experts.
template <typename acc_t, typename scalar_t>
void load_grad_row(const scalar_t* clean, const acc_t* stdev, const acc_t* chosen, acc_t thr_in, acc_t thr_out,
                   const acc_t* grad_load, int64_t E, acc_t* d_clean, acc_t* d_std, acc_t* to_in, acc_t* to_out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using vec8::f32x8;
    const f32x8 vin = vec8::splat(thr_in), vout = vec8::splat(thr_out), zero = {};
    f32x8 sin = {}, sout = {};
    for (int64_t e = 0; e < E; e += vec8::kLanes) {
      const int64_t n = E - e;
      const auto is_in = vec8::load_n(chosen + e, n) != zero;
      const f32x8 sd = vec8::load_n(stdev + e, n, 1.0f);
      const f32x8 z = (vec8::load_n(clean + e, n) - (is_in ? vin : vout)) / sd;
      const f32x8 q = vec8::load_n(grad_load + e, n) * vec8::normal_pdf(z) / sd;  // 0 in the padding lanes
      vec8::store_n(d_clean + e, q, n);
      vec8::store_n(d_std + e, zero - q * z, n);
      sin += is_in ? q : zero;
      sout += is_in ? zero : q;
    }
    *to_in = vec8::reduce_add(sin);
    *to_out = vec8::reduce_add(sout);
  } else {
    acc_t tin = 0, tout = 0;
    for (int64_t e = 0; e < E; ++e) {
      const acc_t z = (static_cast<acc_t>(clean[e]) - (chosen[e] != 0 ? thr_in : thr_out)) / stdev[e];
      const acc_t q = grad_load[e] * normal_pdf(z) / stdev[e];
      d_clean[e] = q;
      d_std[e] = -q * z;
      (chosen[e] != 0 ? tin : tout) += q;
    }
    *to_in = tin;
    *to_out = tout;
  }
}

// grad_clean = d_clean + d_noisy; grad_raw = (d_std + d_noisy noise) sigmoid(raw).
template <typename acc_t, typename scalar_t>
void noisy_grad_row(const acc_t* d_clean, const acc_t* d_std, const acc_t* d_noisy, const acc_t* noise,
                    const scalar_t* raw, int64_t E, scalar_t* grad_clean, scalar_t* grad_raw) {
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t e = 0; e < E; e += vec8::kLanes) {
      const int64_t n = E - e;
      const vec8::f32x8 dn = vec8::load_n(d_noisy + e, n);
      const vec8::f32x8 dstd = vec8::load_n(d_std + e, n) + dn * vec8::load_n(noise + e, n);
      vec8::store_n(grad_clean + e, vec8::load_n(d_clean + e, n) + dn, n);
      vec8::store_n(grad_raw + e, dstd * vec8::sigmoid(vec8::load_n(raw + e, n)), n);
    }
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const acc_t dstd = d_std[e] + d_noisy[e] * noise[e];
      grad_clean[e] = static_cast<scalar_t>(d_clean[e] + d_noisy[e]);
      grad_raw[e] = static_cast<scalar_t>(dstd * sigmoid(static_cast<acc_t>(raw[e])));
    }
  }
}

// Per-row scratch for one thread.
template <typename acc_t>
struct NoisyRow {
  std::vector<acc_t> noisy, stdev, val;
  std::vector<int64_t> sel, order;
  std::vector<acc_t> chosen;  // 1 for the k chosen experts of the row, else 0
  NoisyRow(int64_t E, int64_t m)
      : noisy(E), stdev(E), val(m), sel(m), order(m > kInsertionSelectMax ? E : 0), chosen(E) {}

  // noisy = clean + noise * (softplus(raw) + eps), then the top m in rank order.
  template <typename scalar_t>
  void load(const scalar_t* clean, const scalar_t* raw, const acc_t* noise, int64_t E, int64_t m,
            acc_t eps) {
    noisy_row(clean, raw, noise, E, eps, stdev.data(), noisy.data());
    select_topk<acc_t>(noisy.data(), E, m, sel.data(), val.data(), order.data());
  }

  void mark_chosen(int64_t E, int64_t k) {
    std::fill(chosen.begin(), chosen.begin() + E, acc_t(0));
    for (int64_t j = 0; j < k; ++j) chosen[sel[j]] = 1;
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
          r.mark_chosen(E, k);
          const acc_t thr_in = r.noisy[r.sel[k]], thr_out = r.noisy[r.sel[k - 1]];
          add_load_row(C + off, r.stdev.data(), r.chosen.data(), thr_in, thr_out, E, ld);
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
      std::vector<acc_t> d_noisy(E), d_clean(E), d_std(E), stdev(E), chosen(E);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t off = t * E;
        const int64_t* idx = I + t * k;
        std::fill(d_noisy.begin(), d_noisy.end(), acc_t(0));
        // Weights: softmax over the chosen noisy logits.
        acc_t s = 0;
        for (int64_t j = 0; j < k; ++j) s += (GW[t * k + j] + GI[idx[j]]) * W[t * k + j];
        for (int64_t j = 0; j < k; ++j)
          d_noisy[idx[j]] += W[t * k + j] * (GW[t * k + j] + GI[idx[j]] - s);
        stdev_row(R + off, E, eps, stdev.data());
        if (k < E) {
          // Load: Phi((clean - thr) / std), thr the noisy logit of rank k+1
          // (chosen experts) or rank k (the others).
          const int64_t a = TI[t], b = idx[k - 1];
          auto noisy_at = [&](int64_t e) { return static_cast<acc_t>(C[off + e]) + N[off + e] * stdev[e]; };
          const acc_t thr_in = noisy_at(a), thr_out = noisy_at(b);
          std::fill(chosen.begin(), chosen.end(), acc_t(0));
          for (int64_t j = 0; j < k; ++j) chosen[idx[j]] = 1;
          acc_t to_in, to_out;
          load_grad_row(C + off, stdev.data(), chosen.data(), thr_in, thr_out, GL, E, d_clean.data(), d_std.data(),
                        &to_in, &to_out);
          d_noisy[a] -= to_in;
          d_noisy[b] -= to_out;
        } else {
          std::fill(d_clean.begin(), d_clean.end(), acc_t(0));
          std::fill(d_std.begin(), d_std.end(), acc_t(0));
        }
        noisy_grad_row(d_clean.data(), d_std.data(), d_noisy.data(), N + off, R + off, E, DC + off, DR + off);
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
