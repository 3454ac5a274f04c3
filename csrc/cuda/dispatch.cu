// MoE dispatch CUDA kernels: moe_align (stable counting sort of the
// assignments by expert, plus the row-block table), permute (row gather),
// unpermute (deterministic gather-sum) and the backward of the weighted
// unpermute.
//
// CUDA runtime only (no torch headers): compiles with a plain `nvcc -c`. The
// torch-facing glue is dispatch_binding.cpp; the op contracts are beside the
// schemas in mars_kernels/ops/dispatch.py, the launcher conventions in
// launcher.h. Here T tokens, k assignments per token, S = T * k assignments
// (assignment flat = t * k + j), E experts, D row width; indices and offsets
// are int64. Preconditions (checked by the binding): 1 <= E < 2^30,
// block_size >= 1, 1 <= k < 2^31, permutation / inverse as produced by
// launch_moe_align for the same S.
//
// moe_align, for S assignments and E experts (bucket E = dropped), with the
// assignments cut into nchunks chunks of `chunk` consecutive flat indices
// (align_plan; chunk is a multiple of 32):
//   1. align_histogram_kernel: block c counts chunk c per bucket (shared
//      memory counters, or global atomics when E + 1 buckets do not fit) into
//      hist[b * nchunks + c] (bucket-major).
//   2. exclusive scan of hist as one flat int64 array: start[b * nchunks + c]
//      = (assignments in buckets < b) + (assignments of bucket b in chunks
//      < c) is the first sorted slot of chunk c's bucket-b assignments, and
//      start[b * nchunks] = offsets[b]. (Integer sums: exact in any order.)
//   3. align_offsets_kernel: offsets, counts and the row blocks per expert.
//   4. align_scatter_kernel: one warp per chunk walks its chunk in order, 32
//      assignments per round; __match_any_sync groups equal buckets and a
//      lane's rank is the number of lower lanes in its group, so the sort is
//      stable and the result equals the CPU op bit for bit.
//   5. exclusive scan of the row blocks per expert, then align_blocks_kernel
//      finds each row block's expert by binary search.
// Nothing syncs with the host; every size is known from (S, E, block_size).
//
// Row kernels (permute, unpermute, unpermute backward): a 256-thread block is
// (bx, 256 / bx) with bx the smallest power of two >= the row's vector count
// (at most 256); thread (x, y) handles vectors x, x + bx, ... of row
// blockIdx.x * by + y (grid-stride over rows). A vector is 16 bytes when the
// row width and base pointers allow it, else one element (permute: the widest
// of 16, 8, 4, 2, 1 bytes). grad_weights uses one warp per (t, j).
#include "launcher.h"

#include <cstdint>
#include <type_traits>

