"""Screen one configuration on the VALIDATION split (the MARS research log,
docs/mars_research.md).

    python experiments/mars_screen.py NAME --seeds 0 1 2 [--ref OTHER] -- <mars train options>

trains ``mars train <options> --seed S`` for each seed (run directories under
``runs/screen/NAME/``) and reports, on the validation split only: the mean
over modality subsets of the best epoch (the epoch is chosen on validation,
as ``mars train`` does), the mean by number of observed modalities, for
methods with a residual router the oracle score (residual-router gating,
``mars eval RUN --oracle --split val``) and the feature-vs-residual router
top-k agreement under the training protocol's masks, and for sparse-MoE
methods the specialisation NMI (missing pattern vs expert). Test scores are
neither read nor printed. With ``--ref OTHER`` also the per-seed paired
difference to the screen OTHER (same seeds) with a 95% paired-t interval.

Writes experiments/results/screens/NAME.json (command, per-seed values, means and standard
deviations, seconds per epoch) and prints one line.

    python experiments/mars_screen.py --table NAME ...

prints the markdown table of the named screens (the log's tables).

    python experiments/mars_screen.py --pool NEW:REF [NEW:REF ...]

pairs each screen NEW with REF seed by seed (experiments/results/screens/*.json) and prints
every paired difference and their pooled mean with a 95% paired-t interval
(e.g. one variant over several data sets and seed ranges).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mars import cli, methods  # noqa: E402
from mars.data import MissingnessProtocol  # noqa: E402
from mars.evaluate import evaluate_subsets, router_agreement  # noqa: E402
from mars.rundir import write_json  # noqa: E402
from mars.stats import paired_interval  # noqa: E402
from mars.train import train  # noqa: E402

OUT = ROOT / "experiments" / "results" / "screens"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


def check_name(name: str, what: str = "NAME") -> str:
    """A screen name is one plain path component (it names runs/screen/NAME/
    and experiments/results/screens/NAME.json): letters, digits and ``_ . + = -``, not
    starting with a dot; no ``/``, ``..`` or absolute path."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise SystemExit(f"mars_screen: error: {what}: {name!r} is not a screen name; expected letters, digits and "
                         "_ . + = - (one path component, not starting with a dot)")
    return name


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def screen_seed(train_argv: list[str], seed: int, run_dir: Path) -> dict:
    """Train one seed into ``run_dir``. An earlier run there is replaced the
    way ``mars train --overwrite`` replaces one (atomically, once the new run
    is complete, under the run's lock); a directory holding anything else is
    refused, never deleted."""
    cfg = replace(cli.config_from_args(train_argv), seed=seed)
    t0 = time.time()
    res = train(cfg, run_dir, progress=False, log=lambda *a, **k: None, overwrite=True)
    seconds = time.time() - t0
    model, summary = res["model"], res["summary"]
    from mars.train import run_data

    _, val_set, _ = run_data(cfg)
    method = methods.get(cfg.model.method)
    num_experts = cfg.model.num_experts if method.sparse_moe else None
    val = evaluate_subsets(model, val_set, num_experts=num_experts)
    row = {"seed": seed, "val_mean": val["mean"], "val_by_size": val["by_size"], "best_epoch": summary["best_epoch"],
           "seconds": seconds, "seconds_per_epoch": summary["train_seconds"] / cfg.epochs,
           "specialisation_nmi": val.get("specialisation_nmi")}
    assert abs(row["val_mean"] - summary["val_mean"]) < 1e-9, (row["val_mean"], summary["val_mean"])
    if method.residual_router:
        row["oracle_val_mean"] = evaluate_subsets(model, val_set, mode="oracle")["mean"]
        row["router_agreement_val"] = router_agreement(model, val_set, MissingnessProtocol.parse(cfg.protocol),
                                                       cfg.seed)
    return row


