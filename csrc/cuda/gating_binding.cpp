// CUDA kernels of the top-k gating and router statistics ops (schemas in
// mars_kernels/ops/gating.py): topk_gating_fwd/bwd, router_stats_fwd/bwd, and
// cuda_kernels_run_on (schema in mars_kernels/backend.py).
//
// This file only validates arguments, allocates outputs with torch and calls
// the plain launchers of gating.cu (declared below; contracts there) on the
// current CUDA stream of the input's device. It is compiled by the host
// compiler and built only when torch has CUDA.
//
// Argument policy: the primary inputs (logits, noise, saved forward outputs)
// must be contiguous tensors of the documented dtype on one CUDA device;
// incoming gradients are made contiguous here (autograd may hand over
// expanded or strided gradients) but must still have the documented dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "binding_utils.h"
#include "launcher.h"

namespace mars_kernels {
namespace cuda {

// The launchers of gating.cu.
template <typename scalar_t>
cudaError_t launch_topk_gating_fwd(const scalar_t* logits, int64_t num_tokens, int64_t num_experts, int64_t k,
                                   bool softmax_first, bool renormalize, acc_t<scalar_t>* weights,
                                   int64_t* indices, acc_t<scalar_t>* lse, cudaStream_t stream);
template <typename scalar_t>
cudaError_t launch_topk_gating_bwd(const acc_t<scalar_t>* grad_weights, const scalar_t* logits,
                                   const acc_t<scalar_t>* weights, const int64_t* indices,
                                   const acc_t<scalar_t>* lse, int64_t num_tokens, int64_t num_experts, int64_t k,
                                   bool softmax_first, bool renormalize, scalar_t* grad_logits,
                                   cudaStream_t stream);
int64_t router_stats_fwd_workspace_elems(int64_t num_tokens, int64_t num_experts);
template <typename scalar_t>
cudaError_t launch_router_stats_fwd(const scalar_t* logits, int64_t num_tokens, int64_t num_experts,
                                    acc_t<scalar_t>* lse, acc_t<scalar_t>* prob_sum, acc_t<scalar_t>* workspace,
                                    cudaStream_t stream);
template <typename scalar_t>
cudaError_t launch_router_stats_bwd(const acc_t<scalar_t>* grad_lse, const acc_t<scalar_t>* grad_prob_sum,
                                    const scalar_t* logits, const acc_t<scalar_t>* lse, int64_t num_tokens,
                                    int64_t num_experts, scalar_t* grad_logits, cudaStream_t stream);
cudaError_t kernel_image_status();

}  // namespace cuda
}  // namespace mars_kernels

namespace {

using at::Tensor;
namespace mk = mars_kernels::cuda;

// ---------------------------------------------------------------------------
// top-k gating
// ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> topk_gating_fwd_cuda(const Tensor& logits, int64_t k,
                                                        bool softmax_first, bool renormalize) {
  constexpr const char* op = "topk_gating_fwd";
  check_logits(logits, op, "logits");
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  check_k(k, E, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = acc_dtype(logits.scalar_type());
  Tensor weights = at::empty({T, k}, logits.options().dtype(acc));
  Tensor indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  Tensor lse = at::empty({T}, logits.options().dtype(acc));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_logits_type(logits.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using A = mk::acc_t<scalar_t>;
    check_launch(mk::launch_topk_gating_fwd<scalar_t>(
                     cptr<scalar_t>(logits), T, E, k, softmax_first, renormalize,
                     mptr<A>(weights), mptr<int64_t>(indices), mptr<A>(lse), stream),
                 op);
  });
  return {weights, indices, lse};
}

