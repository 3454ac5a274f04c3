// Routing CUDA kernels: top-k gating and the router softmax statistics,
// forward and backward (noisy top-k gating is in noisy_gating.cu).
//
// CUDA runtime only (no torch headers): compiles with a plain `nvcc -c`. The
// torch-facing glue is gating_binding.cpp; the op contracts are beside the
// schemas in mars_kernels/ops/gating.py, the launcher conventions in launcher.h.
//
// Work decomposition (all kernels):
//   * One warp per token row; a block holds kWarpsPerBlock = 4 warps (128
//     threads). Lane l owns the experts e = l, l + 32, l + 64, ... of its row,
//     so any E >= 1 works. Row-level reductions (max, sum, arg-max) are warp
//     shuffles; no shared memory.
//   * The router statistics sum over tokens (prob_sum): each warp owns a fixed
//     chunk of R = rows_per_chunk(T) consecutive rows (routing_device.cuh: 4
//     for T <= 16k, more for larger T so that there are at most 4096 chunks);
//     the warp accumulates its chunk (in registers for the first 32*CACHE
//     experts, in its own global partial row for the rest) and writes one
//     partial row [E]. The partials [num_chunks, E] are then reduced over
//     chunks by column_sum_kernel in a fixed order (one or two stages).
//     Nothing uses atomics on global memory, so the sums are bitwise
//     reproducible run to run.
//
// Selection ("top-k"): each element gets a unique key that orders like
// (value descending, expert index ascending) with NaN mapped to +inf and -0
// mapped to +0. For float math the key is a single uint64:
//     (order-preserving bits of the value) << 32 | (0xFFFFFFFF - e),
// for double math a (uint64 value bits, uint32 inverted index) pair. Rank j is
// the largest key strictly below the key of rank j-1, found by a per-lane scan
// followed by a warp arg-max, so no "already taken" bookkeeping is needed.
// Keys of the first 32*CACHE experts live in registers (CACHE in {1,2,4,8} is
// picked from E at launch); experts beyond that are re-read from global memory
// (L1/L2 resident) on each round.
//
// The building blocks shared with noisy_gating.cu and mars_routing.cu (scalar
// helpers, warp reductions, selection keys, token chunks, column_sum_kernel)
// are in routing_device.cuh.
#include "launcher.h"
#include "routing_device.cuh"

#include <cstdint>
#include <type_traits>
#include <utility>

namespace mars_kernels {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// top-k gating forward.
// grid = ceil(T / 4) blocks of 128 threads; warp w of block b handles row 4b+w.
// ---------------------------------------------------------------------------
template <typename scalar_t, int CACHE>
__global__ void __launch_bounds__(kThreadsPerBlock)
    topk_gating_fwd_kernel(const scalar_t* __restrict__ logits, int64_t num_tokens, int E,
                           int k, bool dense_lse, acc_t<scalar_t>* __restrict__ weights,
                           int64_t* __restrict__ indices, acc_t<scalar_t>* __restrict__ lse_out) {
  using Acc = acc_t<scalar_t>;
  using Key = SelectKey<Acc>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= num_tokens) return;  // warp-uniform
  const scalar_t* __restrict__ x = logits + row * E;
  int64_t* __restrict__ idx_row = indices + row * k;
  Acc* __restrict__ w_row = weights + row * k;

  // Register cache of the first 32*CACHE experts of the row.
  Acc val[CACHE];
  Key key[CACHE];
#pragma unroll
  for (int i = 0; i < CACHE; ++i) {
    const int e = lane + i * kWarpSize;
    val[i] = Acc(0);
    key[i] = Key::empty();
    if (e < E) {
      val[i] = to_acc(x[e]);
      key[i] = Key::make(val[i], e);
    }
  }

  // Selection: k rounds of "largest key below the previous one". Index j is
  // written by lane j % 32, which later reads it back itself (no sync needed).
  Key bound = Key::top();
  for (int j = 0; j < k; ++j) {
    const Key best =
        next_key(key, bound, lane, E, [&](int e) { return Key::make(to_acc(x[e]), e); });
    if (lane == j % kWarpSize) idx_row[j] = best.index();
    bound = best;
  }

