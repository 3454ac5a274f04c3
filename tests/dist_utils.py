"""Run a function in N Gloo processes (CPU) for the distributed tests.

    results = run_distributed(fn, world_size=2, args=(spec,))

spawns ``world_size`` processes; each initialises a Gloo process group (file://
rendezvous in a temporary directory, a short ``timeout`` so that a collective
one rank never reaches fails instead of hanging), calls ``fn(rank,
world_size, *args)`` and sends back its return value (anything torch.save can
write). ``fn`` must be a module-level function of an importable module. An
exception in any process is raised in the caller (torch.multiprocessing's
ProcessRaisedException, with the child's traceback).
"""
from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, fn, world_size, args, workdir, timeout_s, threads):
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(workdir, "rendezvous"),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(workdir, f"result_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, *, args: tuple = (), timeout_s: float = 30.0, threads: int = 1) -> list:
    """[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)],
    each computed in its own process of one Gloo group."""
    with tempfile.TemporaryDirectory(prefix="mk_dist_") as workdir:
        mp.spawn(_worker, args=(fn, world_size, args, workdir, timeout_s, threads), nprocs=world_size, join=True)
        return [torch.load(os.path.join(workdir, f"result_{r}.pt"), weights_only=False) for r in range(world_size)]
