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
from pathlib import Path

from . import methods
from .config import (
    NOISE_MODES,
    PRECISIONS,
    RESIDUAL_INPUTS,
    RETRIEVER_VARIANTS,
    ROUTINGS,
    SHAPLEY_VARIANTS,
    ConfigError,
    ModelConfig,
)
from .data import DataFormatError
from .devices import check_precision, resolve_device, set_up_device
from .distributed import DistributedFailure, context_from_env, shutdown, world_from_env
from .rundir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    RunFileError,
    check_config_matches,
    load_checkpoint,
    open_output,
    read_config,
    write_json,
    write_text,
)
from .train import (
    TrainConfig,
    TrainingDiverged,
    check_setup,
    load_weights,
    make_model,
    on_device,
    prepare_model,
    requested_device,
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


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--method", type=method, default=methods.DEFAULT_METHOD, metavar="METHOD",
                   help=f"one of {', '.join(METHOD_CHOICES)}")
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--d-hidden", type=int, default=128)
    g.add_argument("--experts", type=int, default=8)
    g.add_argument("--k", type=int, default=2)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--noise", choices=NOISE_MODES, default="adaptive", help="MARS noise on the residual router")
    g.add_argument("--routing", choices=ROUTINGS, default="residual", help="router that gates in training (ablation)")
    g.add_argument("--sigma-0", type=float, default=1.0)
    g.add_argument("--sigma-max", type=float, default=1.0)
    g.add_argument("--residual-input", choices=RESIDUAL_INPUTS, default="concat",
                   help="residual router input: [z_i, stopgrad(z_c)] or stopgrad(z_c - z_i)")
    g.add_argument("--router-mlp", action="store_true", help="MLP routers instead of linear ones")
    g.add_argument("--lambda-imit", type=float, default=5.0)
    g.add_argument("--lambda-balance", type=float, default=0.01)
    g.add_argument("--lambda-complete", type=float, default=1.0)
    g.add_argument("--backend", choices=["auto", "reference", "cpu", "triton", "cuda"], default=None)
    r = p.add_argument_group("MoE-Retriever (--method moe-retriever)")
    r.add_argument("--retriever-variant", choices=RETRIEVER_VARIANTS, default="paper",
                   help="paper: attention + restricted noisy top-k MoE retrieval; code: the official code's 0.5/0.5 mean imputation")
    r.add_argument("--retriever-candidates", type=int, default=8, help="modality-specific experts per modality")
    r.add_argument("--retriever-shared", type=int, default=4, help="shared experts")
    r.add_argument("--retriever-k", type=int, default=4, help="experts per token")
    r.add_argument("--retriever-alpha", type=float, default=0.5, help="weight of the inter-modal context")
    r.add_argument("--retriever-warmup", type=int, default=0, help="epochs before retrieval starts")
    r.add_argument("--lambda-gate", type=float, default=0.01, help="weight of the retriever's balance loss")
    m = p.add_argument_group("MCE (--method mce)")
    m.add_argument("--mce-shapley", choices=SHAPLEY_VARIANTS, default="exact",
                   help="exact Shapley values, or the official code's formula")
    m.add_argument("--mce-teacher-epochs", type=int, default=10, help="epochs of the frozen unimodal models")
    m.add_argument("--mce-no-a", action="store_true", help="drop the dataset-level factor 1/(1 - r_m)")
    m.add_argument("--mce-no-b", action="store_true", help="drop the Shapley batch-level factor")
    m.add_argument("--lambda-sep", type=float, default=1.0)
    m.add_argument("--lambda-com", type=float, default=1.0)
    m.add_argument("--lambda-sub", type=float, default=1.0)


def _device_args(p: argparse.ArgumentParser, *, run_default: bool = False) -> None:
    """--device and --precision; ``run_default``: their defaults are the run's (mars eval)."""
    p.add_argument("--device", default=None if run_default else "auto", metavar="auto|cpu|cuda|cuda:N",
                   help="where to compute: auto (cuda when torch.cuda.is_available(), else cpu), cpu, cuda (under "
                        "torchrun: cuda:LOCAL_RANK) or cuda:N" + (" (default: the run's device)" if run_default else ""))
    p.add_argument("--precision", choices=PRECISIONS, default=None if run_default else "fp32",
                   help="fp32, or bf16: the forward pass and the loss under torch.autocast to bfloat16, float32 "
                        "weights" + (" (default: the run's precision)" if run_default else ""))


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="mfeat", help="'mfeat' (embedded), 'synthetic-seg', a feature directory, or BENCHMARK:DIR with BENCHMARK one of "
                   "crema-d, food-101, casia-surf, mcubes")
    p.add_argument("--protocol", "--missing", dest="protocol", default="uniform",
                   help="training missingness: uniform | independent:0.2,0.5,0.8 (one rate per modality) | fixed:0.5")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _device_args(p)
    p.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun: shard the experts over the processes (methods "
                   f"{' and '.join(m.cli_name for m in methods.REGISTRY.values() if m.sparse_moe)})")
    _model_args(p)