  // Normaliser. The shift is the max unless the max is -inf (all -inf row:
  // lse = -inf). A +inf or NaN in the set makes lse (and the weights) NaN.
  Acc mx = neg_inf<Acc>();
  Acc sum = Acc(0);
  if (dense_lse) {
#pragma unroll
    for (int i = 0; i < CACHE; ++i)
      if (lane + i * kWarpSize < E) mx = m_max(mx, val[i]);
    for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) mx = m_max(mx, to_acc(x[e]));
    mx = warp_max(mx);
    const Acc shift = (mx == neg_inf<Acc>()) ? Acc(0) : mx;
#pragma unroll
    for (int i = 0; i < CACHE; ++i)
      if (lane + i * kWarpSize < E) sum += m_exp(val[i] - shift);
    for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize)
      sum += m_exp(to_acc(x[e]) - shift);
    mx = shift;
  } else {
    for (int j = lane; j < k; j += kWarpSize) mx = m_max(mx, to_acc(x[idx_row[j]]));
    mx = warp_max(mx);
    const Acc shift = (mx == neg_inf<Acc>()) ? Acc(0) : mx;
    for (int j = lane; j < k; j += kWarpSize) sum += m_exp(to_acc(x[idx_row[j]]) - shift);
    mx = shift;
  }
  const Acc lse = m_log(warp_sum(sum)) + mx;

  for (int j = lane; j < k; j += kWarpSize) w_row[j] = m_exp(to_acc(x[idx_row[j]]) - lse);
  if (lane == 0) lse_out[row] = lse;
}

// ---------------------------------------------------------------------------
// top-k gating backward. One warp per row (grid as the forward).
// Pass 1 writes the dense part of every element; after __syncwarp, pass 2
// overwrites each selected position with its complete value (dense part plus
// all sparse contributions to that position, summed in j order), so lanes
// that share a duplicated index write identical values.
// ---------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    topk_gating_bwd_kernel(const acc_t<scalar_t>* __restrict__ grad_weights,
                           const scalar_t* __restrict__ logits,
                           const acc_t<scalar_t>* __restrict__ weights,
                           const int64_t* __restrict__ indices,
                           const acc_t<scalar_t>* __restrict__ lse, int64_t num_tokens, int E,
                           int k, bool dense_lse, scalar_t* __restrict__ grad_logits) {
  using Acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= num_tokens) return;
  const scalar_t* __restrict__ x = logits + row * E;
  const Acc* __restrict__ g = grad_weights + row * k;
  const Acc* __restrict__ w = weights + row * k;
  const int64_t* __restrict__ idx = indices + row * k;
  scalar_t* __restrict__ out = grad_logits + row * E;

  Acc s = Acc(0);
  for (int j = lane; j < k; j += kWarpSize) s += g[j] * w[j];
  s = warp_sum(s);
  const Acc L = lse[row];

  // Pass 1: dense part (-s * p_e, or 0 in the sparse case).
  for (int e = lane; e < E; e += kWarpSize) {
    const Acc d = dense_lse ? -s * m_exp(to_acc(x[e]) - L) : Acc(0);
    store_val(out + e, d);
  }
  __syncwarp();
  // Pass 2: complete value at every selected position.
  for (int j = lane; j < k; j += kWarpSize) {
    const int64_t e = idx[j];
    if (e < 0 || e >= E) continue;  // never produced by the forward; skip, don't corrupt
    Acc d = dense_lse ? -s * m_exp(to_acc(x[e]) - L) : Acc(0);
    for (int jj = 0; jj < k; ++jj) {
      if (idx[jj] == e) d += dense_lse ? w[jj] * g[jj] : w[jj] * (g[jj] - s);
    }
    store_val(out + e, d);
  }
}

