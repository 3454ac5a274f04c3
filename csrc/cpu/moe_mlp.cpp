// CPU fused expert MLP: for each expert, gather its token rows into a small
// reused buffer, run the two GEMMs, and accumulate the gate-weighted rows back
// into the token-order output. Nothing of size T*k*D is materialised; only the
// pre-activations h [S, H1] are kept for the backward, which regathers rows and
// gets the gate-weight gradients from G = grad_y W2^T (no saved expert outputs).
// Contract beside the schema in mars_kernels/ops/expert_mlp.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <utility>

#include "cpu_common.h"
#include "expert_mlp.h"

namespace mars_kernels {
namespace cpu {
namespace {

// Rows per tile: an expert's rows are processed in tiles whose intermediates
// (gathered rows, activations, expert outputs and their gradients) fit a fixed
// workspace budget. Larger tiles make fewer, larger GEMMs, which run at a
// higher rate; the budget keeps the workspace below what a per-expert loop
// materialises. MARS_KERNELS_CPU_ROW_TILE overrides it
// (read per call, like MARS_KERNELS_CPU_TOKEN_GROUPS below, so tests can set it).
constexpr int64_t kWorkspaceBytes = int64_t{48} << 20;
constexpr int64_t kMinTile = 256, kMaxTile = 16384;

int64_t env_int(const char* name) {
  const char* env = std::getenv(name);
  const int64_t v = env ? std::atoll(env) : 0;
  return v > 0 ? v : int64_t{0};
}

// The token groups below share the budget (each has its own buffers).
int64_t row_tile(const Shapes& sh, int64_t elem_bytes, int64_t groups) {
  const int64_t forced = env_int("MARS_KERNELS_CPU_ROW_TILE");
  if (forced > 0) return forced;
  const int64_t row_bytes = (3 * sh.D + 2 * sh.H + sh.H1) * elem_bytes;  // the backward's per-row buffers
  return std::clamp(kWorkspaceBytes / groups / std::max<int64_t>(row_bytes, 1), kMinTile, kMaxTile);
}

// The routing in expert order, gathered once per call (not per expert, where
// small ATen ops would cost more than the work): for the first `valid` sorted
// slots s, the token slot s reads (permutation[s] / k) and its gate weight.
// `token_sorted`: within each expert the tokens ascend (the align is stable).
struct SortedRouting {
  at::Tensor tokens;   // [valid] int64
  at::Tensor weights;  // [valid] in the weights' dtype (float32 / float64)
  bool token_sorted;
};

SortedRouting sort_routing(const at::Tensor& perm, const at::Tensor& weights, int64_t top_k, const int64_t* off,
                           int64_t E) {
  const int64_t valid = off[E];
  at::Tensor tokens = at::empty({valid}, perm.options());
  at::Tensor w = at::empty({valid}, weights.options());
  const int64_t* P = perm.const_data_ptr<int64_t>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "sort_routing", [&] {
    const scalar_t* W = weights.const_data_ptr<scalar_t>();
    scalar_t* out = w.data_ptr<scalar_t>();
    for (int64_t s = 0; s < valid; ++s) {
      tok[s] = P[s] / top_k;
      out[s] = W[P[s]];
    }
  });
  bool sorted = true;
  for (int64_t e = 0; e < E && sorted; ++e)
    for (int64_t s = off[e] + 1; s < off[e + 1]; ++s)
      if (P[s] < P[s - 1]) {
        sorted = false;
        break;
      }
  return {tokens, w, sorted};
}

// How the work is shared between threads. With few, large experts, ATen shares
// each GEMM and row pass between the threads. With many small experts that is
// a fork/join per small GEMM, so instead the tokens are cut into one contiguous
// range per thread ("token group") and each thread runs every expert on its
// rows of that range with single-threaded GEMMs. Within an expert the rows are
// sorted by token, so a group's rows of an expert are one contiguous slice;
// groups write disjoint output rows and each token still sums its experts in
// expert order. The load stays balanced however skewed the routing is, and
// the step no longer depends on the latency of hundreds of small fork/joins
// (the README's benchmark section has the figures).
// The backward keeps one weight-gradient partial per extra group, summed in
// group order, so it is split only while those partials fit a budget.
// MARS_KERNELS_CPU_TOKEN_GROUPS=1 turns the split off (N > 1 forces N groups).
constexpr int64_t kGroupRowsPerExpert = 2048;  // split below this many rows per expert and thread
constexpr int64_t kPartialBytes = int64_t{64} << 20;

int64_t token_groups(const Shapes& sh, int64_t T, int64_t valid, const SortedRouting& route, int64_t partial_bytes) {
  const int64_t forced = env_int("MARS_KERNELS_CPU_TOKEN_GROUPS");
  const int64_t threads = at::get_num_threads();
  if (!route.token_sorted || at::in_parallel_region()) return 1;
  if (forced > 0) return std::min(forced, std::max<int64_t>(T, 1));
  if (threads <= 1 || T < 2 * threads) return 1;
  if (valid > kGroupRowsPerExpert * threads * sh.E) return 1;
  if (partial_bytes * (threads - 1) > kPartialBytes) return 1;
  return threads;
}

// Runs f(g) for each group g, one group per thread. The workers take the
// caller's thread-local state (grad mode, dispatch exclusions), or ATen calls
// on them would see autograd and refuse the out= GEMMs on parameters.
template <typename F>
void for_each_group(int64_t groups, const F& f) {
  if (groups == 1) return f(0);
  const at::ThreadLocalState caller;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    at::ThreadLocalStateGuard guard(caller);
    for (int64_t g = g0; g < g1; ++g) f(g);
  });
}

