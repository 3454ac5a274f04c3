// What every plain C++ launcher of the CUDA kernels shares: its conventions
// and the accumulation type in its signature.
//
// Each csrc/cuda/<op>.cu defines the launchers of its op (host functions that
// take raw device pointers and a stream); <op>_binding.cpp, compiled by the
// host compiler, declares the ones it calls, checks the torch arguments and
// registers the torch kernels. This header depends on the CUDA runtime only
// (no torch, no ATen), so both sides include it. tests/test_nvcc_compile.py
// checks that every launcher a binding declares is defined by a .cu file.
//
// Conventions shared by every launcher:
//   * T = number of tokens (rows), E = number of experts (columns), k = experts
//     chosen per token. Every [T, E] / [T, k] tensor is a dense row-major
//     (contiguous) device buffer; offsets are computed in int64.
//   * scalar_t is the element type of the data: float, __half, __nv_bfloat16
//     or double. acc_t<scalar_t> is the math / output type of the routing
//     quantities (and of the dispatch weights): float, or double for double.
//   * Selection order: descending value, ties to the lower expert index, NaN
//     ranked as +inf (so indices are always valid expert ids).
//   * Launchers are asynchronous on `stream`, never synchronise with the host,
//     launch nothing when there is nothing to compute (after zero-filling [E]
//     outputs that are sums over T), and return the first CUDA error of their
//     launches (cudaGetLastError()).
//   * Preconditions (checked by the binding, not here): 1 <= E <= 2^30,
//     1 <= k <= E, all pointers on the current device.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mars_kernels {
namespace cuda {

/// Math / output type of the routing quantities for data of type scalar_t.
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

}  // namespace cuda
}  // namespace mars_kernels
