// MARS training-time routing CUDA kernels (docs/design.md section 2.3), forward and backward.
//
// CUDA runtime only (no torch headers): compiles with a plain `nvcc -c`. The
// torch-facing glue is mars_routing_binding.cpp; the op contract is beside the
// schema in mars_kernels/ops/mars_routing.py, the launcher conventions in
// launcher.h, the ground truth is mars_kernels.reference.mars_routing.
//
// Work decomposition (as gating.cu):
//   * One warp per token row; a block holds kWarpsPerBlock = 4 warps (128
//     threads). Lane l owns the experts e = l, l + 32, l + 64, ... of its row,
//     so any E >= 1 works. Row reductions (max, sum, arg-max) are xor-butterfly
//     warp shuffles, which give every lane bitwise the same result; no shared
//     memory.
//   * The forward sums p_r over tokens (prob_sum): each warp owns a fixed chunk
//     of R = rows_per_chunk(T) consecutive rows (4 for T <= 16k, more for
//     larger T so that there are at most 4096 chunks), accumulates its chunk
//     (in registers for the first 32*CACHE experts, in its own global partial
//     row for the rest) and writes one partial row [E]. column_sum_kernel then
//     reduces the partials [num_chunks, E] over chunks in a fixed order (one
//     or two stages). No atomics: prob_sum is bitwise reproducible and its
//     bits depend on (T, E) only.
//
// Forward, per row: both routers' row max and log-sum-exp, then in one pass
// the divergence sum_e p_r (log p_r - log p_f) and the prob_sum contribution,
// sigma (a warp-uniform value), the selection keys of the noisy logits
// l_r + sigma * noise, k rounds of "largest key below the previous one" (the
// keys of gating.cu: order-preserving value bits above the inverted expert
// index, unique within a row), then the softmax over the k selected values.
// Noisy values are formed with explicitly rounded multiply and add (no FMA
// contraction), so every recomputation is bitwise identical to what the
// selection saw, and equal to torch's `l_r + sigma * noise` for equal sigma.
// Values of the first 32*CACHE experts stay in registers (CACHE in {1,2,4,8}
// from E at launch); experts beyond that are re-read (L1/L2 resident).
// The building blocks shared with gating.cu and noisy_gating.cu (scalar
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

// Token chunks of the forward: rows_per_chunk(T) rows per warp
// (routing_device.cuh), part of the summation order of prob_sum.

// ---------------------------------------------------------------------------
// Scalar helpers used only here (the common ones, the warp reductions and the
// selection keys are in routing_device.cuh).
// ---------------------------------------------------------------------------

/// The noisy logit l + sigma * n, rounded as torch's two elementwise ops.
template <typename Acc>
__device__ __forceinline__ Acc noisy_val(Acc l, Acc sigma, Acc n) {
  return add_rn(l, mul_rn(sigma, n));
}

