"""Triton launchers for residual + LayerNorm + mean over modalities (the end of
the MARS fusion, docs/design.md section 3; ops module :mod:`mars_kernels.ops.residual_norm`,
kernels in ``_residual_norm_kernels.py``).

Same contract as ``torch.ops.mars_kernels.residual_norm_mean_fwd`` / ``_bwd``
(the schema in :mod:`mars_kernels.ops.residual_norm`; ground truth :func:`mars_kernels.ops.residual_norm.residual_norm_mean_torch`).
The ``cuda`` backend runs these kernels too. Inputs are expected validated and
contiguous. Grid: (ceil(rows / BLOCK_T),) with rows the P * T instances
(forward) or the T positions (backward).
"""
from __future__ import annotations

import torch
import triton

from ..common import compute_dtype
from . import _residual_norm_kernels as _k
from .launch import device_guard, mask_args, tl_dtype

__all__ = ["residual_norm_mean_fwd", "residual_norm_mean_bwd"]

# Elements of one [BLOCK_T, BLOCK_D] tile per program on a GPU / in the interpreter.
_GPU_TILE = 4096
_INTERPRETER_TILE = 8192


def _launch(rows: int, D: int, device: torch.device) -> tuple[tuple[int], dict]:
    block_d = triton.next_power_of_2(D)
    tile = _GPU_TILE if device.type == "cuda" else _INTERPRETER_TILE
    block_t = max(1, min(tile // block_d, triton.next_power_of_2(max(rows, 1))))
    return (triton.cdiv(rows, block_t),), dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)


def residual_norm_mean_fwd(y, h, weight, bias, missing, observed, eps):
    """-> z [*P, T, D] (h's dtype), mean and rstd [*P, T, M] f32/f64."""
    T, M, D = h.shape
    cdt = compute_dtype(h.dtype)
    miss, obs, has_missing, P, lead = mask_args(h, missing, observed)
    z = torch.empty((*lead, D), dtype=h.dtype, device=h.device)
    mean = torch.empty((*lead, M), dtype=cdt, device=h.device)
    rstd = torch.empty_like(mean)
    if P * T == 0:
        return z, mean, rstd
    grid, meta = _launch(P * T, D, h.device)
    with device_guard(h):
        _k.residual_norm_mean_fwd_kernel[grid](
            y, h, weight, bias, miss, obs, z, mean, rstd, T, P * T, M, D,
            torch.full((1,), float(eps), dtype=cdt, device=h.device),
            HAS_MISSING=has_missing, CDT=tl_dtype(cdt), **meta,
        )
    return z, mean, rstd


def residual_norm_mean_bwd(grad_z, y, h, weight, missing, observed, mean, rstd):
    """-> grad_y, grad_h (summed over the masks), grad_weight, grad_bias,
    grad_missing (an empty [0] tensor without missing)."""
    T, M, D = h.shape
    cdt = compute_dtype(h.dtype)
    miss, obs, has_missing, P, _ = mask_args(h, missing, observed)
    grad_y, grad_h = torch.empty_like(y), torch.empty_like(h)
    grid, meta = _launch(T, D, h.device)
    part = torch.zeros((grid[0], 2 + M, D), dtype=cdt, device=h.device)
    if T > 0:
        with device_guard(h):
            _k.residual_norm_mean_bwd_kernel[grid](
                grad_z.contiguous(), y, h, weight, miss, obs, mean, rstd, grad_y, grad_h, part, T, P, M, D,
                HAS_MISSING=has_missing, CDT=tl_dtype(cdt), **meta,
            )
    total = part.sum(0)
    grad_missing = total[2:].to(h.dtype, copy=True) if has_missing else h.new_empty((0,))
    return grad_y, grad_h, total[0].to(weight.dtype, copy=True), total[1].to(weight.dtype, copy=True), grad_missing