namespace mars_kernels {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- moe_align
// Chunks hold at least kMinChunk assignments; the chunk size doubles until
// there are at most kMaxAlignChunks chunks and (E + 1) * nchunks <=
// kMaxScanElems (the scanned per-chunk histogram), or a single chunk.
constexpr int64_t kMinChunk = 256;
constexpr int64_t kMaxAlignChunks = 2048;
constexpr int64_t kMaxScanElems = int64_t{1} << 22;
constexpr int kHistThreads = 256;
// Dynamic shared memory per block, kept within the default 48 KiB (no opt-in).
constexpr int64_t kMaxDynSmem = 48 * 1024;
constexpr int64_t kHistSharedBuckets = kMaxDynSmem / static_cast<int64_t>(sizeof(int));
constexpr int64_t kScatterSharedBuckets = kMaxDynSmem / static_cast<int64_t>(sizeof(int64_t));
// Block scans: kScanThreads threads x kScanItems consecutive items per thread.
constexpr int kScanThreads = 256;
constexpr int kScanItems = 8;
constexpr int64_t kScanTile = kScanThreads * kScanItems;
// Elementwise-ish kernels.
constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = int64_t{1} << 20;

/// ceil(a / b) for a >= 0, b >= 1, without overflow.
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

inline unsigned grid_for(int64_t work, int64_t per_block) {
  int64_t g = ceil_div(work, per_block);
  if (g < 1) g = 1;
  if (g > kMaxGrid) g = kMaxGrid;
  return static_cast<unsigned>(g);
}

struct AlignPlan {
  int64_t chunk;       // assignments per chunk (multiple of 32)
  int64_t nchunks;     // ceil(S / chunk) >= 1
  int64_t scan_elems;  // (E + 1) * nchunks
  int64_t scan_tiles;  // ceil(scan_elems / kScanTile)
};

inline AlignPlan align_plan(int64_t S, int64_t E) {
  int64_t chunk = kMinChunk;
  while (chunk < S) {
    const int64_t n = ceil_div(S, chunk);
    if (n <= kMaxAlignChunks && n <= kMaxScanElems / (E + 1)) break;
    chunk *= 2;
  }
  AlignPlan p;
  p.chunk = chunk;
  p.nchunks = ceil_div(S, chunk);
  if (p.nchunks < 1) p.nchunks = 1;
  p.scan_elems = (E + 1) * p.nchunks;
  p.scan_tiles = ceil_div(p.scan_elems, kScanTile);
  return p;
}

/// The sort bucket of an expert id: the id itself in [0, E], E (dropped) for
/// anything else, so malformed input can never index out of bounds.
__device__ __forceinline__ int bucket_of(int64_t id, int E) {
  return (id >= 0 && id <= E) ? static_cast<int>(id) : E;
}

// ---------------------------------------------------------------------------
// Block-wide scans (blockDim.x == kScanThreads).
// ---------------------------------------------------------------------------

/// Exclusive prefix of v over the block's threads (in thread order); `total`
/// receives the block sum on every thread. Contains two __syncthreads.
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, int64_t& total) {
  __shared__ long long warp_totals[kScanThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  long long inc = static_cast<long long>(v);
#pragma unroll
  for (int d = 1; d < kWarpSize; d <<= 1) {
    const long long o = __shfl_up_sync(kFullMask, inc, d);
    if (lane >= d) inc += o;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = inc;
  __syncthreads();
  long long before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kScanThreads / kWarpSize; ++w) {
    const long long t = warp_totals[w];
    if (w < warp) before += t;
    sum += t;
  }
  __syncthreads();  // warp_totals may be reused right after
  total = static_cast<int64_t>(sum);
  return static_cast<int64_t>(before + inc) - v;
}

/// In-place exclusive scan of data[begin, end) (end - begin <= kScanTile) plus
/// `carry`; returns the sum of the range. Thread i owns kScanItems
/// consecutive items.
__device__ __forceinline__ int64_t scan_tile(int64_t* __restrict__ data, int64_t begin,
                                             int64_t end, int64_t carry) {
  const int64_t first = begin + static_cast<int64_t>(threadIdx.x) * kScanItems;
  int64_t v[kScanItems];
  int64_t sum = 0;
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    v[i] = (first + i < end) ? data[first + i] : 0;
    sum += v[i];
  }
  int64_t total;
  int64_t run = carry + block_exclusive_scan(sum, total);
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    if (first + i < end) data[first + i] = run;
    run += v[i];
  }
  return total;
}

/// tile_sums[b] = sum of data[b * kScanTile, (b + 1) * kScanTile). grid = tiles.
__global__ void __launch_bounds__(kScanThreads)
    scan_tile_sums_kernel(const int64_t* __restrict__ data, int64_t n,
                          int64_t* __restrict__ tile_sums) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kScanTile;
  const int64_t end = (begin + kScanTile < n) ? begin + kScanTile : n;
  const int64_t first = begin + static_cast<int64_t>(threadIdx.x) * kScanItems;
  int64_t sum = 0;
#pragma unroll
  for (int i = 0; i < kScanItems; ++i)
    if (first + i < end) sum += data[first + i];
  int64_t total;
  block_exclusive_scan(sum, total);
  if (threadIdx.x == 0) tile_sums[blockIdx.x] = total;
}

/// In-place exclusive scan of data[0, n) by a single block, tile after tile.
__global__ void __launch_bounds__(kScanThreads)
    scan_single_block_kernel(int64_t* __restrict__ data, int64_t n) {
  int64_t carry = 0;
  for (int64_t begin = 0; begin < n; begin += kScanTile) {
    const int64_t end = (begin + kScanTile < n) ? begin + kScanTile : n;
    carry += scan_tile(data, begin, end, carry);
  }
}

