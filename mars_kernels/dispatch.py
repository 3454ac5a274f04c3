"""Public dispatch/combine and expert-MLP API: moving token rows to experts,
running the experts, and bringing the gate-weighted results back.

Shapes: T tokens, k experts per token, S = T*k assignments, D model width,
H expert hidden width (H1 = 2H for swiglu), E experts. The default combine is
deterministic (a gather-sum through the inverse permutation, no atomics).
"""
from __future__ import annotations

import torch

from . import _validate as check
from . import backend as _backend
from . import reference
from ._autograd_moe import CpuMoEMLP, FusedMoEMLP, GroupedMLP, Permute, Unpermute
from .meta import MoEMeta

__all__ = ["MoEMeta", "moe_align", "apply_capacity", "permute", "unpermute", "grouped_mlp", "moe_mlp", "ACTIVATIONS"]

ACTIVATIONS = reference.ACTIVATIONS
DEFAULT_BLOCK_SIZE = 64


def _indices(indices, num_experts: int, allow_dropped: bool) -> torch.Tensor:
    check.tensor(indices, "indices")
    if indices.dim() != 2 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be an int32/int64 [T, k] tensor, got {indices.dtype} {tuple(indices.shape)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    top = num_experts if allow_dropped else num_experts - 1
    # A range check costs a device-to-host sync on a GPU; there the kernels
    # rely on the router producing valid ids.
    checkable = indices.device.type == "cpu" and not torch.compiler.is_compiling()
    if checkable and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) > top):
        what = f"[0, {num_experts}] ({num_experts} = dropped)" if allow_dropped else f"[0, {num_experts})"
        raise ValueError(f"indices must lie in {what}, got values in [{int(indices.min())}, {int(indices.max())}]")
    return indices.long()


def moe_align(
    indices: torch.Tensor, num_experts: int, block_size: int = DEFAULT_BLOCK_SIZE, *, backend: str | None = None
) -> MoEMeta:
    """Dispatch metadata (see :class:`MoEMeta`) for indices [T, k] with values
    in [0, E], E marking a dropped assignment. No device-to-host sync."""
    idx = _indices(indices, num_experts, allow_dropped=True)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    name = _backend.resolve(backend, idx.device)
    if name in ("reference", "triton"):  # the torch-ops version is sync-free on GPU as well
        return reference.moe_align(idx, num_experts, block_size)
    T, k = idx.shape
    out = torch.ops.mars_kernels.moe_align(idx.contiguous(), num_experts, block_size)
    return MoEMeta(num_experts, k, block_size, *out)


