"""Benchmark the fused gating ops against the pure-PyTorch reference.

For each shape it times, in the same run: the reference path (exact ties via a
stable sort), a plain torch eager router (softmax + topk + renormalise, what
most MoE code does; topk only), every compiled
backend for the device (cpu; or cuda and triton), and a plain copy of the
logits tensor (the memory-bandwidth ceiling). It prints the time, the speed-up
over the reference, the achieved GB/s and the fraction of the copy bandwidth,
and writes JSON to benchmarks/results/.

    python benchmarks/bench_gating.py --quick            # a few shapes, ~1 min on 2 CPU cores
    python benchmarks/bench_gating.py                    # T 4k..1M x E {8,64,160,256} x k {1,2,8}
    python benchmarks/bench_gating.py --T 262144 --E 64 --k 2   # the issue's CPU target
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import mars_kernels as mk  # noqa: E402

FULL_T = [4096, 16384, 65536, 262144, 1048576]
FULL_E = [8, 64, 160, 256]
FULL_K = [1, 2, 8]
QUICK = [(4096, 64, 2), (65536, 8, 1), (65536, 160, 8), (262144, 64, 2), (262144, 256, 8)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _bytes_moved(op: str, T: int, E: int, k: int, elem: int) -> int:
    """Bytes an ideal kernel reads and writes (forward)."""
    if op == "topk":
        return T * E * elem + T * k * (4 + 8) + T * 4  # logits in; weights, indices, lse out
    # noisy: clean, raw logits and fp32 noise in; weights, indices, threshold index out
    return T * E * (2 * elem + 4) + T * k * (4 + 8) + T * 8


def _workload(op: str, T: int, E: int, k: int, dtype, device, backward: bool):
    g = torch.Generator(device=device).manual_seed(0)
    if op == "topk":
        logits = torch.randn(T, E, device=device, dtype=dtype, generator=g).requires_grad_(backward)

        def run(backend):
            if backend == "eager":  # what most MoE code does; ties are not exact
                p = torch.softmax(logits.float(), dim=-1)
                w, _ = p.topk(k, dim=-1)
                w = w / w.sum(dim=-1, keepdim=True)
            else:
                w, _ = mk.topk_gating(logits, k, backend=backend)
            if backward:
                w.sum().backward()

        return run, logits
    D = 64
    x = torch.randn(T, D, device=device, dtype=dtype, generator=g).requires_grad_(backward)
    wg = (torch.randn(D, E, device=device, dtype=dtype, generator=g) * 0.1).requires_grad_(backward)
    wn = (torch.randn(D, E, device=device, dtype=dtype, generator=g) * 0.1).requires_grad_(backward)
    noise = torch.randn(T, E, device=device, generator=g)

    def run(backend):
        w, _, imp, load = mk.noisy_topk_gating(x, wg, wn, k, training=True, noise=noise, backend=backend)
        if backward:
            (w.sum() + mk.noisy_balance_loss(imp, load)).backward()

    return run, torch.empty(T, E, device=device, dtype=dtype)


def bench_shape(op, T, E, k, dtype, device, backends, backward, min_run_time):
    run, like = _workload(op, T, E, k, dtype, device, backward)
    elem = like.element_size()
    copy_src = torch.randn(T, E, device=device).to(dtype)
    copy_dst = torch.empty_like(copy_src)
    t_copy = common.median_seconds(lambda: copy_dst.copy_(copy_src), device, min_run_time)
    copy_gbs = 2 * T * E * elem / t_copy / 1e9
    t_ref = common.median_seconds(lambda: run("reference"), device, min_run_time)
    peers = ["reference", "eager"] if op == "topk" else ["reference"]
    t_eager = common.median_seconds(lambda: run("eager"), device, min_run_time) if op == "topk" else None
    rows = []
    for backend in [*peers, *backends]:
        known = {"reference": t_ref, "eager": t_eager}
        t = known.get(backend) or common.median_seconds(lambda: run(backend), device, min_run_time)
        gbs = _bytes_moved(op, T, E, k, elem) / t / 1e9
        rows.append(
            dict(
                op=f"{op}_gating" + ("_fwd_bwd" if backward else "_fwd"),
                T=T, E=E, k=k, dtype=str(dtype).replace("torch.", ""), backend=backend,
                median_ms=t * 1e3, speedup_vs_reference=t_ref / t,
                speedup_vs_eager=None if t_eager is None else t_eager / t, gbps=gbs,
                copy_ms=t_copy * 1e3, copy_gbps=copy_gbs, fraction_of_copy=gbs / copy_gbs,
                peak_mem_mb=(lambda b: None if b is None else b / 2**20)(
                    common.peak_memory_bytes(lambda: run(backend), device)
                ),
            )
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a handful of shapes instead of the full sweep")
    p.add_argument("--T", type=int, nargs="*", help="token counts (default: the full sweep)")
    p.add_argument("--E", type=int, nargs="*", help="expert counts")
    p.add_argument("--k", type=int, nargs="*", help="experts per token")
    p.add_argument("--op", choices=["topk", "noisy"], nargs="*", default=["topk"])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="*", help="compiled backends to time (default: cpu, or cuda and triton)")
    p.add_argument("--min-run-time", type=float, default=0.3, help="CPU: seconds of timing per measurement")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/bench_gating_<device>.json)")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    backends = a.backends or (["cuda", "triton"] if device.type == "cuda" else ["cpu"])
    if a.T or a.E or a.k:
        shapes = list(itertools.product(a.T or [262144], a.E or [64], a.k or [2]))
    elif a.quick:
        shapes = QUICK
    else:
        shapes = list(itertools.product(FULL_T, FULL_E, FULL_K))
    env = common.environment(device)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | dtype {a.dtype}", flush=True)
    columns = [
        ("op", "op", ""), ("T", "T", "d"), ("E", "E", "d"), ("k", "k", "d"), ("backend", "backend", ""),
        ("median_ms", "ms", ".3f"), ("speedup_vs_reference", "x ref", ".2f"),
        ("speedup_vs_eager", "x eager", ".2f"), ("gbps", "GB/s", ".1f"),
        ("copy_gbps", "copy GB/s", ".1f"), ("fraction_of_copy", "of copy", ".0%"),
    ]
    common.print_header(columns)
    rows = []
    for op in a.op:
        for T, E, k in shapes:
            if not 1 <= k <= E:
                continue
            new = bench_shape(op, T, E, k, DTYPES[a.dtype], device, backends, a.backward, a.min_run_time)
            common.print_rows(new, columns)
            rows += new
    path = common.write_results("bench_gating", env, rows, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