/// In-place exclusive scan of tile b of data, offset by tile_offsets[b] (the
/// exclusive scan of the tile sums). grid = tiles.
__global__ void __launch_bounds__(kScanThreads)
    scan_tiles_kernel(int64_t* __restrict__ data, int64_t n,
                      const int64_t* __restrict__ tile_offsets) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kScanTile;
  const int64_t end = (begin + kScanTile < n) ? begin + kScanTile : n;
  scan_tile(data, begin, end, tile_offsets[blockIdx.x]);
}

/// In-place exclusive scan of data[0, n), n >= 1. tile_sums holds
/// ceil(n / kScanTile) elements (unused for a single tile).
cudaError_t exclusive_scan(int64_t* data, int64_t n, int64_t* tile_sums, cudaStream_t stream) {
  const int64_t tiles = ceil_div(n, kScanTile);
  if (tiles <= 1) {
    scan_single_block_kernel<<<1, kScanThreads, 0, stream>>>(data, n);
    return cudaGetLastError();
  }
  scan_tile_sums_kernel<<<static_cast<unsigned>(tiles), kScanThreads, 0, stream>>>(data, n,
                                                                                  tile_sums);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  scan_single_block_kernel<<<1, kScanThreads, 0, stream>>>(tile_sums, tiles);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  scan_tiles_kernel<<<static_cast<unsigned>(tiles), kScanThreads, 0, stream>>>(data, n,
                                                                              tile_sums);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// moe_align kernels.
// ---------------------------------------------------------------------------

/// hist[b * nchunks + c] = assignments of chunk c (= blockIdx.x) in bucket b.
/// kShared: (E + 1) int counters in dynamic shared memory, every entry of the
/// chunk's column written. Else: global 64-bit atomics into a zeroed hist.
template <bool kShared>
__global__ void __launch_bounds__(kHistThreads)
    align_histogram_kernel(const int64_t* __restrict__ ids, int64_t S, int E, int64_t chunk,
                           int64_t nchunks, int64_t* __restrict__ hist) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  const int64_t c = blockIdx.x;
  const int64_t begin = c * chunk;
  const int64_t end = (begin + chunk < S) ? begin + chunk : S;
  if (kShared) {
    int* cnt = reinterpret_cast<int*>(dyn_smem);
    for (int e = threadIdx.x; e <= E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
      atomicAdd(&cnt[bucket_of(ids[i], E)], 1);
    __syncthreads();
    for (int e = threadIdx.x; e <= E; e += blockDim.x)
      hist[static_cast<int64_t>(e) * nchunks + c] = cnt[e];
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const int64_t b = bucket_of(ids[i], E);
      atomicAdd(reinterpret_cast<unsigned long long*>(hist + b * nchunks + c), 1ull);
    }
  }
}

/// From the scanned histogram: offsets[e] = start[e * nchunks] (e <= E),
/// counts[e] = offsets[e + 1] - offsets[e] and blk[e] = ceil(counts[e] / bs)
/// (e < E).
__global__ void __launch_bounds__(kThreads)
    align_offsets_kernel(const int64_t* __restrict__ start, int E, int64_t nchunks, int64_t bs,
                         int64_t* __restrict__ counts, int64_t* __restrict__ offsets,
                         int64_t* __restrict__ blk) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e <= E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t off = start[e * nchunks];
    offsets[e] = off;
    if (e < E) {
      const int64_t n = start[(e + 1) * nchunks] - off;
      counts[e] = n;
      blk[e] = n / bs + (n % bs != 0 ? 1 : 0);
    }
  }
}

