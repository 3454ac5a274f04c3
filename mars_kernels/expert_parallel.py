"""Expert parallelism: the experts of a MoE layer sharded over a process group.

Each rank of the group holds a contiguous block of expert ids (see
:func:`shard_range`). :class:`ShardedExperts` has the forward contract of
:class:`mars_kernels.Experts`; per call it

1. sorts this rank's (token, slot) assignments by expert (``moe_align`` +
   ``permute``); contiguous shards make that order also the order by owner rank,
2. exchanges the per-expert counts (one ``all_to_all_single`` of int64 [P, E_max]),
3. sends the token rows to the owners (``all_to_all_single`` with those splits),
4. runs the local experts on the received rows with the grouped kernels
   (``moe_mlp`` with metadata over the local expert ids and unit gates),
5. sends the expert outputs back (the reverse ``all_to_all_single``) and
6. combines them with the gate weights (``unpermute``: deterministic
   gather-sum; the gate weights get their gradient there).

The backward runs the two exchanges in reverse. Every rank of the group must
call forward (also with T = 0 tokens) and, when training, backward through the
layer, in the same order as the other ranks; a rank that fails or skips one
makes the others wait until the process group's timeout, so initialise it with
``torch.distributed.init_process_group(..., timeout=datetime.timedelta(...))``.

Gradients: an expert's gradient collects the contributions of the tokens of
every rank (the gradient of the sum of all ranks' losses). Under
DistributedDataParallel, keep the expert parameters out of its all-reduce (they
are not replicas) and note that DDP averages the replicated ones (router) over
ranks while the expert gradients are sums: divide the expert gradients by the
data-parallel size to match.

With ``group=None`` and no initialised process group the layer runs on one
process and is plain local experts.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import backend as _backend
from . import checks as check
from .ops import moe_align, moe_mlp, parse_activation, permute, unpermute
from ._expert_parallel_comm import all_gather_stacked, all_to_all_rows, comm_timing, exchange_counts, group_rank_and_size
from .layers import Experts, SparseMoE

__all__ = ["shard_range", "ShardedExperts", "shard_experts", "gather_experts", "expert_parallel", "comm_timing"]

_PARAM_NAMES = ("w1", "b1", "w2", "b2")


def shard_range(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """The experts [start, stop) that ``rank`` owns out of ``num_experts``
    split over ``world_size`` ranks: contiguous blocks of E // P experts, the
    first E % P ranks holding one more (E = 5, P = 2 -> (0, 3) and (3, 5))."""
    check.positive_int(num_experts, "num_experts")
    check.positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    base, extra = divmod(num_experts, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedExperts(nn.Module):
    """This rank's shard of E expert MLPs D -> H -> D, expert-parallel over ``group``.

    forward(x [T, D], weights [T, k], indices [T, k] global expert ids in
    [0, E], E meaning dropped) -> y [T, D], y[t] = sum_j weights[t, j] *
    Expert_{indices[t, j]}(x[t]), whichever rank owns the expert. T may differ
    between ranks and be 0; k must be the same on every rank.

    Parameters (layout of :class:`Experts`, first dim local): w1 [E_local, D, H1],
    b1 [E_local, H1], w2 [E_local, H, D], b2 [E_local, D] for the global experts
    ``expert_start .. expert_stop - 1`` (:func:`shard_range`; uneven when P does
    not divide E). Requires P <= E. Initialised like nn.Linear, each expert from
    a generator seeded by one draw of the global RNG plus its global id: with a
    common seed on all ranks the shards together form the same full layer for
    any P, and no two experts start alike.

    ``capacity_factor`` (default None: dropless): each expert takes at most
    ``capacity = ceil(capacity_factor * T_total * k / E)`` assignments, T_total
    the token count summed over the group, with the priority of
    :func:`mars_kernels.apply_capacity` applied to the concatenation of all
    ranks' tokens in rank order (first choices before second choices, then
    lower rank, then earlier token). So the kept and dropped assignments, and
    the results, equal the single-process layer on the concatenated batch.
    Assignments that arrive already dropped (id E) do not compete. After each
    forward: ``last_dropped`` (int64 scalar, this rank's assignments dropped by
    the capacity), ``last_dropped_total`` (over the group) and
    ``last_capacity`` (int, -1 when dropless).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        *,
        group=None,
        activation: str = "gelu",
        bias: bool = True,
        capacity_factor: float | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        gated = parse_activation(activation).gated  # validates
        for name, v in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            check.positive_int(v, name)
        _backend.check_name(backend)
        if capacity_factor is not None:
            capacity_factor = check.positive_float(capacity_factor, "capacity_factor")
        rank, world_size = group_rank_and_size(group)
        if world_size > num_experts:
            raise ValueError(
                f"the expert-parallel group has {world_size} ranks but num_experts={num_experts}; "
                "every rank must own at least one expert (use a smaller group)"
            )
        self.d_model, self.d_hidden, self.num_experts = d_model, d_hidden, num_experts
        self.activation, self.backend, self.capacity_factor = activation, backend, capacity_factor
        self.group, self.rank, self.world_size = group, rank, world_size
        self.expert_start, self.expert_stop = shard_range(num_experts, world_size, rank)
        self.num_local_experts = self.expert_stop - self.expert_start
        self._register_routing_tables()
        h1 = 2 * d_hidden if gated else d_hidden
        n = self.num_local_experts
        self.w1 = nn.Parameter(torch.empty(n, d_model, h1))
        self.w2 = nn.Parameter(torch.empty(n, d_hidden, d_model))
        self.b1 = nn.Parameter(torch.empty(n, h1)) if bias else None
        self.b2 = nn.Parameter(torch.empty(n, d_model)) if bias else None
        self.last_dropped: torch.Tensor | None = None
        self.last_dropped_total: torch.Tensor | None = None
        self.last_capacity: int = -1
        self.reset_parameters()

    def _register_routing_tables(self) -> None:
        """Index tables (non-persistent buffers, so they follow .to(device))."""
        E, P = self.num_experts, self.world_size
        ranges = [shard_range(E, P, r) for r in range(P)]
        widest = max(stop - start for start, stop in ranges)
        # send_index[r, j] = global id of rank r's j-th expert, E (a zero count) as padding.
        send_index = torch.full((P, widest), E, dtype=torch.int64)
        for r, (start, stop) in enumerate(ranges):
            send_index[r, : stop - start] = torch.arange(start, stop)
        self.register_buffer("_send_index", send_index, persistent=False)
        self.register_buffer("_rank_bounds", torch.tensor([s for s, _ in ranges] + [E]), persistent=False)
        # Received rows come grouped by (source rank, local expert slot of the widest shard): their local ids
        # (slots past this rank's own experts receive no rows). The same on every rank, like the tables above:
        # a wrapper that broadcasts buffers (DistributedDataParallel) must not see rank-dependent shapes.
        self.register_buffer("_recv_pattern", torch.arange(widest).repeat(P), persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        base_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        gen = torch.Generator(device="cpu")
        for local, expert in enumerate(range(self.expert_start, self.expert_stop)):
            gen.manual_seed(base_seed + expert)
            for w, b, fan_in in ((self.w1, self.b1, self.d_model), (self.w2, self.b2, self.d_hidden)):
                bound = 1 / math.sqrt(fan_in)
                w[local].copy_(torch.empty(w.shape[1:]).uniform_(-bound, bound, generator=gen))
                if b is not None:
                    b[local].copy_(torch.empty(b.shape[1:]).uniform_(-bound, bound, generator=gen))

    # ------------------------------------------------------------------ forward

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, *, backend: str | None = None
    ) -> torch.Tensor:
        """As :meth:`mars_kernels.Experts.forward` (``backend`` overrides the module's for this call)."""
        indices = self._check_inputs(x, weights, indices)
        name = _backend.resolve(backend or self.backend, x.device)
        block = _backend.EXPERT_BLOCK_SIZE[name]
        self.last_capacity = -1
        self.last_dropped = self.last_dropped_total = torch.zeros((), dtype=torch.int64, device=x.device)
        if self.capacity_factor is not None:
            indices, weights = self._apply_group_capacity(indices, weights)
        meta = moe_align(indices, self.num_experts, block, backend=name)
        if self.world_size == 1:
            return moe_mlp(x, weights, meta, self.w1, self.b1, self.w2, self.b2, self.activation, backend=name)
        return self._forward_exchanged(x, weights, meta, name, block)

    def _forward_exchanged(self, x, weights, meta, name: str, block: int) -> torch.Tensor:
        P, n_local = self.world_size, self.num_local_experts
        counts = torch.cat([meta.counts, meta.counts.new_zeros(1)])
        recv_counts = exchange_counts(counts[self._send_index], self.group)  # [P, widest], 0 past n_local
        # One device-to-host copy for all split sizes (all_to_all_single wants them on the host).
        host = torch.cat([meta.offsets[self._rank_bounds], recv_counts.sum(1)]).tolist()
        bounds, recv_splits = host[: P + 1], host[P + 1 :]
        send_splits = [bounds[r + 1] - bounds[r] for r in range(P)]
        kept, received = bounds[P], sum(recv_splits)

        anchor = x.new_empty(0, requires_grad=True) if torch.is_grad_enabled() else None
        x_sorted = permute(x, meta, backend=name)
        x_recv = all_to_all_rows(x_sorted[:kept], recv_splits, send_splits, self.group, anchor)

        local_ids = torch.repeat_interleave(self._recv_pattern, recv_counts.reshape(-1), output_size=received)
        local_meta = moe_align(local_ids.unsqueeze(1), n_local, block, backend=name)
        unit_gates = x_recv.new_ones(received, 1)
        y_recv = moe_mlp(
            x_recv, unit_gates, local_meta, self.w1, self.b1, self.w2, self.b2, self.activation, backend=name
        )

        y_back = all_to_all_rows(y_recv, send_splits, recv_splits, self.group, anchor)
        dropped_rows = meta.permutation.shape[0] - kept
        if dropped_rows:
            y_back = torch.cat([y_back, y_back.new_zeros(dropped_rows, y_back.shape[1])])
        return unpermute(y_back, meta, weights, backend=name)

    def _check_inputs(self, x, weights, indices) -> torch.Tensor:
        check.float_matrix(x, "x")
        if x.shape[1] != self.d_model:
            raise ValueError(f"x must have shape [T, d_model={self.d_model}], got {tuple(x.shape)}")
        if x.dtype != self.w1.dtype:
            raise TypeError(f"x must have the experts' dtype {self.w1.dtype}, got {x.dtype}")
        check.tensor(indices, "indices")
        if indices.dim() != 2 or indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be an int32/int64 [T, k] tensor, got {indices.dtype} {tuple(indices.shape)}")
        if indices.shape[0] != x.shape[0]:
            raise ValueError(f"indices must have T = {x.shape[0]} rows like x, got shape {tuple(indices.shape)}")
        check.float_matrix(weights, "weights")
        check.shape(weights, tuple(indices.shape), "weights", "[T, k] like indices")
        E = self.num_experts
        # As in dispatch: the range check would cost a device-to-host sync on a GPU.
        if indices.device.type == "cpu" and indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi > E:
                raise ValueError(f"indices must lie in [0, {E}] ({E} = dropped), got values in [{lo}, {hi}]")
        return indices.long()

    def _apply_group_capacity(self, indices: torch.Tensor, weights: torch.Tensor):
        """The capacity rule of the class docstring. Returns (indices with the
        newly dropped assignments set to E, weights with them zeroed)."""
        T, k = indices.shape
        E, dev = self.num_experts, indices.device
        sizes = all_gather_stacked(torch.tensor([T, k], dtype=torch.int64, device=dev), self.group).tolist()
        if any(s[1] != k for s in sizes):
            raise ValueError(f"every rank must route with the same k, got k per rank {[s[1] for s in sizes]}")
        capacity = math.ceil(self.capacity_factor * sum(s[0] for s in sizes) * k / E)
        # Assignment (t, j) at position p = j*T + t, keyed by (choice j, expert e); E: already dropped.
        key = (indices + torch.arange(k, device=dev) * (E + 1)).t().reshape(-1)
        per_key = torch.zeros(k * (E + 1), dtype=torch.int64, device=dev).index_add_(0, key, torch.ones_like(key))
        group_counts = all_gather_stacked(per_key.view(k, E + 1)[:, :E], self.group)  # [P, k, E]
        choice_totals = group_counts.sum(0)
        # Assignments to expert e ranked before (j, this rank, t): all of choices < j, ranks < this one at j ...
        ahead = (torch.cumsum(choice_totals, 0) - choice_totals) + group_counts[: self.rank].sum(0)
        ahead = torch.cat([ahead, ahead.new_zeros(k, 1)], 1).reshape(-1)
        # ... and this rank's earlier tokens with the same (j, e).
        order = torch.sort(key, stable=True).indices
        starts = torch.cumsum(per_key, 0) - per_key
        within = torch.empty_like(order)
        within[order] = torch.arange(key.numel(), device=dev) - starts[key[order]]
        live = (indices < E).t().reshape(-1)
        keep = ~live | (ahead[key] + within < capacity)
        keep = keep.view(k, T).t()
        self.last_capacity = capacity
        self.last_dropped = (~keep).sum()
        self.last_dropped_total = (group_counts.sum((0, 1)) - capacity).clamp(min=0).sum()
        return torch.where(keep, indices, torch.full_like(indices, E)), weights * keep

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, "
            f"experts={self.expert_start}..{self.expert_stop - 1} on rank {self.rank}/{self.world_size}, "
            f"activation={self.activation!r}, bias={self.b1 is not None}, capacity_factor={self.capacity_factor}"
        )


