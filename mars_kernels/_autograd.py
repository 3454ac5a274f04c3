"""One ``torch.autograd.Function`` per op family, shared by the compiled
backends (cpu, cuda, triton): forward calls ``<backend>.<op>_fwd``, backward
``<backend>.<op>_bwd`` (contracts in csrc/ops.cpp). The same setup/backward
helpers are registered as the autograd formulas of the ``torch.ops``
themselves, so the raw ops are differentiable too (opcheck tests that).
"""
from __future__ import annotations

import torch

from . import backend as _backend

# --------------------------------------------------------------------------- top-k


def _topk_setup(ctx, inputs, output):
    logits, k, softmax_first, renormalize = inputs[:4]
    weights, indices, lse = output
    ctx.save_for_backward(logits, weights, indices, lse)
    ctx.flags = (softmax_first, renormalize)
    ctx.mark_non_differentiable(indices, lse)


def _topk_backward(ctx, kern, grad_weights):
    logits, weights, indices, lse = ctx.saved_tensors
    if grad_weights is None:
        return None
    return kern.topk_gating_bwd(grad_weights.contiguous(), logits, weights, indices, lse, *ctx.flags)


class TopKGating(torch.autograd.Function):
    """(logits [T,E], k, softmax_first, renormalize, backend) -> weights, indices, lse."""

    @staticmethod
    def forward(ctx, logits, k, softmax_first, renormalize, backend):
        out = _backend.kernels(backend).topk_gating_fwd(logits, k, softmax_first, renormalize)
        _topk_setup(ctx, (logits, k, softmax_first, renormalize), out)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_weights, _grad_indices, _grad_lse):
        grad = _topk_backward(ctx, _backend.kernels(ctx.backend), grad_weights)
        return grad, None, None, None, None


# --------------------------------------------------------------------------- noisy top-k


def _noisy_setup(ctx, inputs, output):
    clean, raw, noise, k, noise_eps = inputs[:5]
    weights, indices, threshold_index, _importance, _load = output
    ctx.save_for_backward(clean, raw, noise, weights, indices, threshold_index)
    ctx.noise_eps = noise_eps
    ctx.mark_non_differentiable(indices, threshold_index)


def _noisy_backward(ctx, kern, grad_weights, grad_importance, grad_load):
    clean, raw, noise, weights, indices, threshold_index = ctx.saved_tensors
    E = clean.shape[1]

    def dense(g, like):
        return torch.zeros_like(like) if g is None else g.contiguous()

    vec = weights.new_zeros(E)
    return kern.noisy_topk_gating_bwd(
        dense(grad_weights, weights),
        dense(grad_importance, vec),
        dense(grad_load, vec),
        clean,
        raw,
        noise,
        weights,
        indices,
        threshold_index,
        ctx.noise_eps,
    )


class NoisyTopKGating(torch.autograd.Function):
    """(clean [T,E], noise_logits [T,E], noise [T,E], k, noise_eps, backend) ->
    weights, indices, threshold_index, importance, load (training mode)."""

    @staticmethod
    def forward(ctx, clean, raw, noise, k, noise_eps, backend):
        out = _backend.kernels(backend).noisy_topk_gating_fwd(clean, raw, noise, k, noise_eps)
        _noisy_setup(ctx, (clean, raw, noise, k, noise_eps), out)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_weights, _gi, _gt, grad_importance, grad_load):
        kern = _backend.kernels(ctx.backend)
        grad_clean, grad_raw = _noisy_backward(ctx, kern, grad_weights, grad_importance, grad_load)
        return grad_clean, grad_raw, None, None, None, None


# --------------------------------------------------------------------------- router stats


def _stats_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _stats_backward(ctx, kern, grad_lse, grad_prob_sum):
    logits, lse = ctx.saved_tensors
    if grad_lse is None and grad_prob_sum is None:
        return None
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.contiguous()
    grad_prob_sum = lse.new_zeros(logits.shape[1]) if grad_prob_sum is None else grad_prob_sum.contiguous()
    return kern.router_stats_bwd(grad_lse, grad_prob_sum, logits, lse)


class RouterStats(torch.autograd.Function):
    """(logits [T,E], backend) -> lse [T], prob_sum [E]."""

    @staticmethod
    def forward(ctx, logits, backend):
        out = _backend.kernels(backend).router_stats_fwd(logits)
        _stats_setup(ctx, (logits,), out)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_lse, grad_prob_sum):
        return _stats_backward(ctx, _backend.kernels(ctx.backend), grad_lse, grad_prob_sum), None


# --------------------------------------------------------------------------- MARS routing


def _mars_setup(ctx, inputs, output):
    residual, feature = inputs[:2]
    weights, indices, _imitation, divergence, _prob_sum, lse_r, lse_f = output
    ctx.save_for_backward(residual, feature, weights, indices, lse_r, lse_f)
    ctx.mark_non_differentiable(indices, divergence, lse_r, lse_f)


def _mars_backward(ctx, kern, grad_weights, grad_imitation, grad_prob_sum):
    residual, feature, weights, indices, lse_r, lse_f = ctx.saved_tensors
    if grad_weights is None and grad_imitation is None and grad_prob_sum is None:
        return None, None
    return kern.mars_routing_bwd(
        torch.zeros_like(weights) if grad_weights is None else grad_weights.contiguous(),
        torch.zeros_like(lse_r) if grad_imitation is None else grad_imitation.contiguous(),
        lse_r.new_zeros(residual.shape[1]) if grad_prob_sum is None else grad_prob_sum.contiguous(),
        residual,
        feature,
        weights,
        indices,
        lse_r,
        lse_f,
    )


