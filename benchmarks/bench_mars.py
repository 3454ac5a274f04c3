"""Benchmark one MARS training step (forward + backward) on the feature-map
path at a size where the MoE dominates, compiled kernels vs the pure-PyTorch
reference backend, in the same run.

Default: 16 samples of 32x32 maps (16,384 tokens), D = 256, H = 512, E = 8,
k = 2, three modalities. Prints the median step time per backend and the
speed-up; writes JSON to benchmarks/results/.

    python benchmarks/bench_mars.py
    python benchmarks/bench_mars.py --backends cpu reference --batch 8 --size 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mars.config import ModelConfig  # noqa: E402
from mars.methods import build_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="*", help="default: cpu and reference (cuda/triton and reference on GPU)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="maps are size x size: tokens = batch * size^2")
    p.add_argument("--modalities", type=int, default=3)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/bench_mars_<device>.json)")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    backends = a.backends or (["cuda", "triton", "reference"] if device.type == "cuda" else ["cpu", "reference"])
    torch.manual_seed(0)
    mods = [f"m{i}" for i in range(a.modalities)]
    shapes = {m: (a.channels, a.size, a.size) for m in mods}
    # The fusion + MoE step this benchmark has always timed: without the per-modality heads and with the
    # residual router's plain gate (the recipe's heads and mixed routing add little work and are not kernels).
    cfg = ModelConfig(d_model=a.d_model, d_hidden=a.d_hidden, num_experts=a.experts, k=a.k, fusion_heads=4, dropout=0.0,
                      lambda_unimodal=0.0, mars={"mix": "none"})
    model = build_model(mods, shapes, 5, "segmentation", cfg).to(device)
    feats = {m: torch.randn(a.batch, *shapes[m], device=device) for m in mods}
    labels = torch.randint(0, 5, (a.batch, a.size, a.size), device=device)
    available = torch.ones(a.batch, a.modalities, dtype=torch.bool, device=device)
    observed = available.clone()
    observed[:, 0] = False

    def step_for(backend):
        def step():
            model.backend = backend
            model.zero_grad(set_to_none=True)
            out = model(feats, observed, available, mode="train")
            loss, _ = model.loss(out, labels)
            loss.backward()
        return step

    times = common.interleaved_medians({b: step_for(b) for b in backends}, device, a.rounds)
    env = common.environment(device)
    tokens = a.batch * a.size * a.size
    print(f"# {env['device']} | torch {env['torch']} | MARS training step, {tokens} tokens, D={a.d_model}, "
          f"H={a.d_hidden}, E={a.experts}, k={a.k}")
    rows = []
    ref = times.get("reference")
    for b in backends:
        row = dict(op="mars_train_step", tokens=tokens, D=a.d_model, H=a.d_hidden, E=a.experts, k=a.k, backend=b,
                   median_ms=times[b] * 1e3, speedup_vs_reference=None if ref is None else ref / times[b])
        rows.append(row)
        speed = "" if ref is None else f"  x{row['speedup_vs_reference']:.2f} vs reference"
        print(f"{b:>10}: {row['median_ms']:8.1f} ms{speed}")
    print(f"wrote {common.write_results('bench_mars', env, rows, a.out)}")


if __name__ == "__main__":
    main()
