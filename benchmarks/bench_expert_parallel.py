"""Benchmark the expert-parallel SparseMoE (mars_kernels.expert_parallel):
forward + backward tokens/s with 1 and 2 processes, and the share of the step
spent in the all-to-all exchanges.

Each process holds T tokens (so P processes do P*T tokens per step) and its
shard of the experts; the router is replicated. CPU: Gloo, and the machine's
threads are split between the processes (torch.set_num_threads(total // P)),
so the 1- and 2-process runs use the same cores; a control row runs one
process at the per-process thread count of the largest group. CUDA (``--device cuda``):
NCCL, one GPU per process, P in 1..N GPUs.

Step time: per iteration, barrier, then forward + backward timed with
time.perf_counter; the step's time is the slowest rank's; median over the
iterations. Exchange time: further iterations under
``mars_kernels.expert_parallel.comm_timing`` (a barrier before each exchange,
so waiting for a slower rank's compute is not counted); its share is the
exchanges' seconds over those iterations' step time.

    python benchmarks/bench_expert_parallel.py            # MARS-like and fine-grained shapes, P = 1, 2
    python benchmarks/bench_expert_parallel.py --quick    # small T, smoke run
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import mars_kernels as mk  # noqa: E402
from mars_kernels.expert_parallel import comm_timing  # noqa: E402

# name: (T tokens per process, D, H, E, k)
SHAPES = {"mars": (8192, 256, 512, 8, 2), "fine-grained": (8192, 256, 128, 64, 8)}
COLUMNS = [
    ("shape", "shape", ""),
    ("procs", "procs", "d"),
    ("threads_per_proc", "threads/proc", "d"),
    ("step_ms", "step ms", ".1f"),
    ("tokens_per_s", "tokens/s", ".0f"),
    ("speedup", "vs 1 proc", ".2f"),  # against 1 process with all the threads
    ("comm_ms", "a2a ms", ".1f"),
    ("comm_share", "a2a share", ".3f"),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(step, device: torch.device) -> float:
    dist.barrier()
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def _slowest(seconds: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(seconds, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def measure(rank: int, world_size: int, shape: tuple, device_type: str, iters: int, comm_iters: int) -> dict:
    """One process's share of the benchmark; returns the group-wide figures."""
    T, D, H, E, k = shape
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    torch.manual_seed(0)  # same router and full expert set on every rank
    moe = mk.expert_parallel(mk.SparseMoE(D, H, E, k).to(device))
    gen = torch.Generator(device=device).manual_seed(1 + rank)
    x = torch.randn(T, D, device=device, generator=gen).requires_grad_(True)
    cotangent = torch.randn(T, D, device=device, generator=gen)

    def step():
        moe.zero_grad(set_to_none=True)
        x.grad = None
        y, _ = moe(x)
        (y * cotangent).sum().backward()

    for _ in range(2):
        step()
    step_s = statistics.median(_slowest([_timed_step(step, device) for _ in range(iters)], device))
    with comm_timing() as timer:
        timed = sum(_slowest([_timed_step(step, device) for _ in range(comm_iters)], device))
    comm = _slowest([timer.seconds], device)[0]
    return {"step_s": step_s, "comm_s": comm / comm_iters, "comm_share": comm / timed}


def _worker(rank, world_size, workdir, backend, threads, jobs):
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method="file://" + os.path.join(workdir, "rendezvous"),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=10),
    )
    try:
        results = [measure(rank, world_size, *job) for job in jobs]
        if rank == 0:
            torch.save(results, os.path.join(workdir, "results.pt"))
    finally:
        dist.destroy_process_group()


def run_group(world_size: int, threads: int, device_type: str, jobs: list[tuple]) -> list[dict]:
    backend = "nccl" if device_type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="mk_bench_ep_") as workdir:
        mp.spawn(_worker, args=(world_size, workdir, backend, threads, jobs), nprocs=world_size, join=True)
        return torch.load(os.path.join(workdir, "results.pt"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--procs", type=int, nargs="+", help="group sizes (default: 1 2 on CPU, 1..#GPUs on CUDA)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--comm-iters", type=int, default=3)
    ap.add_argument("--threads", type=int, help="total threads to split (default torch.get_num_threads())")
    ap.add_argument("--quick", action="store_true", help="T = 1024 tokens per process, 2 iterations")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/bench_expert_parallel_<device>.json)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU")
    total_threads = args.threads or torch.get_num_threads()
    procs = args.procs or ([1, 2] if device.type == "cpu" else list(range(1, torch.cuda.device_count() + 1)))
    iters, comm_iters = (2, 1) if args.quick else (args.iters, args.comm_iters)
    shapes = {n: ((1024,) + s[1:] if args.quick else s) for n, s in SHAPES.items()}
    jobs = [(s, device.type, iters, comm_iters) for s in shapes.values()]

    env = common.environment(device)
    env.update(
        total_threads=total_threads,
        note="CPU: each of P processes runs torch.set_num_threads(total_threads // P); "
        "tokens/s counts the tokens of all processes (P * T per step)",
    )
    print(f"# expert-parallel SparseMoE fwd+bwd, {env['device']}, T per process: "
          + ", ".join(f"{n} {s[0]}" for n, s in shapes.items()), flush=True)
    runs = [(P, max(1, total_threads // P) if device.type == "cpu" else total_threads) for P in procs]
    if device.type == "cpu" and 1 in procs:
        # Control: one process at the per-process thread count of the largest group.
        control = (1, max(1, total_threads // max(procs)))
        if control not in runs:
            runs.insert(1, control)
    rows = []
    for P, threads in runs:
        for (name, shape), res in zip(shapes.items(), run_group(P, threads, device.type, jobs)):
            T, D, H, E, k = shape
            rows.append({
                "shape": name, "T_per_proc": T, "D": D, "H": H, "E": E, "k": k,
                "procs": P, "threads_per_proc": threads,
                "step_ms": res["step_s"] * 1e3,
                "tokens_per_s": P * T / res["step_s"],
                "comm_ms": res["comm_s"] * 1e3,
                "comm_share": res["comm_share"],
            })
    base = {r["shape"]: r["tokens_per_s"] for r in rows if r["procs"] == 1 and r["threads_per_proc"] == runs[0][1]}
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base[r["shape"]] if r["shape"] in base else None
    common.print_header(COLUMNS)
    common.print_rows(rows, COLUMNS)
    path = common.write_results("bench_expert_parallel", env, rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