def table(names: list[str]) -> str:
    """Markdown rows of the screens ``names`` (experiments/results/screens/NAME.json)."""
    def f(v, d=4):
        return "-" if v is None else f"{v[0]:.{d}f} ± {v[1]:.{d}f}"

    lines = ["| screen | options | val mean over subsets | one modality | all | oracle (val) | router agreement (val) "
             "| NMI (val) | paired diff. [95% CI] | s / epoch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = json.loads((OUT / f"{check_name(name)}.json").read_text())
        opts = r["command"].split(" -- ", 1)[1] if " -- " in r["command"] else ""
        pv = r.get("paired_vs")
        diff = "-" if not pv else (f"{pv['mean']:+.4f} [{pv['low']:+.4f}, {pv['high']:+.4f}]"
                                   f"{'*' if pv['significant'] else ''} vs {pv['ref']}")
        lines.append(f"| {name} | `{opts}` | {f(r['val_mean'])} | {f(r['val_one'])} | {f(r['val_all'])} | "
                     f"{f(r['oracle_val_mean'])} | {f(r['router_agreement_val'], 3)} | "
                     f"{f(r['specialisation_nmi_val'], 3)} | {diff} | {r['seconds_per_epoch']:.2f} |")
    return "\n".join(lines)


def pool(pairs: list[str]) -> str:
    """The per-seed differences of each NEW:REF pair of screens and their
    pooled paired interval, as text."""
    diffs, lines = [], []
    for pair in pairs:
        new, sep, ref = pair.partition(":")
        if not sep or not new or not ref:
            raise SystemExit(f"--pool: expected NEW:REF (two screen names), got {pair!r}")
        a, b = ({r["seed"]: r["val_mean"] for r in json.loads((OUT / f"{n}.json").read_text())["seeds"]}
                for n in (new, ref))
        seeds = sorted(set(a) & set(b))
        if not seeds:
            raise SystemExit(f"--pool: {new} and {ref} share no seed")
        d = [a[s] - b[s] for s in seeds]
        diffs += d
        lines.append(f"{new} vs {ref}, seeds {seeds}: " + ", ".join(f"{x:+.4f}" for x in d))
    pv = paired_interval(diffs)
    lines.append(f"pooled over {pv['n']} paired runs ({sum(x > 0 for x in diffs)} positive): {pv['mean']:+.4f} "
                 f"[{pv['low']:+.4f}, {pv['high']:+.4f}]{'*' if pv['significant'] else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--table":
        print(table(argv[1:]))
        return 0
    if argv and argv[0] == "--pool":
        print(pool(argv[1:]))
        return 0
    if "--" in argv:
        cut = argv.index("--")
        ours, theirs = argv[:cut], argv[cut + 1:]
    else:
        ours, theirs = argv, []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ref", default=None, help="a screen to pair with (experiments/results/screens/REF.json)")
    p.add_argument("--note", default="", help="what the variant tests")
    a = p.parse_args(ours)
    check_name(a.name)
    if a.ref is not None:
        check_name(a.ref, "--ref")
    targs = theirs
    torch.set_num_threads(torch.get_num_threads())
    rows = [screen_seed(targs, s, ROOT / "runs" / "screen" / a.name / f"seed{s}") for s in a.seeds]
    sizes = sorted({int(k) for r in rows for k in r["val_by_size"]})
    result = {
        "name": a.name, "note": a.note, "split": "val",
        "command": f"python experiments/mars_screen.py {a.name} --seeds {' '.join(map(str, a.seeds))} -- "
                   + " ".join(theirs),
        "config": replace(cli.config_from_args(targs), seed=a.seeds[0]).to_dict(),
        "seeds": rows,
        "val_mean": _mean_sd([r["val_mean"] for r in rows]),
        "val_one": _mean_sd([r["val_by_size"][sizes[0]] for r in rows]),
        "val_all": _mean_sd([r["val_by_size"][sizes[-1]] for r in rows]),
        "oracle_val_mean": _mean_sd([r.get("oracle_val_mean") for r in rows]),
        "router_agreement_val": _mean_sd([r.get("router_agreement_val") for r in rows]),
        "specialisation_nmi_val": _mean_sd([r.get("specialisation_nmi") for r in rows]),
        "seconds_per_epoch": statistics.mean(r["seconds_per_epoch"] for r in rows),
    }
    if a.ref:
        ref = json.loads((OUT / f"{a.ref}.json").read_text())
        ref_by_seed = {r["seed"]: r["val_mean"] for r in ref["seeds"]}
        diffs = [r["val_mean"] - ref_by_seed[r["seed"]] for r in rows if r["seed"] in ref_by_seed]
        result["paired_vs"] = {"ref": a.ref, **paired_interval(diffs)} if diffs else None
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / f"{a.name}.json", result)  # atomic: an interrupted write leaves the previous screen

    def f(v, d=4):
        return "-" if v is None else f"{v[0]:.{d}f}±{v[1]:.{d}f}"

    line = (f"{a.name}: val {f(result['val_mean'])} one {f(result['val_one'])} all {f(result['val_all'])} "
            f"oracle {f(result['oracle_val_mean'])} agree {f(result['router_agreement_val'], 3)} "
            f"nmi {f(result['specialisation_nmi_val'], 3)} s/ep {result['seconds_per_epoch']:.2f}")
    if result.get("paired_vs"):
        pv = result["paired_vs"]
        line += f" | vs {a.ref}: {pv['mean']:+.4f} [{pv['low']:+.4f}, {pv['high']:+.4f}]{'*' if pv['significant'] else ''}"
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
