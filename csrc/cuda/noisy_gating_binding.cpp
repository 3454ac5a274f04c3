// CUDA kernels of the noisy top-k gating ops (schemas in
// mars_kernels/ops/noisy_gating.py): noisy_topk_gating_fwd/bwd.
//
// This file only validates arguments, allocates outputs with torch and calls
// the plain launchers of noisy_gating.cu (declared below; contracts there) on
// the current CUDA stream of the input's device. It is compiled by the host
// compiler and built only when torch has CUDA. Argument policy as
// gating_binding.cpp.
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

// The launchers of noisy_gating.cu.
int64_t noisy_topk_gating_fwd_workspace_elems(int64_t num_tokens, int64_t num_experts);
template <typename scalar_t>
cudaError_t launch_noisy_topk_gating_fwd(const scalar_t* clean_logits, const scalar_t* noise_logits,
                                         const acc_t<scalar_t>* noise, int64_t num_tokens, int64_t num_experts,
                                         int64_t k, double noise_eps, acc_t<scalar_t>* weights, int64_t* indices,
                                         int64_t* threshold_index, acc_t<scalar_t>* importance,
                                         acc_t<scalar_t>* load, acc_t<scalar_t>* workspace, cudaStream_t stream);
template <typename scalar_t>
cudaError_t launch_noisy_topk_gating_bwd(const acc_t<scalar_t>* grad_weights, const acc_t<scalar_t>* grad_importance,
                                         const acc_t<scalar_t>* grad_load, const scalar_t* clean_logits,
                                         const scalar_t* noise_logits, const acc_t<scalar_t>* noise,
                                         const acc_t<scalar_t>* weights, const int64_t* indices,
                                         const int64_t* threshold_index, int64_t num_tokens, int64_t num_experts,
                                         int64_t k, double noise_eps, scalar_t* grad_clean,
                                         scalar_t* grad_noise_logits, cudaStream_t stream);

}  // namespace cuda
}  // namespace mars_kernels

namespace {

using at::Tensor;
namespace mk = mars_kernels::cuda;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> noisy_topk_gating_fwd_cuda(
    const Tensor& clean_logits, const Tensor& noise_logits, const Tensor& noise, int64_t k,
    double noise_eps) {
  constexpr const char* op = "noisy_topk_gating_fwd";
  check_logits(clean_logits, op, "clean_logits");
  const int64_t T = clean_logits.size(0);
  const int64_t E = clean_logits.size(1);
  check_k(k, E, op);
  const auto dev = clean_logits.device();
  const auto acc = acc_dtype(clean_logits.scalar_type());
  check_arg(noise_logits, op, "noise_logits", dev, clean_logits.scalar_type(), {T, E});
  check_arg(noise, op, "noise", dev, acc, {T, E});
  const c10::cuda::CUDAGuard guard(dev);
  const auto acc_opts = clean_logits.options().dtype(acc);
  Tensor weights = at::empty({T, k}, acc_opts);
  Tensor indices = at::empty({T, k}, clean_logits.options().dtype(at::kLong));
  Tensor threshold_index = at::empty({T}, clean_logits.options().dtype(at::kLong));
  Tensor importance = at::empty({E}, acc_opts);
  Tensor load = at::empty({E}, acc_opts);
  Tensor workspace =
      at::empty({T > 0 ? mk::noisy_topk_gating_fwd_workspace_elems(T, E) : 0}, acc_opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_logits_type(clean_logits.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using A = mk::acc_t<scalar_t>;
    check_launch(mk::launch_noisy_topk_gating_fwd<scalar_t>(
                     cptr<scalar_t>(clean_logits), cptr<scalar_t>(noise_logits), cptr<A>(noise),
                     T, E, k, noise_eps, mptr<A>(weights), mptr<int64_t>(indices),
                     mptr<int64_t>(threshold_index), mptr<A>(importance), mptr<A>(load),
                     mptr<A>(workspace), stream),
                 op);
  });
  return {weights, indices, threshold_index, importance, load};
}

std::tuple<Tensor, Tensor> noisy_topk_gating_bwd_cuda(
    const Tensor& grad_weights, const Tensor& grad_importance, const Tensor& grad_load,
    const Tensor& clean_logits, const Tensor& noise_logits, const Tensor& noise,
    const Tensor& weights, const Tensor& indices, const Tensor& threshold_index,
    double noise_eps) {
  constexpr const char* op = "noisy_topk_gating_bwd";
  check_logits(clean_logits, op, "clean_logits");
  const int64_t T = clean_logits.size(0);
  const int64_t E = clean_logits.size(1);
  const int64_t k = top_k_of(indices, E, op);
  const auto dev = clean_logits.device();
  const auto acc = acc_dtype(clean_logits.scalar_type());
  check_arg(noise_logits, op, "noise_logits", dev, clean_logits.scalar_type(), {T, E});
  check_arg(noise, op, "noise", dev, acc, {T, E});
  check_arg(weights, op, "weights", dev, acc, {T, k});
  check_arg(indices, op, "indices", dev, at::kLong, {T, k});
  check_arg(threshold_index, op, "threshold_index", dev, at::kLong, {T});
  const Tensor gw = grad_arg(grad_weights, op, "grad_weights", dev, acc, {T, k});
  const Tensor gi = grad_arg(grad_importance, op, "grad_importance", dev, acc, {E});
  const Tensor gl = grad_arg(grad_load, op, "grad_load", dev, acc, {E});
  const c10::cuda::CUDAGuard guard(dev);
  Tensor grad_clean = at::empty({T, E}, clean_logits.options());
  Tensor grad_noise_logits = at::empty({T, E}, clean_logits.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_logits_type(clean_logits.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using A = mk::acc_t<scalar_t>;
    check_launch(mk::launch_noisy_topk_gating_bwd<scalar_t>(
                     cptr<A>(gw), cptr<A>(gi), cptr<A>(gl), cptr<scalar_t>(clean_logits),
                     cptr<scalar_t>(noise_logits), cptr<A>(noise), cptr<A>(weights),
                     cptr<int64_t>(indices), cptr<int64_t>(threshold_index), T, E, k,
                     noise_eps, mptr<scalar_t>(grad_clean), mptr<scalar_t>(grad_noise_logits),
                     stream),
                 op);
  });
  return {grad_clean, grad_noise_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CUDA, m) {
  m.impl("noisy_topk_gating_fwd", &noisy_topk_gating_fwd_cuda);
  m.impl("noisy_topk_gating_bwd", &noisy_topk_gating_bwd_cuda);
}