Tensor topk_gating_bwd_cuda(const Tensor& grad_weights, const Tensor& logits,
                            const Tensor& weights, const Tensor& indices, const Tensor& lse,
                            bool softmax_first, bool renormalize) {
  constexpr const char* op = "topk_gating_bwd";
  check_logits(logits, op, "logits");
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  const int64_t k = top_k_of(indices, E, op);
  const auto dev = logits.device();
  const auto acc = acc_dtype(logits.scalar_type());
  check_arg(indices, op, "indices", dev, at::kLong, {T, k});
  check_arg(weights, op, "weights", dev, acc, {T, k});
  check_arg(lse, op, "lse", dev, acc, {T});
  const Tensor g = grad_arg(grad_weights, op, "grad_weights", dev, acc, {T, k});
  const c10::cuda::CUDAGuard guard(dev);
  Tensor grad_logits = at::empty({T, E}, logits.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_logits_type(logits.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using A = mk::acc_t<scalar_t>;
    check_launch(mk::launch_topk_gating_bwd<scalar_t>(
                     cptr<A>(g), cptr<scalar_t>(logits), cptr<A>(weights),
                     cptr<int64_t>(indices), cptr<A>(lse), T, E, k, softmax_first,
                     renormalize, mptr<scalar_t>(grad_logits), stream),
                 op);
  });
  return grad_logits;
}

// ---------------------------------------------------------------------------
// router statistics
// ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor> router_stats_fwd_cuda(const Tensor& logits) {
  constexpr const char* op = "router_stats_fwd";
  check_logits(logits, op, "logits");
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc_opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  Tensor lse = at::empty({T}, acc_opts);
  Tensor prob_sum = at::empty({E}, acc_opts);
  Tensor workspace =
      at::empty({T > 0 ? mk::router_stats_fwd_workspace_elems(T, E) : 0}, acc_opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_logits_type(logits.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using A = mk::acc_t<scalar_t>;
    check_launch(mk::launch_router_stats_fwd<scalar_t>(cptr<scalar_t>(logits), T, E,
                                                       mptr<A>(lse), mptr<A>(prob_sum),
                                                       mptr<A>(workspace), stream),
                 op);
  });
  return {lse, prob_sum};
}

Tensor router_stats_bwd_cuda(const Tensor& grad_lse, const Tensor& grad_prob_sum,
                             const Tensor& logits, const Tensor& lse) {
  constexpr const char* op = "router_stats_bwd";
  check_logits(logits, op, "logits");
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  const auto dev = logits.device();
  const auto acc = acc_dtype(logits.scalar_type());
  check_arg(lse, op, "lse", dev, acc, {T});
  const Tensor gl = grad_arg(grad_lse, op, "grad_lse", dev, acc, {T});
  const Tensor gp = grad_arg(grad_prob_sum, op, "grad_prob_sum", dev, acc, {E});
  const c10::cuda::CUDAGuard guard(dev);
  Tensor grad_logits = at::empty({T, E}, logits.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_logits_type(logits.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using A = mk::acc_t<scalar_t>;
    check_launch(mk::launch_router_stats_bwd<scalar_t>(cptr<A>(gl), cptr<A>(gp),
                                                       cptr<scalar_t>(logits), cptr<A>(lse), T,
                                                       E, mptr<scalar_t>(grad_logits), stream),
                 op);
  });
  return grad_logits;
}

// Whether the compiled CUDA kernels can run on GPU `device` (mars_kernels.backend
// falls back to Triton where they cannot, e.g. a GPU newer than the build's PTX).
bool cuda_kernels_run_on(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return mk::kernel_image_status() == cudaSuccess;
}

}  // namespace

// Not a tensor op (schema in mars_kernels/backend.py): with no tensor argument
// to dispatch on, the dispatcher runs the CompositeExplicitAutograd kernel. Only
// CUDA builds register it.
TORCH_LIBRARY_IMPL(mars_kernels, CompositeExplicitAutograd, m) {
  m.impl("cuda_kernels_run_on", &cuda_kernels_run_on);
}

TORCH_LIBRARY_IMPL(mars_kernels, CUDA, m) {
  m.impl("topk_gating_fwd", &topk_gating_fwd_cuda);
  m.impl("topk_gating_bwd", &topk_gating_bwd_cuda);
  m.impl("router_stats_fwd", &router_stats_fwd_cuda);
  m.impl("router_stats_bwd", &router_stats_bwd_cuda);
}
