"""Triton launchers for MARS training-time routing (docs/design.md section 2.3; ops module
:mod:`mars_kernels.ops.mars_routing`, kernels in ``_mars_routing_kernels.py``).

Same contract as the ``torch.ops.mars_kernels.mars_routing_fwd`` / ``_bwd`` ops
(the schema in :mod:`mars_kernels.ops.mars_routing`; ground truth :func:`mars_kernels.ops.mars_routing.mars_routing_torch`),
so a caller can use this module in place of ``torch.ops.mars_kernels``. Inputs
are expected validated; ``[T, E]`` inputs must be row-contiguous (``stride(1) ==
1``), ``[T, k]`` / ``[T]`` / ``[E]`` tensors contiguous (incoming gradients are
made contiguous here). Shapes: ``T`` tokens, ``E`` experts, ``k`` chosen per token.

One fused pass per token row computes both routers' softmax statistics, the
divergence KL(p_r || p_f), the noise scale, the top-k of the noisy residual
logits and the weights, plus this program's share of ``prob_sum``. The backward
is one pass as well.

Dtypes: logits float16, bfloat16, float32 or float64 (both routers the same);
math, weights, imitation, divergence, prob_sum and lse in float32 (float64 for
float64 logits); indices int64; gradients in the logits' dtype.

``prob_sum`` is deterministic: each program writes the sum over its ``BLOCK_T``
rows to a ``[num_programs, E]`` buffer, reduced with ``torch.sum`` (no atomics);
``BLOCK_T`` depends only on ``T``, ``E`` and the device type.

The forward kernel is compiled without FMA contraction, so the noisy logits are
``l_r + sigma * noise`` rounded exactly as torch's elementwise ops do.
"""
from __future__ import annotations

import torch
import triton

from ..common import compute_dtype
from . import _mars_routing_kernels as _k
from .launch import (
    check_float, device_guard, row_blocks, select_params, selection_outputs, tl_dtype, unit_column_stride,
)

__all__ = ["mars_routing_fwd", "mars_routing_bwd"]

# Elements per program tile on a GPU (BLOCK_T * BLOCK_E). The forward keeps
# several [BLOCK_T, BLOCK_E] tiles live (both routers' logits, the noise, the
# int64 keys), so the GPU tile is a quarter of the other routing kernels': with
# 8 elements per thread both kernels stay at <= ~120 registers for E <= 512
# (ptxas, sm_90a, float32 math) instead of 200-250 with 16.
_GPU_TILE = 1024


def _blocks(T: int, E: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps) with this module's smaller GPU tile."""
    return row_blocks(T, E, device, gpu_tile=_GPU_TILE)


def _check_pair(residual_logits: torch.Tensor, feature_logits: torch.Tensor) -> None:
    check_float("residual_logits", residual_logits)
    check_float("feature_logits", feature_logits)
    if residual_logits.dim() != 2:
        raise ValueError(
            f"residual_logits must be 2-D [T, E], got shape {tuple(residual_logits.shape)}"
        )
    if feature_logits.shape != residual_logits.shape:
        raise ValueError(
            f"feature_logits must have the shape of residual_logits "
            f"{tuple(residual_logits.shape)}, got {tuple(feature_logits.shape)}"
        )
    if feature_logits.dtype != residual_logits.dtype:
        raise TypeError(
            f"feature_logits must have the dtype of residual_logits ({residual_logits.dtype}), "
            f"got {feature_logits.dtype}"
        )


