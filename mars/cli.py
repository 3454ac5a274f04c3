"""The ``mars`` command: ``mars train``, ``mars eval``, ``mars compare``.

Every error the user can fix (an option out of range, a bad data or run file,
an output directory that exists, a failed write) is one line
``mars: error: <argument or file>: <what is wrong / expected>`` and exit code
2; a diverged run exits with 3 and a failed peer process (torchrun) with 4.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from . import methods
from .config import BACKBONES, PRECISIONS, ConfigError, TrainConfig, used_by
from .data import DataFormatError
from .devices import check_precision, resolve_device, set_up_device
from .distributed import DistributedFailure, context_from_env, shutdown, world_from_env
from .options import add_config_options, config_for, file_values, given_values, option_of
from .rundir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    RunFileError,
    check_config_matches,
    check_data_matches,
    load_checkpoint,
    open_output,
    read_config,
    read_json,
    recover_interrupted_swap,
    write_json,
    write_text,
)
from .train import (
    TrainingDiverged,
    check_setup,
    load_weights,
    make_model,
    on_device,
    prepare_model,
    requested_device,
    run_data,
    train,
)

METHOD_CHOICES = methods.cli_names()


def method(text: str) -> str:
    """argparse type: a method name or alias -> its canonical name."""
    try:
        return methods.canonical(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {', '.join(METHOD_CHOICES)}") from None


def method_list(text: str) -> list[str]:
    """argparse type: one method or a comma-separated list of them."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a method name, got {text!r}")
    return [method(t) for t in names]


def _device_args(p: argparse.ArgumentParser) -> None:
    """mars eval's --device and --precision (default: the run's)."""
    p.add_argument("--device", default=None, metavar="auto|cpu|cuda|cuda:N",
                   help="where to compute: auto (cuda when torch.cuda.is_available(), else cpu), cpu, cuda or cuda:N "
                        "(default: the run's device)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32, or bf16: the forward pass under torch.autocast to bfloat16 (default: the run's precision)")


def _train_args(p: argparse.ArgumentParser, *, compare: bool = False) -> None:
    add_config_options(p, method, with_method=not compare)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _compare_args(c: argparse.ArgumentParser) -> None:
    _train_args(c, compare=True)
    c.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1 for every method (>= 1)")
    c.add_argument("--backbones", nargs="+", choices=BACKBONES, default=None, metavar="BACKBONE",
                   help=f"run each method built on a backbone (mars, vanilla-moe, backbone) once per backbone "
                        f"({', '.join(BACKBONES)}), as rows method@backbone, each compared with MARS on its backbone "
                        "(e.g. --methods mars backbone --backbones attention late mce: backbone alone vs backbone + MARS)")
    defaults = [m for m in methods.REGISTRY.values() if m.compare_default]
    c.add_argument("--methods", nargs="+", type=method_list, default=[[m.name for m in defaults]],
                   metavar="METHOD", help=f"any of {', '.join(METHOD_CHOICES)}, separated by spaces or commas "
                   f"(default: {' '.join(m.cli_name for m in defaults)})")


def _option_values(a: argparse.Namespace) -> tuple[dict, dict]:
    """The configuration values of ``--config FILE`` and of the command line
    (which wins) -> ({field path: value}, {field path: the file it came from})."""
    values = given_values(a)
    source = getattr(a, "config_file", None)
    if source is None:
        return values, {}
    if not str(source).strip():
        raise ConfigError("config_file", "expected a JSON file of options, got an empty path")
    from_file = file_values(read_json(Path(source), "options in config.json's form (a JSON object)"), source)
    origin = {path: source for path in from_file if path not in values}
    return {**from_file, **values}, origin


def _config(a: argparse.Namespace) -> TrainConfig:
    """The run ``mars train`` asks for: its method's defaults, then ``--config FILE``, then the command line."""
    values, origin = _option_values(a)
    return config_for(values.get("model.method", methods.DEFAULT_METHOD), values, strict=True, origin=origin)


