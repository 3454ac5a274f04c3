// Device-side building blocks shared by the routing kernels (gating.cu,
// noisy_gating.cu and mars_routing.cu): launch-shape constants, scalar helpers
// (float / double overloads), warp reductions, the ordered selection keys and
// one selection round, the token chunks of the sums over tokens, the
// deterministic column-sum kernel and small host-side helpers.
//
// CUDA runtime only (no torch headers); included only by .cu files. Like the
// code it was taken from, everything lives in an anonymous namespace, so each
// .cu file gets its own internal-linkage copy. Kernel launches stay in the .cu
// files.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mars_kernels {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;
constexpr unsigned kFullMask = 0xffffffffu;
// Rows per thread column of column_sum_kernel (block = (kWarpSize, kReduceThreadsY)).
constexpr int kReduceThreadsY = 8;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// Scalar helpers: conversions, overloaded math (float / double), constants.
// ---------------------------------------------------------------------------

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }

__device__ __forceinline__ void store_val(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_val(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_val(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void store_val(double* p, double v) { *p = v; }

__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_log(float x) { return logf(x); }
__device__ __forceinline__ double m_log(double x) { return log(x); }
// fmax semantics: a NaN operand is ignored (NaN only if both are NaN). Every
// caller also sums exp() over the same values, which propagates NaN.
__device__ __forceinline__ float m_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double m_max(double a, double b) { return fmax(a, b); }
// Explicitly rounded add / multiply: never contracted into an FMA, so noisy
// logits are computed exactly as torch's elementwise ops would (and
// identically in every kernel that recomputes them).
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename Acc>
__device__ __forceinline__ Acc neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull));
}

template <typename Acc>
__device__ __forceinline__ Acc quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fffffff); }
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7fffffffffffffffll);
}

// ---------------------------------------------------------------------------
// Warp reductions (full warp; every lane gets the identical result, because the
// xor butterfly combines the same operands in the same tree on every lane).
// ---------------------------------------------------------------------------

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}
template <typename Acc>
__device__ __forceinline__ Acc warp_max(Acc v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = m_max(v, __shfl_xor_sync(kFullMask, v, m));
  return v;
}

// ---------------------------------------------------------------------------
// Selection keys: larger key = ranked earlier; unique within a row.
// ---------------------------------------------------------------------------

/// Order-preserving unsigned image of a float: a < b  <=>  bits(a) < bits(b).
/// NaN is mapped to +inf and -0 to +0 first (so -0 and +0 tie, as in a sort).
/// Every real key is >= bits(-inf) = 0x007FFFFF > 0 and < 0xFFFFFFFF.
__device__ __forceinline__ uint32_t ordered_bits(float v) {
  uint32_t u = isnan(v) ? 0x7f800000u : __float_as_uint(v);
  if (v == 0.0f) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint64_t ordered_bits(double v) {
  uint64_t u = isnan(v) ? 0x7ff0000000000000ull
                        : static_cast<uint64_t>(__double_as_longlong(v));
  if (v == 0.0) u = 0ull;
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

template <typename Acc>
struct SelectKey;

/// float math: one uint64 = value bits << 32 | (0xFFFFFFFF - e). Larger key =
/// ranked earlier. empty() (0) is below every real key, top() above.
template <>
struct SelectKey<float> {
  unsigned long long bits;

  static __device__ __forceinline__ SelectKey make(float v, int e) {
    return SelectKey{(static_cast<unsigned long long>(ordered_bits(v)) << 32) |
                     static_cast<unsigned long long>(0xffffffffu - static_cast<uint32_t>(e))};
  }
  static __device__ __forceinline__ SelectKey empty() { return SelectKey{0ull}; }
  static __device__ __forceinline__ SelectKey top() { return SelectKey{~0ull}; }
  __device__ __forceinline__ bool less(const SelectKey& o) const { return bits < o.bits; }
  __device__ __forceinline__ SelectKey shfl_xor(int m) const {
    return SelectKey{__shfl_xor_sync(kFullMask, bits, m)};
  }
  __device__ __forceinline__ int index() const {
    return static_cast<int>(0xffffffffu - static_cast<uint32_t>(bits & 0xffffffffull));
  }
};

/// double math: (uint64 value bits, 0xFFFFFFFF - e) compared lexicographically.
template <>
struct SelectKey<double> {
  unsigned long long hi;
  unsigned int lo;

  static __device__ __forceinline__ SelectKey make(double v, int e) {
    return SelectKey{static_cast<unsigned long long>(ordered_bits(v)),
                     0xffffffffu - static_cast<uint32_t>(e)};
  }
  static __device__ __forceinline__ SelectKey empty() { return SelectKey{0ull, 0u}; }
  static __device__ __forceinline__ SelectKey top() { return SelectKey{~0ull, ~0u}; }
  __device__ __forceinline__ bool less(const SelectKey& o) const {
    return hi < o.hi || (hi == o.hi && lo < o.lo);
  }
  __device__ __forceinline__ SelectKey shfl_xor(int m) const {
    return SelectKey{__shfl_xor_sync(kFullMask, hi, m), __shfl_xor_sync(kFullMask, lo, m)};
  }
  __device__ __forceinline__ int index() const { return static_cast<int>(0xffffffffu - lo); }
};

/// Largest key across the warp (all lanes get it).
template <typename Key>
__device__ __forceinline__ Key warp_max_key(Key k) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) {
    const Key o = k.shfl_xor(m);
    if (k.less(o)) k = o;
  }
  return k;
}

/// best = max(best, cand) restricted to cand < bound.
template <typename Key>
__device__ __forceinline__ void consider(Key& best, const Key& cand, const Key& bound) {
  if (cand.less(bound) && best.less(cand)) best = cand;
}