def apply_capacity(
    indices: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop assignments beyond ``capacity`` per expert, first choices before
    second choices, earlier tokens first (GShard/Switch). Returns (indices with
    dropped ones set to E, weights with dropped ones zeroed, number dropped)."""
    idx = _indices(indices, num_experts, allow_dropped=False)
    check.tensor(weights, "weights")
    check.shape(weights, tuple(idx.shape), "weights", "[T, k] like indices")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
    return reference.apply_capacity(idx, weights, num_experts, capacity)


def _check_meta(meta) -> MoEMeta:
    if not isinstance(meta, MoEMeta):
        raise TypeError(f"meta must be a MoEMeta from moe_align, got {type(meta).__name__}")
    return meta


def permute(x: torch.Tensor, meta: MoEMeta, *, backend: str | None = None) -> torch.Tensor:
    """x [T, D] -> x_sorted [S, D] in expert order (row s = x[permutation[s] // k])."""
    check.float_matrix(x, "x")
    _check_meta(meta)
    if meta.permutation.shape[0] != x.shape[0] * meta.top_k:
        raise ValueError(f"x must have T = {meta.num_tokens} rows for this meta, got {x.shape[0]}")
    name = _backend.resolve(backend, x.device)
    if name in ("reference", "triton"):
        return reference.permute(x, meta)
    return Permute.apply(x.contiguous(), meta.permutation, meta.inverse, meta.top_k, name)


def unpermute(
    y_sorted: torch.Tensor, meta: MoEMeta, weights: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """y_sorted [S, D], weights [T, k] (or None: plain sum) -> y [T, D], the
    gate-weighted sum of each token's k expert rows, deterministic."""
    check.float_matrix(y_sorted, "y_sorted")
    _check_meta(meta)
    S = meta.permutation.shape[0]
    if y_sorted.shape[0] != S:
        raise ValueError(f"y_sorted must have S = T*k = {S} rows, got {y_sorted.shape[0]}")
    T, k = S // max(meta.top_k, 1), meta.top_k
    if weights is not None:
        check.float_matrix(weights, "weights")
        check.shape(weights, (T, k), "weights", "[T, k]")
        weights = weights.to(reference.compute_dtype(y_sorted.dtype)).contiguous()
    name = _backend.resolve(backend, y_sorted.device)
    if name in ("reference", "triton"):
        if weights is None:
            weights = y_sorted.new_ones(T, k, dtype=reference.compute_dtype(y_sorted.dtype))
        return reference.unpermute(y_sorted, meta, weights)
    return Unpermute.apply(y_sorted.contiguous(), weights, meta.permutation, meta.inverse, k, name)


def _expert_weights(x_dtype, D, w1, b1, w2, b2, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, t, dims in (("w1", w1, 3), ("w2", w2, 3)):
        check.tensor(t, name)
        if t.dim() != dims:
            raise ValueError(f"{name} must be 3-D, got shape {tuple(t.shape)}")
        if t.dtype != x_dtype:
            raise TypeError(f"{name} must have the activations' dtype {x_dtype}, got {t.dtype}")
    E, H = w2.shape[0], w2.shape[1]
    H1 = 2 * H if activation == "swiglu" else H
    check.shape(w1, (E, D, H1), "w1", f"[E, D, {'2H' if activation == 'swiglu' else 'H'}]")
    check.shape(w2, (E, H, D), "w2", "[E, H, D]")
    for name, b, n in (("b1", b1, H1), ("b2", b2, D)):
        if b is not None:
            check.tensor(b, name)
            check.shape(b, (E, n), name, f"[E, {n}]")
            if b.dtype != x_dtype:
                raise TypeError(f"{name} must have dtype {x_dtype}, got {b.dtype}")
    return E


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
    w2 [E, H, D], b2 [E, D] or None. Rows of dropped assignments give zeros."""
    check.float_matrix(x_sorted, "x_sorted")
    _check_meta(meta)
    E = _expert_weights(x_sorted.dtype, x_sorted.shape[1], w1, b1, w2, b2, activation)
    if E != meta.num_experts:
        raise ValueError(f"w1/w2 must hold E = {meta.num_experts} experts for this meta, got {E}")
    check.same_device({"x_sorted": x_sorted, "w1": w1, "w2": w2})
    name = _backend.resolve(backend, x_sorted.device)
    if name == "reference":
        return reference.grouped_mlp(x_sorted, w1, b1, w2, b2, meta, activation)
    if name in ("triton", "cuda"):
        # The fused Triton MLP with an identity gather: each sorted row is its own token.
        S = x_sorted.shape[0]
        ident = torch.arange(S, device=x_sorted.device)
        flat = meta._replace(top_k=1, permutation=ident, inverse=ident)
        ones = x_sorted.new_ones(S, 1, dtype=torch.float32)
        return FusedMoEMLP.apply(x_sorted.contiguous(), ones, w1, b1, w2, b2, flat, activation)
    needs_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_sorted, w1, b1, w2, b2)
    )
    return GroupedMLP.apply(x_sorted.contiguous(), w1, b1, w2, b2, meta.offsets, activation, name, needs_backward)


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
    permute -> grouped_mlp -> unpermute.
    """
    check.float_matrix(x, "x")
    _check_meta(meta)
    T, D = x.shape
    check.float_matrix(weights, "weights")
    check.shape(weights, (T, meta.top_k), "weights", "[T, k]")
    _expert_weights(x.dtype, D, w1, b1, w2, b2, activation)
    name = _backend.resolve(backend, x.device)
    if name in ("triton", "cuda"):
        from .triton import moe as triton_moe

        if meta.block_size != triton_moe.BLOCK_M:
            raise ValueError(f"meta.block_size must be {triton_moe.BLOCK_M} for the triton expert MLP, got {meta.block_size}")
        w = weights.to(torch.float32).contiguous()
        return FusedMoEMLP.apply(x.contiguous(), w, w1, b1, w2, b2, meta, activation)
    if name == "cpu":
        w = weights.to(reference.compute_dtype(x.dtype)).contiguous()
        needs_backward = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weights, w1, b1, w2, b2)
        )
        return CpuMoEMLP.apply(
            x.contiguous(), w, w1, b1, w2, b2, meta.permutation, meta.offsets, meta.top_k, activation, needs_backward
        )
    y_sorted = grouped_mlp(permute(x, meta, backend=name), w1, b1, w2, b2, meta, activation, backend=name)
    return unpermute(y_sorted, meta, weights, backend=name)
