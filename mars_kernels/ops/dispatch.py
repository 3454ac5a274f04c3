"""Dispatch and combine: the metadata that moves token rows to experts
(``moe_align``), the capacity limit, and the two row moves (``permute`` into
expert order, ``unpermute`` back with the gate weights).

Shapes: T tokens, k experts per token, S = T*k assignments, D model width, E
experts. The combine is deterministic (a gather-sum through the inverse
permutation, no atomics); nothing here syncs the device with the host.

Kernel-level ops (schemas below, beside their callers): ``moe_align``,
``moe_permute``, ``moe_unpermute``, ``moe_unpermute_bwd``; C++ in
``csrc/cpu/dispatch.cpp``, CUDA in ``csrc/cuda/dispatch.cu`` (+
``dispatch_binding.cpp``). The Triton backend runs the twins here (sync-free
torch ops on a GPU).
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .. import checks as check
from .. import library
from ..meta import MoEMeta, max_blocks
from .common import compute_dtype

__all__ = [
    "MoEMeta",
    "DEFAULT_BLOCK_SIZE",
    "moe_align",
    "moe_align_torch",
    "apply_capacity",
    "apply_capacity_torch",
    "permute",
    "permute_torch",
    "unpermute",
    "unpermute_torch",
    "check_meta",
    "check_indices",
    "row_blocks_from_offsets",
]

DEFAULT_BLOCK_SIZE = 64


def check_indices(indices, num_experts: int, allow_dropped: bool) -> torch.Tensor:
    """indices [T, k] int32/int64 with values in [0, E) (or [0, E] with the
    dropped sentinel E) -> int64. The range is checked on CPU tensors only: on
    a GPU it would cost a device-to-host sync, and the kernels rely on the
    router producing valid ids."""
    check.tensor(indices, "indices")
    if indices.dim() != 2 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be an int32/int64 [T, k] tensor, got {indices.dtype} {tuple(indices.shape)}")
    check.positive_int(num_experts, "num_experts")
    top = num_experts if allow_dropped else num_experts - 1
    what = f"[0, {num_experts}] ({num_experts} = dropped)" if allow_dropped else f"[0, {num_experts})"
    check.values_in_range(indices, 0, top, "indices", what)
    return indices.long()


META_FIELDS = ("counts", "offsets", "permutation", "inverse", "block_expert", "block_start")


def check_meta(meta, device: torch.device | None = None) -> MoEMeta:
    """A MoEMeta whose tensors are int64 and on ``device``. On CPU its slot
    indices are bounds-checked here for the torch twins (the C++ kernels check
    them again themselves); on a GPU they are not (a check would cost a
    device-to-host sync): a forged MoEMeta there is undefined behaviour."""
    if not isinstance(meta, MoEMeta):
        raise TypeError(f"meta must be a MoEMeta from moe_align, got {type(meta).__name__}")
    for name in META_FIELDS:
        t = getattr(meta, name)
        if t is None and name == "counts":
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise TypeError(f"meta.{name} must be a 1-D int64 tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if device is not None and t.device != device:
            raise ValueError(f"tensors must be on one device, got meta.{name} on {t.device} and the data on {device}")
    S, E = meta.permutation.numel(), meta.num_experts
    if meta.inverse.numel() != S or meta.offsets.numel() != E + 1:
        raise ValueError(f"meta must have inverse [S={S}] and offsets [E+1={E + 1}], got "
                         f"{meta.inverse.numel()} and {meta.offsets.numel()} entries")
    check.values_in_range(meta.permutation, 0, S - 1, "meta.permutation", f"[0, S={S})")
    check.values_in_range(meta.inverse, 0, S - 1, "meta.inverse", f"[0, S={S})")
    check.values_in_range(meta.offsets, 0, S, "meta.offsets", f"[0, S={S}]")
    return meta


# --------------------------------------------------------------------------- align


def moe_align(
    indices: torch.Tensor, num_experts: int, block_size: int = DEFAULT_BLOCK_SIZE, *, backend: str | None = None
) -> MoEMeta:
    """Dispatch metadata (see :class:`MoEMeta`) for indices [T, k] with values
    in [0, E], E marking a dropped assignment. No device-to-host sync."""
    idx = check_indices(indices, num_experts, allow_dropped=True)
    check.positive_int(block_size, "block_size")
    impl = _backend.implementation("moe_align", _backend.resolve(backend, idx.device))
    if impl == "torch":
        return moe_align_torch(idx, num_experts, block_size)
    out = library.namespace(impl).moe_align(idx.contiguous(), num_experts, block_size)
    return MoEMeta(num_experts, idx.shape[1], block_size, *out)


def moe_align_torch(indices: torch.Tensor, num_experts: int, block_size: int) -> MoEMeta:
    """The pure-PyTorch twin of :func:`moe_align` (a stable sort of the flat
    assignments by expert; sync-free)."""
    T, k = indices.shape
    E, bs = num_experts, block_size
    flat = indices.reshape(-1).long()
    S = flat.numel()
    dev = flat.device
    permutation = torch.sort(flat, stable=True).indices
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(S, device=dev)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).index_add_(0, flat, torch.ones_like(flat))[:E]
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    block_expert, block_start = row_blocks_from_offsets(offsets, S, E, bs)
    return MoEMeta(
        num_experts=E,
        top_k=k,
        block_size=bs,
        counts=counts,
        offsets=offsets,
        permutation=permutation,
        inverse=inverse,
        block_expert=block_expert,
        block_start=block_start,
    )


def row_blocks_from_offsets(
    offsets: torch.Tensor, num_rows: int, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row blocks of :class:`MoEMeta` from the experts' row offsets [E+1]:
    (block_expert [NB], block_start [NB]), each expert's rows cut into
    ``block_size`` pieces, unused blocks -1 / offsets[E]. Sync-free."""
    E, bs = num_experts, block_size
    counts = offsets[1:] - offsets[:-1]
    blocks = (counts + bs - 1) // bs
    block_end = torch.cumsum(blocks, 0)
    b = torch.arange(max_blocks(num_rows, E, bs), device=offsets.device)
    owner = torch.searchsorted(block_end, b, right=True)
    valid = owner < E
    e = owner.clamp(max=E - 1)
    start = offsets[e] + (b - (block_end[e] - blocks[e])) * bs
    return torch.where(valid, owner, torch.full_like(owner, -1)), torch.where(valid, start, offsets[E].expand_as(start))


