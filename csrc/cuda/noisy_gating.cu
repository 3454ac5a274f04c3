// Noisy top-k gating CUDA kernels (Shazeer et al. 2017), training mode,
// forward and backward.
//
// CUDA runtime only (no torch headers): compiles with a plain `nvcc -c`. The
// torch-facing glue is noisy_gating_binding.cpp; the op contract is beside the
// schema in mars_kernels/ops/noisy_gating.py, the launcher conventions in
// launcher.h.
//
// Work decomposition and selection as in gating.cu (one warp per token row,
// lane l owning experts l, l + 32, ...; unique ordered selection keys). The
// forward sums importance and load over tokens in fixed chunks of
// rows_per_chunk(T) rows per warp (routing_device.cuh), reduced over chunks
// by column_sum_kernel in a fixed order: no atomics, bitwise reproducible. The
// backward's only shared memory is a per-warp membership bitmap.
#include "launcher.h"
#include "routing_device.cuh"

#include <cstdint>
#include <type_traits>
#include <utility>

namespace mars_kernels {
namespace cuda {
namespace {

// Noisy backward: experts covered by one pass of the per-warp membership
// bitmap (kBitmapWords 32-bit words in shared memory per warp).
constexpr int kBitmapWords = 256;
constexpr int kBitmapExperts = kBitmapWords * 32;

// ---------------------------------------------------------------------------
// Scalar helpers used only here (the common ones, the warp reductions and the
// selection keys are in routing_device.cuh).
// ---------------------------------------------------------------------------

__device__ __forceinline__ float m_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double m_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float m_erfc(float x) { return erfcf(x); }
__device__ __forceinline__ double m_erfc(double x) { return erfc(x); }

/// softplus as torch computes it: x above 20, else log1p(exp(x)) (the same
/// formula as the reference and the other backends, so the noise scale and the
/// selection agree with them up to the last bits of exp/log1p).
template <typename Acc>
__device__ __forceinline__ Acc softplus(Acc x) {
  return x > Acc(20) ? x : m_log1p(m_exp(x));
}
/// 1 / (1 + exp(-x)); saturates to 0 / 1 without NaN.
template <typename Acc>
__device__ __forceinline__ Acc sigmoid(Acc x) {
  return Acc(1) / (Acc(1) + m_exp(-x));
}
/// Standard normal CDF, Phi(z) = erfc(-z / sqrt(2)) / 2.
template <typename Acc>
__device__ __forceinline__ Acc normal_cdf(Acc z) {
  return Acc(0.5) * m_erfc(-z * Acc(0.70710678118654752440));
}
/// Standard normal density, exp(-z^2 / 2) / sqrt(2 pi).
template <typename Acc>
__device__ __forceinline__ Acc normal_pdf(Acc z) {
  return m_exp(Acc(-0.5) * z * z) * Acc(0.39894228040143267794);
}

/// clean, std = softplus(noise_logit) + eps and noisy = clean + noise * std of
/// element `off`. Used by every kernel that needs them, so recomputations are
/// bit-identical to the values the selection saw.
template <typename scalar_t>
__device__ __forceinline__ void noisy_elem(const scalar_t* __restrict__ clean,
                                           const scalar_t* __restrict__ noise_logits,
                                           const acc_t<scalar_t>* __restrict__ noise,
                                           int64_t off, acc_t<scalar_t> eps,
                                           acc_t<scalar_t>& c, acc_t<scalar_t>& sd,
                                           acc_t<scalar_t>& nz) {
  c = to_acc(clean[off]);
  sd = add_rn(softplus(to_acc(noise_logits[off])), eps);
  nz = add_rn(c, mul_rn(noise[off], sd));
}

// ---------------------------------------------------------------------------
// Noisy top-k gating forward. Warp c (c = 4 * block + warp) handles the
// chunk of rows [c * R, (c+1) * R), R = rows_per_chunk, one row at a time
// and writes partials[c] = (importance part [E], load part [E]).
// grid = ceil(ceil(T / R) / 4) blocks of 128 threads.
// ---------------------------------------------------------------------------
template <typename scalar_t, int CACHE>
__global__ void __launch_bounds__(kThreadsPerBlock) noisy_topk_gating_fwd_kernel(
    const scalar_t* __restrict__ clean_logits, const scalar_t* __restrict__ noise_logits,
    const acc_t<scalar_t>* __restrict__ noise, int64_t num_tokens, int64_t rows_per_chunk,
    int E, int k, acc_t<scalar_t> eps, acc_t<scalar_t>* __restrict__ weights, int64_t* __restrict__ indices,
    int64_t* __restrict__ threshold_index, acc_t<scalar_t>* __restrict__ partials) {
  using Acc = acc_t<scalar_t>;
  using Key = SelectKey<Acc>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t chunk =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t row_begin = chunk * rows_per_chunk;
  if (row_begin >= num_tokens) return;  // warp-uniform
  const int64_t row_end =
      row_begin + rows_per_chunk < num_tokens ? row_begin + rows_per_chunk : num_tokens;
  const int m = (k + 1 < E) ? k + 1 : E;  // ranks to select
  const bool has_load = k < E;           // else every expert is chosen: load = T
  Acc* __restrict__ imp_part = partials + chunk * 2 * static_cast<int64_t>(E);
  Acc* __restrict__ load_part = imp_part + E;

  // Per-lane accumulators: registers for the cached experts, the warp's own
  // partial row (initialised here, same thread reads it back) for the rest.
  Acc imp_acc[CACHE];
  Acc load_acc[CACHE];
#pragma unroll
  for (int i = 0; i < CACHE; ++i) {
    imp_acc[i] = Acc(0);
    load_acc[i] = Acc(0);
  }
  for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) {
    imp_part[e] = Acc(0);
    load_part[e] = Acc(0);
  }

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t off = row * E;
    Acc cl[CACHE], sd[CACHE], nz[CACHE];
    Key key[CACHE];
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int e = lane + i * kWarpSize;
      cl[i] = sd[i] = nz[i] = Acc(0);
      key[i] = Key::empty();
      if (e < E) {
        noisy_elem(clean_logits, noise_logits, noise, off + e, eps, cl[i], sd[i], nz[i]);
        key[i] = Key::make(nz[i], e);
      }
    }