def config_from_args(argv: list[str]) -> TrainConfig:
    """The configuration ``mars train ARGV`` trains (no run is started): for
    scripts and tests that build runs the way the command does."""
    parser = argparse.ArgumentParser(prog="mars train")
    _train_args(parser)
    return _config(parser.parse_args(list(argv)))


def _print_results(result: dict) -> None:
    s, res = result["summary"], result["test"]
    split = s.get("evaluated", "test")  # "val" with --evaluate val: the test split was not read
    print(f"\n{s['method']} on {s['data']} (seed {s['seed']}): best epoch {s['best_epoch']}, "
          f"{s['train_seconds']:.0f} s, {s['parameters']:,} parameters")
    print(f"{split} score, mean over all {len(res['subsets'])} modality subsets: {res['mean']:.4f}")
    for key, label in ((f"{split}_miou", "mIoU"), (f"{split}_acer", "ACER (lower is better)")):
        if key in s:
            print(f"{split} {label}, mean over subsets: {s[key]:.4f}")
    if s.get("router_agreement") is not None:
        print(f"feature-vs-residual router top-k agreement: {s['router_agreement']:.3f}")
    if s.get("specialisation_nmi") is not None:
        print(f"specialisation (NMI of missing pattern and expert): {s['specialisation_nmi']:.3f}")
    print("by number of observed modalities: " + ", ".join(f"{k}: {v:.4f}" for k, v in s[f"{split}_by_size"].items()))
    ranked = sorted(res["subsets"], key=lambda r: r["score"])
    show = ranked[:3] + ranked[-3:] if len(ranked) > 6 else ranked
    print("worst / best subsets: " + ", ".join(f"{r['name']} {r['score']:.3f}" for r in show))


def _plots(run: Path, result: dict) -> None:
    from .plots import plot_by_size, plot_usage

    split = result["summary"].get("evaluated", "test")
    plot_by_size({result["summary"]["method"]: result["summary"][f"{split}_by_size"]}, run / "score_by_observed.png")
    usage = result["test"].get("usage")
    if usage is not None:
        nmi = result["test"].get("specialisation_nmi")
        plot_usage(usage, [r["name"] for r in result["test"]["subsets"]], run / "expert_usage.png",
                   title=f"{result['summary']['method']}: expert usage by missing pattern ({split})"
                         + (f", NMI {nmi:.3f}" if nmi is not None else ""), counts=result["test"].get("usage_counts"))


RESUME_OPTIONS = ("epochs", "device", "quiet")  # the options --resume takes (besides the run directory)


def cmd_train(a, given: set[str], parser: argparse.ArgumentParser) -> int:
    """Single process, or data-parallel under torchrun (rank 0 prints and plots)."""
    values = given_values(a)
    if a.resume is not None:
        extra = [name for name in sorted(given) if name not in RESUME_OPTIONS + ("resume",)]
        if extra:
            flags = ", ".join(option_of(parser, name) for name in extra)
            raise ConfigError("resume", f"continues the run with the configuration in its {CONFIG_FILE}; {flags} cannot "
                                        "be given with it (allowed: --epochs N to train up to N epochs in all, "
                                        "--device to move the run, --quiet)")
        if not a.resume.strip():
            raise ConfigError("resume", "expected the directory of a run, got an empty path")
    elif not a.out.strip():
        raise ConfigError("out", "expected a directory for the run, got an empty path")
    resume = a.resume is not None
    cfg = None if resume else _config(a)
    device = values.get("device") if resume else cfg.device  # resume: the run's unless given
    # under torchrun the process group runs on the run's device: NCCL on CUDA, Gloo on CPU
    ctx = context_from_env(requested_device(cfg, a.resume, resume=resume, device=device)
                           if world_from_env() > 1 else "cpu")
    # the plots are part of the run: drawn under its lock, before a replacement is committed
    if resume:
        result = train(None, a.resume, resume=True, progress=not a.quiet, ctx=ctx, epochs=values.get("epochs"),
                       device=device, finish=_plots)
    else:
        result = train(cfg, a.out, progress=not a.quiet, ctx=ctx, overwrite=a.overwrite, evaluate=a.evaluate,
                       finish=_plots)
    shutdown(ctx)
    run = Path(a.resume if a.resume is not None else a.out)
    if ctx.is_main:
        _print_results(result)
        print(f"run directory: {run}")
    return 0