def mars_routing_fwd(
    residual_logits: torch.Tensor,
    feature_logits: torch.Tensor,
    noise: torch.Tensor,
    k: int,
    sigma_0: float,
    sigma_const: float,
    sigma_max: float,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """MARS routing forward.

    residual_logits l_r, feature_logits l_f [T, E], noise [T, E] ->
    weights [T, k], indices [T, k] int64, imitation [T], divergence [T],
    prob_sum [E], lse_r [T], lse_f [T] (all but indices f32/f64).

    Per row: p_r = softmax(l_r), p_f = softmax(l_f), lse_r / lse_f their
    log-sum-exps, divergence d = KL(p_r || p_f) = sum_e p_r (log p_r - log p_f);
    sigma = min(sigma_0 * d + sigma_const, sigma_max); indices = the top k of
    l_r + sigma * noise (descending, ties to the lower expert index, NaN as
    +inf); weights = softmax over the k selected noisy values. imitation has
    the value of d (its gradient, KL(stopgrad(p_r) || p_f), flows to l_f only).
    prob_sum[e] = sum_t p_r[t, e]. A row holding NaN or +inf, or all -inf, has
    a NaN lse and softmax, as ``torch.log_softmax`` gives.
    """
    _check_pair(residual_logits, feature_logits)
    check_float("noise", noise)
    if noise.shape != residual_logits.shape:
        raise ValueError(
            f"noise must have the shape of the logits {tuple(residual_logits.shape)}, got {tuple(noise.shape)}"
        )
    T, E, k, cdt, weights, indices = selection_outputs(residual_logits, k)
    dev = residual_logits.device
    imitation = torch.empty((T,), dtype=cdt, device=dev)
    divergence = torch.empty((T,), dtype=cdt, device=dev)
    lse_r = torch.empty((T,), dtype=cdt, device=dev)
    lse_f = torch.empty((T,), dtype=cdt, device=dev)
    if T == 0:
        prob_sum = torch.zeros((E,), dtype=cdt, device=dev)
        return weights, indices, imitation, divergence, prob_sum, lse_r, lse_f
    lr, lf, nz = unit_column_stride(residual_logits), unit_column_stride(feature_logits), unit_column_stride(noise)
    block_t, block_e, num_warps = _blocks(T, E, dev)
    mode = 3 if cdt == torch.float64 else 0  # noisy values are computed in cdt
    use_sort, kp = select_params(k, block_e, mode)
    n_prog = triton.cdiv(T, block_t)
    part = torch.empty((n_prog, E), dtype=cdt, device=dev)
    sigma = torch.tensor(
        [float(sigma_0), float(sigma_const), float(sigma_max)], dtype=cdt, device=dev
    )
    with device_guard(residual_logits):
        _k.mars_routing_fwd_kernel[(n_prog,)](
            lr, lf, nz, sigma,
            weights, indices, imitation, divergence, part, lse_r, lse_f,
            T, E, lr.stride(0), lf.stride(0), nz.stride(0),
            K=k,
            MODE=mode,
            USE_SORT=use_sort,
            KP=kp,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            CDT=tl_dtype(cdt),
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
    return weights, indices, imitation, divergence, part.sum(0), lse_r, lse_f


def mars_routing_bwd(
    grad_weights: torch.Tensor,
    grad_imitation: torch.Tensor,
    grad_prob_sum: torch.Tensor,
    residual_logits: torch.Tensor,
    feature_logits: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    lse_r: torch.Tensor,
    lse_f: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MARS routing backward -> (grad_residual, grad_feature) [T, E], logits' dtype.

    grad_weights [T, k], grad_imitation [T], grad_prob_sum [E] (f32/f64);
    weights, indices, lse_r, lse_f from :func:`mars_routing_fwd`. With
    p = exp(l - lse) and s[t] = sum_j grad_weights[t, j] * weights[t, j]:

    * grad_residual[t, e] = sum_j [indices[t, j] == e] weights[t, j] (grad_weights[t, j] - s[t])
      + p_r[t, e] (grad_prob_sum[e] - sum_e' grad_prob_sum[e'] p_r[t, e']);
    * grad_feature[t, e] = grad_imitation[t] (p_f[t, e] - p_r[t, e]).

    sigma and the selected set are constants (the divergence is detached).
    """
    _check_pair(residual_logits, feature_logits)
    T, E = residual_logits.shape
    k = indices.shape[1]
    dev = residual_logits.device
    grad_r = torch.empty((T, E), dtype=residual_logits.dtype, device=dev)
    grad_f = torch.empty((T, E), dtype=feature_logits.dtype, device=dev)
    if T == 0:
        return grad_r, grad_f
    lr, lf = unit_column_stride(residual_logits), unit_column_stride(feature_logits)
    block_t, block_e, num_warps = _blocks(T, E, dev)
    with device_guard(residual_logits):
        _k.mars_routing_bwd_kernel[(triton.cdiv(T, block_t),)](
            grad_weights.contiguous(), grad_imitation.contiguous(), grad_prob_sum.contiguous(),
            lr, lf, weights.contiguous(), indices.contiguous(),
            lse_r.contiguous(), lse_f.contiguous(),
            grad_r, grad_f,
            T, E, lr.stride(0), lf.stride(0), grad_r.stride(0), grad_f.stride(0),
            K=k,
            KP=triton.next_power_of_2(k),
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            CDT=tl_dtype(compute_dtype(residual_logits.dtype)),
            num_warps=num_warps,
        )
    return grad_r, grad_f
