"""Triton launchers for modality attention (the MARS fusion, docs/design.md section 3; ops module
:mod:`mars_kernels.ops.modality_attention`, kernels in ``_modality_attention_kernels.py``).

Same contract as ``torch.ops.mars_kernels.modality_attention_fwd`` / ``_bwd``
(the schema in :mod:`mars_kernels.ops.modality_attention`; ground truth :func:`mars_kernels.ops.modality_attention.modality_attention_torch`).
The ``cuda`` backend runs these kernels too. Inputs are expected validated;
``qkv`` and ``keep`` contiguous.

Shapes: T positions, M modalities, D model width, H heads of DH = D / H.
Grid: (ceil(T / BLOCK_T), H). The backward runs two kernels: the score
gradients ds per instance, then per (position block, head) each target
modality's dq, dk, dv summed over the masks in registers and stored once:
deterministic, no atomics, no read-modify-write of global memory.
"""
from __future__ import annotations

import math

import torch
import triton

from ..common import compute_dtype
from . import _modality_attention_kernels as _k
from .launch import check_float, device_guard, mask_args, tl_dtype

__all__ = ["modality_attention_fwd", "modality_attention_bwd"]

# Elements of one [BLOCK_T, BLOCK_DH] tile per program on a GPU / in the interpreter.
_GPU_TILE = 2048
_INTERPRETER_TILE = 4096


def _dims(qkv: torch.Tensor, num_heads: int) -> tuple[int, int, int, int]:
    check_float("qkv", qkv)
    if qkv.dim() != 3 or qkv.shape[2] % 3 or qkv.shape[2] == 0 or (qkv.shape[2] // 3) % num_heads:
        raise ValueError(
            f"qkv must be [T, M, 3*D] with D divisible by num_heads={num_heads}, got shape {tuple(qkv.shape)}"
        )
    T, M, D3 = qkv.shape
    return T, M, D3 // 3, D3 // 3 // num_heads


def _scale(dh: int, cdt: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 / sqrt(DH) as a [1] tensor of the compute dtype: a Python float would
    reach a compiled kernel as float32 (the interpreter keeps float64)."""
    return torch.full((1,), 1.0 / math.sqrt(dh), dtype=cdt, device=device)


def _launch(T: int, M: int, dh: int, num_heads: int, device: torch.device) -> tuple[tuple[int, int], dict]:
    block_dh = triton.next_power_of_2(dh)
    tile = _GPU_TILE if device.type == "cuda" else _INTERPRETER_TILE
    block_t = max(1, min(tile // block_dh, triton.next_power_of_2(max(T, 1))))
    grid = (triton.cdiv(T, block_t), num_heads)
    meta = dict(DH=dh, BLOCK_T=block_t, BLOCK_M=triton.next_power_of_2(M), BLOCK_DH=block_dh, num_warps=4)
    return grid, meta


def modality_attention_fwd(
    qkv: torch.Tensor,
    num_heads: int,
    keep: torch.Tensor | None,
    missing: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [T, M, 3D], keep [T, H, M, M] or None, missing [M, 3D] and observed
    [T, M] bool or None -> out [T, M, D] (qkv's dtype), probs [T, H, M, M]
    f32/f64 (softmax_j(<q_i, k_j> / sqrt(DH)) before keep). With observed
    [P, T, M], keep, out and probs have a leading P."""
    T, M, D, dh = _dims(qkv, num_heads)
    cdt = compute_dtype(qkv.dtype)
    miss, obs, has_missing, P, lead = mask_args(qkv, missing, observed)
    out = torch.empty((*lead, M, D), dtype=qkv.dtype, device=qkv.device)
    probs = torch.empty((*lead, num_heads, M, M), dtype=cdt, device=qkv.device)
    if P * T == 0 or M == 0:
        return out, probs
    grid, meta = _launch(P * T, M, dh, num_heads, qkv.device)
    with device_guard(qkv):
        _k.modality_attention_fwd_kernel[grid](
            qkv, probs if keep is None else keep, miss, obs, out, probs,
            T, P * T, M, D, num_heads, _scale(dh, cdt, qkv.device),
            HAS_KEEP=keep is not None, HAS_MISSING=has_missing, CDT=tl_dtype(cdt), **meta,
        )
    return out, probs


def modality_attention_bwd(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    probs: torch.Tensor,
    keep: torch.Tensor | None,
    missing: torch.Tensor | None,
    observed: torch.Tensor | None,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> grad_qkv [T, M, 3D] in qkv's dtype (dq | dk | dv, summed over the
    masks; zero on rows no mask observes), grad_missing [M, 3D] (an empty [0]
    tensor without missing)."""
    T, M, D, dh = _dims(qkv, num_heads)
    cdt = compute_dtype(qkv.dtype)
    grad = torch.zeros((T, M, 3 * D), dtype=cdt, device=qkv.device)
    grid, meta = _launch(T, M, dh, num_heads, qkv.device)
    miss, obs, has_missing, P, _ = mask_args(qkv, missing, observed)
    part = torch.zeros((grid[0] if has_missing else 0, M, 3 * D), dtype=cdt, device=qkv.device)
    if T > 0 and M > 0:
        scale = _scale(dh, cdt, qkv.device)
        keep_t = probs if keep is None else keep
        grad_out = grad_out.contiguous()
        ds = torch.empty_like(probs)
        score_grid, score_meta = _launch(P * T, M, dh, num_heads, qkv.device)
        with device_guard(qkv):
            _k.modality_attention_bwd_scores_kernel[score_grid](
                grad_out, qkv, probs, keep_t, miss, obs, ds, T, P * T, M, D, num_heads, scale,
                HAS_KEEP=keep is not None, HAS_MISSING=has_missing, CDT=tl_dtype(cdt), **score_meta,
            )
            _k.modality_attention_bwd_grads_kernel[grid](
                grad_out, qkv, probs, keep_t, ds, miss, obs, grad, part, T, P, M, D, num_heads,
                HAS_KEEP=keep is not None, HAS_MISSING=has_missing, CDT=tl_dtype(cdt), **meta,
            )
    grad_missing = part.sum(0).to(missing.dtype) if has_missing else qkv.new_empty((0,))
    return grad.to(qkv.dtype), grad_missing