// The slots [begin, end) of expert e that belong to group g of `groups`.
std::pair<int64_t, int64_t> group_slots(const SortedRouting& route, const int64_t* off, int64_t e, int64_t T,
                                        int64_t g, int64_t groups) {
  if (groups == 1) return {off[e], off[e + 1]};
  const int64_t* tok = route.tokens.const_data_ptr<int64_t>();
  const int64_t* first = tok + off[e];
  const int64_t* last = tok + off[e + 1];
  const int64_t* lo = std::lower_bound(first, last, T * g / groups);
  const int64_t* hi = std::lower_bound(lo, last, T * (g + 1) / groups);
  return {lo - tok, hi - tok};
}

// Columns per task of the column-split row passes: at least 64, and enough
// that a task covers ~16K elements of the n rows, so a handful of rows (decode:
// one token per expert) runs inline instead of paying a fork/join per pass.
inline int64_t column_grain(int64_t n) {
  return std::max<int64_t>(64, (int64_t{16384} + n - 1) / std::max<int64_t>(n, 1));
}

// acc[tokens[i]] += scale[i] * (rows[i] + bias), with scale (acc dtype) and
// bias ([D]) optional. Threads split the columns, so repeated tokens are safe
// and the order is fixed.
void accumulate_rows(at::Tensor& acc, const at::Tensor& rows, const at::Tensor& tokens, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias = c10::nullopt) {
  const int64_t n = rows.size(0), D = rows.size(1);
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  dispatch_float_types(rows, [&](auto s_tag, auto a_tag) {
    using scalar_t = decltype(s_tag);
    using acc_t = decltype(a_tag);
    const scalar_t* R = rows.const_data_ptr<scalar_t>();
    const scalar_t* B = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    acc_t* A = acc.data_ptr<acc_t>();
    const acc_t* W = scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, D, column_grain(n), [&](int64_t d0, int64_t d1) {
      for (int64_t i = 0; i < n; ++i) {
        const acc_t w = W ? W[i] : acc_t(1);
        acc_t* a = A + tok[i] * D;
        const scalar_t* r = R + i * D;
        if (B)
          for (int64_t d = d0; d < d1; ++d) a[d] += w * (static_cast<acc_t>(r[d]) + static_cast<acc_t>(B[d]));
        else
          for (int64_t d = d0; d < d1; ++d) a[d] += w * static_cast<acc_t>(r[d]);
      }
    });
  });
}

