"""Expert parallelism inside ``mars train`` (``--expert-parallel`` under torchrun).

Every ``mars_kernels.Experts`` of the model is replaced by this rank's
``ShardedExperts`` (contiguous blocks of experts; the first E % N ranks own
one more when N does not divide E); tokens travel to their experts' ranks with
``all_to_all_single``. The replicated parameters stay under
DistributedDataParallel; the expert shards are left out of it and their
gradients (which already sum every rank's tokens) are divided by the world
size, so the update equals the data-parallel one.

Checkpoints stay single-process: at each save the shards are gathered into a
full state dict (``full_state_dict``), written by rank 0 together with every
rank's optimiser state. So ``mars eval`` and single-process code read a
distributed run's ``checkpoint.pt`` as is, and a run saved with N ranks is
resumed with N ranks (each takes its slice back, ``load_full_state_dict``).
"""
from __future__ import annotations

import torch
from torch import nn

import mars_kernels as mk

from . import methods

# The methods whose expert calls are the same on every rank (one set of experts over the fused tokens).
EP_METHODS = tuple(m.name for m in methods.REGISTRY.values() if m.sparse_moe)


def check_expert_parallel(method: str, num_experts: int, world: int) -> None:
    """What ``--expert-parallel`` over ``world`` processes needs, checked
    before the run directory is touched: a method with one set of experts
    (:data:`EP_METHODS`) and at least one expert per process (any count from
    ``world`` up: the first E mod N processes own one more). Raises
    :class:`mars.config.ConfigError` of ``model.method`` or ``model.num_experts``."""
    from .config import ConfigError

    if not methods.get(method).sparse_moe:
        raise ConfigError("model.method", f"--expert-parallel supports the methods "
                                          f"{', '.join(methods.get(m).cli_name for m in EP_METHODS)}, got {method!r}")
    if num_experts < world:
        raise ConfigError("model.num_experts", f"--expert-parallel over {world} processes needs at least {world} experts "
                                               f"(each process owns at least one), got {num_experts}; use more experts "
                                               "or fewer processes")


def sharded_modules(model: nn.Module) -> dict[str, mk.ShardedExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, mk.ShardedExperts)}


def shard_model_experts(model: nn.Module, method: str) -> list[str]:
    """Replace every ``Experts`` submodule by this rank's shard, in place;
    returns the names of the sharded parameters and of the shards' buffers
    (for DDP to ignore: neither is a replica; the routing tables, e.g.
    ``_recv_pattern``, differ in length between ranks when the world size
    does not divide the expert count, so DDP's buffer broadcast would be a
    collective mismatch)."""
    if not methods.get(method).sparse_moe:
        raise ValueError(f"--expert-parallel supports the methods {EP_METHODS}, got {method!r} "
                         "(its expert calls are not the same on every rank)")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, mk.Experts)]
    for name, experts in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, mk.shard_experts(experts))
    return [f"{name}.{p}" for name, m in sharded_modules(model).items()
            for p, _ in [*m.named_parameters(), *m.named_buffers()]]


def average_expert_grads(model: nn.Module, world: int) -> None:
    """Expert shards receive the sum over ranks; DDP averages the rest."""
    for m in sharded_modules(model).values():
        for p in m.parameters():
            if p.grad is not None:
                p.grad.div_(world)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict (a collective: every rank must call it)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, m in sharded_modules(model).items():
        full = mk.gather_experts(m)
        for p, value in full.state_dict().items():
            state[f"{name}.{p}"] = value
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a single-process state dict into a sharded model (this rank's slices)."""
    local = dict(state)
    for name, m in sharded_modules(model).items():
        for p, _ in m.named_parameters():
            local[f"{name}.{p}"] = state[f"{name}.{p}"][m.expert_start : m.expert_stop]
    model.load_state_dict(local)
