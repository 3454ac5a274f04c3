// CUDA implementations of the MARS routing ops declared in csrc/ops.cpp:
// mars_routing_fwd / mars_routing_bwd.
//
// This file only validates arguments, allocates outputs with torch and calls
// the plain launchers of mars_routing.cu (declared in mars_routing.cuh) on the
// current CUDA stream of the logits' device. It is compiled by the host
// compiler and built only when torch has CUDA.
//
// Argument policy (as gating_binding.cpp): the primary inputs (logits, noise,
// saved forward outputs) must be contiguous tensors of the documented dtype on
// one CUDA device; incoming gradients are made contiguous here (autograd may
// hand over expanded or strided gradients) but must still have the documented
// dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "mars_routing.cuh"

namespace {

using at::Tensor;
namespace mk = mars_kernels::cuda;

// The backward grid uses one warp (of a 4-warp block) per token row.
constexpr int64_t kMaxTokens = 4 * static_cast<int64_t>(std::numeric_limits<int32_t>::max());
// Expert ids are int32 inside the kernels (selection keys hold 32 bits of index).
constexpr int64_t kMaxExperts = int64_t{1} << 30;

template <typename T>
struct TypeTag {
  using type = T;
};

/// Calls f(TypeTag<scalar_t>{}) with the CUDA element type of `st`.
template <typename F>
void dispatch_logits_type(at::ScalarType st, const char* op, F&& f) {
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
      TORCH_CHECK(false, "mars_kernels.", op, ": unsupported logits dtype ", st,
                  " (expected float16, bfloat16, float32 or float64)");
  }
}

/// Routing math / output dtype for logits of dtype st.
at::ScalarType acc_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

std::string describe(const Tensor& t) {
  std::ostringstream os;
  os << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device()
     << (t.is_contiguous() ? "" : ", non-contiguous");
  return os.str();
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << at::IntArrayRef(shape);
  return os.str();
}

