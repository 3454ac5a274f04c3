"""Data-parallel training on ``torch.distributed`` (launched with ``torchrun``).

``mars train`` started by ``torchrun --nproc-per-node N`` finds ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in the environment and runs data-parallel: the
model is wrapped in ``DistributedDataParallel``, over NCCL when the run is on
CUDA (each process on ``cuda:LOCAL_RANK``, made its current device) and over
Gloo on CPU (see :mod:`mars.devices` for ``--device``); every rank draws the
same global batch and missingness masks from the shared seed (on the CPU) and
trains on its strided share of it (``batch[rank::world]``), so with
the same global batch size the run follows the single-process one up to the
order of floating-point sums (and the per-rank randomness of dropout and
routing noise). Evaluation pairs are split over the ranks and their counts
summed. Only rank 0 writes files and shows the progress bar.

Faults: every collective has a timeout (``MARS_DIST_TIMEOUT`` seconds, default
120). When a peer dies, the surviving ranks raise :class:`DistributedFailure`
("a peer process failed or timed out ...") instead of hanging; the last
checkpoint, written at the end of each completed epoch, is kept for
``--resume``. (That is Gloo's behaviour, tested on CPU; on NCCL the same
timeout applies, but NCCL's watchdog may end the process itself instead of
raising.)
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .devices import resolve_device, set_up_device

DEFAULT_TIMEOUT_S = 120.0


class DistributedFailure(RuntimeError):
    """A peer process died or a collective timed out."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``world`` processes, this one is ``rank``
    (``local_rank`` on its node); ``device`` is where the tensors of the
    collectives live ("cpu" for Gloo, "cuda:LOCAL_RANK" for NCCL)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's strided share of a global batch of indices."""
        return idx[self.rank :: self.world] if self.enabled else idx

    def sum_(self, *tensors: torch.Tensor) -> None:
        """In-place sum over ranks; a tensor on another device than the
        process group's is summed through a copy on that device."""
        if self.enabled:
            device = torch.device(self.device)
            for t in tensors:
                if t.device == device:
                    guarded(dist.all_reduce, t, op=dist.ReduceOp.SUM)
                else:
                    on = t.to(device)
                    guarded(dist.all_reduce, on, op=dist.ReduceOp.SUM)
                    t.copy_(on)

    def mean_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats (same keys on every rank) over the ranks."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        self.sum_(t)
        return {k: float(v) / self.world for k, v in zip(keys, t)}

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        guarded(dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        guarded(dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            guarded(dist.barrier)


_PEER_FAILURE_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout")


def _is_peer_failure(exc: BaseException) -> bool:
    """Gloo/NCCL report a dead peer or a timeout as DistError or as a
    RuntimeError naming the transport (also from inside DDP's backward)."""
    if isinstance(exc, DistributedFailure):
        return False
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _PEER_FAILURE_MARKERS)


def _failure(exc: BaseException, during: str) -> DistributedFailure:
    first = str(exc).splitlines()[0] if str(exc) else ""
    rank = dist.get_rank() if dist.is_initialized() else "?"
    return DistributedFailure(
        f"rank {rank}: a peer process failed or timed out during {during} ({type(exc).__name__}: {first}); "
        "stopping. The last completed epoch's checkpoint is kept: restart with --resume RUN_DIR"
    )


@contextmanager
def peer_failures(during: str):
    """Turn a dead peer or a timeout raised in the block into DistributedFailure."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if _is_peer_failure(e):
            raise _failure(e, during) from e
        raise


def guarded(fn, *args, **kwargs):
    """Run a collective; turn a dead peer or a timeout into DistributedFailure."""
    with peer_failures(getattr(fn, "__name__", str(fn))):
        return fn(*args, **kwargs)


def timeout_seconds() -> float:
    text = os.environ.get("MARS_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"MARS_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"MARS_DIST_TIMEOUT must be > 0 seconds, got {value}")
    return value


def world_from_env() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def context_from_env(device: str = "cpu") -> DistContext:
    """Initialise the default process group when launched by torchrun
    (``WORLD_SIZE`` > 1), once; a plain single-process context otherwise.
    ``device`` is the run's ``--device`` (auto, cpu, cuda): on CUDA each
    process takes ``cuda:LOCAL_RANK`` and the group runs NCCL, on CPU Gloo.
    A device this machine does not have is a :class:`mars.config.ConfigError`,
    raised before the group is initialised."""
    world = world_from_env()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    where = resolve_device(device, world=world, local_rank=local_rank)
    set_up_device(where)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_seconds())
        if where.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=where)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=str(where))


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