// ---------------------------------------------------------------------------
// Router statistics forward. Chunked like the noisy forward: warp c handles
// rows [c * R, (c+1) * R), writes lse for its rows and partials[c] [E].
// lse follows torch.logsumexp: shift by the row max unless it is infinite
// (NaN if the row holds NaN, +inf if it holds +inf and no NaN, -inf if it is
// all -inf); the softmax of a row with a non-finite lse is all NaN (torch).
// ---------------------------------------------------------------------------
template <typename scalar_t, int CACHE>
__global__ void __launch_bounds__(kThreadsPerBlock)
    router_stats_fwd_kernel(const scalar_t* __restrict__ logits, int64_t num_tokens,
                            int64_t rows_per_chunk, int E,
                            acc_t<scalar_t>* __restrict__ lse_out,
                            acc_t<scalar_t>* __restrict__ partials) {
  using Acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t chunk =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t row_begin = chunk * rows_per_chunk;
  if (row_begin >= num_tokens) return;  // warp-uniform
  const int64_t row_end =
      row_begin + rows_per_chunk < num_tokens ? row_begin + rows_per_chunk : num_tokens;
  Acc* __restrict__ part = partials + chunk * static_cast<int64_t>(E);

  Acc p_acc[CACHE];
#pragma unroll
  for (int i = 0; i < CACHE; ++i) p_acc[i] = Acc(0);
  for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) part[e] = Acc(0);

  for (int64_t row = row_begin; row < row_end; ++row) {
    const scalar_t* __restrict__ x = logits + row * E;
    Acc val[CACHE];
    Acc mx = neg_inf<Acc>();
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int e = lane + i * kWarpSize;
      val[i] = Acc(0);
      if (e < E) {
        val[i] = to_acc(x[e]);
        mx = m_max(mx, val[i]);
      }
    }
    for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) mx = m_max(mx, to_acc(x[e]));
    mx = warp_max(mx);
    const Acc shift = isinf(mx) ? Acc(0) : mx;
    Acc sum = Acc(0);
#pragma unroll
    for (int i = 0; i < CACHE; ++i)
      if (lane + i * kWarpSize < E) sum += m_exp(val[i] - shift);
    for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize)
      sum += m_exp(to_acc(x[e]) - shift);
    const Acc L = m_log(warp_sum(sum)) + shift;
    if (lane == 0) lse_out[row] = L;
    // As torch.softmax: a row whose lse is not finite (NaN, +inf, or -inf for
    // an all -inf row) has an all-NaN softmax, so it adds NaN to every column.
    // (exp(l - L) alone would give 0 in the finite columns of a +inf row.)
    if (isnan(L) || isinf(L)) {
#pragma unroll
      for (int i = 0; i < CACHE; ++i) p_acc[i] += quiet_nan<Acc>();
      for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) part[e] += quiet_nan<Acc>();
      continue;  // warp-uniform: every lane holds the same L
    }
#pragma unroll
    for (int i = 0; i < CACHE; ++i)
      if (lane + i * kWarpSize < E) p_acc[i] += m_exp(val[i] - L);
    for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize)
      part[e] += m_exp(to_acc(x[e]) - L);
  }

#pragma unroll
  for (int i = 0; i < CACHE; ++i) {
    const int e = lane + i * kWarpSize;
    if (e < E) part[e] = p_acc[i];
  }
}

