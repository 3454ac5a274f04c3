// Plain C++ launchers for the routing / gating CUDA kernels (gating.cu).
//
// This header depends on the CUDA runtime only (no torch, no ATen), so it can
// be included both by nvcc (gating.cu) and by the host compiler
// (gating_binding.cpp, which registers the torch ops).
//
// Conventions shared by every launcher:
//   * T = number of tokens (rows), E = number of experts (columns), k = experts
//     chosen per token. Every [T, E] / [T, k] tensor is a dense row-major
//     (contiguous) device buffer; offsets are computed in int64.
//   * scalar_t is the logits' element type: float, __half, __nv_bfloat16 or
//     double. acc_t<scalar_t> is the math / output type of the routing
//     quantities: float, or double for double logits.
//   * Selection order: descending value, ties to the lower expert index, NaN
//     ranked as +inf (so indices are always valid expert ids).
//   * All launchers are asynchronous on `stream`, never synchronise with the
//     host, return immediately when T == 0 (after zero-filling [E] outputs that
//     are sums over T), and return cudaGetLastError() after their launches.
//   * Preconditions (checked by the binding, not here): 1 <= E <= 2^30,
//     1 <= k <= E, all pointers on the current device.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mars_kernels {
namespace cuda {

/// Math / output type of the routing quantities for logits of type scalar_t.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

// ---------------------------------------------------------------------------
// top-k gating
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
                                   cudaStream_t stream);

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
                                   scalar_t* grad_logits, cudaStream_t stream);

// ---------------------------------------------------------------------------
// noisy top-k gating (Shazeer et al. 2017), training mode
// ---------------------------------------------------------------------------

/// Number of acc_t elements of scratch memory launch_noisy_topk_gating_fwd needs
/// (per-token-block partial sums of importance and load plus a small staging
/// area for the deterministic two-stage column reduction).
int64_t noisy_topk_gating_fwd_workspace_elems(int64_t num_tokens, int64_t num_experts);

/// clean [T, E], noise_logits [T, E] (scalar_t), noise [T, E] (acc) ->
///   weights [T, k] (acc), indices [T, k] (int64), threshold_index [T] (int64,
///   the expert ranked k+1 in noisy order, -1 when k == E), importance [E]
///   (acc), load [E] (acc).
///
/// std = softplus(noise_logits) + noise_eps, noisy = clean + noise * std; the
/// top min(k+1, E) noisy values are selected; weights = softmax over the first
/// k. importance[e] = sum_t weight routed to e. load[e] = sum_t
/// Phi((clean - thr) / std) with thr = noisy[threshold_index] if e is chosen,
/// else noisy[indices[t, k-1]]; load[e] = T when k == E. Both sums over T are
/// deterministic (fixed token blocks, fixed reduction order, no atomics).
/// `workspace` holds noisy_topk_gating_fwd_workspace_elems(T, E) elements.
template <typename scalar_t>
cudaError_t launch_noisy_topk_gating_fwd(const scalar_t* clean_logits,
                                         const scalar_t* noise_logits,
                                         const acc_t<scalar_t>* noise, int64_t num_tokens,
                                         int64_t num_experts, int64_t k, double noise_eps,
                                         acc_t<scalar_t>* weights, int64_t* indices,
                                         int64_t* threshold_index,
                                         acc_t<scalar_t>* importance, acc_t<scalar_t>* load,
                                         acc_t<scalar_t>* workspace, cudaStream_t stream);

/// grad_weights [T, k], grad_importance [E], grad_load [E] (acc), clean [T, E],
/// noise_logits [T, E] (scalar_t), noise [T, E] (acc), weights [T, k] (acc),
/// indices [T, k], threshold_index [T] (int64) ->
///   grad_clean [T, E], grad_noise_logits [T, E] (scalar_t).
template <typename scalar_t>
cudaError_t launch_noisy_topk_gating_bwd(
    const acc_t<scalar_t>* grad_weights, const acc_t<scalar_t>* grad_importance,
    const acc_t<scalar_t>* grad_load, const scalar_t* clean_logits,
    const scalar_t* noise_logits, const acc_t<scalar_t>* noise,
    const acc_t<scalar_t>* weights, const int64_t* indices, const int64_t* threshold_index,
    int64_t num_tokens, int64_t num_experts, int64_t k, double noise_eps,
    scalar_t* grad_clean, scalar_t* grad_noise_logits, cudaStream_t stream);

// ---------------------------------------------------------------------------
// router statistics (auxiliary losses)
// ---------------------------------------------------------------------------

/// cudaSuccess when this build holds code the current device can run (the
/// matching SASS, or PTX the driver can JIT-compile), else the CUDA error.
cudaError_t kernel_image_status();

/// Number of acc_t elements of scratch memory launch_router_stats_fwd needs.
int64_t router_stats_fwd_workspace_elems(int64_t num_tokens, int64_t num_experts);

/// logits [T, E] -> lse [T] (acc, row log-sum-exp with torch.logsumexp's
/// handling of infinities), prob_sum [E] (acc, sum over T of softmax(l),
/// deterministic; a row whose lse is not finite adds NaN to every column, as
/// torch.softmax makes that row all NaN). `workspace` holds
/// router_stats_fwd_workspace_elems(T, E).
template <typename scalar_t>
cudaError_t launch_router_stats_fwd(const scalar_t* logits, int64_t num_tokens,
                                    int64_t num_experts, acc_t<scalar_t>* lse,
                                    acc_t<scalar_t>* prob_sum, acc_t<scalar_t>* workspace,
                                    cudaStream_t stream);

/// grad_lse [T], grad_prob_sum [E] (acc), logits [T, E], lse [T] (acc) ->
/// grad_logits [T, E] (scalar_t) = p * (grad_lse[t] + grad_prob_sum[e] -
/// sum_e' grad_prob_sum[e'] p[t, e']), p = exp(l - lse).
template <typename scalar_t>
cudaError_t launch_router_stats_bwd(const acc_t<scalar_t>* grad_lse,
                                    const acc_t<scalar_t>* grad_prob_sum,
                                    const scalar_t* logits, const acc_t<scalar_t>* lse,
                                    int64_t num_tokens, int64_t num_experts,
                                    scalar_t* grad_logits, cudaStream_t stream);

}  // namespace cuda
}  // namespace mars_kernels
