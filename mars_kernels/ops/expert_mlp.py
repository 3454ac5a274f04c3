"""The expert MLPs of a mixture of experts: each expert's MLP on its rows
(``grouped_mlp``, rows already in expert order) and the whole expert
computation in token order (``moe_mlp``: gather, MLP and gate-weighted combine).

Shapes: T tokens, k experts per token, S = T*k assignments, D model width, H
expert hidden width (H1 = 2H for the gated activations, whose w1 columns hold
gate and up), E experts. Weights may be strided views (e.g. HF transformers'
[E, 2I, D] layout transposed): the kernels take strides, and the weight
gradients come back with the weights' strides. Everything is deterministic (no
atomics). Activations: :class:`Activation`.

Kernel-level ops (schemas below, beside their callers): ``grouped_mlp_fwd/_bwd``
and ``moe_mlp_fwd/_bwd``; C++ in ``csrc/cpu/expert_mlp.cpp`` (per-expert ATen
GEMMs with fused row passes), Triton in
``ops/triton/expert_mlp.py`` (the gather fused into the first GEMM and the gate
weighting/scatter into the second, ScatterMoE style; also what ``cuda`` runs).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .. import checks as check
from .. import library
from ..meta import MoEMeta
from .activation import ACTIVATIONS, Activation, parse_activation
from .common import compute_dtype
from .dispatch import check_meta, permute_torch, unpermute_torch

__all__ = [
    "ACTIVATIONS", "Activation", "parse_activation", "activation",
    "grouped_mlp", "grouped_mlp_torch", "moe_mlp", "moe_mlp_torch",
]


@functools.cache
def _launchers():
    """The Triton launchers, imported on first call (triton is optional)."""
    from .triton import expert_mlp

    return expert_mlp

def _element(x: torch.Tensor, fn: str, alpha: float) -> torch.Tensor:
    if fn == "gelu":
        return F.gelu(x)
    if fn == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if fn == "silu":
        return F.silu(x)
    if fn == "relu":
        return F.relu(x)
    if fn == "relu2":
        return F.relu(x).square()
    return x * torch.sigmoid(alpha * x)


def activation(h: torch.Tensor, spec) -> torch.Tensor:
    """The activation of h [..., H1] -> [..., H] (see :class:`Activation`)."""
    act = parse_activation(spec)
    if not act.gated:
        return _element(h, act.fn, act.alpha)
    gate, up = (h[..., ::2], h[..., 1::2]) if act.interleaved else h.chunk(2, dim=-1)
    if act.clamp:
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit) + act.up_offset
    return _element(gate, act.fn, act.alpha) * up


def _check_expert_weights(x_dtype, D, w1, b1, w2, b2, activation_name) -> int:
    """Validate w1 [E, D, H1], b1 [E, H1] or None, w2 [E, H, D], b2 [E, D] or None -> E."""
    gated = parse_activation(activation_name).gated
    for name, t in (("w1", w1), ("w2", w2)):
        check.tensor(t, name)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D, got shape {tuple(t.shape)}")
        if t.dtype != x_dtype:
            raise TypeError(f"{name} must have the activations' dtype {x_dtype}, got {t.dtype}")
    E, H = w2.shape[0], w2.shape[1]
    H1 = 2 * H if gated else H
    check.shape(w1, (E, D, H1), "w1", f"[E, D, {'2H' if gated else 'H'}]")
    check.shape(w2, (E, H, D), "w2", "[E, H, D]")
    for name, b, n in (("b1", b1, H1), ("b2", b2, D)):
        if b is not None:
            check.tensor(b, name)
            check.shape(b, (E, n), name, f"[E, {n}]")
            if b.dtype != x_dtype:
                raise TypeError(f"{name} must have dtype {x_dtype}, got {b.dtype}")
    return E


def _needs_backward(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- grouped MLP (rows in expert order)


def grouped_mlp(
    x_sorted: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    meta: MoEMeta,
    activation: str = "gelu",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Each expert's MLP on its rows of x_sorted [S, D] -> y_sorted [S, D]:
    act(x W1[e] + b1[e]) W2[e] + b2[e]; w1 [E, D, H1], b1 [E, H1] or None,
    w2 [E, H, D], b2 [E, D] or None. Rows of dropped assignments give zeros.
    Without a backward the pre-activations are not kept (less inference memory)."""
    check.float_matrix(x_sorted, "x_sorted")
    check_meta(meta, x_sorted.device)
    E = _check_expert_weights(x_sorted.dtype, x_sorted.shape[1], w1, b1, w2, b2, activation)
    if E != meta.num_experts:
        raise ValueError(f"w1/w2 must hold E = {meta.num_experts} experts for this meta, got {E}")
    if meta.permutation.shape[0] != x_sorted.shape[0]:
        raise ValueError(f"x_sorted must have S = {meta.permutation.shape[0]} rows for this meta, got {x_sorted.shape[0]}")
    check.same_device({"x_sorted": x_sorted, "w1": w1, "b1": b1, "w2": w2, "b2": b2})
    impl = _backend.implementation("grouped_mlp", _backend.resolve(backend, x_sorted.device))
    if impl == "torch":
        return grouped_mlp_torch(x_sorted, w1, b1, w2, b2, meta, activation)
    y, _ = library.namespace(impl).grouped_mlp_fwd(
        x_sorted.contiguous(), meta.offsets, w1, b1, w2, b2, activation, _needs_backward(x_sorted, w1, b1, w2, b2)
    )
    return y


