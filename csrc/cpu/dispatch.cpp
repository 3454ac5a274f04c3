// CPU dispatch: align (a stable counting sort of the assignments by expert),
// permute (row gather) and unpermute (deterministic gather-sum). Contract beside the
// schemas in mars_kernels/ops/dispatch.py; metadata layout in mars_kernels/meta.py.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "cpu_common.h"

namespace mars_kernels {
namespace cpu {
namespace {

// Assignments per chunk of the parallel counting sort. Fixed, so the result
// never depends on the number of threads (it is unique anyway: the sort is stable).
constexpr int64_t kAlignChunk = 16384;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align(
    const at::Tensor& indices, int64_t num_experts, int64_t block_size) {
  TORCH_CHECK(indices.dim() == 2, "indices must be a 2-D [T, k] tensor, got shape ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(block_size >= 1, "block_size must be >= 1, got ", block_size);
  const at::Tensor flat = indices.contiguous().view(-1);
  const int64_t S = flat.numel(), E = num_experts, bs = block_size;
  const int64_t* id = flat.const_data_ptr<int64_t>();
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const int64_t nchunks = (S + kAlignChunk - 1) / kAlignChunk;

  // Per-chunk histograms over E + 1 buckets (the last one holds dropped assignments).
  std::vector<int64_t> hist(nchunks * (E + 1), 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * (E + 1);
      for (int64_t i = c * kAlignChunk; i < std::min(S, (c + 1) * kAlignChunk); ++i) {
        TORCH_CHECK(id[i] >= 0 && id[i] <= E, "indices must lie in [0, E=", E, "] (E = dropped), got ", id[i]);
        ++h[id[i]];
      }
    }
  });
  at::Tensor counts = at::empty({E}, i64), offsets = at::empty({E + 1}, i64);
  int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t* off = offsets.data_ptr<int64_t>();
  // Turn the histograms into each chunk's first slot per bucket.
  int64_t running = 0;
  for (int64_t e = 0; e <= E; ++e) {
    if (e < E) off[e] = running;
    else off[E] = running;
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t n = hist[c * (E + 1) + e];
      hist[c * (E + 1) + e] = running;
      running += n;
    }
    if (e < E) cnt[e] = running - off[e];
  }
  at::Tensor permutation = at::empty({S}, i64), inverse = at::empty({S}, i64);
  int64_t* perm = permutation.data_ptr<int64_t>();
  int64_t* inv = inverse.data_ptr<int64_t>();
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cursor = hist.data() + c * (E + 1);
      for (int64_t i = c * kAlignChunk; i < std::min(S, (c + 1) * kAlignChunk); ++i) {
        const int64_t slot = cursor[id[i]]++;
        perm[slot] = i;
        inv[i] = slot;
      }
    }
  });
  // Row blocks: each expert's slots cut into block_size pieces.
  const int64_t nb = (S + bs - 1) / bs + E;
  at::Tensor block_expert = at::full({nb}, -1, i64), block_start = at::full({nb}, off[E], i64);
  int64_t* be = block_expert.data_ptr<int64_t>();
  int64_t* bst = block_start.data_ptr<int64_t>();
  int64_t b = 0;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t s = off[e]; s < off[e + 1]; s += bs, ++b) {
      be[b] = e;
      bst[b] = s;
    }
  return {counts, offsets, permutation, inverse, block_expert, block_start};
}

at::Tensor moe_permute(const at::Tensor& x, const at::Tensor& permutation, const at::Tensor& inverse, int64_t top_k) {
  TORCH_CHECK(x.dim() == 2, "x must be a 2-D [T, D] tensor, got shape ", x.sizes());
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  const at::Tensor xc = x.contiguous(), perm = permutation.contiguous();
  const int64_t S = perm.numel(), D = x.size(1);
  TORCH_CHECK(S == x.size(0) * top_k, "permutation must have T*k = ", x.size(0) * top_k, " entries, got ", S);
  TORCH_CHECK(inverse.numel() == S, "inverse must have T*k = ", S, " entries, got ", inverse.numel());
  check_slots(perm, S, "permutation");
  at::Tensor out = at::empty({S, D}, x.options());
  const int64_t* p = perm.const_data_ptr<int64_t>();
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = D * x.element_size();
  at::parallel_for(0, S, std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1)), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) std::memcpy(dst + s * row_bytes, src + (p[s] / top_k) * row_bytes, row_bytes);
  });
  return out;
}