/// logits-like input: 2-D [T, E], contiguous, floating dtype, on a CUDA device.
void check_logits(const Tensor& t, const char* op, const char* name) {
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

/// Any other tensor argument: exact dtype, shape, device; contiguous.
void check_arg(const Tensor& t, const char* op, const char* name, const at::Device& device,
               at::ScalarType dtype, const std::vector<int64_t>& shape) {
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
Tensor grad_arg(const Tensor& t, const char* op, const char* name, const at::Device& device,
                at::ScalarType dtype, const std::vector<int64_t>& shape) {
  TORCH_CHECK(t.defined(), "mars_kernels.", op, ": `", name, "` is undefined");
  Tensor c = t.contiguous();
  check_arg(c, op, name, device, dtype, shape);
  return c;
}

void check_k(int64_t k, int64_t E, const char* op) {
  TORCH_CHECK(k >= 1 && k <= E, "mars_kernels.", op, ": expected 1 <= k <= E = ", E,
              ", got k = ", k);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "mars_kernels.", op,
              ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

template <typename T>
const T* cptr(const Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mars_routing_fwd_cuda(
    const Tensor& residual_logits, const Tensor& feature_logits, const Tensor& noise, int64_t k,
    double sigma_0, double sigma_const, double sigma_max) {
  constexpr const char* op = "mars_routing_fwd";
  check_logits(residual_logits, op, "residual_logits");
  const int64_t T = residual_logits.size(0);
  const int64_t E = residual_logits.size(1);
  check_k(k, E, op);
  const auto dev = residual_logits.device();
  const auto acc = acc_dtype(residual_logits.scalar_type());
  check_arg(feature_logits, op, "feature_logits", dev, residual_logits.scalar_type(), {T, E});
  check_arg(noise, op, "noise", dev, acc, {T, E});
  const c10::cuda::CUDAGuard guard(dev);
  const auto acc_opts = residual_logits.options().dtype(acc);
  Tensor weights = at::empty({T, k}, acc_opts);
  Tensor indices = at::empty({T, k}, residual_logits.options().dtype(at::kLong));
  Tensor imitation = at::empty({T}, acc_opts);
  Tensor divergence = at::empty({T}, acc_opts);
  Tensor prob_sum = at::empty({E}, acc_opts);
  Tensor lse_r = at::empty({T}, acc_opts);
  Tensor lse_f = at::empty({T}, acc_opts);
  Tensor workspace =
      at::empty({T > 0 ? mk::mars_routing_fwd_workspace_elems(T, E) : 0}, acc_opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_logits_type(residual_logits.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using A = mk::acc_t<scalar_t>;
    check_launch(mk::launch_mars_routing_fwd<scalar_t>(
                     cptr<scalar_t>(residual_logits), cptr<scalar_t>(feature_logits),
                     cptr<A>(noise), T, E, k, sigma_0, sigma_const, sigma_max,
                     mptr<A>(weights), mptr<int64_t>(indices), mptr<A>(imitation),
                     mptr<A>(divergence), mptr<A>(prob_sum), mptr<A>(lse_r), mptr<A>(lse_f),
                     mptr<A>(workspace), stream),
                 op);
  });
  return {weights, indices, imitation, divergence, prob_sum, lse_r, lse_f};
}

std::tuple<Tensor, Tensor> mars_routing_bwd_cuda(
    const Tensor& grad_weights, const Tensor& grad_imitation, const Tensor& grad_prob_sum,
    const Tensor& residual_logits, const Tensor& feature_logits, const Tensor& weights,
    const Tensor& indices, const Tensor& lse_r, const Tensor& lse_f) {
  constexpr const char* op = "mars_routing_bwd";
  check_logits(residual_logits, op, "residual_logits");
  const int64_t T = residual_logits.size(0);
  const int64_t E = residual_logits.size(1);
  TORCH_CHECK(indices.defined() && indices.dim() == 2, "mars_kernels.", op,
              ": expected `indices` to be 2-D [T, k]",
              indices.defined() ? ", got " + describe(indices) : std::string());
  const int64_t k = indices.size(1);
  check_k(k, E, op);
  const auto dev = residual_logits.device();
  const auto acc = acc_dtype(residual_logits.scalar_type());
  check_arg(feature_logits, op, "feature_logits", dev, residual_logits.scalar_type(), {T, E});
  check_arg(weights, op, "weights", dev, acc, {T, k});
  check_arg(indices, op, "indices", dev, at::kLong, {T, k});
  check_arg(lse_r, op, "lse_r", dev, acc, {T});
  check_arg(lse_f, op, "lse_f", dev, acc, {T});
  const Tensor gw = grad_arg(grad_weights, op, "grad_weights", dev, acc, {T, k});
  const Tensor gi = grad_arg(grad_imitation, op, "grad_imitation", dev, acc, {T});
  const Tensor gp = grad_arg(grad_prob_sum, op, "grad_prob_sum", dev, acc, {E});
  const c10::cuda::CUDAGuard guard(dev);
  Tensor grad_residual = at::empty({T, E}, residual_logits.options());
  Tensor grad_feature = at::empty({T, E}, feature_logits.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_logits_type(residual_logits.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using A = mk::acc_t<scalar_t>;
    check_launch(mk::launch_mars_routing_bwd<scalar_t>(
                     cptr<A>(gw), cptr<A>(gi), cptr<A>(gp), cptr<scalar_t>(residual_logits),
                     cptr<scalar_t>(feature_logits), cptr<A>(weights), cptr<int64_t>(indices),
                     cptr<A>(lse_r), cptr<A>(lse_f), T, E, k, mptr<scalar_t>(grad_residual),
                     mptr<scalar_t>(grad_feature), stream),
                 op);
  });
  return {grad_residual, grad_feature};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CUDA, m) {
  m.impl("mars_routing_fwd", &mars_routing_fwd_cuda);
  m.impl("mars_routing_bwd", &mars_routing_bwd_cuda);
}
