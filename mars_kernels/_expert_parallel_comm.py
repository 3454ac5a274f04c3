"""Collectives for expert parallelism (:mod:`mars_kernels.expert_parallel`):
an autograd all-to-all over token rows, the small count exchanges, and an
opt-in timer that the benchmark uses to measure the share of communication.

Every function here is a collective over ``group``: all ranks of the group must
call it, in the same order. A rank that never arrives (an exception on one
rank only, a rank that skips backward) makes the others wait until the process
group's ``timeout`` runs out, so initialise the group with a finite
``timeout=`` (``torch.distributed.init_process_group(..., timeout=timedelta(...))``).
Gloo runs on CPU tensors, NCCL on CUDA tensors.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["group_rank_and_size", "all_to_all_rows", "exchange_counts", "all_gather_stacked", "CommTimer", "comm_timing"]


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``; (0, 1) when ``group``
    is None and no default process group is initialised."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class CommTimer:
    """Wall seconds and number of calls spent in the exchanges while active.

    With ``barrier=True`` each exchange starts after a barrier, so the time a
    rank waits for a slower rank's computation is not counted as
    communication (the barrier itself is not counted either)."""

    def __init__(self, barrier: bool = True):
        self.barrier = barrier
        self.seconds = 0.0
        self.calls = 0


_active_timer: CommTimer | None = None


@contextmanager
def comm_timing(barrier: bool = True):
    """``with comm_timing() as t: ...`` accumulates the exchanges' time in
    ``t.seconds`` (forward and backward). For measurement only: the barriers
    and synchronisations it adds slow the step down."""
    global _active_timer
    previous, timer = _active_timer, CommTimer(barrier)
    _active_timer = timer
    try:
        yield timer
    finally:
        _active_timer = previous


def _run_timed(fn, group, device: torch.device):
    timer = _active_timer
    if timer is None:
        return fn()
    if timer.barrier:
        dist.barrier(group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timer.seconds += time.perf_counter() - start
    timer.calls += 1
    return out


def _all_to_all_raw(rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    rows = rows.contiguous()
    out = rows.new_empty((sum(output_splits),) + tuple(rows.shape[1:]))
    _run_timed(lambda: dist.all_to_all_single(out, rows, output_splits, input_splits, group=group), group, rows.device)
    return out


class _AllToAllRows(torch.autograd.Function):
    """rows [sum(input_splits), *] -> [sum(output_splits), *]; the backward
    sends the gradient back along the same routes (the splits swapped)."""

    @staticmethod
    def forward(ctx, rows, anchor, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all_raw(rows, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        # Always exchange, even when ``rows`` needs no gradient here: the
        # other ranks are waiting for this rank's share of the collective.
        grad_rows = _all_to_all_raw(grad_out, ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_rows, None, None, None, None


def all_to_all_rows(
    rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group, anchor: torch.Tensor | None = None
) -> torch.Tensor:
    """Send rows [sum(input_splits), *] (block r to rank r) and receive
    [sum(output_splits), *] (block r from rank r), differentiably.

    ``anchor``: a zero-size tensor that requires grad. Passing it puts the
    exchange into the autograd graph on every rank even where ``rows`` needs no
    gradient, so the backward exchange runs on every rank (a collective that
    one rank skipped would hang the others)."""
    if anchor is None:
        anchor = rows.new_empty(0)
    return _AllToAllRows.apply(rows, anchor, list(output_splits), list(input_splits), group)


def exchange_counts(send: torch.Tensor, group) -> torch.Tensor:
    """send [P, C] (row r goes to rank r) -> received [P, C] (row r came from rank r)."""
    send = send.contiguous()
    out = torch.empty_like(send)
    _run_timed(lambda: dist.all_to_all_single(out, send, group=group), group, send.device)
    return out


def all_gather_stacked(t: torch.Tensor, group) -> torch.Tensor:
    """t [*] with the same shape on every rank -> [P, *], row r from rank r."""
    t = t.contiguous()
    _, world_size = group_rank_and_size(group)
    if world_size == 1:
        return t.unsqueeze(0)
    pieces = [torch.empty_like(t) for _ in range(world_size)]
    _run_timed(lambda: dist.all_gather(pieces, t, group=group), group, t.device)
    return torch.stack(pieces)
