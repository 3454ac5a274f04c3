// Routing / gating CUDA kernels: top-k gating, noisy top-k gating (Shazeer et
// al. 2017) and router softmax statistics, forward and backward.
//
// CUDA runtime only (no torch headers): compiles with a plain `nvcc -c`. The
// torch-facing glue is gating_binding.cpp; the launch contracts are documented
// in gating.cuh and the op contracts beside the schemas in mars_kernels/ops/gating.py.
//
// Work decomposition (all kernels):
//   * One warp per token row; a block holds kWarpsPerBlock = 4 warps (128
//     threads). Lane l owns the experts e = l, l + 32, l + 64, ... of its row,
//     so any E >= 1 works. Row-level reductions (max, sum, arg-max) are warp
//     shuffles; no shared memory except the per-warp membership bitmap of the
//     noisy backward.
//   * Kernels that sum over tokens (importance / load, prob_sum) give each warp
//     a fixed chunk of R = rows_per_chunk(T) consecutive rows (4 for T <= 16k,
//     more for larger T so that there are at most 4096 chunks); the warp
//     accumulates its chunk (in registers for the first 32*CACHE experts, in
//     its own global partial row for the rest) and writes one partial row
//     [E]. The partials
//     [num_chunks, E] are then reduced over chunks by column_sum_kernel in a
//     fixed order (one or two stages). Nothing uses atomics on global memory,
//     so the sums are bitwise reproducible run to run.
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
// The building blocks shared with mars_routing.cu (scalar helpers, warp
// reductions, selection keys, column_sum_kernel) are in routing_device.cuh.
#include "gating.cuh"
#include "routing_device.cuh"

#include <cstdint>
#include <type_traits>
#include <utility>

namespace mars_kernels {
namespace cuda {
namespace {

// Kernels that produce per-chunk partial sums over tokens give each warp
// rows_per_chunk(T) = max(kMinRowsPerChunk, ceil(T / kMaxChunks)) consecutive
// rows: small T keeps many warps busy, large T bounds the partials to
// kMaxChunks rows. Both are part of the summation order, hence of the exact
// bits of importance / load / prob_sum (which depend on (T, E) only).
constexpr int64_t kMinRowsPerChunk = 4;
constexpr int64_t kMaxChunks = 4096;
// Noisy backward: experts covered by one pass of the per-warp membership
// bitmap (kBitmapWords 32-bit words in shared memory per warp).
constexpr int kBitmapWords = 256;
constexpr int kBitmapExperts = kBitmapWords * 32;


inline int64_t rows_per_chunk(int64_t num_tokens) {
  const int64_t r = ceil_div(num_tokens, kMaxChunks);
  return r > kMinRowsPerChunk ? r : kMinRowsPerChunk;
}
inline int64_t num_chunks(int64_t num_tokens) {
  return ceil_div(num_tokens, rows_per_chunk(num_tokens));
}

// ---------------------------------------------------------------------------
// Scalar helpers used only here (the common ones, the warp reductions and the
// selection keys are in routing_device.cuh).
// ---------------------------------------------------------------------------

__device__ __forceinline__ float m_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double m_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float m_erfc(float x) { return erfcf(x); }
__device__ __forceinline__ double m_erfc(double x) { return erfc(x); }
__device__ __forceinline__ float m_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double m_abs(double x) { return fabs(x); }

template <typename Acc>
__device__ __forceinline__ Acc quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fffffff); }
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7fffffffffffffffll);
}

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
// Launchers.
// ---------------------------------------------------------------------------

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

int64_t noisy_topk_gating_fwd_workspace_elems(int64_t num_tokens, int64_t num_experts) {
  return num_chunks(num_tokens) * 2 * num_experts + reduce_staging_elems(num_experts);
}

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

int64_t router_stats_fwd_workspace_elems(int64_t num_tokens, int64_t num_experts) {
  return num_chunks(num_tokens) * num_experts + reduce_staging_elems(num_experts);
}

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
  template cudaError_t launch_noisy_topk_gating_fwd<S>(                                         \
      const S*, const S*, const acc_t<S>*, int64_t, int64_t, int64_t, double, acc_t<S>*,        \
      int64_t*, int64_t*, acc_t<S>*, acc_t<S>*, acc_t<S>*, cudaStream_t);                       \
  template cudaError_t launch_noisy_topk_gating_bwd<S>(                                         \
      const acc_t<S>*, const acc_t<S>*, const acc_t<S>*, const S*, const S*, const acc_t<S>*,   \
      const acc_t<S>*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, double, S*,   \
      S*, cudaStream_t);                                                                        \
  template cudaError_t launch_router_stats_fwd<S>(const S*, int64_t, int64_t, acc_t<S>*,        \
                                                  acc_t<S>*, acc_t<S>*, cudaStream_t);          \
  template cudaError_t launch_router_stats_bwd<S>(const acc_t<S>*, const acc_t<S>*, const S*,   \
                                                  const acc_t<S>*, int64_t, int64_t, S*,        \
                                                  cudaStream_t);

cudaError_t kernel_image_status() {
  // cudaFuncGetAttributes needs code this device can run: SASS for its
  // architecture or PTX the driver can JIT-compile; else it reports
  // cudaErrorNoKernelImageForDevice (or InvalidDeviceFunction).
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, column_sum_kernel<float>);
  if (err != cudaSuccess) cudaGetLastError();  // clear the sticky-free error state
  return err;
}

MARS_INSTANTIATE_GATING(float)
MARS_INSTANTIATE_GATING(__half)
MARS_INSTANTIATE_GATING(__nv_bfloat16)
MARS_INSTANTIATE_GATING(double)

#undef MARS_INSTANTIATE_GATING

}  // namespace cuda
}  // namespace mars_kernels