// ---------------------------------------------------------------------------
// Router statistics backward. One warp per row, grid = ceil(T / 4) blocks.
// ---------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    router_stats_bwd_kernel(const acc_t<scalar_t>* __restrict__ grad_lse,
                            const acc_t<scalar_t>* __restrict__ grad_prob_sum,
                            const scalar_t* __restrict__ logits,
                            const acc_t<scalar_t>* __restrict__ lse, int64_t num_tokens, int E,
                            scalar_t* __restrict__ grad_logits) {
  using Acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= num_tokens) return;
  const scalar_t* __restrict__ x = logits + row * E;
  scalar_t* __restrict__ out = grad_logits + row * E;
  const Acc L = lse[row];
  const Acc gl = grad_lse[row];
  Acc dot = Acc(0);
  for (int e = lane; e < E; e += kWarpSize) dot += grad_prob_sum[e] * m_exp(to_acc(x[e]) - L);
  dot = warp_sum(dot);
  for (int e = lane; e < E; e += kWarpSize) {
    const Acc p = m_exp(to_acc(x[e]) - L);
    store_val(out + e, p * (gl + grad_prob_sum[e] - dot));
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Launchers (declared in gating_binding.cpp).
// ---------------------------------------------------------------------------

/// logits [T, E] -> weights [T, k] (acc), indices [T, k] (int64), lse [T] (acc).
///
/// "Dense" normaliser (softmax_first && !renormalize): lse = logsumexp of the
/// whole row. Otherwise lse = logsumexp of the k selected logits. In both
/// cases weights[t, j] = exp(logits[t, indices[t, j]] - lse[t]). A row holding
/// NaN or +inf (in the normalised set) gets NaN weights, as torch.softmax.
template <typename scalar_t>
cudaError_t launch_topk_gating_fwd(const scalar_t* logits, int64_t num_tokens,
                                   int64_t num_experts, int64_t k, bool softmax_first,
                                   bool renormalize, acc_t<scalar_t>* weights,
                                   int64_t* indices, acc_t<scalar_t>* lse,
                                   cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  const bool dense = softmax_first && !renormalize;
  const int E = static_cast<int>(num_experts);
  const int kk = static_cast<int>(k);
  dispatch_cache(num_experts, [&](auto cache) {
    topk_gating_fwd_kernel<scalar_t, decltype(cache)::value>
        <<<row_blocks(num_tokens), kThreadsPerBlock, 0, stream>>>(logits, num_tokens, E, kk,
                                                                  dense, weights, indices, lse);
  });
  return cudaGetLastError();
}

/// grad_weights [T, k] (acc), logits [T, E], weights [T, k] (acc),
/// indices [T, k] (int64), lse [T] (acc) -> grad_logits [T, E] (scalar_t).
///
/// s = sum_j g_j w_j. Dense case: grad[e] = -s exp(l_e - lse) + sum_{j: idx_j=e} w_j g_j.
/// Sparse case: grad[e] = sum_{j: idx_j=e} w_j (g_j - s), zero elsewhere.
/// Duplicate indices in a row are summed (never produced by the forward).
template <typename scalar_t>
cudaError_t launch_topk_gating_bwd(const acc_t<scalar_t>* grad_weights,
                                   const scalar_t* logits, const acc_t<scalar_t>* weights,
                                   const int64_t* indices, const acc_t<scalar_t>* lse,
                                   int64_t num_tokens, int64_t num_experts, int64_t k,
                                   bool softmax_first, bool renormalize,
                                   scalar_t* grad_logits, cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  const bool dense = softmax_first && !renormalize;
  topk_gating_bwd_kernel<scalar_t><<<row_blocks(num_tokens), kThreadsPerBlock, 0, stream>>>(
      grad_weights, logits, weights, indices, lse, num_tokens, static_cast<int>(num_experts),
      static_cast<int>(k), dense, grad_logits);
  return cudaGetLastError();
}

/// Number of acc_t elements of scratch memory launch_router_stats_fwd needs.
int64_t router_stats_fwd_workspace_elems(int64_t num_tokens, int64_t num_experts) {
  return num_chunks(num_tokens) * num_experts + reduce_staging_elems(num_experts);
}

/// logits [T, E] -> lse [T] (acc, row log-sum-exp with torch.logsumexp's
/// handling of infinities), prob_sum [E] (acc, sum over T of softmax(l),
/// deterministic; a row whose lse is not finite adds NaN to every column, as
/// torch.softmax makes that row all NaN). `workspace` holds
/// router_stats_fwd_workspace_elems(T, E).
template <typename scalar_t>
cudaError_t launch_router_stats_fwd(const scalar_t* logits, int64_t num_tokens,
                                    int64_t num_experts, acc_t<scalar_t>* lse,
                                    acc_t<scalar_t>* prob_sum, acc_t<scalar_t>* workspace,
                                    cudaStream_t stream) {
  using Acc = acc_t<scalar_t>;
  if (num_tokens <= 0) return cudaMemsetAsync(prob_sum, 0, sizeof(Acc) * num_experts, stream);
  const int E = static_cast<int>(num_experts);
  const int64_t chunks = num_chunks(num_tokens);
  Acc* partials = workspace;                            // [chunks, E]
  Acc* staging = workspace + chunks * num_experts;      // [kMaxSplits, E]
  const unsigned blocks = static_cast<unsigned>(ceil_div(chunks, kWarpsPerBlock));
  dispatch_cache(num_experts, [&](auto cache) {
    router_stats_fwd_kernel<scalar_t, decltype(cache)::value>
        <<<blocks, kThreadsPerBlock, 0, stream>>>(logits, num_tokens,
                                                  rows_per_chunk(num_tokens), E, lse, partials);
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_columns<Acc>(partials, num_experts, chunks, num_experts, prob_sum, staging, stream);
  return cudaGetLastError();
}

/// grad_lse [T], grad_prob_sum [E] (acc), logits [T, E], lse [T] (acc) ->
/// grad_logits [T, E] (scalar_t) = p * (grad_lse[t] + grad_prob_sum[e] -
/// sum_e' grad_prob_sum[e'] p[t, e']), p = exp(l - lse).
template <typename scalar_t>
cudaError_t launch_router_stats_bwd(const acc_t<scalar_t>* grad_lse,
                                    const acc_t<scalar_t>* grad_prob_sum,
                                    const scalar_t* logits, const acc_t<scalar_t>* lse,
                                    int64_t num_tokens, int64_t num_experts,
                                    scalar_t* grad_logits, cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  router_stats_bwd_kernel<scalar_t><<<row_blocks(num_tokens), kThreadsPerBlock, 0, stream>>>(
      grad_lse, grad_prob_sum, logits, lse, num_tokens, static_cast<int>(num_experts),
      grad_logits);
  return cudaGetLastError();
}

/// cudaSuccess when this build holds code the current device can run (the
/// matching SASS, or PTX the driver can JIT-compile), else the CUDA error.
cudaError_t kernel_image_status() {
  // cudaFuncGetAttributes needs code this device can run: SASS for its
  // architecture or PTX the driver can JIT-compile; else it reports
  // cudaErrorNoKernelImageForDevice (or InvalidDeviceFunction).
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, column_sum_kernel<float>);
  if (err != cudaSuccess) cudaGetLastError();  // clear the sticky-free error state
  return err;
}

// ---------------------------------------------------------------------------
// Explicit instantiations for the four supported logits types.
// ---------------------------------------------------------------------------
#define MARS_INSTANTIATE_GATING(S)                                                             \
  template cudaError_t launch_topk_gating_fwd<S>(const S*, int64_t, int64_t, int64_t, bool,     \
                                                 bool, acc_t<S>*, int64_t*, acc_t<S>*,          \
                                                 cudaStream_t);                                 \
  template cudaError_t launch_topk_gating_bwd<S>(const acc_t<S>*, const S*, const acc_t<S>*,    \
                                                 const int64_t*, const acc_t<S>*, int64_t,      \
                                                 int64_t, int64_t, bool, bool, S*,              \
                                                 cudaStream_t);                                 \
  template cudaError_t launch_router_stats_fwd<S>(const S*, int64_t, int64_t, acc_t<S>*,        \
                                                  acc_t<S>*, acc_t<S>*, cudaStream_t);          \
  template cudaError_t launch_router_stats_bwd<S>(const acc_t<S>*, const acc_t<S>*, const S*,   \
                                                  const acc_t<S>*, int64_t, int64_t, S*,        \
                                                  cudaStream_t);

MARS_INSTANTIATE_GATING(float)
MARS_INSTANTIATE_GATING(__half)
MARS_INSTANTIATE_GATING(__nv_bfloat16)
MARS_INSTANTIATE_GATING(double)

#undef MARS_INSTANTIATE_GATING

}  // namespace cuda
}  // namespace mars_kernels