def grouped_mlp_torch(
    x_sorted: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    meta: MoEMeta,
    activation_name: str,
) -> torch.Tensor:
    """The pure-PyTorch twin of :func:`grouped_mlp`: a loop over the experts'
    row ranges (one host read of the offsets)."""
    offsets = meta.offsets.tolist()
    pieces = []
    for e in range(meta.num_experts):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        h = x_sorted[lo:hi] @ w1[e]
        if b1 is not None:
            h = h + b1[e]
        y = activation(h, activation_name) @ w2[e]
        if b2 is not None:
            y = y + b2[e]
        pieces.append(y)
    pieces.append(x_sorted.new_zeros(x_sorted.shape[0] - offsets[-1], w2.shape[2]))
    return torch.cat(pieces)


def _grouped_fwd_fake(x_sorted, offsets, w1, b1, w2, b2, activation, save_h=True):
    rows = x_sorted.shape[0] if save_h else 0
    return x_sorted.new_empty((x_sorted.shape[0], w2.shape[2])), x_sorted.new_empty((rows, w1.shape[2]))


def _grouped_bwd_fake(grad_y_sorted, x_sorted, h, offsets, w1, w2, activation):
    E, H1, D = w1.shape[0], w1.shape[2], w2.shape[2]
    return torch.empty_like(x_sorted), torch.empty_like(w1), w1.new_empty((E, H1)), torch.empty_like(w2), w2.new_empty((E, D))


def _grouped_setup(ctx, args, output):
    ctx.save_for_backward(args["x_sorted"], output[1], args["offsets"], args["w1"], args["w2"])
    ctx.activation = args["activation"]
    ctx.has_bias = (args["b1"] is not None, args["b2"] is not None)


def _grouped_backward(ops, ctx, grad_y, _grad_h):
    x_sorted, h, offsets, w1, w2 = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = ops.grouped_mlp_bwd(grad_y.contiguous(), x_sorted, h, offsets, w1, w2, ctx.activation)
    has_b1, has_b2 = ctx.has_bias
    return {"x_sorted": dx, "w1": dw1, "b1": db1 if has_b1 else None, "w2": dw2, "b2": db2 if has_b2 else None}


# Each expert's MLP on its contiguous rows of x_sorted [S,D]: h = x W1[e] + b1[e]
# ([S,H1], returned for the backward when save_h, else an empty [0,H1] tensor),
# y = act(h) W2[e] + b2[e] ([S,D]); rows from offsets[E] on are zero.
# w1 [E,D,H1], w2 [E,H,D], H1 = 2H for the gated activations.
library.register(
    "grouped_mlp_fwd(Tensor x_sorted, Tensor offsets, Tensor w1, Tensor? b1, Tensor w2,"
    " Tensor? b2, str activation, bool save_h=True) -> (Tensor y_sorted, Tensor h)",
    fake=_grouped_fwd_fake, triton=lambda *args: _launchers().grouped_mlp_fwd(*args),
    setup=_grouped_setup, backward=_grouped_backward,
)
# -> grad_x_sorted [S,D], grad_w1, grad_b1 [E,H1], grad_w2, grad_b2 [E,D].
library.register(
    "grouped_mlp_bwd(Tensor grad_y_sorted, Tensor x_sorted, Tensor h, Tensor offsets, Tensor w1,"
    " Tensor w2, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_grouped_bwd_fake, triton=lambda *args: _launchers().grouped_mlp_bwd(*args),
)


# --------------------------------------------------------------------------- fused expert computation (token order)


