// Plain C++ launchers for the MARS routing CUDA kernels (mars_routing.cu).
//
// CUDA runtime only (no torch, no ATen): included by nvcc (mars_routing.cu)
// and by the host compiler (mars_routing_binding.cpp, which registers the
// torch ops). The conventions of gating.cuh apply: T tokens, E experts, k
// chosen per token; dense row-major device buffers, int64 offsets; scalar_t is
// the logits' element type (float, __half, __nv_bfloat16, double) and
// acc_t<scalar_t> (float, or double for double logits) the math / output type;
// selection order "descending value, ties to the lower expert index, NaN
// ranked as +inf"; launchers are asynchronous on `stream`, never synchronise
// with the host, return immediately when T == 0 (after zero-filling prob_sum)
// and return cudaGetLastError() after their launches. Preconditions (checked
// by the binding): 1 <= E <= 2^30, 1 <= k <= E, pointers on the current device.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "gating.cuh"  // acc_t

namespace mars_kernels {
namespace cuda {

/// Number of acc_t elements of scratch memory launch_mars_routing_fwd needs
/// (per-token-chunk partial sums of prob_sum and the staging area of the
/// deterministic column reduction).
int64_t mars_routing_fwd_workspace_elems(int64_t num_tokens, int64_t num_experts);

/// residual_logits l_r, feature_logits l_f [T, E] (scalar_t), noise [T, E]
/// (acc) -> weights [T, k] (acc), indices [T, k] (int64), imitation [T],
/// divergence [T], prob_sum [E], lse_r [T], lse_f [T] (acc).
///
/// Per row: lse = log-sum-exp of the row shifted by its max (as
/// torch.log_softmax: NaN for a row holding NaN or +inf, or all -inf), p =
/// exp(l - lse); divergence = imitation = sum_e p_r (log p_r - log p_f);
/// sigma = min(sigma_0 * divergence + sigma_const, sigma_max) (NaN stays
/// NaN); noisy = l_r + sigma * noise, rounded as two separate operations;
/// indices = the top k of noisy, weights = softmax over the k selected noisy
/// values. prob_sum[e] = sum_t p_r[t, e], deterministic (fixed token chunks,
/// fixed reduction order, no atomics). sigma_* are rounded to acc first.
/// `workspace` holds mars_routing_fwd_workspace_elems(T, E) elements.
template <typename scalar_t>
cudaError_t launch_mars_routing_fwd(const scalar_t* residual_logits,
                                    const scalar_t* feature_logits,
                                    const acc_t<scalar_t>* noise, int64_t num_tokens,
                                    int64_t num_experts, int64_t k, double sigma_0,
                                    double sigma_const, double sigma_max,
                                    acc_t<scalar_t>* weights, int64_t* indices,
                                    acc_t<scalar_t>* imitation, acc_t<scalar_t>* divergence,
                                    acc_t<scalar_t>* prob_sum, acc_t<scalar_t>* lse_r,
                                    acc_t<scalar_t>* lse_f, acc_t<scalar_t>* workspace,
                                    cudaStream_t stream);

/// grad_weights [T, k], grad_imitation [T], grad_prob_sum [E] (acc),
/// residual_logits, feature_logits [T, E] (scalar_t), weights [T, k] (acc),
/// indices [T, k] (int64), lse_r, lse_f [T] (acc) ->
///   grad_residual, grad_feature [T, E] (scalar_t).
///
/// With p = exp(l - lse) and s = sum_j g_j w_j:
///   grad_residual[e] = sum_{j: idx_j = e} w_j (g_j - s)
///                      + p_r[e] (grad_prob_sum[e] - sum_e' grad_prob_sum[e'] p_r[e']),
///   grad_feature[e] = grad_imitation (p_f[e] - p_r[e]).
/// Duplicate indices in a row are summed (never produced by the forward);
/// out-of-range indices are skipped.
template <typename scalar_t>
cudaError_t launch_mars_routing_bwd(const acc_t<scalar_t>* grad_weights,
                                    const acc_t<scalar_t>* grad_imitation,
                                    const acc_t<scalar_t>* grad_prob_sum,
                                    const scalar_t* residual_logits,
                                    const scalar_t* feature_logits,
                                    const acc_t<scalar_t>* weights, const int64_t* indices,
                                    const acc_t<scalar_t>* lse_r, const acc_t<scalar_t>* lse_f,
                                    int64_t num_tokens, int64_t num_experts, int64_t k,
                                    scalar_t* grad_residual, scalar_t* grad_feature,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace mars_kernels
