"""Modality attention: self-attention across the modality axis at every token
position, the fusion of MARS (DESIGN 3), as one op.

Shapes: T positions, M modalities, D model width, H heads of D / H columns.
``nn.MultiheadAttention`` on ``[T, M, D]`` does the same maths through head
transposes, copies and a per-position attention kernel built for long
sequences; with M = 2..6 that overhead is most of the layer. The compiled
kernels read the packed q | k | v projections in place and do each position's
M x M attention in registers.
"""
from __future__ import annotations

import torch

from . import _validate as check
from . import backend as _backend
from . import reference
from ._autograd import ModalityAttention

__all__ = ["modality_attention", "attention_keep_mask"]


def modality_attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    keep: torch.Tensor | None = None,
    missing: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """qkv [T, M, 3D] -> out [T, M, D] (or [P, T, M, D], see below) in qkv's dtype.

    Row (t, m) of ``qkv`` is q | k | v of modality m at position t, each split
    into ``num_heads`` heads of D / num_heads columns: exactly
    ``F.linear(x, mha.in_proj_weight, mha.in_proj_bias)`` for an
    ``nn.MultiheadAttention`` ``mha``, whose ``out_proj`` then applies to the
    result. out[t, i, head h] = sum_j p'[t, h, i, j] v[t, j, head h], p =
    softmax_j(<q_i, k_j> / sqrt(D / H)), p' = p * keep (keep [T, H, M, M], e.g.
    from :func:`attention_keep_mask`; no gradient flows to it).

    Missing modalities: with ``missing`` [M, 3D] (the projections of the
    missing-modality embeddings) and ``observed`` [T, M] bool, row (t, m) is
    missing[m] wherever observed[t, m] is false — one projection of the tokens
    then serves any number of masks. Gradients flow to qkv (zero on unobserved
    rows) and to missing (summed over the unobserved positions).

    Several masks in one call: ``observed`` [P, T, M] runs the attention once
    per mask on the same qkv and returns out [P, T, M, D] (``keep`` is then
    [P, T, H, M, M]). The gradient to qkv is the sum over the P masks, formed in
    the kernel: cheaper than P calls whose gradients autograd adds.

    Math in float32 (float64 for float64). The cuda backend runs the Triton
    kernels. See :func:`mars_kernels.reference.modality_attention`.
    """
    check.tensor(qkv, "qkv")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be 3-D [T, M, 3*D], got shape {tuple(qkv.shape)}")
    if qkv.dtype not in check.FLOAT_DTYPES:
        raise TypeError(f"qkv must be float16, bfloat16, float32 or float64, got {qkv.dtype}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    T, M, D3 = qkv.shape
    if D3 == 0 or D3 % 3 or (D3 // 3) % num_heads:
        raise ValueError(
            f"qkv's last dimension must be 3*D with D divisible by num_heads={num_heads}, got {D3}"
        )
    tensors = {"qkv": qkv}
    if (missing is None) != (observed is None):
        raise ValueError("missing and observed must be given together (or neither)")
    lead = (T,)
    if missing is not None:
        check.tensor(missing, "missing")
        check.shape(missing, (M, D3), "missing", "[M, 3D]")
        if missing.dtype != qkv.dtype:
            raise TypeError(f"missing must have qkv's dtype ({qkv.dtype}), got {missing.dtype}")
        lead = check.masks(observed, T, M)
        tensors.update(missing=missing, observed=observed)
    if keep is not None:
        check.tensor(keep, "keep")
        check.shape(keep, (*lead, num_heads, M, M), "keep", "[T, H, M, M]" if len(lead) == 1 else "[P, T, H, M, M]")
        if not keep.is_floating_point():
            raise TypeError(f"keep must be a floating tensor (0 or 1/(1-p) entries), got {keep.dtype}")
        tensors["keep"] = keep
    check.same_device(tensors)
    name = _backend.resolve(backend, qkv.device)
    if name == "reference":
        return reference.modality_attention(qkv, num_heads, keep, missing, observed)
    if keep is not None:
        keep = keep.to(reference.compute_dtype(qkv.dtype)).contiguous()
    if missing is not None:
        missing, observed = missing.contiguous(), observed.contiguous()
    out, _ = ModalityAttention.apply(
        qkv.contiguous(), num_heads, keep, missing, observed, "triton" if name == "cuda" else name
    )
    return out


def attention_keep_mask(
    positions: int,
    num_heads: int,
    num_modalities: int,
    p: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """Attention dropout for :func:`modality_attention`: keep [T, H, M, M] with
    entries 0 (probability ``p``) or 1 / (1 - p); None when p == 0."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"p must be a dropout probability in [0, 1), got {p!r}")
    if p == 0:
        return None
    shape = (positions, num_heads, num_modalities, num_modalities)
    draw = torch.rand(shape, device=device, generator=generator)
    return (draw >= p).to(dtype) / (1 - p)