def cmd_eval(a, given: set[str], parser: argparse.ArgumentParser) -> int:
    from .evaluate import evaluate_subsets

    run = Path(a.run_dir)
    recover_interrupted_swap(run)  # a replacement a killed --overwrite left half done
    if not run.is_dir():
        raise RunFileError(run, "not a directory; expected a run directory written by mars train")
    cfg = read_config(run)
    device = resolve_device(cfg.device if a.device is None else a.device,
                            saved_in=run / CONFIG_FILE if a.device is None else None)
    precision = cfg.precision if a.precision is None else a.precision
    check_precision(precision, device)
    state = load_checkpoint(run / CHECKPOINT_FILE, resume=False)
    check_config_matches(state, cfg, run / CONFIG_FILE, run / CHECKPOINT_FILE)
    (train_set, val_set, test_set), fingerprint = run_data(cfg, with_fingerprint=True)
    check_data_matches(state, fingerprint, train_set, cfg.data, run / CHECKPOINT_FILE)
    check_setup(cfg, (train_set, val_set, test_set), device)
    if a.oracle and not methods.get(cfg.model.method).residual_router:
        raise ConfigError("oracle", f"gates with the residual router; the method {cfg.model.method!r} has none")
    model = make_model(cfg, test_set)
    load_weights(model, state["best"]["state"], run / CHECKPOINT_FILE)
    set_up_device(device)
    split = {"test": test_set, "val": val_set}[a.split]
    train_set, split = on_device(train_set, device), on_device(split, device)
    model.to(device)
    prepare_model(model, cfg, train_set, resume=True)
    method = methods.get(cfg.model.method)
    num_experts = cfg.model.num_experts if method.sparse_moe else None
    res = evaluate_subsets(model, split, mode="oracle" if a.oracle else "eval", precision=precision,
                           num_experts=num_experts)
    how = "oracle: residual router" if a.oracle else ("feature router" if method.sparse_moe else cfg.model.method)
    print(f"{run}: {a.split} mean over subsets {res['mean']:.4f} ({how})")
    print("by number of observed modalities: " + ", ".join(f"{k}: {v:.4f}" for k, v in res["by_size"].items()))
    if res.get("specialisation_nmi") is not None:
        print(f"specialisation (NMI of missing pattern and expert): {res['specialisation_nmi']:.3f}")
    if method.residual_router:
        from .data import MissingnessProtocol
        from .evaluate import router_agreement

        agreement = router_agreement(model, split, MissingnessProtocol.parse(cfg.protocol), cfg.seed, precision)
        print(f"feature-vs-residual router top-k agreement ({a.split}, the training protocol's masks): "
              f"{agreement:.3f}")
    return 0


def _compare_rows(a, backbone: str) -> list[tuple[str, str, str]]:
    """(row name, method, backbone) of every row of ``mars compare``: with
    ``--backbones``, each method built on a backbone (mars, vanilla-moe,
    backbone) once per backbone, as "method@backbone"; the others once."""
    names = list(dict.fromkeys(m for group in a.methods for m in group))  # flattened, first occurrence kept
    rows = []
    for name in names:
        if a.backbones and methods.get(name).on_backbone:
            rows += [(f"{name}@{b}", name, b) for b in dict.fromkeys(a.backbones)]
        else:
            rows.append((name, name, backbone))
    return rows


