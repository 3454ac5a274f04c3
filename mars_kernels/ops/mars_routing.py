"""MARS training-time routing, fused (docs/design.md section 2.3): the residual router gates
the experts with discrepancy-aware noise, and the feature router learns to
imitate it.

Shapes: T tokens, E experts, k experts per token. Math in float32 (float64 for
float64 logits). One pass over both routers' logits computes the softmax
statistics, the divergence, the noise scale, the top-k of the noisy residual
logits and their weights, the imitation loss and the per-expert probability
sums (deterministic, no atomics).

Kernel-level ops (schemas below, beside their callers): ``mars_routing_fwd/_bwd``;
C++ in ``csrc/cpu/mars_routing.cpp``, CUDA in ``csrc/cuda/mars_routing.cu`` (+
``mars_routing_binding.cpp``), Triton in ``ops/triton/mars_routing.py``.
"""
from __future__ import annotations

import functools

import torch

from .. import backend as _backend
from .. import checks as check
from .. import library
from .common import compute_dtype, randn, topk_order

__all__ = ["mars_routing", "mars_routing_torch"]


@functools.cache
def _launchers():
    """The Triton launchers, imported on first call (triton is optional)."""
    from .triton import mars_routing

    return mars_routing


def mars_routing(
    residual_logits: torch.Tensor,
    feature_logits: torch.Tensor,
    k: int,
    *,
    sigma_0: float,
    sigma_max: float,
    sigma_const: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual-router logits l_r [T, E] and feature-router logits l_f [T, E]
    -> (weights [T, k], indices [T, k], imitation [T], divergence [T], prob_sum [E]).

    Gates with the top k of softmax(l_r + sigma * eps), sigma = min(sigma_0 *
    KL(p_r || p_f) + sigma_const, sigma_max) per token (detached); ``imitation``
    is KL(stopgrad(p_r) || p_f) with its gradient to l_f only; ``prob_sum`` sums
    p_r over tokens (for the Switch balance loss on the residual router).
    ``noise`` [T, E] or ``generator`` makes the noise reproducible. See
    :func:`mars_routing_torch`.
    """
    check.logits(residual_logits, "residual_logits")
    check.logits(feature_logits, "feature_logits")
    T, E = residual_logits.shape
    check.shape(feature_logits, (T, E), "feature_logits", "[T, E] like residual_logits")
    if feature_logits.dtype != residual_logits.dtype:
        raise TypeError(f"feature_logits must have the dtype of residual_logits ({residual_logits.dtype}), got {feature_logits.dtype}")
    check.top_k(k, E)
    for name_, v in (("sigma_0", sigma_0), ("sigma_const", sigma_const), ("sigma_max", sigma_max)):
        check.nonnegative_float(v, name_)
    tensors = {"residual_logits": residual_logits, "feature_logits": feature_logits}
    if noise is not None:
        check.float_matrix(noise, "noise")
        check.shape(noise, (T, E), "noise", "[T, E]")
        tensors["noise"] = noise
    check.same_device(tensors)
    check.generator(generator, residual_logits.device)
    impl = _backend.implementation("mars_routing", _backend.resolve(backend, residual_logits.device))
    sigmas = dict(sigma_0=float(sigma_0), sigma_max=float(sigma_max), sigma_const=float(sigma_const))
    if impl == "torch":
        return mars_routing_torch(residual_logits, feature_logits, k, noise=noise, generator=generator, **sigmas)
    ct = compute_dtype(residual_logits.dtype)
    if noise is None:
        noise = randn(T, E, generator=generator, device=residual_logits.device, dtype=ct)
    out = library.namespace(impl).mars_routing_fwd(
        residual_logits.contiguous(), feature_logits.contiguous(), noise.to(ct).contiguous(), k,
        sigmas["sigma_0"], sigmas["sigma_const"], sigmas["sigma_max"],
    )
    return out[:5]


def mars_routing_torch(
    residual_logits: torch.Tensor,
    feature_logits: torch.Tensor,
    k: int,
    *,
    sigma_0: float,
    sigma_max: float,
    sigma_const: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pure-PyTorch twin of :func:`mars_routing`:

    * p_r = softmax(l_r), p_f = softmax(l_f); divergence d = KL(p_r || p_f) per
      token, detached;
    * sigma = min(sigma_0 * d + sigma_const, sigma_max) (detached); noisy
      logits l_r + sigma * eps with eps [T, E] standard normal (``noise``, or
      drawn from ``generator``);
    * weights/indices: top k of softmax(noisy), renormalised (a softmax over the
      k chosen noisy logits); gradient to l_r;
    * imitation = KL(stopgrad(p_r) || p_f) per token; gradient to l_f only;
    * prob_sum = sum over tokens of p_r (clean), for the Switch balance loss on
      the residual router; gradient to l_r.
    """
    ct = compute_dtype(residual_logits.dtype)
    lr, lf = residual_logits.to(ct), feature_logits.to(ct)
    log_pr, log_pf = torch.log_softmax(lr, dim=-1), torch.log_softmax(lf, dim=-1)
    pr = log_pr.exp()
    divergence = (pr * (log_pr - log_pf)).sum(-1).detach()
    sigma = torch.clamp(sigma_0 * divergence + sigma_const, max=sigma_max)
    if noise is None:
        noise = randn(lr.shape, generator=generator, device=lr.device, dtype=ct)
    noisy = lr + sigma.unsqueeze(-1) * noise.to(ct)
    indices = topk_order(noisy.detach(), k)
    weights = torch.softmax(noisy.gather(1, indices), dim=-1)
    sg_pr, sg_log_pr = pr.detach(), log_pr.detach()
    imitation = (sg_pr * (sg_log_pr - log_pf)).sum(-1)
    return weights, indices, imitation, divergence, pr.sum(0)


def _fwd_fake(residual_logits, feature_logits, noise, k, sigma_0, sigma_const, sigma_max):
    T, E = residual_logits.shape
    acc = compute_dtype(residual_logits.dtype)

    def vec(n):
        return residual_logits.new_empty((n,), dtype=acc)

    return (
        residual_logits.new_empty((T, k), dtype=acc),
        residual_logits.new_empty((T, k), dtype=torch.int64),
        vec(T), vec(T), vec(E), vec(T), vec(T),
    )


def _bwd_fake(grad_weights, grad_imitation, grad_prob_sum, residual_logits, feature_logits, weights, indices,
              lse_r, lse_f):
    return torch.empty_like(residual_logits), torch.empty_like(feature_logits)


def _setup(ctx, args, output):
    weights, indices, _imitation, divergence, _prob_sum, lse_r, lse_f = output
    ctx.save_for_backward(args["residual_logits"], args["feature_logits"], weights, indices, lse_r, lse_f)
    ctx.mark_non_differentiable(indices, divergence, lse_r, lse_f)


def _backward(ops, ctx, grad_weights, _gi, grad_imitation, _gd, grad_prob_sum, _gr, _gf):
    residual, feature, weights, indices, lse_r, lse_f = ctx.saved_tensors
    if grad_weights is None and grad_imitation is None and grad_prob_sum is None:
        return {}
    grad_r, grad_f = ops.mars_routing_bwd(
        torch.zeros_like(weights) if grad_weights is None else grad_weights.contiguous(),
        torch.zeros_like(lse_r) if grad_imitation is None else grad_imitation.contiguous(),
        lse_r.new_zeros(residual.shape[1]) if grad_prob_sum is None else grad_prob_sum.contiguous(),
        residual, feature, weights, indices, lse_r, lse_f,
    )
    return {"residual_logits": grad_r, "feature_logits": grad_f}


# See reference.mars_routing. residual_logits, feature_logits [T,E] same float
# dtype; noise [T,E] f32 ("f32": float64 for float64 logits) -> weights [T,k]
# f32, indices [T,k] int64 (top k of l_r + sigma*noise, ties to the lower
# index), imitation [T] f32 (KL(sg(p_r) || p_f)), divergence [T] f32
# (KL(p_r || p_f)), prob_sum [E] f32 (sum over T of p_r, deterministic), lse_r,
# lse_f [T] f32 (row log-sum-exps, for the backward).
# sigma = min(sigma_0 * divergence + sigma_const, sigma_max).
library.register(
    "mars_routing_fwd(Tensor residual_logits, Tensor feature_logits, Tensor noise, int k, float sigma_0,"
    " float sigma_const, float sigma_max) -> (Tensor weights, Tensor indices, Tensor imitation,"
    " Tensor divergence, Tensor prob_sum, Tensor lse_r, Tensor lse_f)",
    fake=_fwd_fake, triton=lambda *args: _launchers().mars_routing_fwd(*args),
    setup=_setup, backward=_backward,
)
# grad_r = scatter(w * (g - <g, w>)) + p_r * (grad_prob_sum - <grad_prob_sum, p_r>);
# grad_f = grad_imitation[t] * (p_f - p_r). -> (grad_residual, grad_feature) in the
# logits' dtype.
library.register(
    "mars_routing_bwd(Tensor grad_weights, Tensor grad_imitation, Tensor grad_prob_sum,"
    " Tensor residual_logits, Tensor feature_logits, Tensor weights, Tensor indices, Tensor lse_r,"
    " Tensor lse_f) -> (Tensor, Tensor)",
    fake=_bwd_fake, triton=lambda *args: _launchers().mars_routing_bwd(*args),
)