def moe_mlp(
    x: torch.Tensor,
    weights: torch.Tensor,
    meta: MoEMeta,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str = "gelu",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The whole expert computation: y[t] = sum_j weights[t, j] * Expert_{e_tj}(x[t]).

    x [T, D], weights [T, k] (gradient flows to them too) -> y [T, D]. On the
    triton backend the gather is fused into the first GEMM and the gate
    weighting/scatter into the second; on cpu each expert's rows are gathered,
    multiplied and accumulated back in small reused buffers; the reference runs
    permute -> grouped_mlp -> unpermute. ``meta.block_size`` must be the
    backend's (``mars_kernels.backend.EXPERT_BLOCK_SIZE``).
    """
    check.float_matrix(x, "x")
    check_meta(meta, x.device)
    T, D = x.shape
    check.float_matrix(weights, "weights")
    check.shape(weights, (T, meta.top_k), "weights", "[T, k]")
    E = _check_expert_weights(x.dtype, D, w1, b1, w2, b2, activation)
    if E != meta.num_experts:
        raise ValueError(f"w1/w2 must hold E = {meta.num_experts} experts for this meta (moe_align's "
                         f"num_experts), got {E}")
    check.same_device({"x": x, "weights": weights, "w1": w1, "b1": b1, "w2": w2, "b2": b2})
    name = _backend.resolve(backend, x.device)
    impl = _backend.implementation("moe_mlp", name)
    if impl == "torch":
        return moe_mlp_torch(x, weights, meta, w1, b1, w2, b2, activation)
    if impl == "triton" and meta.block_size != _backend.EXPERT_BLOCK_SIZE[name]:
        raise ValueError(
            f"meta.block_size must be {_backend.EXPERT_BLOCK_SIZE[name]} for the {name} expert MLP "
            f"(moe_align(..., block_size={_backend.EXPERT_BLOCK_SIZE[name]})), got {meta.block_size}"
        )
    w = weights.to(compute_dtype(x.dtype)).contiguous()
    y, _ = library.namespace(impl).moe_mlp_fwd(
        x.contiguous(), w, meta.permutation, meta.inverse, meta.offsets, meta.block_expert, meta.block_start,
        meta.top_k, meta.block_size, w1, b1, w2, b2, activation, _needs_backward(x, weights, w1, b1, w2, b2),
    )
    return y


def moe_mlp_torch(
    x: torch.Tensor,
    weights: torch.Tensor,
    meta: MoEMeta,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation_name: str,
) -> torch.Tensor:
    """The pure-PyTorch twin of :func:`moe_mlp`: permute -> grouped MLP -> unpermute."""
    y_sorted = grouped_mlp_torch(permute_torch(x, meta), w1, b1, w2, b2, meta, activation_name)
    return unpermute_torch(y_sorted, meta, weights)


def _moe_fwd_fake(x, weights, permutation, inverse, offsets, block_expert, block_start, top_k, block_size,
                  w1, b1, w2, b2, activation, save_h):
    rows = permutation.shape[0] if save_h else 0
    return torch.empty_like(x), x.new_empty((rows, w1.shape[2]))


def _moe_bwd_fake(grad_y, x, weights, permutation, inverse, offsets, block_expert, block_start, top_k, block_size,
                  w1, w2, b2, h, activation):
    E, H1, D = w1.shape[0], w1.shape[2], w2.shape[2]
    return (
        torch.empty_like(x), torch.empty_like(weights), torch.empty_like(w1), w1.new_empty((E, H1)),
        torch.empty_like(w2), w2.new_empty((E, D)),
    )


_META_ARGS = ("permutation", "inverse", "offsets", "block_expert", "block_start")


def _moe_setup(ctx, args, output):
    ctx.save_for_backward(args["x"], args["weights"], args["w1"], args["w2"], args["b2"], output[1],
                          *(args[n] for n in _META_ARGS))
    ctx.top_k, ctx.block_size, ctx.activation = args["top_k"], args["block_size"], args["activation"]
    ctx.has_b1 = args["b1"] is not None


def _moe_backward(ops, ctx, grad_y, _grad_h):
    x, weights, w1, w2, b2, h, *meta = ctx.saved_tensors
    permutation, inverse, offsets, block_expert, block_start = meta
    dx, dw, dw1, db1, dw2, db2 = ops.moe_mlp_bwd(
        grad_y.contiguous(), x, weights, permutation, inverse, offsets, block_expert, block_start,
        ctx.top_k, ctx.block_size, w1, w2, b2, h, ctx.activation,
    )
    return {"x": dx, "weights": dw, "w1": dw1, "b1": db1 if ctx.has_b1 else None, "w2": dw2,
            "b2": db2 if b2 is not None else None}


# The whole expert computation in token order, without materialising T*k rows:
# y[t] = sum over t's assignments of w * (act(x[t] W1[e] + b1[e]) W2[e] + b2[e]),
# accumulated in f32 in expert order. x [T,D], weights [T,k] f32; permutation,
# inverse, offsets, block_expert, block_start, top_k and block_size are the
# MoEMeta of moe_align (the CPU kernels read permutation and offsets, the
# row-block kernels the rest). -> y [T,D], h [S,H1] in sorted order (empty
# [0,H1] unless save_h).
library.register(
    "moe_mlp_fwd(Tensor x, Tensor weights, Tensor permutation, Tensor inverse, Tensor offsets,"
    " Tensor block_expert, Tensor block_start, int top_k, int block_size, Tensor w1, Tensor? b1,"
    " Tensor w2, Tensor? b2, str activation, bool save_h) -> (Tensor y, Tensor h)",
    fake=_moe_fwd_fake, triton=lambda *args: _launchers().moe_mlp_fwd(*args),
    setup=_moe_setup, backward=_moe_backward,
)
# -> grad_x [T,D], grad_weights [T,k] f32, grad_w1, grad_b1 [E,H1], grad_w2, grad_b2 [E,D].
library.register(
    "moe_mlp_bwd(Tensor grad_y, Tensor x, Tensor weights, Tensor permutation, Tensor inverse, Tensor offsets,"
    " Tensor block_expert, Tensor block_start, int top_k, int block_size, Tensor w1, Tensor w2, Tensor? b2,"
    " Tensor h, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_moe_bwd_fake, triton=lambda *args: _launchers().moe_mlp_bwd(*args),
)
