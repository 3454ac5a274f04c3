"""Silent missingness, validation only (``mars.research.silent_missing``):
MARS, the same-budget MoE and MARS with random routing, each with the mask
given (flag) and not given (silent), from the runs of

    python experiments/protocol_v2.py dev --cells synthetic-regimes/a mfeat/a \\
        --arms flag:mars silent:mars flag:moe:same-budget silent:moe:same-budget \\
               flag:mars:routing=random silent:mars:routing=random --seeds 0 1 2

Prints per cell the validation means, the paired differences that say
whether MARS's routing helps when the pattern is hidden, and (synthetic-
regimes) the NMI of the routes; ``--out`` writes them as JSON.

    python experiments/silent_screen.py --out experiments/results/v2/silent_screen.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mars.stats import paired_interval  # noqa: E402

RUNS = ROOT / "runs" / "v2" / "dev"
CELLS = ("synthetic-regimes-a", "mfeat-a")
ARMS = ("flag_mars", "flag_moe_same-budget", "flag_mars_routing-random",
        "silent_mars", "silent_moe_same-budget", "silent_mars_routing-random")
PAIRS = [("silent_mars", "silent_moe_same-budget"), ("silent_mars", "silent_mars_routing-random"),
         ("flag_mars", "flag_moe_same-budget"), ("flag_mars", "flag_mars_routing-random"),
         ("silent_mars", "flag_mars"), ("silent_moe_same-budget", "flag_moe_same-budget")]


def load(cell: str, arm: str) -> dict[int, dict]:
    out = {}
    for d in sorted((RUNS / cell / arm).glob("seed*")):
        if (d / "summary.json").exists():
            row = json.loads((d / "summary.json").read_text())
            if (d / "routing.json").exists():
                row["routing"] = json.loads((d / "routing.json").read_text())
            out[int(d.name[4:])] = row
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    report = {}
    for cell in CELLS:
        runs = {arm: load(cell, arm) for arm in ARMS}
        rows = {}
        print(f"\n{cell} (validation mean over subsets)")
        for arm, seeds in runs.items():
            if not seeds:
                continue
            vals = [r["val_mean"] for r in seeds.values()]
            nmi = [r["routing"] for r in seeds.values() if "routing" in r]
            row = dict(n=len(vals), mean=sum(vals) / len(vals), seeds=sorted(seeds))
            if nmi:
                row["nmi"] = {k: sum(x[k] for x in nmi) / len(nmi) for k in ("nmi_regime", "nmi_pattern", "nmi_label")}
            rows[arm] = row
            extra = "" if "nmi" not in row else "  NMI regime/pattern/label " + " / ".join(
                f"{row['nmi'][k]:.2f}" for k in ("nmi_regime", "nmi_pattern", "nmi_label"))
            print(f"  {arm:28s} {row['mean']:.4f} (n={row['n']}){extra}")
        diffs = {}
        for x, y in PAIRS:
            common = sorted(set(runs[x]) & set(runs[y]))
            if len(common) < 2:
                continue
            iv = paired_interval([runs[x][s]["val_mean"] - runs[y][s]["val_mean"] for s in common])
            diffs[f"{x} - {y}"] = iv
            print(f"  {x} - {y}: {iv['mean']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}] (n={iv['n']})")
        report[cell] = dict(arms=rows, differences=diffs)
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