// ---------------------------------------------------------------------------
// Forward. Warp c (c = 4 * block + warp) handles the rows [c * R, (c+1) * R),
// R = rows_per_chunk, one row at a time, and writes partials[c] [E] (its sum
// of p_r). grid = ceil(ceil(T / R) / 4) blocks of 128 threads.
// ---------------------------------------------------------------------------
template <typename scalar_t, int CACHE>
__global__ void __launch_bounds__(kThreadsPerBlock) mars_routing_fwd_kernel(
    const scalar_t* __restrict__ residual_logits, const scalar_t* __restrict__ feature_logits,
    const acc_t<scalar_t>* __restrict__ noise, int64_t num_tokens, int64_t rows_per_chunk,
    int E, int k, acc_t<scalar_t> sigma_0, acc_t<scalar_t> sigma_const,
    acc_t<scalar_t> sigma_max, acc_t<scalar_t>* __restrict__ weights,
    int64_t* __restrict__ indices, acc_t<scalar_t>* __restrict__ imitation,
    acc_t<scalar_t>* __restrict__ divergence, acc_t<scalar_t>* __restrict__ lse_r_out,
    acc_t<scalar_t>* __restrict__ lse_f_out, acc_t<scalar_t>* __restrict__ partials) {
  using Acc = acc_t<scalar_t>;
  using Key = SelectKey<Acc>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t chunk =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t row_begin = chunk * rows_per_chunk;
  if (row_begin >= num_tokens) return;  // warp-uniform
  const int64_t row_end =
      row_begin + rows_per_chunk < num_tokens ? row_begin + rows_per_chunk : num_tokens;
  Acc* __restrict__ part = partials + chunk * static_cast<int64_t>(E);

  // prob_sum accumulators: registers for the cached experts, the warp's own
  // partial row (initialised here, read back by the same thread) for the rest.
  Acc p_acc[CACHE];
#pragma unroll
  for (int i = 0; i < CACHE; ++i) p_acc[i] = Acc(0);
  for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) part[e] = Acc(0);

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t off = row * E;
    const scalar_t* __restrict__ xr = residual_logits + off;
    const scalar_t* __restrict__ xf = feature_logits + off;
    const Acc* __restrict__ nz = noise + off;
    int64_t* __restrict__ idx_row = indices + row * k;
    Acc* __restrict__ w_row = weights + row * k;

    // Row maxima of both routers.
    Acc vr[CACHE], vf[CACHE];
    Acc mr = neg_inf<Acc>(), mf = neg_inf<Acc>();
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int e = lane + i * kWarpSize;
      vr[i] = vf[i] = Acc(0);
      if (e < E) {
        vr[i] = to_acc(xr[e]);
        vf[i] = to_acc(xf[e]);
        mr = m_max(mr, vr[i]);
        mf = m_max(mf, vf[i]);
      }
    }
    for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) {
      mr = m_max(mr, to_acc(xr[e]));
      mf = m_max(mf, to_acc(xf[e]));
    }
    mr = warp_max(mr);
    mf = warp_max(mf);

    // Log-sum-exps, shifted by the max whatever it is (torch.log_softmax).
    Acc sr = Acc(0), sf = Acc(0);
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      if (lane + i * kWarpSize < E) {
        sr += m_exp(vr[i] - mr);
        sf += m_exp(vf[i] - mf);
      }
    }
    for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) {
      sr += m_exp(to_acc(xr[e]) - mr);
      sf += m_exp(to_acc(xf[e]) - mf);
    }
    const Acc Lr = m_log(warp_sum(sr)) + mr;
    const Acc Lf = m_log(warp_sum(sf)) + mf;

    // Divergence KL(p_r || p_f) and this row's share of prob_sum.
    Acc kl = Acc(0);
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      if (lane + i * kWarpSize < E) {
        const Acc log_pr = vr[i] - Lr;
        const Acc p = m_exp(log_pr);
        kl += p * (log_pr - (vf[i] - Lf));
        p_acc[i] += p;
      }
    }
    for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) {
      const Acc log_pr = to_acc(xr[e]) - Lr;
      const Acc p = m_exp(log_pr);
      kl += p * (log_pr - (to_acc(xf[e]) - Lf));
      part[e] += p;
    }
    kl = warp_sum(kl);

    // sigma = min(sigma_0 * kl + sigma_const, sigma_max); NaN stays NaN.
    Acc sigma = add_rn(mul_rn(sigma_0, kl), sigma_const);
    if (sigma > sigma_max) sigma = sigma_max;

    // Selection keys of the noisy logits; k rounds of "largest key below the
    // previous one". Index j is written by lane j % 32, which reads it back.
    Key key[CACHE];
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int e = lane + i * kWarpSize;
      key[i] = Key::empty();
      if (e < E) key[i] = Key::make(noisy_val(vr[i], sigma, nz[e]), e);
    }
    Key bound = Key::top();
    for (int j = 0; j < k; ++j) {
      const Key best = next_key(key, bound, lane, E, [&](int e) {
        return Key::make(noisy_val(to_acc(xr[e]), sigma, nz[e]), e);
      });
      if (lane == j % kWarpSize) idx_row[j] = best.index();
      bound = best;
    }

    // Softmax over the k selected noisy values. The shift is their max unless
    // it is -inf; a NaN or +inf among them makes every weight NaN.
    Acc mx = neg_inf<Acc>();
    for (int j = lane; j < k; j += kWarpSize) {
      const int64_t e = idx_row[j];
      mx = m_max(mx, noisy_val(to_acc(xr[e]), sigma, nz[e]));
    }
    mx = warp_max(mx);
    const Acc shift = (mx == neg_inf<Acc>()) ? Acc(0) : mx;
    Acc sum = Acc(0);
    for (int j = lane; j < k; j += kWarpSize) {
      const int64_t e = idx_row[j];
      sum += m_exp(noisy_val(to_acc(xr[e]), sigma, nz[e]) - shift);
    }
    const Acc L = m_log(warp_sum(sum)) + shift;
    for (int j = lane; j < k; j += kWarpSize) {
      const int64_t e = idx_row[j];
      w_row[j] = m_exp(noisy_val(to_acc(xr[e]), sigma, nz[e]) - L);
    }

    if (lane == 0) {
      imitation[row] = kl;
      divergence[row] = kl;
      lse_r_out[row] = Lr;
      lse_f_out[row] = Lf;
    }
  }

