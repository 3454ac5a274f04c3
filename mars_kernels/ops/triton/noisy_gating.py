"""Triton launchers for training-mode noisy top-k gating (ops module
:mod:`mars_kernels.ops.noisy_gating`; kernels in ``_noisy_gating_kernels.py``).

Same conventions as :mod:`.gating`: the schema of the ``torch.ops.mars_kernels``
op of the same name, validated row-contiguous ``[T, E]`` inputs, math in float32
(float64 for float64 logits), importance and load summed deterministically from
per-program partials.
"""
from __future__ import annotations

import torch
import triton

from ..common import compute_dtype
from .launch import check_float, device_guard, key_mode, row_blocks, select_params, selection_outputs, tl_dtype

from . import _noisy_gating_kernels as _k

__all__ = ["noisy_topk_gating_fwd", "noisy_topk_gating_bwd"]

# --------------------------------------------------------------------------
# noisy top-k gating (training mode)
# --------------------------------------------------------------------------
def noisy_topk_gating_fwd(
    clean_logits: torch.Tensor,
    noise_logits: torch.Tensor,
    noise: torch.Tensor,
    k: int,
    noise_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy top-k gating forward, training mode (Shazeer et al. 2017).

    clean_logits, noise_logits (pre-softplus) [T, E], noise [T, E] ->
    weights [T, k] f32/f64, indices [T, k] int64, threshold_index [T] int64,
    importance [E] f32/f64, load [E] f32/f64.

    std = softplus(noise_logits) + noise_eps; noisy = clean + noise * std. indices
    are the top k of noisy (descending, ties to the lower index, NaN as +inf),
    threshold_index the (k+1)-th (-1 when k == E); weights = softmax of the k
    selected noisy values. importance[e] = sum over tokens of the weight routed to
    e. load[e] = sum_t Phi((clean[t, e] - thr[t, e]) / std[t, e]), thr being the
    (k+1)-th noisy value if e is among the chosen k, else the k-th; load = T
    everywhere when k == E.
    """
    check_float("clean_logits", clean_logits)
    check_float("noise_logits", noise_logits)
    check_float("noise", noise)
    T, E, k, cdt, weights, indices = selection_outputs(clean_logits, k)
    dev = clean_logits.device
    has_load = k < E
    threshold_index = torch.empty((T,), dtype=torch.int64, device=dev)
    if T == 0:
        zeros = torch.zeros((E,), dtype=cdt, device=dev)
        return weights, indices, threshold_index, zeros, zeros.clone()
    block_t, block_e, num_warps = row_blocks(T, E, dev)
    mode = 3 if cdt == torch.float64 else 0  # noisy values are computed in cdt
    m = min(k + 1, E)
    use_sort, kp = select_params(m, block_e, mode)  # m = k + 1: the threshold too
    n_prog = triton.cdiv(T, block_t)
    imp_part = torch.empty((n_prog, E), dtype=cdt, device=dev)
    load_part = torch.empty((n_prog, E), dtype=cdt, device=dev) if has_load else imp_part
    eps = torch.full((1,), float(noise_eps), dtype=cdt, device=dev)
    with device_guard(clean_logits):
        _k.noisy_topk_gating_fwd_kernel[(n_prog,)](
            clean_logits, noise_logits, noise,
            weights, indices, threshold_index, imp_part, load_part,
            T, E, clean_logits.stride(0), noise_logits.stride(0), noise.stride(0), eps,
            K=k,
            M=m,
            HAS_LOAD=has_load,
            MODE=mode,
            USE_SORT=use_sort,
            KP=kp,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            CDT=tl_dtype(cdt),
            num_warps=num_warps,
            # No FMA contraction: clean + noise * std rounds as torch's two elementwise ops
            # do, so the selection matches the reference except at genuine near-ties.
            enable_fp_fusion=False,
        )
    importance = imp_part.sum(0)
    if has_load:
        load = load_part.sum(0)
    else:
        load = torch.full((E,), float(T), dtype=cdt, device=dev)
    return weights, indices, threshold_index, importance, load


def noisy_topk_gating_bwd(
    grad_weights: torch.Tensor,
    grad_importance: torch.Tensor,
    grad_load: torch.Tensor,
    clean_logits: torch.Tensor,
    noise_logits: torch.Tensor,
    noise: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    threshold_index: torch.Tensor,
    noise_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy top-k gating backward -> (grad_clean_logits, grad_noise_logits) [T, E].

    grad_weights [T, k], grad_importance [E], grad_load [E]; the rest as passed to
    / returned by :func:`noisy_topk_gating_fwd`. Gradients come back in the logits'
    dtype. The top-k set and thresholds are treated as constants (piecewise), as
    autograd through :func:`mars_kernels.ops.noisy_gating.noisy_topk_gating_torch` does.
    """
    check_float("clean_logits", clean_logits)
    T, E = clean_logits.shape
    k = indices.shape[1]
    dev = clean_logits.device
    cdt = compute_dtype(clean_logits.dtype)
    grad_clean = torch.empty((T, E), dtype=clean_logits.dtype, device=dev)
    grad_nl = torch.empty((T, E), dtype=noise_logits.dtype, device=dev)
    if T == 0:
        return grad_clean, grad_nl
    block_t, block_e, num_warps = row_blocks(T, E, dev)
    eps = torch.full((1,), float(noise_eps), dtype=cdt, device=dev)
    with device_guard(clean_logits):
        _k.noisy_topk_gating_bwd_kernel[(triton.cdiv(T, block_t),)](
            grad_weights, grad_importance, grad_load,
            clean_logits, noise_logits, noise, weights, indices, threshold_index,
            grad_clean, grad_nl,
            T, E, clean_logits.stride(0), noise_logits.stride(0), noise.stride(0),
            grad_clean.stride(0), grad_nl.stride(0), eps,
            K=k,
            HAS_LOAD=k < E,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            CDT=tl_dtype(cdt),
            num_warps=num_warps,
        )
    return grad_clean, grad_nl