def _compare_configs(a) -> dict[str, list[TrainConfig]]:
    """Each row's configuration per seed: every option applies to the rows
    whose method reads it (an option no compared method reads is refused)."""
    if a.seeds < 1:
        raise ConfigError("seeds", f"must be >= 1, got {a.seeds}")
    values, origin = _option_values(a)
    names = {m for group in a.methods for m in group}
    for path in values:
        if not names & set(used_by(path)):
            where = f"; given in {origin[path]}" if path in origin else ""
            raise ConfigError(path, "is not used by any compared method (only by "
                                    f"{', '.join(methods.get(m).cli_name for m in used_by(path))}){where}")
    configs = {}
    for row, name, b in _compare_rows(a, values.get("model.backbone", "attention")):
        row_values = {**values, "model.backbone": b} if methods.get(name).on_backbone else dict(values)
        configs[row] = [config_for(name, {**row_values, "seed": seed}, strict=False) for seed in range(a.seeds)]
    return configs


def compare_configs_from_args(argv: list[str]) -> dict[str, list[TrainConfig]]:
    """{row: the configuration of each seed} that ``mars compare ARGV`` runs
    (nothing is trained)."""
    parser = argparse.ArgumentParser(prog="mars compare")
    _compare_args(parser)
    return _compare_configs(parser.parse_args(list(argv)))


def cmd_compare(a, given: set[str], parser: argparse.ArgumentParser) -> int:
    """Every method (x backbone) x seed in ``--out/<row>_seed<seed>``, then the
    tables. Everything is checked before ``--out`` is touched; an existing
    non-empty ``--out`` needs ``--overwrite`` (then the new results replace it
    when complete)."""

    if not a.out.strip():
        raise ConfigError("out", "expected a directory for the results, got an empty path")
    configs = _compare_configs(a)
    first = next(iter(configs.values()))[0]
    device = resolve_device(first.device)
    check_precision(first.precision, device)
    data = run_data(replace(first, seed=0))
    for row in configs:
        check_setup(configs[row][0], data, device)
    out = open_output(a.out, overwrite=a.overwrite, kind="compare")
    try:
        _compare(a, out.build, configs)
        out.commit()
    except (TrainingDiverged, DistributedFailure):
        raise  # a replacement is kept beside the old results: its last good checkpoint is named
    except Exception:
        out.discard()
        raise
    finally:
        out.release()
    print(f"wrote {Path(a.out) / 'compare.md'}")
    return 0


def _reference_row(row: str, names: list[str]) -> str | None:
    """The MARS row a row is compared with: MARS on the same backbone for a
    "method@backbone" row, else the first MARS row."""
    method, _, backbone = row.partition("@")
    if backbone and f"mars@{backbone}" in names:
        return f"mars@{backbone}"
    return next((n for n in names if n.partition("@")[0] == "mars"), None)