def _config(a: argparse.Namespace, method: str | None = None, seed: int | None = None) -> TrainConfig:
    model = ModelConfig(
        method=method or a.method, dropout=a.dropout, d_model=a.d_model, d_hidden=a.d_hidden, num_experts=a.experts,
        k=a.k, noise=a.noise, routing=a.routing, residual_input=a.residual_input, router_mlp=a.router_mlp,
        sigma_0=a.sigma_0, sigma_max=a.sigma_max, lambda_imit=a.lambda_imit,
        lambda_balance=a.lambda_balance, lambda_complete=a.lambda_complete,
        backend=None if a.backend in (None, "auto") else a.backend,
        retriever_variant=a.retriever_variant, retriever_candidates=a.retriever_candidates,
        retriever_shared=a.retriever_shared, retriever_k=a.retriever_k, retriever_alpha=a.retriever_alpha,
        retriever_warmup=a.retriever_warmup, lambda_gate=a.lambda_gate, mce_shapley=a.mce_shapley,
        mce_teacher_epochs=a.mce_teacher_epochs, mce_use_a=not a.mce_no_a, mce_use_b=not a.mce_no_b,
        lambda_sep=a.lambda_sep, lambda_com=a.lambda_com, lambda_sub=a.lambda_sub,
    )
    return TrainConfig(data=a.data, expert_parallel=a.expert_parallel, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                       seed=a.seed if seed is None else seed, protocol=a.protocol, device=a.device,
                       precision=a.precision, model=model)


def _print_results(result: dict) -> None:
    s, test = result["summary"], result["test"]
    print(f"\n{s['method']} on {s['data']} (seed {s['seed']}): best epoch {s['best_epoch']}, "
          f"{s['train_seconds']:.0f} s, {s['parameters']:,} parameters")
    print(f"test score, mean over all {len(test['subsets'])} modality subsets: {s['test_mean']:.4f}")
    for key, label in (("test_miou", "mIoU"), ("test_acer", "ACER (lower is better)")):
        if key in s:
            print(f"test {label}, mean over subsets: {s[key]:.4f}")
    if s.get("router_agreement") is not None:
        print(f"feature-vs-residual router top-k agreement: {s['router_agreement']:.3f}")
    print("by number of observed modalities: " + ", ".join(f"{k}: {v:.4f}" for k, v in s["test_by_size"].items()))
    ranked = sorted(test["subsets"], key=lambda r: r["score"])
    show = ranked[:3] + ranked[-3:] if len(ranked) > 6 else ranked
    print("worst / best subsets: " + ", ".join(f"{r['name']} {r['score']:.3f}" for r in show))


def _plots(run: Path, result: dict) -> None:
    from .plots import plot_by_size, plot_usage

    plot_by_size({result["summary"]["method"]: result["summary"]["test_by_size"]}, run / "score_by_observed.png")
    usage = result["test"].get("usage")
    if usage is not None:
        plot_usage(usage, [r["name"] for r in result["test"]["subsets"]], run / "expert_usage.png")


RESUME_OPTIONS = ("epochs", "device", "quiet")  # the options --resume takes (besides the run directory)


