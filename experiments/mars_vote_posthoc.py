"""Would the per-modality heads' vote help the other models too? (the MARS
research log, docs/mars_research.md, round 4; VALIDATION split only)

    python experiments/mars_vote_posthoc.py SCREEN [SCREEN ...] [--weights 0 0.5 1 2 3 5]

takes the best checkpoints of screens already trained by
``experiments/mars_screen.py`` (``runs/screen/SCREEN/seed*``) and scores them
on the validation split with the prediction

    log_softmax(logits) + W * mean over the observed modalities of log_softmax(head_m)

for each weight W, where head_m are the model's per-modality heads: MARS's
and the vanilla MoE's ``unimodal_heads`` on the encoder tokens (runs with
``--lambda-unimodal`` > 0), or MCE's heads g_m on its completed tokens. W = 0
is the model as trained. The checkpoints' best epochs were chosen without
the vote, so this is a post-hoc check: the screens with ``--unimodal-vote``
choose their epoch with it. Test scores are neither read nor printed.

Writes experiments/results/screens/vote-posthoc.json and prints one line per screen (the
mean over seeds for each W, and the per-seed gain at W = 2).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mars.train import run_data  # noqa: E402
from mars.evaluate import evaluate_subsets  # noqa: E402
from mars.rundir import CHECKPOINT_FILE, load_checkpoint, read_config  # noqa: E402
from mars.train import load_weights, make_model, prepare_model  # noqa: E402

OUT = ROOT / "experiments" / "results" / "screens"


class _Voting(torch.nn.Module):
    """MCE with its heads' vote added at inference (a wrapper for this check
    only): forward(features, observed [B, M], available, mode) -> Output with
    the voted scores."""

    def __init__(self, model, weight: float):
        super().__init__()
        self.model, self.weight = model, weight

    def forward(self, features, observed, available=None, mode="eval"):
        from mars.model import unimodal_vote

        m = self.model
        out = m(features, observed, available, mode=mode)
        heads = m.modality_readout(m.complete(m.tokens(m.encode(features), observed.to(m.position.device))))
        return type(out)(unimodal_vote(out.logits, heads, observed, self.weight), out.aux)


def _score(run: Path, weights: list[float]) -> dict[float, float]:
    """The validation mean of the run's best checkpoint at each vote weight
    (one model, built and prepared once; only the weight changes)."""
    cfg = read_config(run)
    mce = cfg.model.method == "mce"
    if not mce and cfg.model.lambda_unimodal == 0:
        raise SystemExit(f"{run}: trained without per-modality heads (--lambda-unimodal 0)")
    state = load_checkpoint(run / CHECKPOINT_FILE, resume=False)
    train_set, val_set, _ = run_data(cfg)
    model = make_model(cfg, val_set)
    load_weights(model, state["best"]["state"], run / CHECKPOINT_FILE)
    prepare_model(model, cfg, train_set, resume=True)
    scores = {}
    for w in weights:
        if mce:
            scored = _Voting(model, w) if w > 0 else model
        else:  # MarsModel reads the weight from its config at every forward
            model.config = replace(cfg.model, unimodal_vote=w)
            scored = model
        scores[w] = evaluate_subsets(scored, val_set)["mean"]
    return scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("screens", nargs="+")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 3.0, 5.0])
    a = p.parse_args(argv)
    if 0.0 not in a.weights or 2.0 not in a.weights:
        raise SystemExit("--weights must include 0 (the model as trained) and 2 (the per-seed gains)")
    result = {"command": "python experiments/mars_vote_posthoc.py " + " ".join(a.screens) + " --weights "
                         + " ".join(f"{w:g}" for w in a.weights), "split": "val", "screens": {}}
    for name in a.screens:
        runs = sorted((ROOT / "runs" / "screen" / name).glob("seed*"), key=lambda r: int(r.name[4:]))
        if not runs:
            raise SystemExit(f"{name}: no runs under runs/screen/{name} (train it with experiments/mars_screen.py)")
        per_seed = {int(r.name[4:]): _score(r, a.weights) for r in runs}
        mean = {w: statistics.mean(s[w] for s in per_seed.values()) for w in a.weights}
        gain = {seed: s[2.0] - s[0.0] for seed, s in per_seed.items()}
        result["screens"][name] = {"per_seed": {str(k): {f"{w:g}": v for w, v in s.items()} for k, s in per_seed.items()},
                                   "mean": {f"{w:g}": v for w, v in mean.items()},
                                   "gain_w2": {str(k): v for k, v in gain.items()}}
        print(f"{name}: " + ", ".join(f"W={w:g} {v:.4f}" for w, v in mean.items())
              + " | gain at W=2 per seed: " + ", ".join(f"{g:+.4f}" for g in gain.values()), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vote-posthoc.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
