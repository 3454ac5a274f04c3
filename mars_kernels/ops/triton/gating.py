"""Triton launchers for top-k gating and the router statistics (ops module
:mod:`mars_kernels.ops.gating`; kernels in ``_gating_kernels.py``).

Each function has exactly the schema and semantics of the ``torch.ops.mars_kernels``
op of the same name (schemas and ``*_torch`` twins in :mod:`mars_kernels.ops.gating`).
Inputs are expected validated and row-contiguous (``stride(1) == 1``); shapes:
``T`` tokens, ``E`` experts, ``k`` experts chosen per token.

Dtypes: logits may be float16, bfloat16, float32 or float64. Routing math runs in
float32 (float64 for float64 logits); weights, lse and prob_sum come back in that
dtype, indices as int64, gradients in the logits' dtype.

Sums over tokens (prob_sum) are deterministic: every program writes the partial
sum of its ``BLOCK_T`` tokens to a ``[num_programs, E]`` buffer, which is reduced
with ``torch.sum`` (no atomics). ``BLOCK_T`` depends only on ``T``, ``E`` and the
device type, so results are bitwise reproducible per shape.
"""
from __future__ import annotations

import torch
import triton

from ..common import compute_dtype
from .launch import check_float, device_guard, key_mode, row_blocks, select_params, selection_outputs, tl_dtype

from . import _gating_kernels as _k

__all__ = ["topk_gating_fwd", "topk_gating_bwd", "router_stats_fwd", "router_stats_bwd"]

# --------------------------------------------------------------------------
# top-k gating
# --------------------------------------------------------------------------
def topk_gating_fwd(
    logits: torch.Tensor, k: int, softmax_first: bool, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k gating forward.

    logits [T, E] -> weights [T, k] f32/f64, indices [T, k] int64, lse [T] f32/f64.

    indices: the k largest logits per row, descending, ties to the lower expert
    index, NaN ranked as +inf. weights[t, j] = exp(logits[t, indices[t, j]] - lse[t]),
    where lse is the log-sum-exp of the whole row when ``softmax_first and not
    renormalize`` (softmax then top-k), else of the k selected logits (top-k then
    softmax, or softmax then top-k renormalised: the same weights).
    """
    check_float("logits", logits)
    T, E, k, cdt, weights, indices = selection_outputs(logits, k)
    dev = logits.device
    lse = torch.empty((T,), dtype=cdt, device=dev)
    if T == 0:
        return weights, indices, lse
    block_t, block_e, num_warps = row_blocks(T, E, dev)
    mode = key_mode(logits.dtype, block_e)
    use_sort, kp = select_params(k, block_e, mode)
    grid = (triton.cdiv(T, block_t),)
    with device_guard(logits):
        _k.topk_gating_fwd_kernel[grid](
            logits, weights, indices, lse,
            T, E, logits.stride(0),
            K=k,
            DENSE=bool(softmax_first) and not bool(renormalize),
            MODE=mode,
            USE_SORT=use_sort,
            KP=kp,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            CDT=tl_dtype(logits.dtype),
            num_warps=num_warps,
        )
    return weights, indices, lse


def topk_gating_bwd(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    softmax_first: bool,
    renormalize: bool,
) -> torch.Tensor:
    """Top-k gating backward: grad_logits [T, E] in the logits' dtype.

    grad_weights, weights [T, k], indices [T, k] int64, lse [T], as returned by
    :func:`topk_gating_fwd`. With s[t] = sum_j grad_weights[t, j] * weights[t, j]:

    * softmax_first and not renormalize (dense): grad[t, e] =
      -s[t] * exp(logits[t, e] - lse[t]) + sum_j [indices[t, j] == e] weights[t, j] grad_weights[t, j];
    * otherwise (sparse): grad[t, indices[t, j]] = weights[t, j] * (grad_weights[t, j] - s[t]),
      zero elsewhere (logits and lse are not read).
    """
    check_float("logits", logits)
    T, E = logits.shape
    k = indices.shape[1]
    grad = torch.empty((T, E), dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad
    dense = bool(softmax_first) and not bool(renormalize)
    block_t, block_e, num_warps = row_blocks(T, E, logits.device)
    grid = (triton.cdiv(T, block_t),)
    with device_guard(logits):
        _k.topk_gating_bwd_kernel[grid](
            grad_weights, logits, weights, indices, lse, grad,
            T, E, logits.stride(0), grad.stride(0),
            K=k,
            KP=triton.next_power_of_2(k),
            DENSE=dense,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            CDT=tl_dtype(logits.dtype),
            num_warps=num_warps,
        )
    return grad


# --------------------------------------------------------------------------
# router statistics
# --------------------------------------------------------------------------
def router_stats_fwd(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax statistics in one pass: logits [T, E] -> lse [T], prob_sum [E] (f32/f64).

    lse[t] = logsumexp(logits[t]) (as ``torch.logsumexp``: +-inf rows give +-inf);
    prob_sum[e] = sum_t softmax(logits[t])[e], summed deterministically.
    """
    check_float("logits", logits)
    T, E = logits.shape
    cdt = compute_dtype(logits.dtype)
    dev = logits.device
    lse = torch.empty((T,), dtype=cdt, device=dev)
    if T == 0:
        return lse, torch.zeros((E,), dtype=cdt, device=dev)
    block_t, block_e, num_warps = row_blocks(T, E, dev)
    n_prog = triton.cdiv(T, block_t)
    part = torch.empty((n_prog, E), dtype=cdt, device=dev)
    with device_guard(logits):
        _k.router_stats_fwd_kernel[(n_prog,)](
            logits, lse, part, T, E, logits.stride(0),
            BLOCK_T=block_t, BLOCK_E=block_e, CDT=tl_dtype(cdt), num_warps=num_warps,
        )
    return lse, part.sum(0)


def router_stats_bwd(
    grad_lse: torch.Tensor, grad_prob_sum: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    """Backward of :func:`router_stats_fwd`: grad_logits [T, E] in the logits' dtype.

    grad_lse [T], grad_prob_sum [E], lse [T] from the forward. With p = exp(logits - lse):
    grad[t, e] = p[t, e] * (grad_lse[t] + grad_prob_sum[e] - sum_e' grad_prob_sum[e'] p[t, e']).
    """
    check_float("logits", logits)
    T, E = logits.shape
    grad = torch.empty((T, E), dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad
    block_t, block_e, num_warps = row_blocks(T, E, logits.device)
    with device_guard(logits):
        _k.router_stats_bwd_kernel[(triton.cdiv(T, block_t),)](
            grad_lse, grad_prob_sum, logits, lse, grad,
            T, E, logits.stride(0), grad.stride(0),
            BLOCK_T=block_t, BLOCK_E=block_e, CDT=tl_dtype(compute_dtype(logits.dtype)),
            num_warps=num_warps,
        )
    return grad