/// One warp (= block) per chunk c = blockIdx.x: assigns the sorted slots of the
/// chunk's assignments in flat order. The cursor of bucket b starts at
/// start[b * nchunks + c] and advances by the number of bucket-b assignments
/// of each round of 32. kShared: cursors copied to dynamic shared memory
/// ((E + 1) int64). Else the chunk's entries of `start` itself are the cursors
/// (each is owned by exactly one warp; `start` is consumed).
template <bool kShared>
__global__ void __launch_bounds__(kWarpSize)
    align_scatter_kernel(const int64_t* __restrict__ ids, int64_t S, int E, int64_t chunk,
                         int64_t nchunks, int64_t* __restrict__ start,
                         int64_t* __restrict__ permutation, int64_t* __restrict__ inverse) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  const int lane = threadIdx.x;
  const int64_t c = blockIdx.x;
  const int64_t begin = c * chunk;
  const int64_t end = (begin + chunk < S) ? begin + chunk : S;
  int64_t* cursor;
  int64_t stride;
  if (kShared) {
    cursor = reinterpret_cast<int64_t*>(dyn_smem);
    stride = 1;
    for (int e = lane; e <= E; e += kWarpSize) cursor[e] = start[static_cast<int64_t>(e) * nchunks + c];
    __syncwarp();
  } else {
    cursor = start + c;
    stride = nchunks;
  }
  const unsigned lower_lanes = (1u << lane) - 1u;
  // Loads run one round ahead of their use.
  int64_t id = (begin + lane < end) ? ids[begin + lane] : 0;
  for (int64_t base = begin; base < end; base += kWarpSize) {  // warp-uniform
    const int64_t i = base + lane;
    const bool valid = i < end;
    const int b = valid ? bucket_of(id, E) : -1;
    id = (i + kWarpSize < end) ? ids[i + kWarpSize] : 0;
    const unsigned peers = __match_any_sync(kFullMask, b);
    const int rank = __popc(peers & lower_lanes);
    int64_t* cur = cursor + static_cast<int64_t>(valid ? b : 0) * stride;
    if (valid) {
      const int64_t slot = *cur + rank;
      permutation[slot] = i;
      inverse[i] = slot;
    }
    __syncwarp();  // every lane has read its cursor before the group leader moves it
    if (valid && rank == 0) *cur += __popc(peers);
    __syncwarp();
  }
}

/// Row block b -> its expert e (largest e with blk_begin[e] <= b; blk_begin =
/// exclusive scan of the blocks per expert) and first slot; -1 / offsets[E]
/// for unused blocks.
__global__ void __launch_bounds__(kThreads)
    align_blocks_kernel(const int64_t* __restrict__ blk_begin, const int64_t* __restrict__ counts,
                        const int64_t* __restrict__ offsets, int E, int64_t bs, int64_t nb,
                        int64_t* __restrict__ block_expert, int64_t* __restrict__ block_start) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nb;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int lo = 0, hi = E - 1;
    while (lo < hi) {
      const int mid = lo + (hi - lo + 1) / 2;
      if (blk_begin[mid] <= b) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const int64_t n = counts[lo];
    const int64_t blocks = n / bs + (n % bs != 0 ? 1 : 0);
    const int64_t local = b - blk_begin[lo];
    if (local < blocks) {
      block_expert[b] = lo;
      block_start[b] = offsets[lo] + local * bs;
    } else {
      block_expert[b] = -1;
      block_start[b] = offsets[E];
    }
  }
}

// ---------------------------------------------------------------------------
// Row kernels.
// ---------------------------------------------------------------------------

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }

__device__ __forceinline__ void from_acc(float a, float& o) { o = a; }
__device__ __forceinline__ void from_acc(float a, __half& o) { o = __float2half_rn(a); }
__device__ __forceinline__ void from_acc(float a, __nv_bfloat16& o) { o = __float2bfloat16_rn(a); }
__device__ __forceinline__ void from_acc(double a, double& o) { o = a; }

// Rounded product, never contracted into an FMA with the following add (the
// CPU op and the reference round each term before summing).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

/// VEC consecutive elements, loaded / stored as one aligned access.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

/// Rows per block and threads per row for rows of `nvec` vectors.
inline dim3 row_block(int64_t nvec) {
  int bx = 1;
  while (bx < nvec && bx < kThreads) bx *= 2;
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(kThreads / bx));
}

