// Plain C++ launchers for the MoE dispatch CUDA kernels (moe_dispatch.cu):
// moe_align (a stable counting sort of the assignments by expert), permute
// (row gather), unpermute (deterministic gather-sum) and its backward.
//
// CUDA runtime only (no torch, no ATen), like gating.cuh, whose acc_t it
// reuses: float for float / half / bfloat16 data, double for double.
//
// Conventions shared by every launcher:
//   * T tokens, k assignments per token, S = T * k assignments, E experts,
//     D row width. Assignment flat = t * k + j. Every tensor is a dense
//     row-major (contiguous) device buffer; indices and offsets are int64.
//   * All launchers are asynchronous on `stream`, never synchronise with the
//     host, launch nothing when there is nothing to compute, and return the
//     first CUDA error of their launches (cudaGetLastError()).
//   * Preconditions (checked by the binding, not here): 1 <= E < 2^30,
//     block_size >= 1, 1 <= k < 2^31, all pointers on the current device,
//     permutation / inverse as produced by launch_moe_align for the same S.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "gating.cuh"  // acc_t

namespace mars_kernels {
namespace cuda {

// ---------------------------------------------------------------------------
// moe_align
// ---------------------------------------------------------------------------

/// Number of int64 elements of scratch memory launch_moe_align needs for S
/// assignments and E experts (per-chunk bucket counts and scan partials).
int64_t moe_align_workspace_elems(int64_t num_assignments, int64_t num_experts);

/// indices [S] (int64, the flattened [T, k]; values in [0, E], E = dropped) ->
///   counts [E], offsets [E + 1], permutation [S] (sorted slot -> flat),
///   inverse [S] (flat -> sorted slot), block_expert [NB], block_start [NB],
///   NB = ceil(S / block_size) + E. All int64, bit-identical to the CPU op.
/// The sort is stable (by flat index within an expert), dropped assignments
/// come last. An index outside [0, E] (undefined input, never checked on the
/// device because that would need a sync) is treated as dropped, so the
/// outputs stay in bounds.
/// `workspace` holds moe_align_workspace_elems(S, E) elements. S must be >= 1
/// (the binding handles S == 0 without launching anything).
cudaError_t launch_moe_align(const int64_t* indices, int64_t num_assignments,
                             int64_t num_experts, int64_t block_size, int64_t* counts,
                             int64_t* offsets, int64_t* permutation, int64_t* inverse,
                             int64_t* block_expert, int64_t* block_start, int64_t* workspace,
                             cudaStream_t stream);

// ---------------------------------------------------------------------------
// permute / unpermute
// ---------------------------------------------------------------------------

/// x [T, row_bytes] (raw bytes, any dtype) -> out [S, row_bytes]:
/// out[s] = x[permutation[s] / k]. Copies 16-byte words when row_bytes and
/// both base pointers allow it, else the widest of 8, 4, 2, 1 bytes that does.
cudaError_t launch_moe_permute(const void* x, int64_t row_bytes, const int64_t* permutation,
                               int64_t num_assignments, int64_t top_k, void* out,
                               cudaStream_t stream);

/// y_sorted [S, D] (scalar_t), inverse [S], weights [T, k] (acc, or nullptr
/// for all ones) -> out [T, D] (scalar_t):
/// out[t] = sum_{j = 0..k-1} w[t, j] * y_sorted[inverse[t * k + j]], accumulated
/// in acc in the order j = 0..k-1 (each term rounded, then added: no FMA), no
/// atomics.
template <typename scalar_t>
cudaError_t launch_moe_unpermute(const scalar_t* y_sorted, const int64_t* inverse,
                                 const acc_t<scalar_t>* weights, int64_t num_tokens,
                                 int64_t top_k, int64_t dim, scalar_t* out,
                                 cudaStream_t stream);

/// grad_out [T, D], y_sorted [S, D] (scalar_t), permutation [S], inverse [S],
/// weights [T, k] (acc) ->
///   grad_y_sorted [S, D] (scalar_t): grad_y_sorted[s] = w[p] * grad_out[p / k],
///     p = permutation[s];
///   grad_weights [T, k] (acc): <grad_out[t], y_sorted[inverse[t * k + j]]>,
///     summed in acc by one warp per (t, j) (fixed order: deterministic).
template <typename scalar_t>
cudaError_t launch_moe_unpermute_bwd(const scalar_t* grad_out, const scalar_t* y_sorted,
                                     const int64_t* permutation, const int64_t* inverse,
                                     const acc_t<scalar_t>* weights, int64_t num_tokens,
                                     int64_t top_k, int64_t dim, scalar_t* grad_y_sorted,
                                     acc_t<scalar_t>* grad_weights, cudaStream_t stream);

}  // namespace cuda
}  // namespace mars_kernels
