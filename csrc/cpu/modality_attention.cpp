// CPU modality attention: self-attention across the M modality tokens at each
// position, every head, in one pass per position, reading the packed q|k|v
// projections in place (no head transposes, no per-position launch). Contract
// beside the schema in mars_kernels/ops/modality_attention.py; ground truth in mars_kernels/reference.py
// (modality_attention).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace mars_kernels {
namespace cpu {
namespace {

// Positions per parallel task: large enough to amortise the task, small
// enough that both cores get work at the smallest training batches.
constexpr int64_t kPositionGrain = 16;

// The masks' instances (Masks, from `observed`) and the attention's sizes.
struct Dims : Masks {
  int64_t M, D, H, dh;
};

Dims check_qkv(const at::Tensor& qkv, int64_t num_heads) {
  TORCH_CHECK(qkv.dim() == 3, "qkv must be a 3-D [T, M, 3*D] tensor, got shape ", qkv.sizes());
  TORCH_CHECK(at::isFloatingType(qkv.scalar_type()), "qkv must be floating point, got ", qkv.scalar_type());
  TORCH_CHECK(qkv.is_contiguous(), "qkv must be contiguous");
  TORCH_CHECK(num_heads >= 1, "num_heads must be >= 1, got ", num_heads);
  const int64_t D3 = qkv.size(2);
  TORCH_CHECK(D3 % 3 == 0 && D3 > 0 && (D3 / 3) % num_heads == 0, "qkv's last dimension must be 3*D with D (",
              D3, "/3) divisible by num_heads=", num_heads);
  return {{1, qkv.size(0), {qkv.size(0)}}, qkv.size(1), D3 / 3, num_heads, D3 / 3 / num_heads};
}

void check_probs_like(const at::Tensor& t, const Dims& s, at::ScalarType dtype, const char* name) {
  const auto want = s.shape({s.H, s.M, s.M});
  TORCH_CHECK(t.sizes() == at::IntArrayRef(want), name, " must have shape ", at::IntArrayRef(want),
              " ([T, H, M, M], or [P, T, H, M, M] for P masks), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// sum_d a[d] * b[d] with sixteen independent lanes (vectorisable without
// reassociation, so the result does not depend on the compiler's flags).
template <typename acc_t, typename scalar_t>
inline acc_t dot_lanes(const scalar_t* a, const scalar_t* b, int64_t n) {
  constexpr int L = 16;
  acc_t lane[L] = {};
  int64_t d = 0;
  for (; d + L <= n; d += L)
    for (int l = 0; l < L; ++l) lane[l] += static_cast<acc_t>(a[d + l]) * static_cast<acc_t>(b[d + l]);
  acc_t s = 0;
  for (int l = 0; l < L; ++l) s += lane[l];
  for (; d < n; ++d) s += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  return s;
}

// out[d] += c * x[d]
template <typename acc_t, typename scalar_t>
inline void axpy(acc_t c, const scalar_t* __restrict__ x, acc_t* __restrict__ out, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] += c * static_cast<acc_t>(x[d]);
}

// missing [M, 3D] (qkv's dtype) and observed [T, M] or [P, T, M] bool, both or
// neither: the input row of modality m in instance (p, t) is qkv[t, m] if
// observed[p, t, m], else missing[m]. Sets the masks of s from observed.
void check_missing(const std::optional<at::Tensor>& missing, const std::optional<at::Tensor>& observed,
                   const at::Tensor& qkv, Dims& s) {
  TORCH_CHECK(missing.has_value() == observed.has_value(), "missing and observed must be given together");
  if (!missing) return;
  TORCH_CHECK(missing->sizes() == at::IntArrayRef({s.M, 3 * s.D}), "missing must have shape [M, 3D] = [", s.M, ", ",
              3 * s.D, "], got ", missing->sizes());
  TORCH_CHECK(missing->scalar_type() == qkv.scalar_type(), "missing must be ", qkv.scalar_type(), ", got ",
              missing->scalar_type());
  TORCH_CHECK(missing->is_contiguous(), "missing must be contiguous");
  static_cast<Masks&>(s) = check_masks(observed, s.T, s.M);
}

// Row pointers of one instance i (position t = i mod T): modality j reads
// qkv[t, j] or missing[j].
template <typename scalar_t>
struct Rows {
  const scalar_t *qkv, *missing;
  const bool* observed;
  int64_t M, D3;
  bool is_observed(int64_t i, int64_t j) const { return observed == nullptr || observed[i * M + j]; }
  const scalar_t* operator()(int64_t i, int64_t t, int64_t j) const {
    return is_observed(i, j) ? qkv + (t * M + j) * D3 : missing + j * D3;
  }
};

std::tuple<at::Tensor, at::Tensor> modality_attention_fwd(const at::Tensor& qkv, int64_t num_heads,
                                                          const std::optional<at::Tensor>& keep,
                                                          const std::optional<at::Tensor>& missing,
                                                          const std::optional<at::Tensor>& observed) {
  Dims s = check_qkv(qkv, num_heads);
  const auto dtype = routing_dtype(qkv);
  check_missing(missing, observed, qkv, s);
  if (keep) check_probs_like(*keep, s, dtype, "keep");
  at::Tensor out = at::empty(s.shape({s.M, s.D}), qkv.options());
  at::Tensor probs = at::empty(s.shape({s.H, s.M, s.M}), qkv.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "modality_attention_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rows<scalar_t> row_of{qkv.const_data_ptr<scalar_t>(), missing ? missing->const_data_ptr<scalar_t>() : nullptr,
                                observed ? observed->const_data_ptr<bool>() : nullptr, s.M, 3 * s.D};
    const acc_t* KP = keep ? keep->const_data_ptr<acc_t>() : nullptr;
    scalar_t* O = out.data_ptr<scalar_t>();
    acc_t* P = probs.data_ptr<acc_t>();
    const int64_t M = s.M, D = s.D, dh = s.dh;
    const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(dh));
    at::parallel_for(0, s.instances(), kPositionGrain, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> w(M), o(dh);
      std::vector<const scalar_t*> x(M);
      for (int64_t t = t0; t < t1; ++t) {  // t: the instance
        for (int64_t j = 0; j < M; ++j) x[j] = row_of(t, t % s.T, j);
        for (int64_t h = 0; h < s.H; ++h) {
          const int64_t col = h * dh;
          for (int64_t i = 0; i < M; ++i) {
            const scalar_t* q = x[i] + col;
            acc_t top = -std::numeric_limits<acc_t>::infinity();
            for (int64_t j = 0; j < M; ++j) {
              w[j] = scale * dot_lanes<acc_t>(q, x[j] + D + col, dh);
              top = std::max(top, w[j]);
            }
            acc_t total = 0;
            for (int64_t j = 0; j < M; ++j) total += (w[j] = std::exp(w[j] - top));
            const int64_t row = ((t * s.H + h) * M + i) * M;
            std::fill(o.begin(), o.end(), acc_t(0));
            for (int64_t j = 0; j < M; ++j) {
              const acc_t p = w[j] / total;
              P[row + j] = p;
              axpy(KP ? p * KP[row + j] : p, x[j] + 2 * D + col, o.data(), dh);
            }
            scalar_t* dst = O + (t * M + i) * D + col;
            for (int64_t d = 0; d < dh; ++d) dst[d] = static_cast<scalar_t>(o[d]);
          }
        }
      }
    });
  });
  return {out, probs};
}