    // Select the top m noisy values; remember the key of rank k-1 (the last
    // chosen) and the expert of rank k (the threshold expert).
    Key bound = Key::top();
    Key kth = Key::empty();
    int thr_e = -1;
    for (int j = 0; j < m; ++j) {
      const Key best = next_key(key, bound, lane, E, [&](int e) {
        Acc c, s, n;
        noisy_elem(clean_logits, noise_logits, noise, off + e, eps, c, s, n);
        return Key::make(n, e);
      });
      if (j < k) {
        if (lane == j % kWarpSize) indices[row * k + j] = best.index();
      } else {
        thr_e = best.index();
      }
      if (j == k - 1) kth = best;
      bound = best;
    }
    if (lane == 0) threshold_index[row] = thr_e;  // -1 when k == E
    // e is chosen  <=>  key_e >= kth  (keys are unique).

    // Thresholds of the load estimate: the (k+1)-th noisy value for chosen
    // experts, the k-th for the others.
    Acc thr_in = Acc(0), thr_out = Acc(0);
    if (has_load) {
      Acc c, s;
      noisy_elem(clean_logits, noise_logits, noise, off + thr_e, eps, c, s, thr_in);
      noisy_elem(clean_logits, noise_logits, noise, off + kth.index(), eps, c, s, thr_out);
    }