# ---------------------------------------------------------------------- conversions


def shard_experts(experts: Experts, group=None, *, capacity_factor: float | None = None) -> ShardedExperts:
    """This rank's shard of a full :class:`Experts` (same device and dtype; the
    full module is left as it was). Every rank must pass the same parameters."""
    if not isinstance(experts, Experts):
        raise TypeError(f"experts must be a mars_kernels.Experts, got {type(experts).__name__}")
    with torch.random.fork_rng(devices=[]):  # the fresh init below is overwritten: leave the RNG alone
        sharded = ShardedExperts(
            experts.d_model,
            experts.d_hidden,
            experts.num_experts,
            group=group,
            activation=experts.activation,
            bias=experts.b1 is not None,
            capacity_factor=capacity_factor,
            backend=experts.backend,
        )
    sharded.to(device=experts.w1.device, dtype=experts.w1.dtype)
    with torch.no_grad():
        for name in _PARAM_NAMES:
            full = getattr(experts, name)
            if full is not None:
                getattr(sharded, name).copy_(full[sharded.expert_start : sharded.expert_stop])
    return sharded


def gather_experts(sharded: ShardedExperts) -> Experts:
    """The full single-process :class:`Experts` assembled from every rank's
    shard (a collective: all ranks call it and all get the full module), e.g.
    to export a distributed checkpoint."""
    if not isinstance(sharded, ShardedExperts):
        raise TypeError(f"sharded must be a ShardedExperts, got {type(sharded).__name__}")
    E, P = sharded.num_experts, sharded.world_size
    with torch.random.fork_rng(devices=[]):
        full = Experts(
            sharded.d_model,
            sharded.d_hidden,
            E,
            activation=sharded.activation,
            bias=sharded.b1 is not None,
            backend=sharded.backend,
        )
    full.to(device=sharded.w1.device, dtype=sharded.w1.dtype)
    ranges = [shard_range(E, P, r) for r in range(P)]
    widest = ranges[0][1]  # rank 0 owns the most experts
    with torch.no_grad():
        for name in _PARAM_NAMES:
            shard = getattr(sharded, name)
            if shard is None:
                continue
            padded = shard.new_zeros((widest,) + tuple(shard.shape[1:]))
            padded[: shard.shape[0]] = shard
            stacked = all_gather_stacked(padded, sharded.group)  # [P, widest, ...]
            parts = [stacked[r, : stop - start] for r, (start, stop) in enumerate(ranges)]
            getattr(full, name).copy_(torch.cat(parts))
    return full


def expert_parallel(moe: SparseMoE, group=None) -> SparseMoE:
    """Shard ``moe``'s experts over ``group`` in place (the router stays
    replicated) and return ``moe``.

    The layer's own ``capacity_factor`` keeps its meaning: SparseMoE applies it
    before the experts, per rank, with the capacity computed from that rank's
    token count (as DeepSpeed-MoE does). For a capacity over the whole group's
    tokens use ``ShardedExperts(capacity_factor=...)`` instead. The aux entries
    (``expert_counts``, ``dropped``, the balance losses) stay per rank."""
    if not isinstance(moe, SparseMoE):
        raise TypeError(f"moe must be a mars_kernels.SparseMoE, got {type(moe).__name__}")
    if isinstance(moe.experts, ShardedExperts):
        raise ValueError("moe's experts are already sharded")
    moe.experts = shard_experts(moe.experts, group)
    return moe