def cmd_train(a, given: set[str]) -> int:
    """Single process, or data-parallel under torchrun (rank 0 prints and plots)."""
    if a.resume is not None:
        extra = [name for name in sorted(given) if name not in RESUME_OPTIONS + ("resume",)]
        if extra:
            flags = ", ".join("--" + name.replace("_", "-") for name in extra)
            raise ConfigError("resume", f"continues the run with the configuration in its {CONFIG_FILE}; {flags} cannot "
                                        "be given with it (allowed: --epochs N to train up to N epochs in all, "
                                        "--device to move the run, --quiet)")
        if not a.resume.strip():
            raise ConfigError("resume", "expected the directory of a run, got an empty path")
    elif not a.out.strip():
        raise ConfigError("out", "expected a directory for the run, got an empty path")
    resume = a.resume is not None
    cfg = None if resume else _config(a)
    device = a.device if not resume or "device" in given else None  # resume: the run's unless given
    # under torchrun the process group runs on the run's device: NCCL on CUDA, Gloo on CPU
    ctx = context_from_env(requested_device(cfg, a.resume, resume=resume, device=device)
                           if world_from_env() > 1 else "cpu")
    if resume:
        result = train(None, a.resume, resume=True, progress=not a.quiet, ctx=ctx,
                       epochs=a.epochs if "epochs" in given else None, device=device)
    else:
        result = train(cfg, a.out, progress=not a.quiet, ctx=ctx, overwrite=a.overwrite)
    shutdown(ctx)
    run = Path(a.resume if a.resume is not None else a.out)
    if ctx.is_main:
        _print_results(result)
        _plots(run, result)
        print(f"run directory: {run}")
    return 0


def cmd_eval(a, given: set[str]) -> int:
    from .data import load_data
    from .evaluate import evaluate_subsets

    run = Path(a.run_dir)
    if not run.is_dir():
        raise RunFileError(run, "not a directory; expected a run directory written by mars train")
    cfg = read_config(run)
    device = resolve_device(cfg.device if a.device is None else a.device,
                            saved_in=run / CONFIG_FILE if a.device is None else None)
    precision = cfg.precision if a.precision is None else a.precision
    check_precision(precision, device)
    state = load_checkpoint(run / CHECKPOINT_FILE, resume=False)
    check_config_matches(state, cfg, run / CONFIG_FILE, run / CHECKPOINT_FILE)
    train_set, val_set, test_set = load_data(cfg.data, seed=cfg.seed)
    check_setup(cfg, (train_set, val_set, test_set), device)
    model = make_model(cfg, test_set)
    load_weights(model, state["best"]["state"], run / CHECKPOINT_FILE)
    set_up_device(device)
    train_set, test_set = on_device(train_set, device), on_device(test_set, device)
    model.to(device)
    prepare_model(model, cfg, train_set, resume=True)
    res = evaluate_subsets(model, test_set, mode="oracle" if a.oracle else "eval", precision=precision)
    how = "oracle: residual router" if a.oracle else (
        "feature router" if methods.get(cfg.model.method).sparse_moe else cfg.model.method)
    print(f"{run}: test mean over subsets {res['mean']:.4f} ({how})")
    print("by number of observed modalities: " + ", ".join(f"{k}: {v:.4f}" for k, v in res["by_size"].items()))
    return 0


def cmd_compare(a, given: set[str]) -> int:
    """Every method x seed in ``--out/<method>_seed<seed>``, then the tables.
    Everything is checked before ``--out`` is touched; an existing non-empty
    ``--out`` needs ``--overwrite`` (then the new results replace it when
    complete)."""
    from .data import load_data

    if a.seeds < 1:
        raise ConfigError("seeds", f"must be >= 1, got {a.seeds}")
    if not a.out.strip():
        raise ConfigError("out", "expected a directory for the results, got an empty path")
    names = list(dict.fromkeys(m for group in a.methods for m in group))  # flattened, first occurrence kept
    configs = {name: [_config(a, method=name, seed=seed) for seed in range(a.seeds)] for name in names}
    device = resolve_device(a.device)
    check_precision(a.precision, device)
    data = load_data(a.data, seed=0)
    for name in names:
        check_setup(configs[name][0], data, device)
    out = open_output(a.out, overwrite=a.overwrite, kind="compare")
    try:
        _compare(a, out.build, configs)
        out.commit()
    except (TrainingDiverged, DistributedFailure):
        raise  # a replacement is kept beside the old results: its last good checkpoint is named
    except Exception:
        out.discard()
        raise
    print(f"wrote {Path(a.out) / 'compare.md'}")
    return 0