std::tuple<at::Tensor, at::Tensor> modality_attention_bwd(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                          const at::Tensor& probs,
                                                          const std::optional<at::Tensor>& keep,
                                                          const std::optional<at::Tensor>& missing,
                                                          const std::optional<at::Tensor>& observed,
                                                          int64_t num_heads) {
  Dims s = check_qkv(qkv, num_heads);
  const auto dtype = routing_dtype(qkv);
  check_missing(missing, observed, qkv, s);
  check_probs_like(probs, s, dtype, "probs");
  if (keep) check_probs_like(*keep, s, dtype, "keep");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(s.shape({s.M, s.D})), "grad_out must have shape ",
              at::IntArrayRef(s.shape({s.M, s.D})), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == qkv.scalar_type(), "grad_out must be ", qkv.scalar_type(), ", got ",
              grad_out.scalar_type());
  const at::Tensor go = grad_out.contiguous();
  at::Tensor grad_qkv = at::empty_like(qkv);
  at::Tensor grad_missing = missing ? at::empty_like(*missing) : at::empty({0}, qkv.options());
  const int64_t nblocks = (s.T + kTokenBlock - 1) / kTokenBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "modality_attention_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rows<scalar_t> row_of{qkv.const_data_ptr<scalar_t>(), missing ? missing->const_data_ptr<scalar_t>() : nullptr,
                                observed ? observed->const_data_ptr<bool>() : nullptr, s.M, 3 * s.D};
    const scalar_t* G = go.const_data_ptr<scalar_t>();
    const acc_t* P = probs.const_data_ptr<acc_t>();
    const acc_t* KP = keep ? keep->const_data_ptr<acc_t>() : nullptr;
    scalar_t* GX = grad_qkv.data_ptr<scalar_t>();
    const int64_t M = s.M, D = s.D, D3 = 3 * s.D, dh = s.dh;
    const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(dh));
    // Gradients of the missing rows: one partial [M, 3D] per block of positions,
    // added in block order (deterministic whatever the thread count).
    std::vector<acc_t> partial(missing ? nblocks * M * D3 : 0, acc_t(0));
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      // dq, dk, dv [M, dh] of one head in one instance; ds of one query row;
      // gx: the position's qkv gradient, summed over the P instances that read it.
      std::vector<acc_t> dq(M * dh), dk(M * dh), dv(M * dh), ds(M), gx(M * D3);
      std::vector<const scalar_t*> x(M);
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* part = missing ? partial.data() + b * M * D3 : nullptr;
        for (int64_t pos = b * kTokenBlock; pos < std::min(s.T, (b + 1) * kTokenBlock); ++pos) {
          std::fill(gx.begin(), gx.end(), acc_t(0));
          for (int64_t t = pos; t < s.instances(); t += s.T) {  // t: the instance
            for (int64_t j = 0; j < M; ++j) x[j] = row_of(t, pos, j);
            for (int64_t h = 0; h < s.H; ++h) {
              const int64_t col = h * dh;
              std::fill(dq.begin(), dq.end(), acc_t(0));
              std::fill(dk.begin(), dk.end(), acc_t(0));
              std::fill(dv.begin(), dv.end(), acc_t(0));
              for (int64_t i = 0; i < M; ++i) {
                const int64_t row = ((t * s.H + h) * M + i) * M;
                const scalar_t* g = G + (t * M + i) * D + col;
                // ds_ij = p_ij (dp_ij - sum_l p_il dp_il), dp_ij = keep_ij <g_i, v_j>.
                acc_t r = 0;
                for (int64_t j = 0; j < M; ++j) {
                  const acc_t p = P[row + j], kj = KP ? KP[row + j] : acc_t(1);
                  axpy(p * kj, g, dv.data() + j * dh, dh);
                  ds[j] = kj * dot_lanes<acc_t>(g, x[j] + 2 * D + col, dh);
                  r += p * ds[j];
                }
                for (int64_t j = 0; j < M; ++j) {
                  const acc_t c = scale * P[row + j] * (ds[j] - r);
                  axpy(c, x[j] + D + col, dq.data() + i * dh, dh);
                  axpy(c, x[i] + col, dk.data() + j * dh, dh);
                }
              }
              for (int64_t j = 0; j < M; ++j) {
                const acc_t* src[3] = {dq.data() + j * dh, dk.data() + j * dh, dv.data() + j * dh};
                const bool seen = row_of.is_observed(t, j);
                for (int part_index = 0; part_index < 3; ++part_index) {
                  const int64_t off = j * D3 + part_index * D + col;
                  const acc_t* g = src[part_index];
                  acc_t* dst = seen ? gx.data() + off : part + off;
                  for (int64_t d = 0; d < dh; ++d) dst[d] += g[d];
                }
              }
            }
          }
          scalar_t* out = GX + pos * M * D3;
          for (int64_t e = 0; e < M * D3; ++e) out[e] = static_cast<scalar_t>(gx[e]);
        }
      }
    });
    if (missing) {
      std::vector<acc_t> total(M * D3, acc_t(0));
      for (int64_t b = 0; b < nblocks; ++b)
        for (int64_t e = 0; e < M * D3; ++e) total[e] += partial[b * M * D3 + e];
      scalar_t* GM = grad_missing.data_ptr<scalar_t>();
      for (int64_t e = 0; e < M * D3; ++e) GM[e] = static_cast<scalar_t>(total[e]);
    }
  });
  return {grad_qkv, grad_missing};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CPU, m) {
  m.impl("modality_attention_fwd", &modality_attention_fwd);
  m.impl("modality_attention_bwd", &modality_attention_bwd);
}

}  // namespace cpu
}  // namespace mars_kernels