/// out[s] = x[permutation[s] / k], rows of nvec words of type V.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    permute_kernel(const V* __restrict__ x, const int64_t* __restrict__ permutation, int64_t S,
                   int64_t k, int64_t nvec, V* __restrict__ out) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; s < S;
       s += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const V* __restrict__ src = x + (permutation[s] / k) * nvec;
    V* __restrict__ dst = out + s * nvec;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) dst[v] = src[v];
  }
}

/// out[t] = sum_j w[t, j] * y[inverse[t * k + j]] (w = 1 when weights is null),
/// in acc, j ascending. nvec = D / VEC.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    unpermute_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ inverse,
                     const acc_t<scalar_t>* __restrict__ weights, int64_t T, int64_t k,
                     int64_t nvec, scalar_t* __restrict__ out) {
  using Acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const P* __restrict__ Y = reinterpret_cast<const P*>(y);
  P* __restrict__ O = reinterpret_cast<P*>(out);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      Acc acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = Acc(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t f = t * k + j;
        const P p = Y[inverse[f] * nvec + v];
        if (weights != nullptr) {
          const Acc w = weights[f];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] = acc[i] + mul_rn(w, to_acc(p.v[i]));
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] = acc[i] + to_acc(p.v[i]);
        }
      }
      P o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) from_acc(acc[i], o.v[i]);
      O[t * nvec + v] = o;
    }
  }
}

/// grad_y[s] = w[p] * grad_out[p / k], p = permutation[s]. nvec = D / VEC.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    unpermute_bwd_rows_kernel(const scalar_t* __restrict__ grad_out,
                              const int64_t* __restrict__ permutation,
                              const acc_t<scalar_t>* __restrict__ weights, int64_t S, int64_t k,
                              int64_t nvec, scalar_t* __restrict__ grad_y) {
  using Acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const P* __restrict__ G = reinterpret_cast<const P*>(grad_out);
  P* __restrict__ GY = reinterpret_cast<P*>(grad_y);
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; s < S;
       s += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t p = permutation[s];
    const Acc w = weights[p];
    const P* __restrict__ src = G + (p / k) * nvec;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const P a = src[v];
      P o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) from_acc(mul_rn(w, to_acc(a.v[i])), o.v[i]);
      GY[s * nvec + v] = o;
    }
  }
}

/// grad_w[f] = <grad_out[f / k], y[inverse[f]]>, one warp per f (1-D block of
/// kThreads threads). Lane l sums vectors l, l + 32, ... in order, then a xor
/// butterfly: the same order on every run.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    unpermute_bwd_weights_kernel(const scalar_t* __restrict__ grad_out,
                                 const scalar_t* __restrict__ y,
                                 const int64_t* __restrict__ inverse, int64_t S, int64_t k,
                                 int64_t nvec, acc_t<scalar_t>* __restrict__ grad_w) {
  using Acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const P* __restrict__ G = reinterpret_cast<const P*>(grad_out);
  const P* __restrict__ Y = reinterpret_cast<const P*>(y);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = blockDim.x / kWarpSize;
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarpSize; f < S;
       f += static_cast<int64_t>(gridDim.x) * warps) {  // warp-uniform
    const P* __restrict__ a = G + (f / k) * nvec;
    const P* __restrict__ b = Y + inverse[f] * nvec;
    Acc acc = Acc(0);
    for (int64_t v = lane; v < nvec; v += kWarpSize) {
      const P pa = a[v];
      const P pb = b[v];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc += to_acc(pa.v[i]) * to_acc(pb.v[i]);
    }
    acc = warp_sum(acc);
    if (lane == 0) grad_w[f] = acc;
  }
}

/// True when every pointer is aligned to `bytes`.
inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

/// Calls f(std::integral_constant<int, VEC>{}) with VEC = 16 / sizeof(scalar_t)
/// when D is a multiple of it and all pointers are 16-byte aligned, else 1.
template <typename scalar_t, typename F>
void dispatch_vec(int64_t D, const void* p0, const void* p1, const void* p2, F&& f) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
  if (D % kVec == 0 && aligned(p0, 16) && aligned(p1, 16) && aligned(p2, 16)) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

