// CUDA kernels of the dispatch ops (schemas in mars_kernels/ops/dispatch.py):
// moe_align, moe_permute, moe_unpermute, moe_unpermute_bwd.
//
// This file only validates arguments, allocates outputs with torch and calls
// the plain launchers of dispatch.cu (declared below; contracts there) on the
// current CUDA stream of the input's device. It is compiled by the host
// compiler and built only when torch has CUDA. Nothing here synchronises with
// the host: every output size follows from the input shapes.
//
// Argument policy: tensors must live on one CUDA device and have the
// documented dtype and shape; they are made contiguous here (a no-op for the
// usual contiguous inputs; autograd may hand over strided gradients).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "binding_utils.h"
#include "launcher.h"

namespace mars_kernels {
namespace cuda {

// The launchers of dispatch.cu.
int64_t moe_align_workspace_elems(int64_t num_assignments, int64_t num_experts);
cudaError_t launch_moe_align(const int64_t* indices, int64_t num_assignments, int64_t num_experts,
                             int64_t block_size, int64_t* counts, int64_t* offsets, int64_t* permutation,
                             int64_t* inverse, int64_t* block_expert, int64_t* block_start, int64_t* workspace,
                             cudaStream_t stream);
cudaError_t launch_moe_permute(const void* x, int64_t row_bytes, const int64_t* permutation,
                               int64_t num_assignments, int64_t top_k, void* out, cudaStream_t stream);
template <typename scalar_t>
cudaError_t launch_moe_unpermute(const scalar_t* y_sorted, const int64_t* inverse, const acc_t<scalar_t>* weights,
                                 int64_t num_tokens, int64_t top_k, int64_t dim, scalar_t* out,
                                 cudaStream_t stream);
template <typename scalar_t>
cudaError_t launch_moe_unpermute_bwd(const scalar_t* grad_out, const scalar_t* y_sorted,
                                     const int64_t* permutation, const int64_t* inverse,
                                     const acc_t<scalar_t>* weights, int64_t num_tokens, int64_t top_k,
                                     int64_t dim, scalar_t* grad_y_sorted, acc_t<scalar_t>* grad_weights,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace mars_kernels

namespace {

using at::Tensor;
namespace mk = mars_kernels::cuda;

bool is_float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble;
}

/// The primary tensor of an op: defined, on a CUDA device, `dim`-D.
void check_primary(const Tensor& t, const char* op, const char* name, int64_t dim,
                   const char* layout) {
  TORCH_CHECK(t.defined(), "mars_kernels.", op, ": `", name, "` is undefined");
  TORCH_CHECK(t.is_cuda(), "mars_kernels.", op, ": expected `", name,
              "` on a CUDA device, got ", describe(t));
  TORCH_CHECK(t.dim() == dim, "mars_kernels.", op, ": expected `", name, "` to be ", dim,
              "-D ", layout, ", got ", describe(t));
}

/// Floating data matrix [rows, D] (float16, bfloat16, float32 or float64).
void check_float_matrix(const Tensor& t, const char* op, const char* name, const char* layout) {
  check_primary(t, op, name, 2, layout);
  TORCH_CHECK(is_float_type(t.scalar_type()), "mars_kernels.", op, ": expected `", name,
              "` of dtype float16, bfloat16, float32 or float64, got ", describe(t));
}

/// Any other tensor argument: exact dtype, shape and device; returned contiguous.
Tensor arg(const Tensor& t, const char* op, const char* name, const at::Device& device,
           at::ScalarType dtype, const std::vector<int64_t>& shape) {
  TORCH_CHECK(t.defined(), "mars_kernels.", op, ": `", name, "` is undefined");
  TORCH_CHECK(t.device() == device, "mars_kernels.", op, ": expected `", name,
              "` on device ", device, ", got ", describe(t));
  TORCH_CHECK(t.scalar_type() == dtype, "mars_kernels.", op, ": expected `", name,
              "` of dtype ", dtype, ", got ", describe(t));
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "mars_kernels.", op, ": expected `", name,
              "` of shape ", shape_str(shape), ", got ", describe(t));
  return t.contiguous();
}

void check_top_k(int64_t top_k, const char* op) {
  TORCH_CHECK(top_k >= 1 && top_k <= std::numeric_limits<int32_t>::max(), "mars_kernels.", op,
              ": expected 1 <= top_k <= ", std::numeric_limits<int32_t>::max(), ", got ", top_k);
}

// ---------------------------------------------------------------------------
// moe_align
// ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> moe_align_cuda(
    const Tensor& indices, int64_t num_experts, int64_t block_size) {
  constexpr const char* op = "moe_align";
  check_primary(indices, op, "indices", 2, "[T, k]");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "mars_kernels.", op,
              ": expected `indices` of dtype int64, got ", describe(indices));
  TORCH_CHECK(num_experts >= 1 && num_experts < kMaxExperts, "mars_kernels.", op,
              ": expected 1 <= num_experts < ", kMaxExperts, ", got ", num_experts);
  TORCH_CHECK(block_size >= 1, "mars_kernels.", op, ": expected block_size >= 1, got ",
              block_size);
  const c10::cuda::CUDAGuard guard(indices.device());
  const Tensor idx = indices.contiguous();
  const int64_t S = idx.numel();
  const int64_t E = num_experts;
  const int64_t nb = S / block_size + (S % block_size != 0 ? 1 : 0) + E;
  const auto opts = idx.options().dtype(at::kLong);
  if (S == 0) {
    // No assignments: nothing to sort; every row block is unused.
    return {at::zeros({E}, opts),        at::zeros({E + 1}, opts),
            at::empty({0}, opts),        at::empty({0}, opts),
            at::full({nb}, -1, opts),    at::zeros({nb}, opts)};
  }
  Tensor counts = at::empty({E}, opts);
  Tensor offsets = at::empty({E + 1}, opts);
  Tensor permutation = at::empty({S}, opts);
  Tensor inverse = at::empty({S}, opts);
  Tensor block_expert = at::empty({nb}, opts);
  Tensor block_start = at::empty({nb}, opts);
  Tensor workspace = at::empty({mk::moe_align_workspace_elems(S, E)}, opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_launch(mk::launch_moe_align(cptr<int64_t>(idx), S, E, block_size, mptr<int64_t>(counts),
                                    mptr<int64_t>(offsets), mptr<int64_t>(permutation),
                                    mptr<int64_t>(inverse), mptr<int64_t>(block_expert),
                                    mptr<int64_t>(block_start), mptr<int64_t>(workspace),
                                    stream),
               op);
  return {counts, offsets, permutation, inverse, block_expert, block_start};
}

// ---------------------------------------------------------------------------
// permute / unpermute
// ---------------------------------------------------------------------------

// The metadata is not bounds-checked here (that would cost a pass and a
// device-to-host sync per call); the CPU kernels check it.
Tensor moe_permute_cuda(const Tensor& x, const Tensor& permutation, const Tensor& inverse, int64_t top_k) {
  constexpr const char* op = "moe_permute";
  // Rows are copied as raw bytes, so any dtype works (as on the CPU).
  check_primary(x, op, "x", 2, "[T, D]");
  check_top_k(top_k, op);
  const int64_t T = x.size(0);
  const int64_t D = x.size(1);
  const int64_t S = T * top_k;
  const auto dev = x.device();
  const c10::cuda::CUDAGuard guard(dev);
  const Tensor perm = arg(permutation, op, "permutation", dev, at::kLong, {S});
  arg(inverse, op, "inverse", dev, at::kLong, {S});
  const Tensor xc = x.contiguous();
  Tensor out = at::empty({S, D}, xc.options());
  if (S == 0 || D == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_launch(mk::launch_moe_permute(xc.const_data_ptr(), D * static_cast<int64_t>(xc.element_size()),
                                      cptr<int64_t>(perm), S, top_k, out.mutable_data_ptr(),
                                      stream),
               op);
  return out;
}

Tensor moe_unpermute_cuda(const Tensor& y_sorted, const Tensor& permutation, const Tensor& inverse,
                          const c10::optional<Tensor>& weights, int64_t top_k) {
  constexpr const char* op = "moe_unpermute";
  check_float_matrix(y_sorted, op, "y_sorted", "[S, D]");
  check_top_k(top_k, op);
  const int64_t S = y_sorted.size(0);
  const int64_t D = y_sorted.size(1);
  TORCH_CHECK(S % top_k == 0, "mars_kernels.", op, ": `y_sorted` must have S = T * top_k rows (top_k = ",
              top_k, "), got ", describe(y_sorted));
  const int64_t T = S / top_k;
  const auto dev = y_sorted.device();
  const auto acc = acc_dtype(y_sorted.scalar_type());
  const c10::cuda::CUDAGuard guard(dev);
  arg(permutation, op, "permutation", dev, at::kLong, {S});
  const Tensor inv = arg(inverse, op, "inverse", dev, at::kLong, {S});
  Tensor w;
  if (weights.has_value() && weights->defined())
    w = arg(*weights, op, "weights", dev, acc, {T, top_k});
  const Tensor y = y_sorted.contiguous();
  Tensor out = at::empty({T, D}, y.options());
  if (T == 0 || D == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_type(y.scalar_type(), op, "y_sorted", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using A = mk::acc_t<scalar_t>;
    check_launch(mk::launch_moe_unpermute<scalar_t>(cptr<scalar_t>(y), cptr<int64_t>(inv),
                                                    w.defined() ? cptr<A>(w) : nullptr, T,
                                                    top_k, D, mptr<scalar_t>(out), stream),
                 op);
  });
  return out;
}

std::tuple<Tensor, Tensor> moe_unpermute_bwd_cuda(const Tensor& grad_out, const Tensor& y_sorted,
                                                  const Tensor& permutation,
                                                  const Tensor& inverse, const Tensor& weights) {
  constexpr const char* op = "moe_unpermute_bwd";
  check_float_matrix(y_sorted, op, "y_sorted", "[S, D]");
  TORCH_CHECK(weights.defined() && weights.dim() == 2, "mars_kernels.", op,
              ": expected `weights` to be 2-D [T, k]",
              weights.defined() ? ", got " + describe(weights) : std::string());
  const int64_t T = weights.size(0);
  const int64_t k = weights.size(1);
  check_top_k(k, op);
  const int64_t S = y_sorted.size(0);
  const int64_t D = y_sorted.size(1);
  TORCH_CHECK(S == T * k, "mars_kernels.", op, ": `y_sorted` must have S = T * k = ", T * k,
              " rows for `weights` of shape [", T, ", ", k, "], got ", describe(y_sorted));
  const auto dev = y_sorted.device();
  const auto st = y_sorted.scalar_type();
  const auto acc = acc_dtype(st);
  const c10::cuda::CUDAGuard guard(dev);
  const Tensor g = arg(grad_out, op, "grad_out", dev, st, {T, D});
  const Tensor perm = arg(permutation, op, "permutation", dev, at::kLong, {S});
  const Tensor inv = arg(inverse, op, "inverse", dev, at::kLong, {S});
  const Tensor w = arg(weights, op, "weights", dev, acc, {T, k});
  const Tensor y = y_sorted.contiguous();
  Tensor grad_y = at::empty({S, D}, y.options());
  Tensor grad_w = at::empty({T, k}, w.options());
  if (S == 0) return {grad_y, grad_w};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_type(st, op, "y_sorted", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using A = mk::acc_t<scalar_t>;
    check_launch(mk::launch_moe_unpermute_bwd<scalar_t>(
                     cptr<scalar_t>(g), cptr<scalar_t>(y), cptr<int64_t>(perm),
                     cptr<int64_t>(inv), cptr<A>(w), T, k, D, mptr<scalar_t>(grad_y),
                     mptr<A>(grad_w), stream),
                 op);
  });
  return {grad_y, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CUDA, m) {
  m.impl("moe_align", &moe_align_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
  m.impl("moe_unpermute_bwd", &moe_unpermute_bwd_cuda);
}
