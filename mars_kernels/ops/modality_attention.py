"""Modality attention: self-attention across the modality axis at every token
position, the fusion of MARS (docs/design.md section 3), as one op.

Shapes: T positions, M modalities, D model width, H heads of D / H columns.
``nn.MultiheadAttention`` on ``[T, M, D]`` does the same maths through head
transposes, copies and a per-position attention kernel built for long
sequences; with M = 2..6 that overhead is most of the layer. The compiled
kernels read the packed q | k | v projections in place and do each position's
M x M attention in registers.

Kernel-level ops (schemas below, beside their callers): ``modality_attention_fwd/_bwd``;
C++ in ``csrc/cpu/modality_attention.cpp``, Triton in
``ops/triton/modality_attention.py`` (also what ``cuda`` runs).
"""
from __future__ import annotations

import functools
import math

import torch

from .. import backend as _backend
from .. import checks as check
from .. import library
from .common import compute_dtype, rand

__all__ = ["modality_attention", "modality_attention_torch", "attention_keep_mask"]


@functools.cache
def _launchers():
    """The Triton launchers, imported on first call (triton is optional)."""
    from .triton import modality_attention

    return modality_attention


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
    kernels. See :func:`modality_attention_torch`.
    """
    check.tensor(qkv, "qkv")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be 3-D [T, M, 3*D], got shape {tuple(qkv.shape)}")
    if qkv.dtype not in check.FLOAT_DTYPES:
        raise TypeError(f"qkv must be float16, bfloat16, float32 or float64, got {qkv.dtype}")
    check.positive_int(num_heads, "num_heads")
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
    impl = _backend.implementation("modality_attention", _backend.resolve(backend, qkv.device))
    if impl == "torch":
        return modality_attention_torch(qkv, num_heads, keep, missing, observed)
    if keep is not None:
        keep = keep.to(compute_dtype(qkv.dtype)).contiguous()
    if missing is not None:
        missing, observed = missing.contiguous(), observed.contiguous()
    out, _ = library.namespace(impl).modality_attention_fwd(qkv.contiguous(), num_heads, keep, missing, observed)
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
    draw = rand(shape, device=device, generator=generator)
    return (draw >= p).to(dtype) / (1 - p)


def modality_attention_torch(
    qkv: torch.Tensor,
    num_heads: int,
    keep: torch.Tensor | None = None,
    missing: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pure-PyTorch twin of :func:`modality_attention`: self-attention
    across the M modality tokens at each of T positions.

    qkv [T, M, 3D]: q | k | v of each modality, each split into ``num_heads``
    heads of D / num_heads columns (the packed in-projection of
    ``nn.MultiheadAttention``). missing [M, 3D] and observed [T, M] bool (both
    or neither): row (t, m) is missing[m] where observed[t, m] is false. keep
    [T, H, M, M] or None multiplies the attention probabilities (a dropout
    mask already scaled by 1 / (1 - p)). -> out [T, M, D] in qkv's dtype:
    out[t, i, head h] = sum_j p'[t, h, i, j] v[t, j, h] with p =
    softmax_j(<q_i, k_j> / sqrt(D / H)), p' = p * keep. Math in float32
    (float64 for float64).

    P masks: observed [P, T, M] runs the attention once per mask on the same
    qkv; keep is then [P, T, H, M, M] and out [P, T, M, D].
    """
    if observed is not None and observed.dim() == 3:
        return torch.stack([
            modality_attention_torch(qkv, num_heads, None if keep is None else keep[p], missing, observed[p])
            for p in range(observed.shape[0])
        ])
    T, M, D3 = qkv.shape
    D = D3 // 3
    dh = D // num_heads
    if missing is not None:
        qkv = torch.where(observed[..., None], qkv, missing)
    q, k, v = qkv.to(compute_dtype(qkv.dtype)).view(T, M, 3, num_heads, dh).unbind(2)  # [T, M, H, dh]
    probs = (torch.einsum("tihd,tjhd->thij", q, k) / math.sqrt(dh)).softmax(dim=-1)
    if keep is not None:
        probs = probs * keep.to(probs.dtype)
    return torch.einsum("thij,tjhd->tihd", probs, v).reshape(T, M, D).to(qkv.dtype)

def _fwd_fake(qkv, num_heads, keep, missing, observed):
    T, M, D3 = qkv.shape
    lead = check.leading_shape(observed, T)
    return qkv.new_empty((*lead, M, D3 // 3)), qkv.new_empty((*lead, num_heads, M, M), dtype=compute_dtype(qkv.dtype))


def _bwd_fake(grad_out, qkv, probs, keep, missing, observed, num_heads):
    return torch.empty_like(qkv), (qkv.new_empty((0,)) if missing is None else torch.empty_like(missing))


def _setup(ctx, args, output):
    ctx.save_for_backward(args["qkv"], output[1], args["keep"], args["missing"], args["observed"])
    ctx.num_heads = args["num_heads"]
    ctx.mark_non_differentiable(output[1])


def _backward(ops, ctx, grad_out, _grad_probs):
    qkv, probs, keep, missing, observed = ctx.saved_tensors
    if grad_out is None:
        return {}
    grad_qkv, grad_missing = ops.modality_attention_bwd(
        grad_out.contiguous(), qkv, probs, keep, missing, observed, ctx.num_heads
    )
    return {"qkv": grad_qkv, "missing": grad_missing if missing is not None else None}


# See reference.modality_attention. qkv [T,M,3D] f16/bf16/f32/f64 contiguous:
# row (t, m) holds q | k | v of modality m at position t, each split into
# num_heads heads of D/num_heads columns (the packed in-projection of
# nn.MultiheadAttention). keep [T,H,M,M] f32 (f64 for f64) or None: multiplies
# the attention probabilities (a dropout mask, already scaled). missing [M,3D]
# (qkv's dtype) and observed [T,M] bool, both or neither: row (t, m) is replaced
# by missing[m] where observed[t, m] is false. observed may also be [P,T,M] (P
# masks over one projection): then keep, probs and out gain a leading P
# ([P,T,H,M,M], [P,T,M,D]) and grad_qkv sums the P attentions' gradients.
# -> out [T,M,D] in qkv's dtype, out[t,i,head h] = sum_j p'[t,h,i,j] v[t,j,h],
#    probs [T,H,M,M] f32: softmax_j(<q_i, k_j> / sqrt(D/H)) before keep.
library.register(
    "modality_attention_fwd(Tensor qkv, int num_heads, Tensor? keep, Tensor? missing, Tensor? observed)"
    " -> (Tensor out, Tensor probs)",
    fake=_fwd_fake, triton=lambda *args: _launchers().modality_attention_fwd(*args),
    setup=_setup, backward=_backward,
)
# -> grad_qkv [T,M,3D] in qkv's dtype (dq | dk | dv; zero on unobserved rows),
#    grad_missing [M,3D] (summed over the unobserved positions, in position-block
#    order; an empty [0] tensor without missing).
library.register(
    "modality_attention_bwd(Tensor grad_out, Tensor qkv, Tensor probs, Tensor? keep, Tensor? missing,"
    " Tensor? observed, int num_heads) -> (Tensor grad_qkv, Tensor grad_missing)",
    fake=_bwd_fake, triton=lambda *args: _launchers().modality_attention_bwd(*args),
)