def compare_table(rows: dict[str, list[dict]], epochs: int, level: float = 0.95) -> tuple[dict, list[str]]:
    """The summary table of ``mars compare`` from each row's per-seed run
    summaries (seeds in the same order for every row) -> (table, markdown
    lines). Per row: mean ± std over seeds of the test mean over subsets,
    of one modality and of all modalities; the paired difference to its MARS
    row (:func:`_reference_row`) per seed with a ``level`` paired-t interval
    (:func:`mars.stats.paired_interval`; marked * when it excludes 0); train
    seconds per epoch; parameters; router agreement; specialisation NMI."""
    from .stats import paired_interval

    def stat(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None
        return (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)

    def by_size(s, size):
        d = s["test_by_size"]
        return d[str(size)] if str(size) in d else d[size]

    names = list(rows)
    table = {}
    for row, summaries in rows.items():
        sizes = sorted(int(k) for k in summaries[0]["test_by_size"])
        secs = statistics.mean(s["train_seconds"] for s in summaries)
        entry = {
            "mean": stat([s["test_mean"] for s in summaries]), "one": stat([by_size(s, sizes[0]) for s in summaries]),
            "all": stat([by_size(s, sizes[-1]) for s in summaries]), "seconds": secs,
            "seconds_per_epoch": secs / epochs, "parameters": summaries[0]["parameters"],
            "router_agreement": stat([s.get("router_agreement") for s in summaries]),
            "specialisation_nmi": stat([s.get("specialisation_nmi") for s in summaries]),
            "per_seed": [s["test_mean"] for s in summaries], "seeds": [s["seed"] for s in summaries],
            "masks_per_step": summaries[0].get("masks_per_step", 1),
        }
        ref = _reference_row(row, names)
        entry["reference"] = ref if ref != row else None
        if entry["reference"] is not None:
            ref_by_seed = {s["seed"]: s["test_mean"] for s in rows[ref]}
            pairs = [(s["test_mean"], ref_by_seed[s["seed"]]) for s in summaries if s["seed"] in ref_by_seed]
            entry["paired"] = paired_interval([x - y for x, y in pairs], level=level) if pairs else None
        table[row] = entry

    def fmt(v, digits=4):
        return "-" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"

    def diff(entry):
        p = entry.get("paired")
        if not p:
            return "(reference)" if entry["reference"] is None else "-"
        if p["n"] < 2:
            return f"{p['mean']:+.4f}"
        return f"{p['mean']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]{'*' if p['significant'] else ''}"

    pct = f"{100 * level:g}%"
    lines = [f"| method | mean over subsets | vs MARS: paired diff. [{pct} CI] | one modality | all modalities | "
             "masks / step | s / epoch | parameters | router agreement | specialisation NMI |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, e in table.items():
        lines.append(f"| {row} | {fmt(e['mean'])} | {diff(e)} | {fmt(e['one'])} | {fmt(e['all'])} | "
                     f"{e['masks_per_step']} | {e['seconds_per_epoch']:.2f} | {e['parameters']:,} | "
                     f"{fmt(e['router_agreement'], 3)} | {fmt(e['specialisation_nmi'], 3)} |")
    return table, lines


PAIRED_NOTE = ("paired diff.: the row's test mean over subsets minus its MARS row's (the same backbone for "
               "method@backbone rows) on each seed; mean and 95% paired-t interval over seeds; * = the interval "
               "excludes 0")


def _compare(a, out: Path, configs: dict[str, list[TrainConfig]]) -> None:
    rows: dict[str, list[dict]] = {}
    usage: dict[str, tuple] = {}
    for row, cfgs in configs.items():
        for cfg in cfgs:
            print(f"== {row}, seed {cfg.seed}", flush=True)
            res = train(cfg, out / f"{row}_seed{cfg.seed}", progress=not a.quiet)
            rows.setdefault(row, []).append(res["summary"])
            if row not in usage and res["test"].get("usage") is not None:
                usage[row] = (res["test"]["usage"], [r["name"] for r in res["test"]["subsets"]],
                              res["test"].get("specialisation_nmi"), cfg.seed, res["test"].get("usage_counts"))
    first = next(iter(configs.values()))[0]
    table, lines = compare_table(rows, first.epochs)
    text = "\n".join(lines)
    print("\n" + text + "\n" + PAIRED_NOTE)
    write_text(out / "compare.md", text + "\n")
    first = next(iter(configs.values()))[0]
    write_json(out / "compare.json", {
        "rows": rows, "table": table, "command": "mars " + " ".join(sys.argv[1:]), "data": first.data,
        "protocol": first.protocol, "epochs": first.epochs,
        "masks_per_step": {row: cfgs[0].masks_per_step for row, cfgs in configs.items()},
        "seeds": a.seeds, "note": PAIRED_NOTE})
    from .plots import plot_by_size, plot_usage

    curves = {}
    for row, summaries in rows.items():
        keys = summaries[0]["test_by_size"].keys()
        curves[row] = {int(k): statistics.mean(s["test_by_size"][k] for s in summaries) for k in keys}
    plot_by_size(curves, out / "compare_by_observed.png")
    for row, (u, names, nmi, seed, counts) in usage.items():
        title = f"{row}, seed {seed}: expert usage by missing pattern (test)" + (f", NMI {nmi:.3f}" if nmi is not None else "")
        plot_usage(u, names, out / f"expert_usage_{row}.png", title=title, counts=counts)


_UNSET = object()


def _given(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options of ``sub`` written on the command line
    (parsed again with every default replaced by a marker)."""
    saved = [(action, action.default) for action in sub._actions]
    try:
        for action, _ in saved:
            action.default = _UNSET
        ns = parser.parse_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return {k for k, v in vars(ns).items() if v is not _UNSET and k != "command"}


def _os_error(exc: OSError) -> str:
    if exc.filename is not None:
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else exc.filename
        return f"{where}: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__


def _tolerant_output() -> None:
    """A path that is not valid UTF-8 (decoded with surrogate escapes) prints
    as ``\\xff``-style escapes instead of failing, on a stream set to strict
    errors (e.g. ``PYTHONIOENCODING=utf-8:strict``), after the run is written."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError, AttributeError):
                pass


def main(argv: list[str] | None = None) -> int:
    _tolerant_output()
    p = argparse.ArgumentParser(prog="mars", description="MARS: missingness-aware residual-guided MoE")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train and evaluate one model", usage="mars train [OPTION ...]",
                       epilog="--out must not exist or be empty, unless --overwrite is given. --resume RUN_DIR takes "
                              "only --epochs (the total to train up to, to extend a run), --device (to move the run "
                              "to another device) and --quiet; the rest of the configuration comes from "
                              "RUN_DIR/config.json.")
    _train_args(t)
    t.add_argument("--out", default="runs/mars", help="run directory (must not exist or be empty; see --overwrite)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory --out; the new run is built beside it and replaces it "
                        "only when complete")
    t.add_argument("--evaluate", choices=("test", "val"), default="test",
                   help="the split the best epoch is evaluated on at the end: test, or val (for choosing options "
                        "without reading the test split)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run (with --epochs N: train it up to N epochs in all)")
    e = sub.add_parser("eval", help="evaluate a run's best checkpoint on every modality subset")
    e.add_argument("run_dir")
    e.add_argument("--oracle", action="store_true", help="gate with the residual router (needs complete data)")
    e.add_argument("--split", choices=("test", "val"), default="test",
                   help="the split to evaluate (val: for choosing options without touching the test split)")
    _device_args(e)
    c = sub.add_parser("compare", help="MARS vs the baselines on the same data, splits, masks and budget",
                       usage="mars compare [--methods METHOD ...] [--seeds N] [OPTION ...]")
    _compare_args(c)
    c.add_argument("--out", default="runs/compare",
                   help="results directory: <method>_seed<seed>/ run directories and the compare tables "
                        "(must not exist or be empty; see --overwrite)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing results directory --out once every run is complete")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    command = {"train": t, "eval": e, "compare": c}[a.command]
    given = _given(p, command, argv) if a.command == "train" else set()
    try:
        return {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare}[a.command](a, given, command)
    except TrainingDiverged as exc:
        print(f"mars: {exc}", file=sys.stderr)
        return 3
    except DistributedFailure as exc:
        # The process group is broken: tearing it down (or interpreter exit with
        # its threads alive) can abort, so leave at once with our message.
        print(f"mars: error: {exc}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(4)
    except ConfigError as exc:
        print(f"mars: error: {option_of(command, exc.field)}: {exc.message}", file=sys.stderr)
        return 2
    except (DataFormatError, RunFileError, ValueError) as exc:
        print(f"mars: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a failed read or write: a missing directory, no permission, disk full, read-only
        print(f"mars: error: {_os_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