class MarsRouting(torch.autograd.Function):
    """(l_r [T,E], l_f [T,E], noise [T,E], k, sigma_0, sigma_const, sigma_max, backend)
    -> weights, indices, imitation, divergence, prob_sum, lse_r, lse_f."""

    @staticmethod
    def forward(ctx, residual, feature, noise, k, sigma_0, sigma_const, sigma_max, backend):
        out = _backend.kernels(backend).mars_routing_fwd(residual, feature, noise, k, sigma_0, sigma_const, sigma_max)
        _mars_setup(ctx, (residual, feature), out)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, gw, _gi, gim, _gd, gps, _gr, _gf):
        grad_r, grad_f = _mars_backward(ctx, _backend.kernels(ctx.backend), gw, gim, gps)
        return grad_r, grad_f, None, None, None, None, None, None


# --------------------------------------------------------------------------- modality attention


def _attention_setup(ctx, inputs, output):
    qkv, num_heads, keep, missing, observed = inputs[:5]
    ctx.save_for_backward(qkv, output[1], keep, missing, observed)
    ctx.num_heads = num_heads
    ctx.mark_non_differentiable(output[1])


def _attention_backward(ctx, kern, grad_out):
    qkv, probs, keep, missing, observed = ctx.saved_tensors
    if grad_out is None:
        return None, None
    grad_qkv, grad_missing = kern.modality_attention_bwd(
        grad_out.contiguous(), qkv, probs, keep, missing, observed, ctx.num_heads
    )
    return grad_qkv, (grad_missing if missing is not None else None)


class ModalityAttention(torch.autograd.Function):
    """(qkv [T,M,3D], num_heads, keep [T,H,M,M] or None, missing [M,3D] or None,
    observed [T,M] or None, backend) -> out [T,M,D], probs [T,H,M,M]. Gradients
    flow to qkv and missing (keep is a dropout mask)."""

    @staticmethod
    def forward(ctx, qkv, num_heads, keep, missing, observed, backend):
        out = _backend.kernels(backend).modality_attention_fwd(qkv, num_heads, keep, missing, observed)
        _attention_setup(ctx, (qkv, num_heads, keep, missing, observed), out)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):
        grad_qkv, grad_missing = _attention_backward(ctx, _backend.kernels(ctx.backend), grad_out)
        return grad_qkv, None, None, grad_missing, None, None


# --------------------------------------------------------------------------- residual + norm + mean


def _norm_setup(ctx, inputs, output):
    y, h, weight, _bias, missing, observed = inputs[:6]
    _z, mean, rstd = output
    ctx.save_for_backward(y, h, weight, missing, observed, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _norm_backward(ctx, kern, grad_z):
    """-> grad_y, grad_h, grad_weight, grad_bias, grad_missing (None without missing)."""
    y, h, weight, missing, observed, mean, rstd = ctx.saved_tensors
    if grad_z is None:
        return None, None, None, None, None
    grads = kern.residual_norm_mean_bwd(grad_z.contiguous(), y, h, weight, missing, observed, mean, rstd)
    return (*grads[:4], grads[4] if missing is not None else None)


class ResidualNormMean(torch.autograd.Function):
    """(y [*P,T,M,D], h [T,M,D], weight [D], bias [D], missing [M,D] or None,
    observed [*P,T,M] or None, eps, backend) -> z [*P,T,D], mean, rstd [*P,T,M]."""

    @staticmethod
    def forward(ctx, y, h, weight, bias, missing, observed, eps, backend):
        out = _backend.kernels(backend).residual_norm_mean_fwd(y, h, weight, bias, missing, observed, eps)
        _norm_setup(ctx, (y, h, weight, bias, missing, observed), out)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_z, _grad_mean, _grad_rstd):
        gy, gh, gw, gb, gm = _norm_backward(ctx, _backend.kernels(ctx.backend), grad_z)
        return gy, gh, gw, gb, gm, None, None, None


# --------------------------------------------------------------------------- torch.ops registration


def register_op_autograd() -> None:
    """Give the fwd ops of torch.ops.mars_kernels their autograd formulas."""
    ops = torch.ops.mars_kernels
    torch.library.register_autograd(
        "mars_kernels::topk_gating_fwd",
        lambda ctx, gw, _gi, _gl: (_topk_backward(ctx, ops, gw), None, None, None),
        setup_context=_topk_setup,
    )
    torch.library.register_autograd(
        "mars_kernels::noisy_topk_gating_fwd",
        lambda ctx, gw, _gi, _gt, gimp, gload: (*_noisy_backward(ctx, ops, gw, gimp, gload), None, None, None),
        setup_context=_noisy_setup,
    )
    torch.library.register_autograd(
        "mars_kernels::mars_routing_fwd",
        lambda ctx, gw, _gi, gim, _gd, gps, _gr, _gf: (*_mars_backward(ctx, ops, gw, gim, gps), None, None, None, None, None),
        setup_context=_mars_setup,
    )

    def attention_backward(ctx, grad_out, _grad_probs):
        grad_qkv, grad_missing = _attention_backward(ctx, ops, grad_out)
        return grad_qkv, None, None, grad_missing, None

    torch.library.register_autograd(
        "mars_kernels::modality_attention_fwd", attention_backward, setup_context=_attention_setup
    )

    def norm_backward(ctx, grad_z, _grad_mean, _grad_rstd):
        return (*_norm_backward(ctx, ops, grad_z), None, None)

    torch.library.register_autograd("mars_kernels::residual_norm_mean_fwd", norm_backward, setup_context=_norm_setup)
    torch.library.register_autograd(
        "mars_kernels::router_stats_fwd",
        lambda ctx, gl, gp: (_stats_backward(ctx, ops, gl, gp),),
        setup_context=_stats_setup,
    )