def _align_fake(indices, num_experts, block_size):
    S = indices.numel()
    nb = max_blocks(S, num_experts, block_size)

    def new(n):
        return indices.new_empty((n,), dtype=torch.int64)

    return new(num_experts), new(num_experts + 1), new(S), new(S), new(nb), new(nb)


# S = T*k assignments, flat = t*k + j. indices [T,k] int64 with values in [0, E]
# (E = dropped) -> counts [E], offsets [E+1], permutation [S] (sorted slot ->
# flat), inverse [S], block_expert [NB], block_start [NB], NB = ceil(S/block_size)
# + E. All int64; sorted order is stable (by flat index within an expert). See
# mars_kernels/meta.py.
library.register(
    "moe_align(Tensor indices, int num_experts, int block_size) -> (Tensor counts, Tensor offsets,"
    " Tensor permutation, Tensor inverse, Tensor block_expert, Tensor block_start)",
    fake=_align_fake,
)


# --------------------------------------------------------------------------- capacity


def apply_capacity(
    indices: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop assignments beyond ``capacity`` per expert, first choices before
    second choices, earlier tokens first (GShard/Switch). Returns (indices with
    dropped ones set to E, weights with dropped ones zeroed, number dropped).
    Sync-free torch ops on every backend."""
    idx = check_indices(indices, num_experts, allow_dropped=False)
    check.tensor(weights, "weights")
    check.shape(weights, tuple(idx.shape), "weights", "[T, k] like indices")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating tensor (gate weights), got {weights.dtype}")
    check.same_device({"indices": indices, "weights": weights})
    check.integer(capacity, "capacity", 0)
    return apply_capacity_torch(idx, weights, num_experts, capacity)


def apply_capacity_torch(
    indices: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` assignments per expert.

    Priority: every token's first choice before any second choice, and within
    a choice rank, earlier tokens first (GShard / Switch). indices [T, k],
    weights [T, k] -> (indices with dropped assignments set to the sentinel
    ``num_experts``, weights with dropped ones zeroed, number dropped (int64
    scalar tensor)). Kept weights are not renormalised.
    """
    T, k = indices.shape
    prio = indices.t().reshape(-1).long()  # position p = j * T + t
    order = torch.sort(prio, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=prio.device).index_add_(0, prio, torch.ones_like(prio))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(prio.numel(), device=prio.device) - starts[prio[order]]
    keep = (rank < capacity).view(k, T).t()
    kept_indices = torch.where(keep, indices.long(), torch.full_like(indices.long(), num_experts))
    return kept_indices, weights * keep, (~keep).sum()


# --------------------------------------------------------------------------- permute / unpermute


def permute(x: torch.Tensor, meta: MoEMeta, *, backend: str | None = None) -> torch.Tensor:
    """x [T, D] -> x_sorted [S, D] in expert order (row s = x[permutation[s] // k])."""
    check.float_matrix(x, "x")
    check_meta(meta, x.device)
    if meta.permutation.shape[0] != x.shape[0] * meta.top_k:
        raise ValueError(f"x must have T = {meta.num_tokens} rows for this meta, got {x.shape[0]}")
    impl = _backend.implementation("permute", _backend.resolve(backend, x.device))
    if impl == "torch":
        return permute_torch(x, meta)
    return library.namespace(impl).moe_permute(x.contiguous(), meta.permutation, meta.inverse, meta.top_k)


def permute_torch(x: torch.Tensor, meta: MoEMeta) -> torch.Tensor:
    """The pure-PyTorch twin of :func:`permute`."""
    return x.index_select(0, meta.permutation // meta.top_k)


def unpermute(
    y_sorted: torch.Tensor, meta: MoEMeta, weights: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """y_sorted [S, D], weights [T, k] (or None: plain sum) -> y [T, D], the
    gate-weighted sum of each token's k expert rows, deterministic."""
    check.float_matrix(y_sorted, "y_sorted")
    check_meta(meta, y_sorted.device)
    S = meta.permutation.shape[0]
    if y_sorted.shape[0] != S:
        raise ValueError(f"y_sorted must have S = T*k = {S} rows, got {y_sorted.shape[0]}")
    T, k = S // max(meta.top_k, 1), meta.top_k
    if weights is not None:
        check.float_matrix(weights, "weights")
        check.shape(weights, (T, k), "weights", "[T, k]")
        check.same_device({"y_sorted": y_sorted, "weights": weights})
        weights = weights.to(compute_dtype(y_sorted.dtype)).contiguous()
    impl = _backend.implementation("unpermute", _backend.resolve(backend, y_sorted.device))
    if impl == "torch":
        if weights is None:
            weights = y_sorted.new_ones(T, k, dtype=compute_dtype(y_sorted.dtype))
        return unpermute_torch(y_sorted, meta, weights)
    return library.namespace(impl).moe_unpermute(y_sorted.contiguous(), meta.permutation, meta.inverse, weights, k)


def unpermute_torch(y_sorted: torch.Tensor, meta: MoEMeta, weights: torch.Tensor) -> torch.Tensor:
    """The pure-PyTorch twin of :func:`unpermute`: y [T, D] = sum_j weights[t, j]
    * y_sorted[inverse[t*k + j]], summed in float32 (float64 for float64) in the
    order j = 0..k-1, returned in y_sorted's dtype."""
    T, k = weights.shape
    ct = compute_dtype(y_sorted.dtype)
    rows = y_sorted.index_select(0, meta.inverse).view(T, k, y_sorted.shape[1]).to(ct)
    return (rows * weights.to(ct).unsqueeze(-1)).sum(1).to(y_sorted.dtype)


def _permute_fake(x, permutation, inverse, top_k):
    return x.new_empty((permutation.shape[0], x.shape[1]))


def _permute_setup(ctx, args, output):
    ctx.save_for_backward(args["permutation"], args["inverse"])
    ctx.top_k = args["top_k"]


def _permute_backward(ops, ctx, grad_sorted):
    permutation, inverse = ctx.saved_tensors
    return {"x": ops.moe_unpermute(grad_sorted.contiguous(), permutation, inverse, None, ctx.top_k)}


def _unpermute_fake(y_sorted, permutation, inverse, weights, top_k):
    return y_sorted.new_empty((y_sorted.shape[0] // top_k, y_sorted.shape[1]))


def _unpermute_setup(ctx, args, output):
    ctx.save_for_backward(args["y_sorted"], args["permutation"], args["inverse"], args["weights"])
    ctx.top_k = args["top_k"]


def _unpermute_backward(ops, ctx, grad_out):
    y_sorted, permutation, inverse, weights = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    if weights is None:
        return {"y_sorted": ops.moe_permute(grad_out, permutation, inverse, ctx.top_k)}
    grad_y, grad_w = ops.moe_unpermute_bwd(grad_out, y_sorted, permutation, inverse, weights)
    return {"y_sorted": grad_y, "weights": grad_w}


def _unpermute_bwd_fake(grad_out, y_sorted, permutation, inverse, weights):
    return torch.empty_like(y_sorted), torch.empty_like(weights)


# Both row moves take the permutation and its inverse (each one's backward is
# the other move); entries outside [0, S) raise (CPU) rather than read out of bounds.
# x [T,D] -> x_sorted [S,D], x_sorted[s] = x[permutation[s] / top_k].
library.register(
    "moe_permute(Tensor x, Tensor permutation, Tensor inverse, int top_k) -> Tensor",
    fake=_permute_fake, setup=_permute_setup, backward=_permute_backward,
)
# y_sorted [S,D] -> y [T,D], y[t] = sum_j w[t,j] * y_sorted[inverse[t*k+j]] (w = 1 when
# weights is None), accumulated in f32 in the order j = 0..k-1, no atomics.
library.register(
    "moe_unpermute(Tensor y_sorted, Tensor permutation, Tensor inverse, Tensor? weights, int top_k) -> Tensor",
    fake=_unpermute_fake, setup=_unpermute_setup, backward=_unpermute_backward,
)
# Backward of the weighted unpermute: grad_y_sorted[s] = w[p] * grad_out[p / k] with
# p = permutation[s]; grad_weights[t,j] = <grad_out[t], y_sorted[inverse[t*k+j]]> (f32).
library.register(
    "moe_unpermute_bwd(Tensor grad_out, Tensor y_sorted, Tensor permutation, Tensor inverse,"
    " Tensor weights) -> (Tensor grad_y_sorted, Tensor grad_weights)",
    fake=_unpermute_bwd_fake,
)