    // Softmax over the k chosen noisy values: max and sum of exp.
    Acc mx = neg_inf<Acc>();
#pragma unroll
    for (int i = 0; i < CACHE; ++i)
      if (lane + i * kWarpSize < E && !key[i].less(kth)) mx = m_max(mx, nz[i]);
    for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) {
      Acc c, s, n;
      noisy_elem(clean_logits, noise_logits, noise, off + e, eps, c, s, n);
      if (!Key::make(n, e).less(kth)) mx = m_max(mx, n);
    }
    mx = warp_max(mx);
    Acc sum = Acc(0);
#pragma unroll
    for (int i = 0; i < CACHE; ++i)
      if (lane + i * kWarpSize < E && !key[i].less(kth)) sum += m_exp(nz[i] - mx);
    for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) {
      Acc c, s, n;
      noisy_elem(clean_logits, noise_logits, noise, off + e, eps, c, s, n);
      if (!Key::make(n, e).less(kth)) sum += m_exp(n - mx);
    }
    sum = warp_sum(sum);

    // Importance (gate of each chosen expert) and load (probability of being
    // chosen) contributions of this row.
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      if (lane + i * kWarpSize < E) {
        const bool chosen = !key[i].less(kth);
        if (chosen) imp_acc[i] += m_exp(nz[i] - mx) / sum;
        load_acc[i] +=
            has_load ? normal_cdf((cl[i] - (chosen ? thr_in : thr_out)) / sd[i]) : Acc(1);
      }
    }
    for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize) {
      Acc c, s, n;
      noisy_elem(clean_logits, noise_logits, noise, off + e, eps, c, s, n);
      const bool chosen = !Key::make(n, e).less(kth);
      if (chosen) imp_part[e] += m_exp(n - mx) / sum;
      load_part[e] += has_load ? normal_cdf((c - (chosen ? thr_in : thr_out)) / s) : Acc(1);
    }

    // Weights in rank order; lane j % 32 wrote indices[row, j] itself.
    for (int j = lane; j < k; j += kWarpSize) {
      const int64_t e = indices[row * k + j];
      Acc c, s, n;
      noisy_elem(clean_logits, noise_logits, noise, off + e, eps, c, s, n);
      weights[row * k + j] = m_exp(n - mx) / sum;
    }
  }

#pragma unroll
  for (int i = 0; i < CACHE; ++i) {
    const int e = lane + i * kWarpSize;
    if (e < E) {
      imp_part[e] = imp_acc[i];
      load_part[e] = load_acc[i];
    }
  }
}

