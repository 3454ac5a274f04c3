// CPU residual + LayerNorm + mean over modalities (the end of the MARS fusion):
// z[p, t] = mean_m LayerNorm(y[p, t, m] + x[p, t, m]), x = h[t, m] where
// observed[p, t, m], else missing[m]. One pass per position, forward and
// backward, instead of a where, an add, a LayerNorm and a mean over [P, T, M, D]
// tensors and their backward. Contract beside the schema in mars_kernels/ops/residual_norm.py; ground truth in
// mars_kernels/reference.py (residual_norm_mean).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace mars_kernels {
namespace cpu {
namespace {

// The masks' instances (Masks, from `observed`) and the token sizes.
struct Dims : Masks {
  int64_t M, D;
};

// bias may be null (the backward does not read it).
Dims check_inputs(const at::Tensor& y, const at::Tensor& h, const at::Tensor& weight, const at::Tensor* bias,
                  const std::optional<at::Tensor>& missing, const std::optional<at::Tensor>& observed) {
  TORCH_CHECK(h.dim() == 3, "h must be a 3-D [T, M, D] tensor, got shape ", h.sizes());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "h must be floating point, got ", h.scalar_type());
  const int64_t T = h.size(0), M = h.size(1), D = h.size(2);
  TORCH_CHECK(M >= 1 && D >= 1, "h must have at least one modality and one feature, got shape ", h.sizes());
  TORCH_CHECK(missing.has_value() == observed.has_value(), "missing and observed must be given together");
  const Dims s{check_masks(observed, T, M), M, D};
  if (missing)
    TORCH_CHECK(missing->sizes() == at::IntArrayRef({M, D}), "missing must have shape [M, D] = [", M, ", ", D,
                "], got ", missing->sizes());
  TORCH_CHECK(y.sizes() == at::IntArrayRef(s.shape({M, D})), "y must have shape ", at::IntArrayRef(s.shape({M, D})),
              ", got ", y.sizes());
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({D}) && (bias == nullptr || bias->sizes() == at::IntArrayRef({D})),
              "weight and bias must have shape [D] = [", D, "], got ", weight.sizes(), " and ",
              bias ? bias->sizes() : weight.sizes());
  for (const at::Tensor* t : {&y, &h, &weight, bias}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->scalar_type() == h.scalar_type(), "y, h, weight, bias and missing must share h's dtype ",
                h.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "y, h, weight, bias and missing must be contiguous");
  }
  if (missing) {
    TORCH_CHECK(missing->scalar_type() == h.scalar_type(), "y, h, weight, bias and missing must share h's dtype ",
                h.scalar_type(), ", got ", missing->scalar_type());
    TORCH_CHECK(missing->is_contiguous(), "y, h, weight, bias and missing must be contiguous");
  }
  return s;
}

// One (mask, position, modality) row: r = y_row + x_row in acc_t.
template <typename scalar_t, typename acc_t>
inline void residual_row(const scalar_t* y, const scalar_t* x, int64_t D, acc_t* r) {
  for (int64_t d = 0; d < D; ++d) r[d] = static_cast<acc_t>(y[d]) + static_cast<acc_t>(x[d]);
}

template <typename acc_t>
inline acc_t row_sum(const acc_t* a, int64_t D) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d];
  return s;
}

template <typename acc_t>
inline acc_t centred_square_sum(const acc_t* a, acc_t mu, int64_t D) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += (a[d] - mu) * (a[d] - mu);
  return s;
}

