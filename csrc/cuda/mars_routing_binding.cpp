// CUDA kernels of the MARS routing ops (schemas in mars_kernels/ops/mars_routing.py):
// mars_routing_fwd / mars_routing_bwd.
//
// This file only validates arguments, allocates outputs with torch and calls
// the plain launchers of mars_routing.cu (declared below; contracts there) on
// the current CUDA stream of the logits' device. It is compiled by the host
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
#include <tuple>

#include "binding_utils.h"
#include "launcher.h"

namespace mars_kernels {
namespace cuda {

// The launchers of mars_routing.cu.
int64_t mars_routing_fwd_workspace_elems(int64_t num_tokens, int64_t num_experts);
template <typename scalar_t>
cudaError_t launch_mars_routing_fwd(const scalar_t* residual_logits, const scalar_t* feature_logits,
                                    const acc_t<scalar_t>* noise, int64_t num_tokens, int64_t num_experts, int64_t k,
                                    double sigma_0, double sigma_const, double sigma_max, acc_t<scalar_t>* weights,
                                    int64_t* indices, acc_t<scalar_t>* imitation, acc_t<scalar_t>* divergence,
                                    acc_t<scalar_t>* prob_sum, acc_t<scalar_t>* lse_r, acc_t<scalar_t>* lse_f,
                                    acc_t<scalar_t>* workspace, cudaStream_t stream);
template <typename scalar_t>
cudaError_t launch_mars_routing_bwd(const acc_t<scalar_t>* grad_weights, const acc_t<scalar_t>* grad_imitation,
                                    const acc_t<scalar_t>* grad_prob_sum, const scalar_t* residual_logits,
                                    const scalar_t* feature_logits, const acc_t<scalar_t>* weights,
                                    const int64_t* indices, const acc_t<scalar_t>* lse_r,
                                    const acc_t<scalar_t>* lse_f, int64_t num_tokens, int64_t num_experts, int64_t k,
                                    scalar_t* grad_residual, scalar_t* grad_feature, cudaStream_t stream);

}  // namespace cuda
}  // namespace mars_kernels

namespace {

using at::Tensor;
namespace mk = mars_kernels::cuda;

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
  const int64_t k = top_k_of(indices, E, op);
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
