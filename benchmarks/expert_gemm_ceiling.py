"""Where the expert GEMMs' ceiling comes from: the GEMMs of one MoE training
step (forward x W1, a W2; backward dy W2^T, dW2, dW1, dh W1^T), through the
library torch's own matmul uses (``torch.mm``), cut three ways with the same
FLOPs, timed interleaved in the same run:

- ``one gemm``: each of the six products over all S = T*k rows at once, one
  weight (a dense layer with the MoE's FLOPs and row count);
- ``split, shared w``: the per-expert row counts of a top-k routing, every
  group multiplying the same weight (small GEMMs, one weight);
- ``split, E weights``: the same groups, each with its own expert's weight:
  the ``gemm floor`` peer of ``bench_hf_experts.py``, what an MoE's experts
  must run;
- ``dense mlp``: ``bench_hf_experts.py``'s dense peer (T rows, width k*I).

``split, E weights`` / ``split, shared w`` is the cost of E distinct weights
(each packed and streamed through the cache per product); ``split, shared w``
/ ``one gemm`` that of small row groups. ``weight copy`` is the time to read
and write the experts' weights once (torch's copy at this machine's memory
rate), for scale: a step reads them at least twice and writes their
gradients.

    python benchmarks/expert_gemm_ceiling.py --dtype bfloat16 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_header, print_rows, write_results  # noqa: E402

SHAPES = {  # (T, D, I, E, k), as bench_hf_experts.py
    "qwen3": (4096, 512, 256, 64, 8),
    "mixtral": (2048, 1024, 512, 16, 2),
}


def step_gemms(xs, a, dy, dh, dyT, dhT, w1s, w2s, bounds, lowp: bool):
    """The six products per group [lo, hi) with weights w1s[g] [2I, D], w2s[g] [D, I]."""
    S, D = xs.shape
    I2, I = w1s[0].shape[0], w2s[0].shape[1]

    def call():
        with torch.no_grad():
            h, ys, G, dxs = xs.new_empty(S, I2), xs.new_empty(S, D), xs.new_empty(S, I), xs.new_empty(S, D)
            dw1 = [torch.empty_like(w) for w in w1s]
            dw2 = [torch.empty_like(w) for w in w2s]
            for g, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                if lo == hi:
                    continue
                torch.mm(xs[lo:hi], w1s[g].t(), out=h[lo:hi])
                torch.mm(a[lo:hi], w2s[g].t(), out=ys[lo:hi])
                torch.mm(dy[lo:hi], w2s[g], out=G[lo:hi])
                torch.mm(dyT[g] if lowp else dy[lo:hi].t(), a[lo:hi], out=dw2[g])
                torch.mm(dhT[g] if lowp else dh[lo:hi].t(), xs[lo:hi], out=dw1[g])
                torch.mm(dh[lo:hi], w1s[g], out=dxs[lo:hi])
    return call


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", help="JSON path (default benchmarks/results/expert_gemm_ceiling_cpu[_bf16].json)")
    p.add_argument("--note", help="recorded in the JSON's environment")
    a_ = p.parse_args()
    dtype = getattr(torch, a_.dtype)
    lowp = dtype != torch.float32
    env = environment(torch.device("cpu"))
    if a_.note:
        env["note"] = a_.note
    rows = []
    for name in a_.shapes:
        T, D, I, E, k = SHAPES[name]
        gen = torch.Generator().manual_seed(1)
        logits = torch.randn(T, E, generator=gen)
        idx = logits.softmax(-1).topk(k, dim=-1).indices
        counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
        S = T * k
        rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
        xs, a, dy, dh = rnd(S, D), rnd(S, I), rnd(S, D), rnd(S, 2 * I)
        w1, w2 = rnd(E, 2 * I, D) / D**0.5, rnd(E, D, I) / I**0.5  # HF's layout [E, out, in]
        split = [0]
        for c in counts:
            split.append(split[-1] + c)
        whole = [0, S]

        def transposes(bounds):
            if not lowp:
                return None, None
            return ([dy[lo:hi].t().contiguous() for lo, hi in zip(bounds, bounds[1:])],
                    [dh[lo:hi].t().contiguous() for lo, hi in zip(bounds, bounds[1:])])

        tw, ts = transposes(whole), transposes(split)
        dense_up, dense_down = rnd(D, 2 * k * I) / D**0.5, rnd(k * I, D) / (k * I) ** 0.5
        x = rnd(T, D)

        def dense():
            xi = x.detach().requires_grad_(True)
            dense_up.requires_grad_(True), dense_down.requires_grad_(True)
            gate, up = (xi @ dense_up).chunk(2, dim=-1)
            ((torch.nn.functional.silu(gate) * up) @ dense_down).sum().backward()
            dense_up.grad = dense_down.grad = None

        weights = torch.cat([w1.reshape(-1), w2.reshape(-1)])
        copy_dst = torch.empty_like(weights)
        fns = {
            "one_gemm": step_gemms(xs, a, dy, dh, *tw, [w1[0]], [w2[0]], whole, lowp),
            "split_shared_w": step_gemms(xs, a, dy, dh, *ts, [w1[0]] * E, [w2[0]] * E, split, lowp),
            "split_E_weights": step_gemms(xs, a, dy, dh, *ts, list(w1), list(w2), split, lowp),
            "dense_mlp": dense,
            "weight_copy": lambda: copy_dst.copy_(weights),
        }
        for fn in fns.values():
            fn()
        samples = {n: [] for n in fns}
        for _ in range(a_.rounds):
            for n, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                samples[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(v) * 1e3 for n, v in samples.items()}
        rng = {n: (min(v) * 1e3, max(v) * 1e3) for n, v in samples.items()}
        rows.append(dict(
            shape=name, T=T, D=D, I=I, E=E, k=k, dtype=a_.dtype, rows_per_expert=S / E,
            **{f"{n}_ms": med[n] for n in fns}, **{f"{n}_range_ms": list(rng[n]) for n in fns},
            small_groups=med["split_shared_w"] / med["one_gemm"],
            distinct_weights=med["split_E_weights"] / med["split_shared_w"],
            floor_over_dense=med["split_E_weights"] / med["dense_mlp"],
            weight_bytes=weights.numel() * weights.element_size(),
        ))
    cols = [("shape", "shape", "s"), ("one_gemm_ms", "one gemm", ".1f"), ("split_shared_w_ms", "split, shared w", ".1f"),
            ("split_E_weights_ms", "split, E weights", ".1f"), ("dense_mlp_ms", "dense mlp", ".1f"),
            ("weight_copy_ms", "weight copy", ".2f"), ("small_groups", "x small groups", ".2f"),
            ("distinct_weights", "x distinct w", ".2f"), ("floor_over_dense", "floor / dense", ".2f")]
    print(f"{a_.dtype}, median ms of {a_.rounds} interleaved rounds; {env['cpu_model']}, "
          f"{env['torch_threads'] if 'torch_threads' in env else torch.get_num_threads()} threads")
    print_header(cols)
    print_rows(rows, cols)
    path = write_results("expert_gemm_ceiling", env, rows,
                         a_.out or str(Path(__file__).resolve().parent / "results" /
                                       f"expert_gemm_ceiling_cpu{'_bf16' if lowp else ''}.json"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