// r <- xhat = (r - mu) rs in place; c1 = mean(g w), c2 = mean(g w xhat).
template <typename acc_t>
inline void normalise_and_grad_terms(acc_t* r, const acc_t* g, const acc_t* w, acc_t mu, acc_t rs, int64_t D,
                                     acc_t& c1, acc_t& c2) {
  acc_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t d = 0; d < D; ++d) {
    const acc_t xhat = (r[d] - mu) * rs, gw = g[d] * w[d];
    r[d] = xhat;
    s1 += gw;
    s2 += gw * xhat;
  }
  c1 = s1 / static_cast<acc_t>(D);
  c2 = s2 / static_cast<acc_t>(D);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_norm_mean_fwd(
    const at::Tensor& y, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& missing, const std::optional<at::Tensor>& observed, double eps) {
  const Dims s = check_inputs(y, h, weight, &bias, missing, observed);
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  const auto acc_dtype = routing_dtype(h);
  at::Tensor z = at::empty(s.shape({s.D}), h.options());
  at::Tensor mean = at::empty(s.shape({s.M}), h.options().dtype(acc_dtype));
  at::Tensor rstd = at::empty(s.shape({s.M}), h.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "residual_norm_mean_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *Y = y.const_data_ptr<scalar_t>(), *X = h.const_data_ptr<scalar_t>();
    const scalar_t *W = weight.const_data_ptr<scalar_t>(), *B = bias.const_data_ptr<scalar_t>();
    const scalar_t* MISS = missing ? missing->const_data_ptr<scalar_t>() : nullptr;
    const bool* OBS = observed ? observed->const_data_ptr<bool>() : nullptr;
    scalar_t* Z = z.data_ptr<scalar_t>();
    acc_t *MU = mean.data_ptr<acc_t>(), *RS = rstd.data_ptr<acc_t>();
    const int64_t M = s.M, D = s.D, T = s.T;
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(M, 1));
    at::parallel_for(0, s.instances(), 16, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> r(D), zacc(D), w(D), b(D);
      for (int64_t d = 0; d < D; ++d) w[d] = static_cast<acc_t>(W[d]), b[d] = static_cast<acc_t>(B[d]);
      for (int64_t i = i0; i < i1; ++i) {  // i = p * T + t
        const int64_t t = i % T;
        std::fill(zacc.begin(), zacc.end(), acc_t(0));
        for (int64_t m = 0; m < M; ++m) {
          const bool seen = OBS == nullptr || OBS[i * M + m];
          residual_row(Y + (i * M + m) * D, seen ? X + (t * M + m) * D : MISS + m * D, D, r.data());
          const acc_t mu = row_sum(r.data(), D) / static_cast<acc_t>(D);
          const acc_t rs = acc_t(1) / std::sqrt(centred_square_sum(r.data(), mu, D) / static_cast<acc_t>(D) +
                                                static_cast<acc_t>(eps));
          MU[i * M + m] = mu;
          RS[i * M + m] = rs;
          for (int64_t d = 0; d < D; ++d) zacc[d] += (r[d] - mu) * rs * w[d] + b[d];
        }
        scalar_t* zr = Z + i * D;
        for (int64_t d = 0; d < D; ++d) zr[d] = static_cast<scalar_t>(zacc[d] * inv_m);
      }
    });
  });
  return {z, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_norm_mean_bwd(
    const at::Tensor& grad_z, const at::Tensor& y, const at::Tensor& h, const at::Tensor& weight,
    const std::optional<at::Tensor>& missing, const std::optional<at::Tensor>& observed, const at::Tensor& mean,
    const at::Tensor& rstd) {
  const Dims s = check_inputs(y, h, weight, nullptr, missing, observed);
  const auto acc_dtype = routing_dtype(h);
  for (const at::Tensor* t : {&mean, &rstd})
    TORCH_CHECK(t->sizes() == at::IntArrayRef(s.shape({s.M})) && t->scalar_type() == acc_dtype && t->is_contiguous(),
                "mean and rstd must be the contiguous ", acc_dtype, " ", at::IntArrayRef(s.shape({s.M})),
                " tensors saved by residual_norm_mean_fwd");
  TORCH_CHECK(grad_z.sizes() == at::IntArrayRef(s.shape({s.D})) && grad_z.scalar_type() == h.scalar_type(),
              "grad_z must be a ", h.scalar_type(), " tensor of shape ", at::IntArrayRef(s.shape({s.D})), ", got ",
              grad_z.scalar_type(), " ", grad_z.sizes());
  const at::Tensor gz = grad_z.contiguous();
  at::Tensor grad_y = at::empty_like(y), grad_h = at::empty_like(h);
  at::Tensor grad_weight = at::empty_like(weight), grad_bias = at::empty_like(weight);
  at::Tensor grad_missing = missing ? at::empty_like(*missing) : at::empty({0}, h.options());
  const int64_t M = s.M, D = s.D, T = s.T;
  const int64_t nblocks = (T + kTokenBlock - 1) / kTokenBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "residual_norm_mean_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *Y = y.const_data_ptr<scalar_t>(), *X = h.const_data_ptr<scalar_t>();
    const scalar_t* W = weight.const_data_ptr<scalar_t>();
    const scalar_t* MISS = missing ? missing->const_data_ptr<scalar_t>() : nullptr;
    const bool* OBS = observed ? observed->const_data_ptr<bool>() : nullptr;
    const scalar_t* GZ = gz.const_data_ptr<scalar_t>();
    const acc_t *MU = mean.const_data_ptr<acc_t>(), *RS = rstd.const_data_ptr<acc_t>();
    scalar_t *GY = grad_y.data_ptr<scalar_t>(), *GH = grad_h.data_ptr<scalar_t>();
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(M, 1));
    // Per position block: partial sums of d weight, d bias [D] and d missing
    // [M, D], added in block order (deterministic whatever the thread count).
    const int64_t part_size = (2 + (MISS ? M : 0)) * D;
    std::vector<acc_t> partial(nblocks * part_size, acc_t(0));
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> r(D), g(D), gx(M * D), w(D);
      for (int64_t d = 0; d < D; ++d) w[d] = static_cast<acc_t>(W[d]);
      for (int64_t blk = b0; blk < b1; ++blk) {
        acc_t* dw = partial.data() + blk * part_size;
        acc_t* db = dw + D;
        acc_t* dmiss = db + D;
        for (int64_t t = blk * kTokenBlock; t < std::min(T, (blk + 1) * kTokenBlock); ++t) {
          std::fill(gx.begin(), gx.end(), acc_t(0));  // h's gradient at t, summed over the masks
          for (int64_t i = t; i < s.instances(); i += T) {  // i = p * T + t
            for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(GZ[i * D + d]) * inv_m;
            for (int64_t m = 0; m < M; ++m) {
              const bool seen = OBS == nullptr || OBS[i * M + m];
              residual_row(Y + (i * M + m) * D, seen ? X + (t * M + m) * D : MISS + m * D, D, r.data());
              const acc_t mu = MU[i * M + m], rs = RS[i * M + m];
              acc_t c1, c2;  // dr = rs (g w - c1 - xhat c2)
              normalise_and_grad_terms(r.data(), g.data(), w.data(), mu, rs, D, c1, c2);
              scalar_t* gy = GY + (i * M + m) * D;
              acc_t* gxr = seen ? gx.data() + m * D : dmiss + m * D;
              for (int64_t d = 0; d < D; ++d) {
                const acc_t dr = rs * (g[d] * w[d] - c1 - r[d] * c2);
                gy[d] = static_cast<scalar_t>(dr);
                gxr[d] += dr;
                dw[d] += g[d] * r[d];
                db[d] += g[d];
              }
            }
          }
          scalar_t* gh = GH + t * M * D;
          for (int64_t e = 0; e < M * D; ++e) gh[e] = static_cast<scalar_t>(gx[e]);
        }
      }
    });
    std::vector<acc_t> total(part_size, acc_t(0));
    for (int64_t blk = 0; blk < nblocks; ++blk)
      for (int64_t e = 0; e < part_size; ++e) total[e] += partial[blk * part_size + e];
    scalar_t *GW = grad_weight.data_ptr<scalar_t>(), *GB = grad_bias.data_ptr<scalar_t>();
    for (int64_t d = 0; d < D; ++d) GW[d] = static_cast<scalar_t>(total[d]), GB[d] = static_cast<scalar_t>(total[D + d]);
    if (MISS) {
      scalar_t* GM = grad_missing.data_ptr<scalar_t>();
      for (int64_t e = 0; e < M * D; ++e) GM[e] = static_cast<scalar_t>(total[2 * D + e]);
    }
  });
  return {grad_y, grad_h, grad_weight, grad_bias, grad_missing};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CPU, m) {
  m.impl("residual_norm_mean_fwd", &residual_norm_mean_fwd);
  m.impl("residual_norm_mean_bwd", &residual_norm_mean_bwd);
}

}  // namespace cpu
}  // namespace mars_kernels
