"""autograd.Functions for dispatch/combine and the expert MLP on the compiled
backends (``torch.ops.mars_kernels`` for cpu and cuda); the Triton fused
expert MLP has its own Function (``FusedMoEMLP``). Unlike the gating ops the
raw dispatch ops get no autograd formula of their own: their backward needs
metadata (the inverse permutation) that the forward op does not take.
"""
from __future__ import annotations

import torch

from . import backend as _backend

__all__ = ["Permute", "Unpermute", "GroupedMLP", "CpuMoEMLP", "FusedMoEMLP"]

# --------------------------------------------------------------------------- permute / unpermute


class Permute(torch.autograd.Function):
    """(x [T,D], permutation [S], inverse [S], top_k, backend) -> x_sorted [S,D]."""

    @staticmethod
    def forward(ctx, x, permutation, inverse, top_k, backend):
        ctx.save_for_backward(inverse)
        ctx.top_k, ctx.backend = top_k, backend
        return _backend.kernels(backend).moe_permute(x, permutation, top_k)

    @staticmethod
    def backward(ctx, grad_sorted):
        (inverse,) = ctx.saved_tensors
        grad_x = _backend.kernels(ctx.backend).moe_unpermute(grad_sorted.contiguous(), inverse, None, ctx.top_k)
        return grad_x, None, None, None, None


class Unpermute(torch.autograd.Function):
    """(y_sorted [S,D], weights [T,k] or None, permutation, inverse, top_k, backend) -> y [T,D]."""

    @staticmethod
    def forward(ctx, y_sorted, weights, permutation, inverse, top_k, backend):
        ctx.save_for_backward(y_sorted, weights, permutation, inverse)
        ctx.top_k, ctx.backend, ctx.weighted = top_k, backend, weights is not None
        return _backend.kernels(backend).moe_unpermute(y_sorted, inverse, weights, top_k)

    @staticmethod
    def backward(ctx, grad_out):
        y_sorted, weights, permutation, inverse = ctx.saved_tensors
        kern = _backend.kernels(ctx.backend)
        grad_out = grad_out.contiguous()
        if not ctx.weighted:
            return kern.moe_permute(grad_out, permutation, ctx.top_k), None, None, None, None, None
        grad_y, grad_w = kern.moe_unpermute_bwd(grad_out, y_sorted, permutation, inverse, weights)
        return grad_y, grad_w, None, None, None, None


# --------------------------------------------------------------------------- grouped expert MLP


class GroupedMLP(torch.autograd.Function):
    """(x_sorted [S,D], w1, b1, w2, b2, offsets [E+1], activation, backend,
    needs_backward) -> y_sorted [S,D]. Without a backward the pre-activations
    are not kept, which lowers inference memory."""

    @staticmethod
    def forward(ctx, x_sorted, w1, b1, w2, b2, offsets, activation, backend, needs_backward):
        y, h = _backend.kernels(backend).grouped_mlp_fwd(
            x_sorted, offsets, w1, b1, w2, b2, activation, needs_backward
        )
        ctx.save_for_backward(x_sorted, h, offsets, w1, w2)
        ctx.activation, ctx.backend = activation, backend
        ctx.has_bias = (b1 is not None, b2 is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_sorted, h, offsets, w1, w2 = ctx.saved_tensors
        dx, dw1, db1, dw2, db2 = _backend.kernels(ctx.backend).grouped_mlp_bwd(
            grad_y.contiguous(), x_sorted, h, offsets, w1, w2, ctx.activation
        )
        has_b1, has_b2 = ctx.has_bias
        return dx, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None, None, None, None, None


class CpuMoEMLP(torch.autograd.Function):
    """The CPU fused expert MLP: gather, GEMMs and gate-weighted accumulation per
    expert in small reused buffers. (x [T,D], weights [T,k], w1, b1, w2, b2,
    permutation, offsets, top_k, activation, needs_backward) -> y [T,D]."""

    @staticmethod
    def forward(ctx, x, weights, w1, b1, w2, b2, permutation, offsets, top_k, activation, needs_backward):
        y, h = torch.ops.mars_kernels.moe_mlp_fwd(
            x, weights, permutation, offsets, top_k, w1, b1, w2, b2, activation, needs_backward
        )
        ctx.save_for_backward(x, weights, w1, w2, b2, permutation, offsets, h)
        ctx.top_k, ctx.activation, ctx.has_b1 = top_k, activation, b1 is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weights, w1, w2, b2, permutation, offsets, h = ctx.saved_tensors
        dx, dw, dw1, db1, dw2, db2 = torch.ops.mars_kernels.moe_mlp_bwd(
            grad_y.contiguous(), x, weights, permutation, offsets, ctx.top_k, w1, w2, b2, h, ctx.activation
        )
        return (dx, dw, dw1, db1 if ctx.has_b1 else None, dw2, db2 if b2 is not None else None,
                None, None, None, None, None)


class FusedMoEMLP(torch.autograd.Function):
    """Triton: gather -> expert MLP -> gate-weighted combine in two fused GEMMs.
    (x [T,D], weights [T,k], w1, b1, w2, b2, meta, activation) -> y [T,D]."""

    @staticmethod
    def forward(ctx, x, weights, w1, b1, w2, b2, meta, activation):
        from .triton import moe

        y, h = moe.moe_mlp_fwd(x, weights, meta, w1, b1, w2, b2, activation)
        ctx.save_for_backward(x, weights, w1, b1, w2, b2, h)
        ctx.meta, ctx.activation = meta, activation
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from .triton import moe

        x, weights, w1, b1, w2, b2, h = ctx.saved_tensors
        dx, dw, dw1, db1, dw2, db2 = moe.moe_mlp_bwd(
            grad_y.contiguous(), x, weights, ctx.meta, w1, b1, w2, b2, h, ctx.activation
        )
        return dx, dw, dw1, db1 if b1 is not None else None, dw2, db2 if b2 is not None else None, None, None