#pragma unroll
  for (int i = 0; i < CACHE; ++i) {
    const int e = lane + i * kWarpSize;
    if (e < E) part[e] = p_acc[i];
  }
}

// ---------------------------------------------------------------------------
// Backward. One warp per row, grid = ceil(T / 4) blocks of 128 threads.
// Pass 1 writes grad_feature and the dense part of grad_residual (from
// prob_sum) at every expert; after __syncwarp, pass 2 overwrites each
// selected position with its complete value (dense part plus all weight
// contributions to that expert, summed in j order), so lanes that share a
// duplicated index write identical values.
// ---------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) mars_routing_bwd_kernel(
    const acc_t<scalar_t>* __restrict__ grad_weights,
    const acc_t<scalar_t>* __restrict__ grad_imitation,
    const acc_t<scalar_t>* __restrict__ grad_prob_sum,
    const scalar_t* __restrict__ residual_logits, const scalar_t* __restrict__ feature_logits,
    const acc_t<scalar_t>* __restrict__ weights, const int64_t* __restrict__ indices,
    const acc_t<scalar_t>* __restrict__ lse_r, const acc_t<scalar_t>* __restrict__ lse_f,
    int64_t num_tokens, int E, int k, scalar_t* __restrict__ grad_residual,
    scalar_t* __restrict__ grad_feature) {
  using Acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= num_tokens) return;  // warp-uniform
  const int64_t off = row * E;
  const scalar_t* __restrict__ xr = residual_logits + off;
  const scalar_t* __restrict__ xf = feature_logits + off;
  const Acc* __restrict__ g = grad_weights + row * k;
  const Acc* __restrict__ w = weights + row * k;
  const int64_t* __restrict__ idx = indices + row * k;
  scalar_t* __restrict__ out_r = grad_residual + off;
  scalar_t* __restrict__ out_f = grad_feature + off;

  const Acc Lr = lse_r[row];
  const Acc Lf = lse_f[row];
  const Acc gim = grad_imitation[row];
  Acc s = Acc(0);
  for (int j = lane; j < k; j += kWarpSize) s += g[j] * w[j];
  s = warp_sum(s);
  Acc dot = Acc(0);
  for (int e = lane; e < E; e += kWarpSize) dot += grad_prob_sum[e] * m_exp(to_acc(xr[e]) - Lr);
  dot = warp_sum(dot);

  // Pass 1: grad_feature and the dense part of grad_residual.
  for (int e = lane; e < E; e += kWarpSize) {
    const Acc pr = m_exp(to_acc(xr[e]) - Lr);
    const Acc pf = m_exp(to_acc(xf[e]) - Lf);
    store_val(out_r + e, pr * (grad_prob_sum[e] - dot));
    store_val(out_f + e, gim * (pf - pr));
  }
  __syncwarp();
  // Pass 2: complete value of grad_residual at every selected expert.
  for (int j = lane; j < k; j += kWarpSize) {
    const int64_t e = idx[j];
    if (e < 0 || e >= E) continue;  // never produced by the forward; skip, don't corrupt
    Acc d = m_exp(to_acc(xr[e]) - Lr) * (grad_prob_sum[e] - dot);
    for (int jj = 0; jj < k; ++jj) {
      if (idx[jj] == e) d += w[jj] * (g[jj] - s);
    }
    store_val(out_r + e, d);
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Launchers (declared in mars_routing_binding.cpp).
// ---------------------------------------------------------------------------

/// Number of acc_t elements of scratch memory launch_mars_routing_fwd needs
/// (per-token-chunk partial sums of prob_sum and the staging area of the
/// deterministic column reduction).
int64_t mars_routing_fwd_workspace_elems(int64_t num_tokens, int64_t num_experts) {
  return num_chunks(num_tokens) * num_experts + reduce_staging_elems(num_experts);
}

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
                                    cudaStream_t stream) {
  using Acc = acc_t<scalar_t>;
  // Sums over no tokens: zero (all-zero bits are 0.0 for float and double).
  if (num_tokens <= 0) return cudaMemsetAsync(prob_sum, 0, sizeof(Acc) * num_experts, stream);
  const int E = static_cast<int>(num_experts);
  const int kk = static_cast<int>(k);
  const int64_t chunks = num_chunks(num_tokens);
  Acc* partials = workspace;                        // [chunks, E]
  Acc* staging = workspace + chunks * num_experts;  // [kMaxSplits, E]
  const unsigned blocks = static_cast<unsigned>(ceil_div(chunks, kWarpsPerBlock));
  dispatch_cache(num_experts, [&](auto cache) {
    mars_routing_fwd_kernel<scalar_t, decltype(cache)::value>
        <<<blocks, kThreadsPerBlock, 0, stream>>>(
            residual_logits, feature_logits, noise, num_tokens, rows_per_chunk(num_tokens), E,
            kk, static_cast<Acc>(sigma_0), static_cast<Acc>(sigma_const),
            static_cast<Acc>(sigma_max), weights, indices, imitation, divergence, lse_r, lse_f,
            partials);
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_columns<Acc>(partials, num_experts, chunks, num_experts, prob_sum, staging, stream);
  return cudaGetLastError();
}

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
                                    cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  mars_routing_bwd_kernel<scalar_t><<<row_blocks(num_tokens), kThreadsPerBlock, 0, stream>>>(
      grad_weights, grad_imitation, grad_prob_sum, residual_logits, feature_logits, weights,
      indices, lse_r, lse_f, num_tokens, static_cast<int>(num_experts), static_cast<int>(k),
      grad_residual, grad_feature);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// Explicit instantiations for the four supported logits types.
// ---------------------------------------------------------------------------
#define MARS_INSTANTIATE_MARS_ROUTING(S)                                                       \
  template cudaError_t launch_mars_routing_fwd<S>(                                              \
      const S*, const S*, const acc_t<S>*, int64_t, int64_t, int64_t, double, double, double,   \
      acc_t<S>*, int64_t*, acc_t<S>*, acc_t<S>*, acc_t<S>*, acc_t<S>*, acc_t<S>*, acc_t<S>*,    \
      cudaStream_t);                                                                            \
  template cudaError_t launch_mars_routing_bwd<S>(                                              \
      const acc_t<S>*, const acc_t<S>*, const acc_t<S>*, const S*, const S*, const acc_t<S>*,   \
      const int64_t*, const acc_t<S>*, const acc_t<S>*, int64_t, int64_t, int64_t, S*, S*,      \
      cudaStream_t);

MARS_INSTANTIATE_MARS_ROUTING(float)
MARS_INSTANTIATE_MARS_ROUTING(__half)
MARS_INSTANTIATE_MARS_ROUTING(__nv_bfloat16)
MARS_INSTANTIATE_MARS_ROUTING(double)

#undef MARS_INSTANTIATE_MARS_ROUTING

}  // namespace cuda
}  // namespace mars_kernels
