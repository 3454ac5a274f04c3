"""Benchmark the SparseMoE layer: ours vs a naive per-expert loop vs an
implementation on torch.nn.functional.grouped_mm, next to a same-run dense
MLP with the same number of FLOPs (the ceiling).

All implementations share the router and expert parameters. Reported per
shape and mode (forward, forward+backward): median time, expert GFLOP/s
(TFLOP/s on GPU), speed-up over the loop and over grouped_mm, fraction of the
dense rate, and peak memory above the inputs (CPU: the process's peak RSS,
reset before each run; GPU: torch.cuda.max_memory_allocated). JSON goes to
benchmarks/results/.

    python benchmarks/bench_moe.py                  # MARS-sized + fine-grained shapes for the device
    python benchmarks/bench_moe.py --T 4096 --D 128 --H 256 --E 8 --k 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import mars_kernels as mk  # noqa: E402
from mars_kernels import reference  # noqa: E402

CPU_SHAPES = {"mars": (16384, 256, 512, 8, 2), "fine-grained": (8192, 256, 128, 64, 8)}
GPU_SHAPES = {"mars": (16384, 256, 512, 8, 2), "fine-grained": (16384, 2048, 1024, 64, 8)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def eager_router(x, router_weight, k):
    """softmax -> top-k -> renormalise, as most MoE code routes."""
    p = torch.softmax((x @ router_weight.t()).float(), dim=-1)
    w, i = p.topk(k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), i


def loop_moe(layer, x):
    e = layer.experts
    w, i = eager_router(x, layer.router.proj.weight, layer.k)
    return reference.moe_loop(x, w, i, e.w1, e.b1, e.w2, e.b2, e.activation)


def grouped_mm_moe(layer, x):
    """Sort assignments by expert, two torch grouped_mm calls, index_add back."""
    e = layer.experts
    T, k, E = x.shape[0], layer.k, e.num_experts
    w, i = eager_router(x, layer.router.proj.weight, k)
    flat = i.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert_of_row = flat[order]
    token = order // k
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32)
    )
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = F.grouped_mm(x.index_select(0, token), e.w1, offs=offs) + e.b1.index_select(0, expert_of_row)
    y = F.grouped_mm(reference.activation(h, e.activation), e.w2, offs=offs) + e.b2.index_select(0, expert_of_row)
    y = y * w.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token, y)


def dense_mlp(layer, x_rows):
    """The ceiling: one dense MLP over S = T*k rows (same GEMM FLOPs)."""
    e = layer.experts
    h = torch.addmm(e.b1[0], x_rows, e.w1[0])
    return torch.addmm(e.b2[0], reference.activation(h, e.activation), e.w2[0])


def expert_flops(T, D, H, k, activation):
    h1 = 2 * H if activation == "swiglu" else H
    return 2 * T * k * (D * h1 + H * D)


def bench_shape(label, T, D, H, E, k, dtype, device, backend, activation, rounds, memory_only=False):
    torch.manual_seed(0)
    layer = mk.SparseMoE(D, H, E, k, activation=activation, backend=backend).to(device=device, dtype=dtype)
    x = torch.randn(T, D, device=device, dtype=dtype).requires_grad_(True)
    x_rows = torch.randn(T * k, D, device=device, dtype=dtype).requires_grad_(True)
    impls = {
        "ours": lambda: layer(x)[0],
        "loop": lambda: loop_moe(layer, x),
        "grouped_mm": lambda: grouped_mm_moe(layer, x),
        "dense": lambda: dense_mlp(layer, x_rows),
    }
    grad = torch.randn(T, D, device=device, dtype=dtype)
    grad_rows = torch.randn(T * k, D, device=device, dtype=dtype)
    rows = []
    for mode in ("forward", "forward+backward"):
        runs = {}
        for name, fn in impls.items():
            g = grad_rows if name == "dense" else grad

            def run(fn=fn, g=g):
                if mode == "forward":
                    with torch.no_grad():
                        fn()
                else:
                    fn().backward(g)

            try:
                run()
                runs[name] = run
            except RuntimeError as exc:  # e.g. grouped_mm is missing for some dtypes/devices
                print(f"  {name} skipped: {str(exc).splitlines()[0]}")
        if memory_only:
            times = {name: None for name in impls}
            peaks = {name: common.peak_memory_bytes(runs[name], device) if name in runs else None for name in impls}
        else:
            measured = common.interleaved_medians(runs, device, rounds)
            times = {name: measured.get(name) for name in impls}
            peaks = {name: common.peak_memory_bytes(runs[name], device) if name in runs else None for name in impls}
        layer.zero_grad(set_to_none=True)
        x.grad = x_rows.grad = None
        flops = expert_flops(T, D, H, k, activation) * (1 if mode == "forward" else 3)
        dense_rate = flops / times["dense"] if times["dense"] else None
        for name in ("ours", "loop", "grouped_mm", "dense"):
            t = times[name]
            if memory_only:
                rows.append(dict(shape=label, mode=mode, impl=name, peak_mem_mb=None if peaks[name] is None else peaks[name] / 2**20))
                continue
            if t is None:
                continue
            rate = flops / t
            rows.append(
                dict(
                    op="sparse_moe", shape=label, T=T, D=D, H=H, E=E, k=k, activation=activation, mode=mode,
                    dtype=str(dtype).replace("torch.", ""), impl=name if name != "ours" else f"ours-{backend}",
                    median_ms=t * 1e3, gflops=rate / 1e9,
                    speedup_vs_loop=times["loop"] / t if times["loop"] else None,
                    speedup_vs_grouped_mm=times["grouped_mm"] / t if times["grouped_mm"] else None,
                    fraction_of_dense=rate / dense_rate if dense_rate else None,
                    peak_mem_mb=None if peaks[name] is None else peaks[name] / 2**20,
                )
            )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", help="ours: cpu on CPU, triton on GPU by default")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on GPU")
    p.add_argument("--activation", default="gelu", choices=list(reference.ACTIVATIONS))
    p.add_argument("--shapes", nargs="*", help="named shapes (mars, fine-grained); default both")
    p.add_argument("--T", type=int), p.add_argument("--D", type=int), p.add_argument("--H", type=int)
    p.add_argument("--E", type=int), p.add_argument("--k", type=int)
    p.add_argument("--rounds", type=int, default=9, help="CPU: timed calls of each implementation, interleaved")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/bench_moe_<device>.json)")
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the CPU memory child
    a = p.parse_args(argv)

    device = torch.device(a.device)
    backend = a.backend or ("triton" if device.type == "cuda" else "cpu")
    dtype = DTYPES[a.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    table = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if a.T:
        shapes = {"custom": (a.T, a.D, a.H, a.E, a.k)}
    else:
        shapes = {n: table[n] for n in (a.shapes or table)}
    if a.memory_only:
        rows = []
        for label, (T, D, H, E, k) in shapes.items():
            rows += bench_shape(label, T, D, H, E, k, dtype, device, backend, a.activation, 0, memory_only=True)
        print(json.dumps(rows))
        return
    env = common.environment(device)
    unit = "TFLOP/s" if device.type == "cuda" else "GFLOP/s"
    scale = 1e-3 if device.type == "cuda" else 1.0
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {dtype} | {a.activation}", flush=True)
    columns = [
        ("shape", "shape", ""), ("mode", "mode", ""), ("impl", "impl", ""), ("median_ms", "ms", ".1f"),
        ("rate", unit, ".1f"), ("speedup_vs_loop", "x loop", ".2f"), ("speedup_vs_grouped_mm", "x grouped_mm", ".2f"),
        ("fraction_of_dense", "of dense", ".0%"), ("peak_mem_mb", "peak MB", ".0f"),
    ]
    common.print_header(columns)
    rows = []
    for label, (T, D, H, E, k) in shapes.items():
        new = bench_shape(label, T, D, H, E, k, dtype, device, backend, a.activation, a.rounds)
        if device.type == "cpu":  # peak RSS from a child process whose allocator returns memory at once
            args = [sys.executable, __file__, "--memory-only", "--device", "cpu", "--backend", backend,
                    "--dtype", str(dtype).replace("torch.", ""), "--activation", a.activation,
                    "--T", str(T), "--D", str(D), "--H", str(H), "--E", str(E), "--k", str(k)]
            out = subprocess.run(args, env=common.exact_rss_env(), capture_output=True, text=True, check=True)
            peaks = {(r["mode"], r["impl"]): r["peak_mem_mb"] for r in json.loads(out.stdout.strip().splitlines()[-1])}
            for r in new:
                r["peak_mem_mb"] = peaks[(r["mode"], "ours" if r["impl"].startswith("ours") else r["impl"])]
        for r in new:
            r["rate"] = r["gflops"] * scale
        common.print_rows(new, columns)
        rows += new
    path = common.write_results("bench_moe", env, rows, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