/// One selection round: the largest key of the row strictly below `bound`
/// (every lane gets it; Key::empty() if there is none). key[i] holds the key
/// of expert lane + 32 i (Key::empty() past E); uncached_key(e) recomputes the
/// key of an expert e >= 32 * CACHE. Rank j of the row is the round started
/// from the key of rank j-1 (Key::top() for j = 0).
template <int CACHE, typename Key, typename F>
__device__ __forceinline__ Key next_key(const Key (&key)[CACHE], const Key& bound, int lane,
                                        int E, F&& uncached_key) {
  Key best = Key::empty();
#pragma unroll
  for (int i = 0; i < CACHE; ++i) consider(best, key[i], bound);
  for (int e = lane + CACHE * kWarpSize; e < E; e += kWarpSize)
    consider(best, uncached_key(e), bound);
  return warp_max_key(best);
}

// ---------------------------------------------------------------------------
// Deterministic column sums. in [rows, E] (row stride in_stride) ->
// out [gridDim.y, E]: block (bx, by) sums rows [by * rows_per_split,
// min(rows, (by+1) * rows_per_split)) of columns [32 bx, 32 bx + 32).
// Thread (tx, ty) sums every 8th row of the range in order, then thread
// (tx, 0) adds the 8 partials in order. block = (32, 8).
// ---------------------------------------------------------------------------
template <typename Acc>
__global__ void __launch_bounds__(kWarpSize * kReduceThreadsY)
    column_sum_kernel(const Acc* __restrict__ in, int64_t in_stride, int64_t rows, int64_t E,
                      int64_t rows_per_split, Acc* __restrict__ out) {
  __shared__ Acc partial[kReduceThreadsY][kWarpSize];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kWarpSize + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = (r0 + rows_per_split < rows) ? r0 + rows_per_split : rows;
  Acc acc = Acc(0);
  if (e < E) {
    for (int64_t r = r0 + ty; r < r1; r += kReduceThreadsY) acc += in[r * in_stride + e];
  }
  partial[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && e < E) {
    Acc total = Acc(0);
#pragma unroll
    for (int i = 0; i < kReduceThreadsY; ++i) total += partial[i][tx];
    out[static_cast<int64_t>(blockIdx.y) * E + e] = total;
  }
}

// ---------------------------------------------------------------------------
// Host-side launch helpers.
// ---------------------------------------------------------------------------

/// Calls f(std::integral_constant<int, CACHE>{}) with the register cache size
/// (values per lane) for E experts: the smallest of 1, 2, 4, 8 covering E,
/// else 8 (experts beyond 256 are re-read from global memory).
template <typename F>
void dispatch_cache(int64_t E, F&& f) {
  const int64_t per_lane = ceil_div(E, kWarpSize);
  if (per_lane <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (per_lane <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (per_lane <= 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// Kernels that produce per-chunk partial sums over tokens (importance / load,
// prob_sum) give each warp rows_per_chunk(T) = max(kMinRowsPerChunk,
// ceil(T / kMaxChunks)) consecutive rows: small T keeps many warps busy, large
// T bounds the partials to kMaxChunks rows. Both are part of the summation
// order, hence of the exact bits of those sums (which depend on (T, E) only).
constexpr int64_t kMinRowsPerChunk = 4;
constexpr int64_t kMaxChunks = 4096;

inline int64_t rows_per_chunk(int64_t num_tokens) {
  const int64_t r = ceil_div(num_tokens, kMaxChunks);
  return r > kMinRowsPerChunk ? r : kMinRowsPerChunk;
}
inline int64_t num_chunks(int64_t num_tokens) {
  return ceil_div(num_tokens, rows_per_chunk(num_tokens));
}

// Column reduction: a single stage for up to this many partial rows, else a
// first stage over at most kMaxSplits row ranges and a second over those.
constexpr int64_t kSingleStageRows = 256;
constexpr int64_t kMaxSplits = 64;

/// Number of staging elements reduce_columns may use for E columns.
inline int64_t reduce_staging_elems(int64_t E) { return kMaxSplits * E; }

/// out[e] = sum over r of in[r * in_stride + e], r in [0, rows), in a fixed
/// order that depends on (rows, E) only. `staging` holds
/// reduce_staging_elems(E) elements (used when rows > kSingleStageRows).
template <typename Acc>
void reduce_columns(const Acc* in, int64_t in_stride, int64_t rows, int64_t E, Acc* out,
                    Acc* staging, cudaStream_t stream) {
  const dim3 block(kWarpSize, kReduceThreadsY);
  const unsigned col_blocks = static_cast<unsigned>(ceil_div(E, kWarpSize));
  if (rows <= kSingleStageRows) {
    column_sum_kernel<Acc><<<dim3(col_blocks, 1), block, 0, stream>>>(in, in_stride, rows, E,
                                                                      rows, out);
    return;
  }
  int64_t splits = ceil_div(rows, kSingleStageRows);
  if (splits > kMaxSplits) splits = kMaxSplits;
  const int64_t rows_per_split = ceil_div(rows, splits);
  column_sum_kernel<Acc><<<dim3(col_blocks, static_cast<unsigned>(splits)), block, 0, stream>>>(
      in, in_stride, rows, E, rows_per_split, staging);
  column_sum_kernel<Acc><<<dim3(col_blocks, 1), block, 0, stream>>>(staging, E, splits, E,
                                                                    splits, out);
}

/// Blocks of kWarpsPerBlock warps for one warp per row.
inline unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(ceil_div(rows, kWarpsPerBlock));
}

}  // namespace
}  // namespace cuda
}  // namespace mars_kernels