// rows[i] *= scale[i] (acc dtype [n]) in place, and sums (+)= the column sums
// of the scaled rows, added in row order in double. Threads split the columns.
void scale_rows_and_sum(at::Tensor& rows, const at::Tensor& scale, at::Tensor& sums, bool accumulate) {
  const int64_t n = rows.size(0), D = rows.size(1);
  dispatch_float_types(rows, [&](auto s_tag, auto a_tag) {
    using scalar_t = decltype(s_tag);
    using acc_t = decltype(a_tag);
    scalar_t* R = rows.data_ptr<scalar_t>();
    scalar_t* S = sums.data_ptr<scalar_t>();
    const acc_t* W = scale.const_data_ptr<acc_t>();
    at::parallel_for(0, D, column_grain(n), [&](int64_t d0, int64_t d1) {
      double col[64];
      for (int64_t d = d0; d < d1; d += 64) {
        const int64_t m = std::min<int64_t>(64, d1 - d);
        for (int64_t j = 0; j < m; ++j) col[j] = accumulate ? static_cast<double>(S[d + j]) : 0.0;
        for (int64_t i = 0; i < n; ++i) {
          scalar_t* r = R + i * D + d;
          const acc_t w = W[i];
          for (int64_t j = 0; j < m; ++j) {
            r[j] = static_cast<scalar_t>(static_cast<acc_t>(r[j]) * w);
            col[j] += static_cast<double>(r[j]);
          }
        }
        for (int64_t j = 0; j < m; ++j) S[d + j] = static_cast<scalar_t>(col[j]);
      }
    });
  });
}

void check_routing(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& permutation, int64_t top_k) {
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == x.size(0) && weights.size(1) == top_k &&
                  weights.scalar_type() == routing_dtype(x) && weights.is_contiguous(),
              "weights must be a contiguous [T, k] ", routing_dtype(x), " tensor, got ", weights.scalar_type(), " ",
              weights.sizes());
  check_slots(permutation, x.size(0) * top_k, "permutation");
}