template <typename V>
cudaError_t launch_permute_words(const void* x, int64_t row_bytes, const int64_t* permutation,
                                 int64_t S, int64_t k, void* out, cudaStream_t stream) {
  const int64_t nvec = row_bytes / static_cast<int64_t>(sizeof(V));
  const dim3 block = row_block(nvec);
  permute_kernel<V><<<grid_for(S, block.y), block, 0, stream>>>(
      static_cast<const V*>(x), permutation, S, k, nvec, static_cast<V*>(out));
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------
// Launchers (declared in dispatch_binding.cpp).
// ---------------------------------------------------------------------------

/// Number of int64 elements of scratch memory launch_moe_align needs for S
/// assignments and E experts (per-chunk bucket counts and scan partials).
int64_t moe_align_workspace_elems(int64_t num_assignments, int64_t num_experts) {
  if (num_assignments <= 0) return 0;
  const AlignPlan p = align_plan(num_assignments, num_experts);
  return p.scan_elems + p.scan_tiles + num_experts;
}

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
                             cudaStream_t stream) {
  const int64_t S = num_assignments;
  const int64_t E64 = num_experts;
  const int E = static_cast<int>(num_experts);
  const int64_t bs = block_size;
  if (S <= 0) return cudaSuccess;
  const AlignPlan plan = align_plan(S, E64);
  int64_t* start = workspace;                         // [(E + 1) * nchunks]
  int64_t* tile_sums = start + plan.scan_elems;       // [scan_tiles]
  int64_t* blk = tile_sums + plan.scan_tiles;         // [E]
  const unsigned chunks = static_cast<unsigned>(plan.nchunks);
  cudaError_t err;

  // 1. Per-chunk histograms.
  const bool hist_shared = E64 + 1 <= kHistSharedBuckets && plan.chunk <= INT32_MAX;
  if (hist_shared) {
    align_histogram_kernel<true><<<chunks, kHistThreads, (E64 + 1) * sizeof(int), stream>>>(
        indices, S, E, plan.chunk, plan.nchunks, start);
  } else {
    err = cudaMemsetAsync(start, 0, sizeof(int64_t) * plan.scan_elems, stream);
    if (err != cudaSuccess) return err;
    align_histogram_kernel<false><<<chunks, kHistThreads, 0, stream>>>(
        indices, S, E, plan.chunk, plan.nchunks, start);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // 2. First slot of every (bucket, chunk).
  err = exclusive_scan(start, plan.scan_elems, tile_sums, stream);
  if (err != cudaSuccess) return err;

  // 3. offsets, counts, row blocks per expert.
  align_offsets_kernel<<<grid_for(E64 + 1, kThreads), kThreads, 0, stream>>>(
      start, E, plan.nchunks, bs, counts, offsets, blk);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // 4. Stable scatter (consumes `start` in the global-cursor variant).
  if (E64 + 1 <= kScatterSharedBuckets) {
    align_scatter_kernel<true><<<chunks, kWarpSize, (E64 + 1) * sizeof(int64_t), stream>>>(
        indices, S, E, plan.chunk, plan.nchunks, start, permutation, inverse);
  } else {
    align_scatter_kernel<false><<<chunks, kWarpSize, 0, stream>>>(
        indices, S, E, plan.chunk, plan.nchunks, start, permutation, inverse);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // 5. Row-block table.
  // tile_sums is free again and large enough: scan_tiles >= ceil((E + 1) / kScanTile).
  err = exclusive_scan(blk, E64, tile_sums, stream);
  if (err != cudaSuccess) return err;
  const int64_t nb = ceil_div(S, bs) + E64;
  align_blocks_kernel<<<grid_for(nb, kThreads), kThreads, 0, stream>>>(
      blk, counts, offsets, E, bs, nb, block_expert, block_start);
  return cudaGetLastError();
}

/// x [T, row_bytes] (raw bytes, any dtype) -> out [S, row_bytes]:
/// out[s] = x[permutation[s] / k]. Copies 16-byte words when row_bytes and
/// both base pointers allow it, else the widest of 8, 4, 2, 1 bytes that does.
cudaError_t launch_moe_permute(const void* x, int64_t row_bytes, const int64_t* permutation,
                               int64_t num_assignments, int64_t top_k, void* out,
                               cudaStream_t stream) {
  const int64_t S = num_assignments;
  if (S <= 0 || row_bytes <= 0) return cudaSuccess;
  const uintptr_t bits = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out) |
                         static_cast<uintptr_t>(row_bytes);
  if (bits % 16 == 0) return launch_permute_words<uint4>(x, row_bytes, permutation, S, top_k, out, stream);
  if (bits % 8 == 0) return launch_permute_words<uint2>(x, row_bytes, permutation, S, top_k, out, stream);
  if (bits % 4 == 0) return launch_permute_words<uint32_t>(x, row_bytes, permutation, S, top_k, out, stream);
  if (bits % 2 == 0) return launch_permute_words<uint16_t>(x, row_bytes, permutation, S, top_k, out, stream);
  return launch_permute_words<uint8_t>(x, row_bytes, permutation, S, top_k, out, stream);
}

/// y_sorted [S, D] (scalar_t), inverse [S], weights [T, k] (acc, or nullptr
/// for all ones) -> out [T, D] (scalar_t):
/// out[t] = sum_{j = 0..k-1} w[t, j] * y_sorted[inverse[t * k + j]], accumulated
/// in acc in the order j = 0..k-1 (each term rounded, then added: no FMA), no
/// atomics.
template <typename scalar_t>
cudaError_t launch_moe_unpermute(const scalar_t* y_sorted, const int64_t* inverse,
                                 const acc_t<scalar_t>* weights, int64_t num_tokens,
                                 int64_t top_k, int64_t dim, scalar_t* out,
                                 cudaStream_t stream) {
  const int64_t T = num_tokens;
  if (T <= 0 || dim <= 0) return cudaSuccess;
  dispatch_vec<scalar_t>(dim, y_sorted, out, out, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const int64_t nvec = dim / VEC;
    const dim3 block = row_block(nvec);
    unpermute_kernel<scalar_t, VEC><<<grid_for(T, block.y), block, 0, stream>>>(
        y_sorted, inverse, weights, T, top_k, nvec, out);
  });
  return cudaGetLastError();
}

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
                                     acc_t<scalar_t>* grad_weights, cudaStream_t stream) {
  const int64_t S = num_tokens * top_k;
  if (S <= 0) return cudaSuccess;
  if (dim > 0) {
    dispatch_vec<scalar_t>(dim, grad_out, grad_y_sorted, grad_y_sorted, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int64_t nvec = dim / VEC;
      const dim3 block = row_block(nvec);
      unpermute_bwd_rows_kernel<scalar_t, VEC><<<grid_for(S, block.y), block, 0, stream>>>(
          grad_out, permutation, weights, S, top_k, nvec, grad_y_sorted);
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // Runs for dim == 0 as well: grad_weights is then all zeros.
  dispatch_vec<scalar_t>(dim, grad_out, y_sorted, y_sorted, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const int64_t nvec = dim / VEC;
    unpermute_bwd_weights_kernel<scalar_t, VEC>
        <<<grid_for(S, kThreads / kWarpSize), kThreads, 0, stream>>>(
            grad_out, y_sorted, inverse, S, top_k, nvec, grad_weights);
  });
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// Explicit instantiations for the four supported data types.
// ---------------------------------------------------------------------------
#define MARS_INSTANTIATE_DISPATCH(S)                                                          \
  template cudaError_t launch_moe_unpermute<S>(const S*, const int64_t*, const acc_t<S>*,      \
                                               int64_t, int64_t, int64_t, S*, cudaStream_t);   \
  template cudaError_t launch_moe_unpermute_bwd<S>(const S*, const S*, const int64_t*,         \
                                                   const int64_t*, const acc_t<S>*, int64_t,   \
                                                   int64_t, int64_t, S*, acc_t<S>*,            \
                                                   cudaStream_t);

MARS_INSTANTIATE_DISPATCH(float)
MARS_INSTANTIATE_DISPATCH(__half)
MARS_INSTANTIATE_DISPATCH(__nv_bfloat16)
MARS_INSTANTIATE_DISPATCH(double)

#undef MARS_INSTANTIATE_DISPATCH

}  // namespace cuda
}  // namespace mars_kernels
