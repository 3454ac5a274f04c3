"""Cost of MARS's residual-router inputs in one training step, at the
embedded data's shapes and the ``mars`` command's defaults (P = 8 masks per
step), all peers in the same run.

Peers, one training step each (forward, loss, backward; mfeat's six
modalities, a batch of 64 samples, P masks drawn uniformly):

* ``concat``: the default residual input [z_i, z_c];
* ``pattern``: the per-pattern mean of z_c - z_i, patterns grouped by an
  int64 code per mask (:func:`mars.research.router_inputs.pattern_mean`);
* ``pattern-rows``: the same, grouped by ``torch.unique(dim=0)`` on the mask
  rows (the path for masks wider than 62 modalities, and the earlier
  implementation).

Prints the median step time of each and its ratio to ``concat``, plus the
``pattern_mean`` call alone (code vs rows); writes JSON to
experiments/results/ (``common.write_results`` of benchmarks/, given --out).

    python experiments/bench_residual_input.py
    python experiments/bench_residual_input.py --batch 128 --masks 16 --rounds 31
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402

import mars.research.router_inputs as mars_router  # noqa: E402
from mars.config import ModelConfig  # noqa: E402
from mars.data import MissingnessProtocol, load_mfeat  # noqa: E402
from mars.methods import build_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--masks", type=int, default=8, help="masks per sample per step (P)")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_residual_input_cpu.json"),
                   help="JSON path (default: experiments/results/bench_residual_input_cpu.json)")
    a = p.parse_args(argv)
    if a.batch < 1 or a.masks < 1 or a.rounds < 1:
        p.error("--batch, --masks and --rounds must be >= 1")

    device = torch.device("cpu")
    torch.manual_seed(0)
    train_set = load_mfeat(seed=0)[0]
    idx = torch.arange(min(a.batch, len(train_set)))
    feats = {m: train_set.features[m][idx] for m in train_set.modalities}
    labels = train_set.labels[idx]
    available = torch.ones(len(idx), train_set.num_modalities, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    protocol = MissingnessProtocol.parse("uniform")
    observed = torch.stack([protocol.sample(available, gen) for _ in range(a.masks)])  # [P, B, M]
    shapes = {m: tuple(train_set.features[m].shape[1:]) for m in train_set.modalities}

    def step_for(residual_input: str, code_bits: int):
        torch.manual_seed(0)
        model = build_model(train_set.modalities, shapes, train_set.num_classes, train_set.task,
                            ModelConfig(research={"residual_input": residual_input}))
        model.train()

        def step():
            mars_router._CODE_BITS = code_bits
            model.zero_grad(set_to_none=True)
            loss, _ = model.loss(model(feats, observed, available, mode="train"), labels)
            loss.backward()
        return step

    bits = mars_router._CODE_BITS
    peers = {"concat": step_for("concat", bits), "pattern": step_for("pattern", bits),
             "pattern-rows": step_for("pattern", 0)}
    r = torch.randn(a.masks, len(idx), 1, 64)
    token_masks = observed.unsqueeze(-2)

    def mean_with(code_bits):
        def run():
            mars_router._CODE_BITS = code_bits
            mars_router.pattern_mean(r, token_masks)
        return run

    try:
        times = common.interleaved_medians(peers, device, a.rounds)
        op = common.interleaved_medians({"code": mean_with(bits), "rows": mean_with(0)}, device, a.rounds * 5)
    finally:
        mars_router._CODE_BITS = bits
    env = common.environment(device)
    print(f"# {env['cpu']} | torch {env['torch']} | {env['threads']} threads | MARS training step on mfeat, "
          f"batch {len(idx)}, P = {a.masks}")
    rows = []
    for name, t in times.items():
        rows.append(dict(op="mars_train_step", residual_input=name, batch=len(idx), masks=a.masks,
                         median_ms=t * 1e3, ratio_vs_concat=t / times["concat"]))
        print(f"{name:>13}: {t * 1e3:7.2f} ms  x{t / times['concat']:.3f} of concat")
    for name, t in op.items():
        rows.append(dict(op="pattern_mean", grouping=name, tokens=int(token_masks[..., 0].numel()),
                         median_ms=t * 1e3, ratio_vs_rows=t / op["rows"]))
    print(f"pattern_mean alone: code {op['code'] * 1e3:.3f} ms, rows {op['rows'] * 1e3:.3f} ms "
          f"(x{op['rows'] / op['code']:.1f})")
    print(f"wrote {common.write_results('bench_residual_input', env, rows, a.out)}")


if __name__ == "__main__":
    main()