def _compare(a, out: Path, configs: dict[str, list[TrainConfig]]) -> None:
    rows: dict[str, list[dict]] = {}
    for name, cfgs in configs.items():
        for cfg in cfgs:
            print(f"== {name}, seed {cfg.seed}", flush=True)
            res = train(cfg, out / f"{name}_seed{cfg.seed}", progress=not a.quiet)
            rows.setdefault(name, []).append(res["summary"])

    def stat(vals):
        return (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)

    lines = ["| method | mean over subsets | one modality | all modalities | train s | s / epoch | parameters | router agreement |",
             "|---|---|---|---|---|---|---|---|"]
    table = {}
    for method, summaries in rows.items():
        sizes = sorted(int(k) for k in summaries[0]["test_by_size"])
        one = stat([s["test_by_size"][str(sizes[0])] if str(sizes[0]) in s["test_by_size"] else s["test_by_size"][sizes[0]] for s in summaries])
        full = stat([s["test_by_size"][str(sizes[-1])] if str(sizes[-1]) in s["test_by_size"] else s["test_by_size"][sizes[-1]] for s in summaries])
        mean = stat([s["test_mean"] for s in summaries])
        secs = statistics.mean(s["train_seconds"] for s in summaries)
        table[method] = {"mean": mean, "one": one, "all": full, "seconds": secs, "seconds_per_epoch": secs / a.epochs, "parameters": summaries[0]["parameters"]}
        agree = [s["router_agreement"] for s in summaries if s.get("router_agreement") is not None]
        agree_text = f"{statistics.mean(agree):.3f}" if agree else "-"
        table[method]["router_agreement"] = statistics.mean(agree) if agree else None
        lines.append(f"| {method} | {mean[0]:.4f} ± {mean[1]:.4f} | {one[0]:.4f} ± {one[1]:.4f} | "
                     f"{full[0]:.4f} ± {full[1]:.4f} | {secs:.0f} | {secs / a.epochs:.2f} | {summaries[0]['parameters']:,} | {agree_text} |")
    text = "\n".join(lines)
    print("\n" + text)
    write_text(out / "compare.md", text + "\n")
    write_json(out / "compare.json", {"rows": rows, "table": table})
    from .plots import plot_by_size

    curves = {}
    for method, summaries in rows.items():
        keys = summaries[0]["test_by_size"].keys()
        curves[method] = {int(k): statistics.mean(s["test_by_size"][k] for s in summaries) for k in keys}
    plot_by_size(curves, out / "compare_by_observed.png")


# config fields whose option is not --<field with dashes>
_FIELD_OPTIONS = {"num_experts": "experts", "protocol": "missing", "mce_use_a": "mce_no_a", "mce_use_b": "mce_no_b"}


def _option(parser: argparse.ArgumentParser, field: str) -> str:
    """The command-line option of a config field (``num_experts`` -> ``--experts``),
    or the field's name when the command has no such option."""
    name = field.removeprefix("model.")
    flag = "--" + _FIELD_OPTIONS.get(name, name).replace("_", "-")
    return flag if flag in parser._option_string_actions else field


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mars", description="MARS: missingness-aware residual-guided MoE")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train and evaluate one model",
                       epilog="--out must not exist or be empty, unless --overwrite is given. --resume RUN_DIR takes "
                              "only --epochs (the total to train up to, to extend a run), --device (to move the run "
                              "to another device) and --quiet; the rest of the configuration comes from "
                              "RUN_DIR/config.json.")
    _train_args(t)
    t.add_argument("--out", default="runs/mars", help="run directory (must not exist or be empty; see --overwrite)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory --out; the new run is built beside it and replaces it "
                        "only when complete")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run (with --epochs N: train it up to N epochs in all)")
    e = sub.add_parser("eval", help="evaluate a run's best checkpoint on every modality subset")
    e.add_argument("run_dir")
    e.add_argument("--oracle", action="store_true", help="gate with the residual router (needs complete data)")
    _device_args(e, run_default=True)
    c = sub.add_parser("compare", help="MARS vs the baselines on the same data, splits, masks and budget")
    _train_args(c)
    c.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1 for every method (>= 1)")
    defaults = [m for m in methods.REGISTRY.values() if m.compare_default]
    c.add_argument("--methods", nargs="+", type=method_list, default=[[m.name for m in defaults]],
                   metavar="METHOD", help=f"any of {', '.join(METHOD_CHOICES)}, separated by spaces or commas "
                   f"(default: {' '.join(m.cli_name for m in defaults)})")
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
        return {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare}[a.command](a, given)
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
        print(f"mars: error: {_option(command, exc.field)}: {exc.message}", file=sys.stderr)
        return 2
    except (DataFormatError, RunFileError, ValueError) as exc:
        print(f"mars: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a failed read or write: a missing directory, no permission, disk full, read-only
        print(f"mars: error: {_os_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
