"""Protocol v2 of the MARS research: validation screens, the pre-registered
final runs, and their report.

    python experiments/protocol_v2.py dev     [--cells ...] [--arms ...] [--seeds 0] [--set epochs=5 ...]
    python experiments/protocol_v2.py screen  [--cells ...] [--arms ...] [--seeds 0 1] [--jobs 2]
    python experiments/protocol_v2.py select  [--out experiments/results/v2/selection.json]
    python experiments/protocol_v2.py final   [--jobs 2]         (the pre-registered plan, FINAL_PLAN)
    python experiments/protocol_v2.py report  STAGE [--out experiments/results/v2/STAGE.json]

Cells: a dataset and a training-data regime, "(a)" complete training data
with simulated missingness, "(b)" incomplete training data (each training
sample keeps one fixed subset of its modalities, ``--train-missing``).
Arms: a method with options (:data:`ARMS`, :data:`SCREEN_ARMS`). ``dev`` runs
are screen runs (validation only) with options set by hand, in their own
folder, for developing the benchmark. Every run is
``mars train`` with a fixed test split (``test_split="fixed"``); a screen
run is evaluated on the validation split only (``train(evaluate="val")``:
its test split is never read), a final run on the test split. ``final``
refuses to start until ``docs/preregistration.md`` is committed.

Runs go to ``runs/v2/STAGE/CELL/ARM/seedN`` (one process each, one thread,
``--jobs`` at a time); a run with a summary is skipped, an interrupted one is
resumed, and nothing the script did not create is deleted. On the
synthetic-regimes cells each run also writes ``routing.json``: the NMI of
the chosen experts with the hidden regime, the missing pattern and the
label (a leak check) on the evaluated split.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = ROOT / "runs" / "v2"
RESULTS = ROOT / "experiments" / "results" / "v2"
PREREGISTRATION = ROOT / "docs" / "preregistration.md"

#: dataset/regime -> the run options of the cell.
CELLS = {
    "mfeat/a": dict(data="mfeat", protocol="uniform"),
    "mfeat/b": dict(data="mfeat", protocol="uniform", train_missing="independent:0.2,0.5,0.8,0.2,0.5,0.8"),
    # data_seed 1: data never seen by protocol v1 (whose tables drew test splits from data_seed 0)
    "synthetic-missing/a": dict(data="synthetic-missing:data_seed=1", protocol="uniform"),
    "synthetic-missing/b": dict(data="synthetic-missing:data_seed=1", protocol="uniform",
                                train_missing="independent:0.2,0.5,0.8,0.5"),
    "synthetic-regimes/a": dict(data="synthetic-regimes", protocol="independent:0.7,0.3,0.3"),
    "synthetic-regimes/b": dict(data="synthetic-regimes", protocol="uniform", train_missing="independent:0.7,0.3,0.3"),
}
#: The sanity cells of the regime benchmark (regime (a), the generator changed).
SANITY_CELLS = {
    "synthetic-regimes-conflict0/a": dict(data="synthetic-regimes:conflict=0", protocol="independent:0.7,0.3,0.3"),
    "synthetic-regimes-kappa0/a": dict(data="synthetic-regimes:kappa=0", protocol="independent:0.7,0.3,0.3"),
}
ALL_CELLS = {**CELLS, **SANITY_CELLS}
#: The screens run on the regime-(a) cells (one configuration per method is
#: chosen for every cell; the cost of screening both regimes was too high).
SCREEN_CELLS = [c for c in CELLS if c.endswith("/a")]

def _mars_budget() -> dict:
    """MARS's training budget at its defaults (what "same budget" gives another
    MoE): masks per step, learning rate, dropout, per-modality heads and vote."""
    from mars.config import default_config

    cfg = default_config("mars")
    return dict(masks_per_step=cfg.masks_per_step, lr=cfg.lr, dropout=cfg.model.dropout,
                lambda_unimodal=cfg.model.lambda_unimodal, unimodal_vote=cfg.model.unimodal_vote)


MARS_BUDGET = _mars_budget()

#: Final arms: name -> (method, options). The methods at their selected
#: defaults (mars.config.METHOD_DEFAULTS); MARS with one routing change; MoEs
#: with MARS's budget; and the regime benchmark's ceilings, floors, controls.
MAIN_ARMS: dict[str, tuple[str, dict]] = {
    "mars": ("mars", {}),
    "vanilla-moe": ("moe", {}),
    "late-fusion": ("late_fusion", {}),
    "mce": ("mce", {}),
    "moe-retriever": ("moe_retriever", {}),
}
ABLATION_ARMS: dict[str, tuple[str, dict]] = {
    "mars:routing=feature": ("mars", dict(routing="feature")),
    "mars:routing=random": ("mars", dict(routing="random")),
    "mars:noise=none": ("mars", dict(noise="none")),
    "mars:noise=constant": ("mars", dict(noise="constant")),
    "mars:residual=diff": ("mars", dict(residual_input="diff")),
    "mars:residual=pattern": ("mars", dict(residual_input="pattern")),
}
LABEL_FREE_ARMS: dict[str, tuple[str, dict]] = {
    "mars:residual=diff-label-free": ("mars", dict(residual_input="diff-label-free")),
    "mars:residual=concat-label-free": ("mars", dict(residual_input="concat-label-free")),
}
SAME_BUDGET_ARMS: dict[str, tuple[str, dict]] = {
    # MoEs with MARS's budget: the plain gate, and a router that also reads the missing pattern
    "moe:same-budget": ("moe", dict(MARS_BUDGET)),
    "moe:mask-router": ("moe", dict(MARS_BUDGET, feature_input="tokens+mask")),
}
REGIME_ARMS: dict[str, tuple[str, dict]] = {
    "oracle:g+pattern": ("moe", dict(MARS_BUDGET)),  # its router reads the true regime and pattern (see _oracle)
    "moe:pattern-router": ("moe", dict(MARS_BUDGET, feature_input="mask")),
    "moe:one-expert": ("moe", dict(MARS_BUDGET, experts=1, k=1)),
    "moe:dense": ("moe", dict(MARS_BUDGET, k=8)),  # all 8 experts: the same parameters, no sparsity
}
ARMS = {**MAIN_ARMS, **ABLATION_ARMS, **LABEL_FREE_ARMS, **SAME_BUDGET_ARMS}
SANITY_ARMS = ["mars", "moe:same-budget", "moe:mask-router", "oracle:g+pattern", "mars:routing=random"]
_TEN, _FIVE = list(range(10)), list(range(5))
_OTHER = [c for c in CELLS if c != "synthetic-regimes/a"]
_NOT_REGIMES = [c for c in CELLS if not c.startswith("synthetic-regimes")]
#: The final runs, in the order they are run (the pre-registered cell first;
#: docs/preregistration.md): (cells, arms, seeds).
FINAL_PLAN: list[tuple[list[str], list[str], list[int]]] = [
    (["synthetic-regimes/a"], [*MAIN_ARMS, *SAME_BUDGET_ARMS, *ABLATION_ARMS, *LABEL_FREE_ARMS, *REGIME_ARMS], _TEN),
    (list(SANITY_CELLS), SANITY_ARMS, _TEN),
    (_OTHER, list(MAIN_ARMS), _TEN),
    (_OTHER, list(SAME_BUDGET_ARMS), _TEN),
    (["synthetic-regimes/b"], [*ABLATION_ARMS, *LABEL_FREE_ARMS, *REGIME_ARMS], _TEN),
    (_NOT_REGIMES, list(ABLATION_ARMS), _FIVE),
]


#: Validation screens: every method gets the same six configurations' worth
#: of validation runs, on its main knobs (``docs/preregistration.md``): its
#: defaults, the masks per step, a lower learning rate, more dropout, and two
#: of its own (MARS: no per-modality heads, the label-free residual; vanilla
#: MoE: the heads with and without their vote; late fusion: averaging the
#: observed modalities only; MCE: its paper's learning rates; MoE-Retriever:
#: its code's learning rate and warm-up). MCE and MoE-Retriever try 2 masks
#: per step instead of 8 (each mask multiplies their cost by one full pass).
SCREEN_ARMS: dict[str, tuple[str, dict]] = {}
_P = {"mce": 2, "moe_retriever": 2}
for _method, _name, _own in (
    ("mars", "mars", [dict(lambda_unimodal=0.0, unimodal_vote=0.0), dict(residual_input="concat-label-free")]),
    ("moe", "vanilla-moe", [dict(masks_per_step=8, lambda_unimodal=0.3, unimodal_vote=2.0),
                            dict(masks_per_step=8, lambda_unimodal=0.3, unimodal_vote=0.0)]),
    ("late_fusion", "late-fusion", [dict(masks_per_step=8, late_fusion_average="observed"),
                                    dict(late_fusion_average="observed")]),
    ("mce", "mce", [dict(lr=2e-4), dict(lr=5e-4)]),
    ("moe_retriever", "moe-retriever", [dict(lr=1e-4, retriever_warmup=10), dict(lr=5e-4, retriever_warmup=10)]),
):
    _more = 1 if _method == "mars" else _P.get(_method, 8)  # the other masks-per-step value than the default's
    for _label, _opts in (("defaults", dict()), (f"P{_more}", dict(masks_per_step=_more)), ("lr1e-3", dict(lr=1e-3)),
                          ("dropout0.2", dict(dropout=0.2)), ("own1", _own[0]), ("own2", _own[1])):
        SCREEN_ARMS[f"{_name}:{_label}"] = (_method, _opts)


#: Research after the pre-registration (validation only, ``dev`` stage; not
#: in FINAL_PLAN): silent missingness (``mars.research.silent_missing``), each
#: arm under the flagged default and silent.
SILENT_ARMS: dict[str, tuple[str, dict]] = {
    f"{signal}:{name}": (method, dict(opts, missing_signal=signal))
    for signal in ("flag", "silent")
    for name, (method, opts) in (("mars", ("mars", {})), ("moe:same-budget", SAME_BUDGET_ARMS["moe:same-budget"]),
                                 ("mars:routing=random", ABLATION_ARMS["mars:routing=random"]))
}


def arm_table() -> dict[str, tuple[str, dict]]:
    return {**ARMS, **REGIME_ARMS, **SCREEN_ARMS, **SILENT_ARMS}


def run_plan(plan, jobs: int) -> int:
    """The final runs of ``plan``, group by group (each group seed by seed)."""
    failed = 0
    for cells, arms, seeds in plan:
        failed |= schedule("final", cells, arms, seeds, jobs)
        if failed == 2:  # not pre-registered
            return 2
    return failed


def run_dir(stage: str, cell: str, arm: str, seed: int) -> Path:
    return RUNS / stage / cell.replace("/", "-") / arm.replace(":", "_").replace("=", "-") / f"seed{seed}"


# ----------------------------------------------------------------------- one run (child process)
def _oracle(model, data_splits, cell: str, seed: int):
    """The vanilla MoE's feature router replaced by one that reads the true
    regime g and the missing pattern (one-hot over G x 2^M): routing with an
    oracle of what the sample needs, the same experts. The regime of a
    sample is found from its features (unique rows), never given to the
    network otherwise."""
    import torch
    from torch import nn

    from mars.data.sources import FIXED_TEST_SEED, regimes_spec
    from mars.data.synthetic_regimes import regime_splits
    from mars_kernels.layers.mars import RouterInput, mask_tokens

    spec = regimes_spec(ALL_CELLS[cell]["data"])
    g_splits = regime_splits(seed, test_seed=FIXED_TEST_SEED, spec=spec)
    table = {}
    for split, g in zip(data_splits, g_splits):
        for row, gi in zip(split.features["priv"], g.tolist()):
            table[row.numpy().tobytes()] = gi
    G, M = spec.num_regimes, spec.num_modalities

    class RegimeAndPattern(RouterInput):
        reads_mask = True

        def __init__(self):
            super().__init__()
            self.current = None  # [B] the batch's regimes, set before each forward

        def width(self, d_model: int) -> int:
            return G * 2**M

        def forward(self, z_i, z_c=None, observed=None):
            m = mask_tokens(observed, z_i, M).long()  # [T, M]
            code = (m << torch.arange(M, device=m.device)).sum(dim=1)  # [T] pattern
            g = self.current.to(z_i.device).view(*([1] * (z_i.dim() - 3)), -1, 1).expand(*z_i.shape[:-1]).reshape(-1)
            return nn.functional.one_hot(g * 2**M + code, G * 2**M).to(z_i.dtype).reshape(*z_i.shape[:-1], -1)

    router = model.moe.router
    oracle = RegimeAndPattern()
    router.feature_input = oracle
    router.feature_router = nn.Linear(oracle.width(router.d_model), router.num_experts)
    original = type(model).forward

    def forward(self, features, observed, available=None, mode="eval"):
        rows = features["priv"].detach().cpu()
        oracle.current = torch.tensor([table[r.numpy().tobytes()] for r in rows], dtype=torch.long)
        return original(self, features, observed, available, mode)

    model.forward = forward.__get__(model)
    return model


def _routing_nmi(model, data, g, out_path: Path) -> None:
    """NMI of the chosen experts (every routed token of every (sample, subset)
    pair) with the regime, the missing pattern and the label."""
    import torch

    from mars.data import all_subsets
    from mars.stats import nmi_of

    model.eval()
    masks = torch.stack(all_subsets(data.num_modalities))
    experts, regimes, patterns, labels = [], [], [], []
    with torch.no_grad():
        for s, mask in enumerate(masks):
            obs = mask.expand(len(data), -1).clone()
            out = model({m: data.features[m] for m in data.modalities}, obs, data.available, mode="eval")
            idx = out.aux["indices"].reshape(len(data), -1)  # [N, tokens * k]
            top = idx[:, 0]  # each sample's first-choice expert
            experts += top.tolist()
            regimes += g.tolist()
            patterns += [s] * len(data)
            labels += data.labels.tolist()
    result = {"nmi_regime": nmi_of(experts, regimes), "nmi_pattern": nmi_of(experts, patterns),
              "nmi_label": nmi_of(experts, labels), "first_choice_only": True}
    out_path.write_text(json.dumps(result, indent=1) + "\n")


def run_one(stage: str, cell: str, arm: str, seed: int, overrides: dict | None = None) -> None:
    import torch

    import mars.train as train_mod
    from mars import methods
    from mars.options import config_for, flag_paths

    method, options = arm_table()[arm]
    paths = flag_paths()
    values = {paths[k]: v for k, v in {**ALL_CELLS[cell], **options, **(overrides or {})}.items()}
    values["seed"] = seed
    values["device"] = "cpu"
    cfg = config_for(method, values, strict=True)
    out = run_dir(stage, cell, arm, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    evaluate = "test" if stage == "final" else "val"
    splits = train_mod.run_data(cfg)
    if arm.startswith("oracle:"):
        make = train_mod.make_model
        train_mod.make_model = lambda c, d: _oracle(make(c, d), splits, cell, seed)
    torch.set_num_threads(1)
    resume = (out / "checkpoint.pt").exists()
    res = train_mod.train(None if resume else cfg, out, resume=resume, data=splits, progress=False,
                          log=lambda *a, **k: None, evaluate=evaluate)
    if ALL_CELLS[cell]["data"].startswith("synthetic-regimes") and methods.get(method).sparse_moe:
        from mars.data.sources import FIXED_TEST_SEED, regimes_spec
        from mars.data.synthetic_regimes import regime_splits

        g = regime_splits(seed, test_seed=FIXED_TEST_SEED, spec=regimes_spec(ALL_CELLS[cell]["data"]))
        split = 1 if evaluate == "val" else 2
        _routing_nmi(res["model"], splits[split], g[split], out / "routing.json")


# ----------------------------------------------------------------------- scheduling
def _committed(path: Path) -> bool:
    rel = path.relative_to(ROOT)
    listed = subprocess.run(["git", "ls-files", "--error-unmatch", str(rel)], cwd=ROOT, capture_output=True)
    clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", str(rel)], cwd=ROOT)
    return listed.returncode == 0 and clean.returncode == 0


def schedule(stage: str, cells: list[str], arms: list[str], seeds: list[int], jobs: int,
             overrides: dict | None = None) -> int:
    if stage == "final" and not (PREREGISTRATION.exists() and _committed(PREREGISTRATION)):
        print(f"error: {PREREGISTRATION.relative_to(ROOT)} must be committed before any final run", file=sys.stderr)
        return 2
    # seed by seed, so that a partial stage already has whole seeds of every arm
    todo = [(c, a, s) for s in seeds for c in cells for a in arms
            if not (run_dir(stage, c, a, s) / "summary.json").exists()]
    print(f"{stage}: {len(todo)} runs to do", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list[tuple[subprocess.Popen, tuple, float]] = []
    failed = 0
    while todo or running:
        while todo and len(running) < jobs:
            c, a, s = todo.pop(0)
            log = run_dir(stage, c, a, s).parent / f"seed{s}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as fh:
                proc = subprocess.Popen([sys.executable, __file__, "job", stage, c, a, str(s),
                                         json.dumps(overrides or {})], env=env,
                                        stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
            running.append((proc, (c, a, s), time.time()))
        time.sleep(1.0)
        for item in list(running):
            proc, (c, a, s), t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
            failed += proc.returncode != 0
            print(f"{stage} {c} {a} seed {s}: {status} in {time.time() - t0:.0f} s ({len(todo)} left)", flush=True)
    return 1 if failed else 0


# ----------------------------------------------------------------------- report
def collect(stage: str) -> dict:
    """{cell: {arm: [summary + routing, one per seed]}} of the finished runs."""
    out: dict = {}
    base = RUNS / stage
    for cell in ALL_CELLS:
        for arm in arm_table():
            for s in range(100):
                d = run_dir(stage, cell, arm, s)
                if not (d / "summary.json").exists():
                    continue
                row = json.loads((d / "summary.json").read_text())
                if (d / "routing.json").exists():
                    row.update(json.loads((d / "routing.json").read_text()))
                out.setdefault(cell, {}).setdefault(arm, []).append(row)
    if not base.exists():
        raise SystemExit(f"no runs under {base}")
    return out


def _score(row: dict, stage: str) -> float:
    return row["test_mean"] if stage == "final" else row["val_mean"]


def select(out_path: Path | None) -> int:
    """Each method's configuration: the screen arm with the highest mean, over
    the screened cells, of its mean validation score over seeds."""
    data = collect("screen")
    by_method: dict = {}
    for arm, (method, options) in SCREEN_ARMS.items():
        per_cell = {}
        for cell in SCREEN_CELLS:
            rows = data.get(cell, {}).get(arm, [])
            if rows:
                per_cell[cell] = statistics.fmean(r["val_mean"] for r in rows)
        complete = len(per_cell) == len(SCREEN_CELLS)
        score = statistics.fmean(per_cell.values()) if complete else None
        by_method.setdefault(method, []).append({"arm": arm, "options": options, "per_cell": per_cell, "score": score,
                                                 "runs": sum(len(data.get(c, {}).get(arm, [])) for c in SCREEN_CELLS)})
    result = {}
    for method, arms in by_method.items():
        done = [a for a in arms if a["score"] is not None]
        best = max(done, key=lambda a: a["score"]) if len(done) == len(arms) else None
        result[method] = {"arms": arms, "chosen": best["arm"] if best else None,
                          "options": best["options"] if best else None}
        print(f"\n{method}: chosen {result[method]['chosen']}")
        for a in arms:
            cells = "  ".join(f"{c.split('/')[0]} {v:.4f}" for c, v in a["per_cell"].items())
            mark = "*" if best and a["arm"] == best["arm"] else " "
            print(f" {mark} {a['arm']:28s} {a['score'] if a['score'] is None else round(a['score'], 4)}  "
                  f"({a['runs']} runs)  {cells}")
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"cells": SCREEN_CELLS, "methods": result}, indent=1) + "\n")
        print(f"wrote {out_path}")
    return 0


PRIMARY_CELL = "synthetic-regimes/a"
#: The tested comparisons (docs/preregistration.md): MARS against each arm, in every cell.
FAMILY_R = ["mars:routing=feature", "mars:routing=random", "moe:same-budget", "moe:mask-router"]
FAMILY_B = ["vanilla-moe", "late-fusion", "mce", "moe-retriever"]


def _paired(data, stage, cell, arm) -> list[float]:
    """MARS minus ``arm`` in ``cell``, one difference per seed both ran."""
    mine = {r["seed"]: _score(r, stage) for r in data.get(cell, {}).get("mars", [])}
    other = {r["seed"]: _score(r, stage) for r in data.get(cell, {}).get(arm, [])}
    return [mine[s] - other[s] for s in sorted(mine) if s in other]


def decide(data: dict, stage: str) -> dict:
    """The pre-registered analysis: the primary decision at PRIMARY_CELL
    (MARS minus moe:mask-router interval excludes 0 and is positive, and the
    routing efficiency eta = (MARS - random) / (oracle - random) >= 0.5) and
    the two Holm-corrected families of two-sided paired t tests (MARS minus
    each arm; cells or arms not run are listed as missing, never dropped)."""
    from mars.stats import holm, paired_interval, paired_p_value

    out: dict = {"primary_cell": PRIMARY_CELL}
    cell = data.get(PRIMARY_CELL, {})
    mean = lambda arm: statistics.fmean(_score(r, stage) for r in cell[arm]) if cell.get(arm) else None  # noqa: E731
    diffs = _paired(data, stage, PRIMARY_CELL, "moe:mask-router")
    interval = paired_interval(diffs) if len(diffs) > 1 else None
    mars, rnd, oracle = mean("mars"), mean("mars:routing=random"), mean("oracle:g+pattern")
    eta = (mars - rnd) / (oracle - rnd) if None not in (mars, rnd, oracle) and oracle != rnd else None
    part1 = bool(interval and interval["significant"] and interval["mean"] > 0)
    part2 = eta is not None and eta >= 0.5
    out["primary"] = {
        "mars_minus_mask_router": interval, "eta": eta, "acc_mars": mars, "acc_random": rnd, "acc_oracle": oracle,
        "criterion_1": part1, "criterion_2": part2,
        "complete": interval is not None and eta is not None and len(diffs) == 10,
        "routing_helps": part1 and part2,
    }
    for name, arms in (("R", FAMILY_R), ("B", FAMILY_B)):
        tests, missing = [], []
        for c in CELLS:
            for arm in arms:
                d = _paired(data, stage, c, arm)
                if len(d) < 2:
                    missing.append(f"{c} {arm}")
                    continue
                tests.append({"cell": c, "arm": arm, "n": len(d), "p": paired_p_value(d), **{
                    k: v for k, v in paired_interval(d).items() if k in ("mean", "low", "high")}})
        for t, h in zip(tests, holm([t["p"] for t in tests])):
            t.update(adjusted=h["adjusted"], rejected=h["rejected"])
        out[f"family_{name}"] = {"tests": tests, "missing": missing, "planned": len(CELLS) * len(arms)}
    return out


def print_decision(a: dict) -> None:
    p = a["primary"]
    print(f"\nprimary ({a['primary_cell']}):")
    iv = p["mars_minus_mask_router"]
    if iv:
        print(f"  MARS - moe:mask-router {iv['mean']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}] (n={iv['n']})"
              f" -> criterion 1 {'met' if p['criterion_1'] else 'not met'}")
    if p["eta"] is not None:
        print(f"  eta = ({p['acc_mars']:.4f} - {p['acc_random']:.4f}) / ({p['acc_oracle']:.4f} - {p['acc_random']:.4f})"
              f" = {p['eta']:.3f} -> criterion 2 {'met' if p['criterion_2'] else 'not met'}")
    verdict = "helps" if p["routing_helps"] else "does not help"
    print(f"  MARS's routing {verdict}{'' if p['complete'] else ' (INCOMPLETE: not every primary run is in)'}")
    for name in ("R", "B"):
        f = a[f"family_{name}"]
        print(f"family {name}: {len(f['tests'])} of {f['planned']} tests run (Holm, alpha 0.05)")
        for t in f["tests"]:
            flag = "*" if t["rejected"] else " "
            print(f"  {flag} {t['cell']:22s} MARS - {t['arm']:22s} {t['mean']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}]"
                  f" n={t['n']} p={t['p']:.3g} adj={t['adjusted']:.3g}")


def bayes_of_cell(cell: str) -> float | None:
    """The exact Bayes accuracy of a synthetic-regimes cell's fixed test split,
    averaged over the non-empty modality subsets like the runs' score (None
    for other data)."""
    from mars.data import all_subsets
    from mars.data.sources import FIXED_TEST_SEED, regimes_spec
    from mars.data.synthetic_regimes import bayes_accuracy, make_regimes

    data = ALL_CELLS[cell]["data"]
    if not data.startswith("synthetic-regimes"):
        return None
    spec = regimes_spec(data)
    test = make_regimes(0, standardize=False, test_seed=FIXED_TEST_SEED, spec=spec)[2]
    subsets = all_subsets(test.num_modalities)
    accs = [float(bayes_accuracy(test.features, test.labels, s.expand(len(test.labels), -1), spec).float().mean())
            for s in subsets]
    return statistics.fmean(accs)


def report(stage: str, out_path: Path | None) -> int:
    from mars.stats import paired_interval

    data = collect(stage)
    table, bayes_by_cell = {}, {}
    for cell, arms in data.items():
        table[cell] = {}
        ref = {r["seed"]: _score(r, stage) for r in arms.get("mars", [])}
        for arm, rows in arms.items():
            scores = [_score(r, stage) for r in rows]
            entry = {"n": len(rows), "mean": statistics.fmean(scores),
                     "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                     "seconds_per_epoch": statistics.fmean(r["train_seconds"] for r in rows) / 40,
                     "seeds": [r["seed"] for r in rows], "per_seed": scores}
            for key in ("nmi_regime", "nmi_pattern", "nmi_label"):
                if key in rows[0]:
                    entry[key] = statistics.fmean(r[key] for r in rows)
            pairs = [s - ref[r["seed"]] for r, s in zip(rows, scores) if r["seed"] in ref]
            if arm != "mars" and len(pairs) > 1:
                entry["vs_mars"] = paired_interval(pairs)
            table[cell][arm] = entry
        bayes = bayes_of_cell(cell) if stage == "final" and cell in ALL_CELLS else None
        if bayes is not None:
            bayes_by_cell[cell] = bayes
        print(f"\n{cell} ({stage}: {'test' if stage == 'final' else 'validation'} mean over subsets)"
              + (f"; Bayes accuracy {bayes:.4f}" if bayes is not None else ""))
        for arm, e in sorted(table[cell].items(), key=lambda kv: -kv[1]["mean"]):
            vs = e.get("vs_mars")
            extra = f"  vs mars {vs['mean']:+.4f} [{vs['low']:+.4f}, {vs['high']:+.4f}]" if vs else ""
            print(f"  {arm:28s} {e['mean']:.4f} ± {e['sd']:.4f} (n={e['n']}){extra}")
    analysis = decide(data, stage)
    print_decision(analysis)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"stage": stage, "cells": table, "bayes": bayes_by_cell, "analysis": analysis},
                                       indent=1) + "\n")
        print(f"wrote {out_path}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "job":
        _, stage, cell, arm, seed, overrides = argv
        run_one(stage, cell, arm, int(seed), json.loads(overrides))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("dev", "screen", "final"):
        s = sub.add_parser(name)
        s.add_argument("--cells", nargs="+", default=None, choices=list(ALL_CELLS),
                       help="default: the regime-(a) cells (screen), every main cell (dev, final)")
        s.add_argument("--arms", nargs="+", default=None, choices=list(arm_table()))
        s.add_argument("--seeds", nargs="+", type=int, default=None,
                       help="default: 0 1 (dev, screen), 0-9 (final)")
        s.add_argument("--jobs", type=int, default=2)
        if name == "dev":
            s.add_argument("--set", nargs="+", default=[], metavar="OPTION=VALUE",
                           help="options of every run (e.g. epochs=5), as JSON values where they parse")
    r = sub.add_parser("report")
    r.add_argument("stage", choices=("dev", "screen", "final"))
    r.add_argument("--out", type=Path, default=None)
    sel = sub.add_parser("select", help="each method's configuration from the screens")
    sel.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.command == "report":
        return report(a.stage, a.out)
    if a.command == "select":
        return select(a.out)
    if a.command == "final" and a.arms is None and a.cells is None and a.seeds is None:
        return run_plan(FINAL_PLAN, max(1, a.jobs))
    cells = a.cells or (SCREEN_CELLS if a.command == "screen" else list(CELLS))
    seeds = a.seeds or (list(range(10)) if a.command == "final" else [0, 1])
    arms = a.arms or (list(ARMS) if a.command == "final" else list(SCREEN_ARMS))
    overrides = {}
    for item in getattr(a, "set", []):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return schedule(a.command, cells, arms, seeds, max(1, a.jobs), overrides)


if __name__ == "__main__":
    sys.exit(main())
