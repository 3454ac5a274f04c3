// Argument checks and launch helpers shared by the torch bindings of the CUDA
// kernels (the csrc/cuda/*_binding.cpp files).
//
// Torch-side header (ATen, c10::cuda): included only by the *_binding.cpp
// files, never by the .cu kernels. Everything lives in an anonymous namespace
// (as it did in each binding) and is `inline`, so a binding that does not use
// a helper gets no unused-function warning. Error messages read
// "mars_kernels.<op>: ...".
#pragma once

#include <ATen/ATen.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

// Launch grids use one warp (of a 4-warp block) per token row.
constexpr int64_t kMaxTokens = 4 * static_cast<int64_t>(std::numeric_limits<int32_t>::max());
// Expert ids are int32 inside the kernels (selection keys hold 32 bits of index;
// the dispatch's dropped bucket E must fit as well); 2^30 leaves headroom for
// the lane-strided loop counters.
constexpr int64_t kMaxExperts = int64_t{1} << 30;

template <typename T>
struct TypeTag {
  using type = T;
};

/// Calls f(TypeTag<scalar_t>{}) with the CUDA element type of `st`, the dtype of
/// the argument `name` of `op`.
template <typename F>
void dispatch_float_type(at::ScalarType st, const char* op, const char* name, F&& f) {
  switch (st) {
    case at::kFloat:
      f(TypeTag<float>{});
      break;
    case at::kHalf:
      f(TypeTag<__half>{});
      break;
    case at::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      break;
    case at::kDouble:
      f(TypeTag<double>{});
      break;
    default:
      TORCH_CHECK(false, "mars_kernels.", op, ": unsupported `", name, "` dtype ", st,
                  " (expected float16, bfloat16, float32 or float64)");
  }
}

/// dispatch_float_type for the routing ops, whose float input is the logits.
template <typename F>
void dispatch_logits_type(at::ScalarType st, const char* op, F&& f) {
  dispatch_float_type(st, op, "logits", std::forward<F>(f));
}

/// Routing math / output dtype (and dtype of dispatch weights) for data of dtype st.
inline at::ScalarType acc_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device()
     << (t.is_contiguous() ? "" : ", non-contiguous");
  return os.str();
}

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << at::IntArrayRef(shape);
  return os.str();
}

/// logits-like input: 2-D [T, E], contiguous, floating dtype, on a CUDA device.
inline void check_logits(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "mars_kernels.", op, ": `", name, "` is undefined");
  TORCH_CHECK(t.is_cuda(), "mars_kernels.", op, ": expected `", name,
              "` on a CUDA device, got ", describe(t));
  TORCH_CHECK(t.dim() == 2, "mars_kernels.", op, ": expected `", name,
              "` to be 2-D [T, E], got ", describe(t));
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "mars_kernels.", op, ": expected `", name,
              "` of dtype float16, bfloat16, float32 or float64, got ", describe(t));
  TORCH_CHECK(t.is_contiguous(), "mars_kernels.", op, ": expected `", name,
              "` to be contiguous, got ", describe(t));
  TORCH_CHECK(t.size(1) >= 1 && t.size(1) <= kMaxExperts, "mars_kernels.", op,
              ": expected `", name, "` to have between 1 and ", kMaxExperts,
              " experts (columns), got ", describe(t));
  TORCH_CHECK(t.size(0) <= kMaxTokens, "mars_kernels.", op, ": `", name, "` has more than ",
              kMaxTokens, " tokens (rows): ", describe(t));
}

/// Any other tensor argument of a routing op: exact dtype, shape, device (the
/// logits' device); contiguous.
inline void check_arg(const at::Tensor& t, const char* op, const char* name,
                      const at::Device& device, at::ScalarType dtype,
                      const std::vector<int64_t>& shape) {
  TORCH_CHECK(t.defined(), "mars_kernels.", op, ": `", name, "` is undefined");
  TORCH_CHECK(t.device() == device, "mars_kernels.", op, ": expected `", name,
              "` on device ", device, " (the logits' device), got ", describe(t));
  TORCH_CHECK(t.scalar_type() == dtype, "mars_kernels.", op, ": expected `", name,
              "` of dtype ", dtype, ", got ", describe(t));
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "mars_kernels.", op, ": expected `", name,
              "` of shape ", shape_str(shape), ", got ", describe(t));
  TORCH_CHECK(t.is_contiguous(), "mars_kernels.", op, ": expected `", name,
              "` to be contiguous, got ", describe(t));
}

/// Gradient inputs: made contiguous, then checked like any other argument.
inline at::Tensor grad_arg(const at::Tensor& t, const char* op, const char* name,
                           const at::Device& device, at::ScalarType dtype,
                           const std::vector<int64_t>& shape) {
  TORCH_CHECK(t.defined(), "mars_kernels.", op, ": `", name, "` is undefined");
  at::Tensor c = t.contiguous();
  check_arg(c, op, name, device, dtype, shape);
  return c;
}

inline void check_k(int64_t k, int64_t E, const char* op) {
  TORCH_CHECK(k >= 1 && k <= E, "mars_kernels.", op, ": expected 1 <= k <= E = ", E,
              ", got k = ", k);
}

/// k of the saved selection `indices` [T, k] of a backward (2-D, 1 <= k <= E);
/// its dtype, shape and device are checked with the other arguments.
inline int64_t top_k_of(const at::Tensor& indices, int64_t E, const char* op) {
  TORCH_CHECK(indices.defined() && indices.dim() == 2, "mars_kernels.", op,
              ": expected `indices` to be 2-D [T, k]",
              indices.defined() ? ", got " + describe(indices) : std::string());
  const int64_t k = indices.size(1);
  check_k(k, E, op);
  return k;
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "mars_kernels.", op,
              ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

}  // namespace