at::Tensor moe_unpermute(const at::Tensor& y_sorted, const at::Tensor& permutation, const at::Tensor& inverse,
                         const c10::optional<at::Tensor>& weights, int64_t top_k) {
  TORCH_CHECK(y_sorted.dim() == 2, "y_sorted must be a 2-D [S, D] tensor, got shape ", y_sorted.sizes());
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  const int64_t S = y_sorted.size(0), D = y_sorted.size(1), T = S / top_k;
  TORCH_CHECK(S % top_k == 0 && inverse.numel() == S && permutation.numel() == S,
              "permutation and inverse must have S = T*k entries");
  const at::Tensor y = y_sorted.contiguous(), inv = inverse.contiguous();
  check_slots(inv, S, "inverse");
  at::Tensor w;
  if (weights.has_value()) {
    w = weights->contiguous();
    TORCH_CHECK(w.numel() == S && w.scalar_type() == routing_dtype(y), "weights must be [T, k] of ",
                routing_dtype(y), ", got ", w.scalar_type(), " ", w.sizes());
  }
  at::Tensor out = at::empty({T, D}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* Y = y.const_data_ptr<scalar_t>();
    const int64_t* I = inv.const_data_ptr<int64_t>();
    const acc_t* W = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(D);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < top_k; ++j) {
          const acc_t wt = W ? W[t * top_k + j] : acc_t(1);
          const scalar_t* row = Y + I[t * top_k + j] * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += wt * static_cast<acc_t>(row[d]);
        }
        for (int64_t d = 0; d < D; ++d) O[t * D + d] = static_cast<scalar_t>(acc[d]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_bwd(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                     const at::Tensor& permutation, const at::Tensor& inverse,
                                                     const at::Tensor& weights) {
  TORCH_CHECK(weights.dim() == 2, "weights must be a 2-D [T, k] tensor, got shape ", weights.sizes());
  const int64_t S = y_sorted.size(0), D = y_sorted.size(1), T = grad_out.size(0), k = weights.size(1);
  TORCH_CHECK(grad_out.size(1) == D && weights.numel() == S && T * k == S, "moe_unpermute_bwd: shapes do not agree");
  const at::Tensor g = grad_out.contiguous(), y = y_sorted.contiguous(), perm = permutation.contiguous(),
                   inv = inverse.contiguous(), w = weights.contiguous();
  check_slots(perm, S, "permutation");
  check_slots(inv, S, "inverse");
  at::Tensor grad_y = at::empty_like(y);
  at::Tensor grad_w = at::empty({T, k}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* G = g.const_data_ptr<scalar_t>();
    const scalar_t* Y = y.const_data_ptr<scalar_t>();
    const int64_t* P = perm.const_data_ptr<int64_t>();
    const int64_t* I = inv.const_data_ptr<int64_t>();
    const acc_t* W = w.const_data_ptr<acc_t>();
    scalar_t* GY = grad_y.data_ptr<scalar_t>();
    acc_t* GW = grad_w.data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1));
    at::parallel_for(0, S, grain, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const acc_t wt = W[P[s]];
        const scalar_t* row = G + (P[s] / k) * D;
        for (int64_t d = 0; d < D; ++d) GY[s * D + d] = static_cast<scalar_t>(wt * static_cast<acc_t>(row[d]));
      }
    });
    at::parallel_for(0, T * k, grain, [&](int64_t f0, int64_t f1) {
      for (int64_t f = f0; f < f1; ++f) {
        const scalar_t* a = G + (f / k) * D;
        const scalar_t* b = Y + I[f] * D;
        acc_t dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
        GW[f] = dot;
      }
    });
  });
  return {grad_y, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CPU, m) {
  m.impl("moe_align", &moe_align);
  m.impl("moe_permute", &moe_permute);
  m.impl("moe_unpermute", &moe_unpermute);
  m.impl("moe_unpermute_bwd", &moe_unpermute_bwd);
}

}  // namespace cpu
}  // namespace mars_kernels