// The row-block fields of the metadata (inverse, block_expert, block_start,
// block_size) are for the row-block kernels of the Triton/GPU path; these
// kernels walk each expert's sorted slots instead.
std::tuple<at::Tensor, at::Tensor> moe_mlp_fwd(const at::Tensor& x, const at::Tensor& weights,
                                               const at::Tensor& permutation, const at::Tensor& /*inverse*/,
                                               const at::Tensor& offsets, const at::Tensor& /*block_expert*/,
                                               const at::Tensor& /*block_start*/, int64_t top_k,
                                               int64_t /*block_size*/, const at::Tensor& w1,
                                               const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                               const c10::optional<at::Tensor>& b2, std::string activation,
                                               bool save_h) {
  const Act act = parse_activation(activation);
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  const Shapes sh = check_expert_shapes(x, "x", offsets, w1, w2, act, top_k);
  check_routing(x, weights, permutation, top_k);
  const int64_t T = x.size(0), S = T * top_k;
  const at::Tensor offs = offsets.contiguous(), perm = permutation.contiguous();
  const int64_t* off = offs.const_data_ptr<int64_t>();
  const SortedRouting route = sort_routing(perm, weights, top_k, off, sh.E);
  const int64_t groups = token_groups(sh, T, off[sh.E], route, 0);
  const int64_t tile = std::min(largest_expert(off, sh.E), row_tile(sh, x.element_size(), groups));
  const auto opts = x.options();
  at::Tensor acc = at::zeros({T, sh.D}, opts.dtype(routing_dtype(x)));
  at::Tensor h = save_h ? at::empty({S, sh.H1}, opts) : at::empty({groups, tile, sh.H1}, opts);
  if (save_h) h.narrow(0, off[sh.E], S - off[sh.E]).zero_();
  at::Tensor xg = at::empty({groups, tile, sh.D}, opts), a = at::empty({groups, tile, sh.H}, opts);
  at::Tensor ye = at::empty({groups, tile, sh.D}, opts);
  for_each_group(groups, [&](int64_t g) {
    for (int64_t e = 0; e < sh.E; ++e) {
      const auto [lo, hi] = group_slots(route, off, e, T, g, groups);
      for (int64_t r0 = lo; r0 < hi; r0 += tile) {
        const int64_t n = std::min(tile, hi - r0);
        const at::Tensor tokens = route.tokens.narrow(0, r0, n);
        at::Tensor xe = xg[g].narrow(0, 0, n), he = save_h ? h.narrow(0, r0, n) : h[g].narrow(0, 0, n);
        at::Tensor ae = a[g].narrow(0, 0, n), y_e = ye[g].narrow(0, 0, n);
        gather_rows(x, tokens, xe);
        at::mm_out(he, xe, w1[e]);
        bias_activation_rows(act, he, expert_bias(b1, e), ae);
        at::mm_out(y_e, ae, w2[e]);
        accumulate_rows(acc, y_e, tokens, route.weights.narrow(0, r0, n), expert_bias(b2, e));
      }
    }
  });
  at::Tensor y = acc.scalar_type() == x.scalar_type() ? acc : acc.to(x.scalar_type());
  return {y, save_h ? h : at::empty({0, sh.H1}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_mlp_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& permutation,
    const at::Tensor& /*inverse*/, const at::Tensor& offsets, const at::Tensor& /*block_expert*/,
    const at::Tensor& /*block_start*/, int64_t top_k, int64_t /*block_size*/, const at::Tensor& w1,
    const at::Tensor& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& h, std::string activation) {
  const Act act = parse_activation(activation);
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  const Shapes sh = check_expert_shapes(x, "x", offsets, w1, w2, act, top_k);
  check_routing(x, weights, permutation, top_k);
  const int64_t T = x.size(0);
  TORCH_CHECK(h.size(0) == T * top_k && h.size(1) == sh.H1, "h must be the [S, H1] tensor saved by moe_mlp_fwd");
  const at::Tensor dy = grad_y.contiguous(), offs = offsets.contiguous(), perm = permutation.contiguous();
  const int64_t* off = offs.const_data_ptr<int64_t>();
  const int64_t valid = off[sh.E];
  const SortedRouting route = sort_routing(perm, weights, top_k, off, sh.E);
  const int64_t weight_grad_bytes = (w1.numel() + w2.numel() + sh.E * (sh.H1 + sh.D)) * w1.element_size();
  const int64_t groups = token_groups(sh, T, valid, route, weight_grad_bytes);
  const int64_t tile = std::min(largest_expert(off, sh.E), row_tile(sh, x.element_size(), groups));
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(routing_dtype(x));
  at::Tensor dx_acc = at::zeros({T, sh.D}, acc_opts);
  at::Tensor grad_w = at::zeros({T, top_k}, acc_opts);
  // Group 0 writes the weight gradients themselves and group g > 0 its partial
  // [g - 1]. Each group's first row tile of an expert overwrites; a group with
  // no rows of an expert zeroes that expert's slices.
  at::Tensor dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  at::Tensor db1 = at::empty({sh.E, sh.H1}, w1.options()), db2 = at::empty({sh.E, sh.D}, w2.options());
  at::Tensor part_w1, part_w2, part_b1, part_b2;
  if (groups > 1) {
    part_w1 = at::empty({groups - 1, sh.E, sh.D, sh.H1}, w1.options());
    part_w2 = at::empty({groups - 1, sh.E, sh.H, sh.D}, w2.options());
    part_b1 = at::empty({groups - 1, sh.E, sh.H1}, w1.options());
    part_b2 = at::empty({groups - 1, sh.E, sh.D}, w2.options());
  }
  at::Tensor xg = at::empty({groups, tile, sh.D}, opts), dg = at::empty({groups, tile, sh.D}, opts);
  at::Tensor a = at::empty({groups, tile, sh.H}, opts), G = at::empty({groups, tile, sh.H}, opts);
  at::Tensor dh = at::empty({groups, tile, sh.H1}, opts), dxg = at::empty({groups, tile, sh.D}, opts);
  // d weight of each sorted slot = <grad_y[t], act(h) W2 + b2> = <G, act(h)> + <grad_y[t], b2>.
  at::Tensor dots = at::empty({valid}, acc_opts), bias_dots = at::zeros({valid}, acc_opts);
  for_each_group(groups, [&](int64_t g) {
    const bool own = g == 0;
    for (int64_t e = 0; e < sh.E; ++e) {
      at::Tensor dw2e = own ? dw2[e] : part_w2[g - 1][e], db2e = own ? db2[e] : part_b2[g - 1][e];
      at::Tensor dw1e = own ? dw1[e] : part_w1[g - 1][e], db1e = own ? db1[e] : part_b1[g - 1][e];
      const auto [lo, hi] = group_slots(route, off, e, T, g, groups);
      if (lo == hi)
        for (at::Tensor* t : {&dw2e, &db2e, &dw1e, &db1e}) t->zero_();
      for (int64_t r0 = lo; r0 < hi; r0 += tile) {
        const int64_t n = std::min(tile, hi - r0);
        const bool first = r0 == lo;
        const at::Tensor tokens = route.tokens.narrow(0, r0, n), w_rows = route.weights.narrow(0, r0, n);
        const at::Tensor he = h.narrow(0, r0, n);
        at::Tensor xe = xg[g].narrow(0, 0, n), dge = dg[g].narrow(0, 0, n), ae = a[g].narrow(0, 0, n);
        at::Tensor Ge = G[g].narrow(0, 0, n), dhe = dh[g].narrow(0, 0, n), dxe = dxg[g].narrow(0, 0, n);
        at::Tensor dots_e = dots.narrow(0, r0, n), bd = bias_dots.narrow(0, r0, n);
        gather_rows(dy, tokens, dge, expert_bias(b2, e), &bd);
        at::mm_out(Ge, dge, w2[e].t());
        activation_grad_rows(act, he, Ge, w_rows, ae, dhe, &dots_e);  // ae = act(h), dhe = d h
        // Weight gradients summed over row tiles in tile order (deterministic).
        scale_rows_and_sum(dge, w_rows, db2e, !first);  // dge: now the gradient of this expert's output rows
        if (first) at::mm_out(dw2e, ae.t(), dge);
        else dw2e.addmm_(ae.t(), dge);
        gather_rows(x, tokens, xe);
        if (first) {
          at::mm_out(dw1e, xe.t(), dhe);
          at::sum_out(db1e, dhe, {0});
        } else {
          dw1e.addmm_(xe.t(), dhe);
          db1e.add_(dhe.sum(0));
        }
        at::mm_out(dxe, dhe, w1[e].t());
        accumulate_rows(dx_acc, dxe, tokens, at::Tensor());
      }
    }
  });
  for (int64_t g = 1; g < groups; ++g) {
    dw1.add_(part_w1[g - 1]);
    dw2.add_(part_w2[g - 1]);
    db1.add_(part_b1[g - 1]);
    db2.add_(part_b2[g - 1]);
  }
  AT_DISPATCH_FLOATING_TYPES(grad_w.scalar_type(), "moe_mlp_bwd_grad_w", [&] {
    const int64_t* P = perm.const_data_ptr<int64_t>();
    const scalar_t *Dt = dots.const_data_ptr<scalar_t>(), *Bd = bias_dots.const_data_ptr<scalar_t>();
    scalar_t* GW = grad_w.data_ptr<scalar_t>();
    for (int64_t s = 0; s < valid; ++s) GW[P[s]] = Dt[s] + Bd[s];
  });
  at::Tensor dx = dx_acc.scalar_type() == x.scalar_type() ? dx_acc : dx_acc.to(x.scalar_type());
  return {dx, grad_w, dw1, db1, dw2, db2};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CPU, m) {
  m.impl("moe_mlp_fwd", &moe_mlp_fwd);
  m.impl("moe_mlp_bwd", &moe_mlp_bwd);
}

}  // namespace cpu
}  // namespace mars_kernels
