"""Where the CPU expert MLP's time goes: the per-phase thread CPU time of
``moe_mlp`` forward and backward (gathers, each GEMM, activation, combine,
weight and input gradients) at the HF benchmark's shapes.

Needs a profiling build of the extension (the phases are compiled out
otherwise)::

    MARS_KERNELS_PHASE_PROFILE=1 pip install --no-build-isolation -e .
    python benchmarks/profile_expert_mlp.py [--dtype bfloat16] [--steps 5]

The kernel prints ``phase NAME MS`` lines to stderr after each forward and
backward; this script captures them (from the C stderr, fd 2), sums them over
the steps and prints each phase's share. Thread CPU time, summed over
threads: it stays meaningful on a busy machine, unlike wall time.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

import torch

SHAPES = {"qwen3": (4096, 512, 256, 64, 8), "mixtral": (2048, 1024, 512, 16, 2)}  # T, D, I, E, k


def _captured(fn):
    """Run fn with the process's fd 2 redirected to a file; -> its text."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 2)
        try:
            fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return f.read()


def main() -> int:
    import mars_kernels as mk

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    for name in a.shapes:
        T, D, I, E, k = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
        w1 = (torch.randn(E, D, 2 * I, generator=g) / D**0.5).to(dtype).requires_grad_()
        w2 = (torch.randn(E, I, D, generator=g) / I**0.5).to(dtype).requires_grad_()
        weights, indices = mk.topk_gating(torch.randn(T, E, generator=g), k)
        meta = mk.moe_align(indices, E)

        def step():
            y = mk.moe_mlp(x, weights.to(dtype), meta, w1, None, w2, None, "swiglu", backend="cpu")
            y.float().square().mean().backward()

        _captured(step)  # warm-up (its phases are dropped)
        text = _captured(lambda: [step() for _ in range(a.steps)])
        totals = collections.Counter()
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "phase":
                totals[parts[1]] += float(parts[2]) / a.steps
        if not totals:
            print("no phase lines: the extension was not built with MARS_KERNELS_PHASE_PROFILE=1", file=sys.stderr)
            return 1
        print(f"\n{name} (T, D, I, E, k) = {SHAPES[name]}, {a.dtype}, swiglu, thread CPU ms per step (all threads)")
        for group in ("fwd.", "bwd."):
            sub = {n: v for n, v in totals.items() if n.startswith(group)}
            total = sum(sub.values())
            print(f"  {group[:-1]:3s} total {total:9.1f}")
            for n, v in sorted(sub.items(), key=lambda kv: -kv[1]):
                print(f"    {n:28s} {v:9.1f}  {100 * v / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