// ---------------------------------------------------------------------------
// Noisy top-k gating backward. One warp per row, grid = ceil(T / 4) blocks.
//
//   gw_j = grad_weights[j] + grad_importance[idx_j], s = sum_j gw_j w_j,
//   d_noisy[idx_j] += w_j (gw_j - s).
//   If k < E, per expert e: z = (clean_e - thr_e) / std_e, q_e = gL_e phi(z) / std_e;
//   d_clean[e] += q_e; d_std[e] -= q_e z; d_noisy[thr_idx] -= sum_{e chosen} q_e;
//   d_noisy[idx_{k-1}] -= sum_{e not chosen} q_e.
//   grad_clean = d_clean + d_noisy; d_std += d_noisy * noise;
//   grad_noise_logits = d_std * sigmoid(noise_logits).
// Dense pass writes every element without its d_noisy term (d_noisy is zero
// outside idx_0..idx_{k-1}, thr_idx); after __syncwarp the k+1 sparse
// positions are overwritten with their complete value. Membership of e in the
// chosen set comes from a per-warp shared-memory bitmap built from `indices`,
// in windows of kBitmapExperts experts (any E).
// ---------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) noisy_topk_gating_bwd_kernel(
    const acc_t<scalar_t>* __restrict__ grad_weights,
    const acc_t<scalar_t>* __restrict__ grad_importance,
    const acc_t<scalar_t>* __restrict__ grad_load, const scalar_t* __restrict__ clean_logits,
    const scalar_t* __restrict__ noise_logits, const acc_t<scalar_t>* __restrict__ noise,
    const acc_t<scalar_t>* __restrict__ weights, const int64_t* __restrict__ indices,
    const int64_t* __restrict__ threshold_index, int64_t num_tokens, int E, int k,
    acc_t<scalar_t> eps, scalar_t* __restrict__ grad_clean,
    scalar_t* __restrict__ grad_noise_logits) {
  using Acc = acc_t<scalar_t>;
  __shared__ unsigned int bitmap_all[kWarpsPerBlock][kBitmapWords];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (row >= num_tokens) return;  // warp-uniform; no block-level barriers below
  unsigned int* bitmap = bitmap_all[warp];
  const int64_t off = row * E;
  const Acc* __restrict__ gw = grad_weights + row * k;
  const Acc* __restrict__ w = weights + row * k;
  const int64_t* __restrict__ idx = indices + row * k;
  scalar_t* __restrict__ out_clean = grad_clean + off;
  scalar_t* __restrict__ out_nl = grad_noise_logits + off;
  const bool has_load = k < E;

  // s = sum_j gw_j w_j.
  Acc s = Acc(0);
  for (int j = lane; j < k; j += kWarpSize) {
    const int64_t e = idx[j];
    const Acc gimp = (e >= 0 && e < E) ? grad_importance[e] : Acc(0);
    s += (gw[j] + gimp) * w[j];
  }
  s = warp_sum(s);

  // Threshold experts and values (NaN if an index is out of range).
  const int64_t thr_e = has_load ? threshold_index[row] : -1;
  const int64_t last_e = idx[k - 1];
  const bool thr_ok = has_load && thr_e >= 0 && thr_e < E;
  const bool last_ok = last_e >= 0 && last_e < E;
  Acc thr_in = quiet_nan<Acc>(), thr_out = quiet_nan<Acc>();
  if (has_load) {
    Acc c, sd;
    if (thr_ok) noisy_elem(clean_logits, noise_logits, noise, off + thr_e, eps, c, sd, thr_in);
    if (last_ok) noisy_elem(clean_logits, noise_logits, noise, off + last_e, eps, c, sd, thr_out);
  }

  // Dense pass.
  Acc a_in = Acc(0), a_out = Acc(0);  // sum of q_e over chosen / not chosen e
  if (has_load) {
    for (int64_t base = 0; base < E; base += kBitmapExperts) {
      const int64_t wend = (E - base < kBitmapExperts) ? E : base + kBitmapExperts;
      for (int i = lane; i < kBitmapWords; i += kWarpSize) bitmap[i] = 0u;
      __syncwarp();
      for (int j = lane; j < k; j += kWarpSize) {
        const int64_t e = idx[j];
        if (e >= base && e < wend) {
          const int r = static_cast<int>(e - base);
          atomicOr(&bitmap[r >> 5], 1u << (r & 31));
        }
      }
      __syncwarp();
      for (int64_t e = base + lane; e < wend; e += kWarpSize) {
        const int r = static_cast<int>(e - base);
        const bool chosen = (bitmap[r >> 5] >> (r & 31)) & 1u;
        Acc c, sd, n;
        noisy_elem(clean_logits, noise_logits, noise, off + e, eps, c, sd, n);
        const Acc z = (c - (chosen ? thr_in : thr_out)) / sd;
        const Acc q = grad_load[e] * normal_pdf(z) / sd;
        if (chosen) a_in += q; else a_out += q;
        store_val(out_clean + e, q);
        store_val(out_nl + e, -q * z * sigmoid(to_acc(noise_logits[off + e])));
      }
      __syncwarp();  // everyone is done with the bitmap before the next window
    }
    a_in = warp_sum(a_in);
    a_out = warp_sum(a_out);
  } else {
    for (int e = lane; e < E; e += kWarpSize) {
      store_val(out_clean + e, Acc(0));
      store_val(out_nl + e, Acc(0));
    }
  }
  __syncwarp();

  // Sparse positions: idx_0..idx_{k-1} and (if k < E) thr_e, complete values.
  const int npos = has_load ? k + 1 : k;
  for (int p = lane; p < npos; p += kWarpSize) {
    const int64_t e = (p < k) ? idx[p] : thr_e;
    if (e < 0 || e >= E) continue;
    Acc dn = Acc(0);
    bool chosen = false;
    for (int jj = 0; jj < k; ++jj) {
      if (idx[jj] == e) {
        chosen = true;
        dn += w[jj] * (gw[jj] + grad_importance[e] - s);
      }
    }
    if (has_load) {
      if (e == thr_e) dn -= a_in;
      if (e == last_e) dn -= a_out;
    }
    Acc c, sd, n;
    noisy_elem(clean_logits, noise_logits, noise, off + e, eps, c, sd, n);
    Acc d_clean = Acc(0), d_std = Acc(0);
    if (has_load) {
      const Acc z = (c - (chosen ? thr_in : thr_out)) / sd;
      const Acc q = grad_load[e] * normal_pdf(z) / sd;
      d_clean = q;
      d_std = -q * z;
    }
    d_clean += dn;
    d_std += dn * noise[off + e];
    store_val(out_clean + e, d_clean);
    store_val(out_nl + e, d_std * sigmoid(to_acc(noise_logits[off + e])));
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Launchers (declared in noisy_gating_binding.cpp).
// ---------------------------------------------------------------------------

/// Number of acc_t elements of scratch memory launch_noisy_topk_gating_fwd needs
/// (per-token-block partial sums of importance and load plus a small staging
/// area for the deterministic two-stage column reduction).
int64_t noisy_topk_gating_fwd_workspace_elems(int64_t num_tokens, int64_t num_experts) {
  return num_chunks(num_tokens) * 2 * num_experts + reduce_staging_elems(num_experts);
}

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
                                         acc_t<scalar_t>* workspace, cudaStream_t stream) {
  using Acc = acc_t<scalar_t>;
  if (num_tokens <= 0) {
    // Sums over no tokens: zero (all-zero bits are 0.0 for float and double).
    cudaError_t err = cudaMemsetAsync(importance, 0, sizeof(Acc) * num_experts, stream);
    if (err != cudaSuccess) return err;
    return cudaMemsetAsync(load, 0, sizeof(Acc) * num_experts, stream);
  }
  const int E = static_cast<int>(num_experts);
  const int kk = static_cast<int>(k);
  const int64_t chunks = num_chunks(num_tokens);
  Acc* partials = workspace;                                 // [chunks, 2, E]
  Acc* staging = workspace + chunks * 2 * num_experts;       // [kMaxSplits, E]
  const unsigned blocks = static_cast<unsigned>(ceil_div(chunks, kWarpsPerBlock));
  dispatch_cache(num_experts, [&](auto cache) {
    noisy_topk_gating_fwd_kernel<scalar_t, decltype(cache)::value>
        <<<blocks, kThreadsPerBlock, 0, stream>>>(clean_logits, noise_logits, noise, num_tokens,
                                                  rows_per_chunk(num_tokens), E, kk, static_cast<Acc>(noise_eps), weights,
                                                  indices, threshold_index, partials);
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_columns<Acc>(partials, 2 * num_experts, chunks, num_experts, importance, staging,
                      stream);
  reduce_columns<Acc>(partials + num_experts, 2 * num_experts, chunks, num_experts, load,
                      staging, stream);
  return cudaGetLastError();
}

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
    scalar_t* grad_clean, scalar_t* grad_noise_logits, cudaStream_t stream) {
  using Acc = acc_t<scalar_t>;
  if (num_tokens <= 0) return cudaSuccess;
  noisy_topk_gating_bwd_kernel<scalar_t>
      <<<row_blocks(num_tokens), kThreadsPerBlock, 0, stream>>>(
          grad_weights, grad_importance, grad_load, clean_logits, noise_logits, noise, weights,
          indices, threshold_index, num_tokens, static_cast<int>(num_experts),
          static_cast<int>(k), static_cast<Acc>(noise_eps), grad_clean, grad_noise_logits);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// Explicit instantiations for the four supported logits types.
// ---------------------------------------------------------------------------
#define MARS_INSTANTIATE_NOISY_GATING(S)                                                       \
  template cudaError_t launch_noisy_topk_gating_fwd<S>(                                         \
      const S*, const S*, const acc_t<S>*, int64_t, int64_t, int64_t, double, acc_t<S>*,        \
      int64_t*, int64_t*, acc_t<S>*, acc_t<S>*, acc_t<S>*, cudaStream_t);                       \
  template cudaError_t launch_noisy_topk_gating_bwd<S>(                                         \
      const acc_t<S>*, const acc_t<S>*, const acc_t<S>*, const S*, const S*, const acc_t<S>*,   \
      const acc_t<S>*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, double, S*,   \
      S*, cudaStream_t);

MARS_INSTANTIATE_NOISY_GATING(float)
MARS_INSTANTIATE_NOISY_GATING(__half)
MARS_INSTANTIATE_NOISY_GATING(__nv_bfloat16)
MARS_INSTANTIATE_NOISY_GATING(double)

#undef MARS_INSTANTIATE_NOISY_GATING

}  // namespace cuda
}  // namespace mars_kernels
