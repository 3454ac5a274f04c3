"""How much the experts contribute in trained runs, on the VALIDATION split
(the MARS research log, docs/mars_research.md):

    python experiments/mars_moe_share.py NAME SCREEN [SCREEN ...]

For each seed run of each screen (``runs/screen/SCREEN/seed*``, written by
experiments/mars_screen.py) it evaluates the best checkpoint on validation as
deployed (feature router), and again with the experts' output dropped
(y = z_i: the backbone and the head alone), and measures the mean norm of the
experts' output relative to z_i. Writes experiments/results/screens/NAME.json and prints a
line per screen. Test scores are neither read nor printed.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mars.train import run_data  # noqa: E402
from mars.evaluate import evaluate_subsets  # noqa: E402
from mars.rundir import load_checkpoint, read_config  # noqa: E402
from mars.train import load_weights, make_model  # noqa: E402


def measure(run: Path) -> dict:
    cfg = read_config(run)
    state = load_checkpoint(run / "checkpoint.pt", resume=False)
    _, val, _ = run_data(cfg)
    model = make_model(cfg, val)
    load_weights(model, state["best"]["state"], run / "checkpoint.pt")
    model.eval()
    layer = model.moe
    forward = layer.forward
    ratios: list[float] = []

    def probe(z_i, *args, **kwargs):
        y, aux = forward(z_i, *args, **kwargs)
        ratios.append(float((y - z_i).norm(dim=-1).mean() / z_i.norm(dim=-1).mean()))
        return y, aux

    def dropped(z_i, *args, **kwargs):
        _, aux = forward(z_i, *args, **kwargs)
        return z_i, aux

    layer.forward = probe
    deployed = evaluate_subsets(model, val, mode="eval")["mean"]
    layer.forward = dropped
    without = evaluate_subsets(model, val, mode="eval")["mean"]
    del layer.forward
    return {"run": str(run.relative_to(ROOT)), "val_mean": deployed, "val_mean_without_experts": without,
            "experts_output_norm_ratio": statistics.mean(ratios)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("screens", nargs="+")
    a = p.parse_args(argv)
    for name in (a.name, *a.screens):  # one path component each: docs/research/NAME.json, runs/screen/SCREEN
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*", name) or ".." in name:
            p.error(f"{name!r} is not a screen name; expected letters, digits and _ . + = - (one path component)")
    torch.set_num_threads(1)
    out = {"name": a.name, "split": "val", "command": "python experiments/mars_moe_share.py " + " ".join(sys.argv[1:]),
           "screens": {}}
    for screen in a.screens:
        runs = sorted((ROOT / "runs" / "screen" / screen).glob("seed*"))
        if not runs:
            p.error(f"no runs under runs/screen/{screen}: run experiments/mars_screen.py {screen} first")
        rows = [measure(r) for r in runs]
        drop = [r["val_mean_without_experts"] - r["val_mean"] for r in rows]
        out["screens"][screen] = {"runs": rows, "mean_change_without_experts": statistics.mean(drop),
                                  "mean_norm_ratio": statistics.mean(r["experts_output_norm_ratio"] for r in rows)}
        print(f"{screen}: val {statistics.mean(r['val_mean'] for r in rows):.4f}, without the experts' output "
              f"{statistics.mean(r['val_mean_without_experts'] for r in rows):.4f} "
              f"(change {statistics.mean(drop):+.4f}, per seed {', '.join(f'{d:+.4f}' for d in drop)}), "
              f"|experts' output| / |z_i| {out['screens'][screen]['mean_norm_ratio']:.2f}")
    (ROOT / "experiments" / "results" / "screens" / f"{a.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
