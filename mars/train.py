"""Training loop: run directory, atomic checkpoints, resume, NaN stop.

A run directory holds ``config.json`` (the resolved configuration),
``metrics.jsonl`` (one line per epoch), ``checkpoint.pt`` (written atomically
at the end of every epoch: model, optimiser, RNG states, best weights),
``results.csv`` (test score per modality subset), ``summary.json`` and the
plots. ``resume=True`` continues from ``checkpoint.pt`` and, on CPU with the
same seed, ends with exactly the results of an uninterrupted run.

:func:`train` runs five steps: set up the run (:func:`_set_up_run`), build or
restore the state (:func:`_build_state`), the epoch loop (:func:`_epoch_loop`),
the final evaluation (:func:`_final_evaluation`) and the results
(:func:`_write_run`). The model is used through :class:`mars.interface.TrainableModel`.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import methods
from .config import ModelConfig, TrainConfig
from .data import MissingnessProtocol, MultimodalDataset, load_data
from .distributed import DistContext, context_from_env, peer_failures
from .evaluate import evaluate_subsets
from .expert_sharding import average_expert_grads, full_state_dict, load_full_state_dict, shard_model_experts
from .interface import TrainableModel
from .methods import build_model

__all__ = ["TrainConfig", "TrainingDiverged", "train", "make_model", "prepare_model", "save_checkpoint", "Progress"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, fsync, then rename: never a torn file."""
    _atomic_write_bytes(path, lambda f: torch.save(state, f))


def _write_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


class Progress:
    """A one-line progress bar on a terminal; plain per-epoch lines otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream=sys.stderr):
        self.total, self.enabled, self.stream = total, enabled, stream
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()

    def update(self, done: int, message: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            width = 24
            filled = int(width * done / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {message}")
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"epoch {done}/{self.total} {message}\n")
        self.stream.flush()


def _available(data: MultimodalDataset, idx: torch.Tensor) -> torch.Tensor:
    if data.available is None:
        return torch.ones(idx.numel(), data.num_modalities, dtype=torch.bool)
    return data.available[idx]


def _batch(data: MultimodalDataset, idx: torch.Tensor):
    feats = {m: data.features[m][idx] for m in data.modalities}
    return feats, _available(data, idx), data.labels[idx]


def _shapes(data: MultimodalDataset) -> dict[str, tuple[int, ...]]:
    return {m: tuple(data.features[m].shape[1:]) for m in data.modalities}


def make_model(cfg: TrainConfig, data: MultimodalDataset) -> TrainableModel:
    return build_model(data.modalities, _shapes(data), data.num_classes, data.task, ModelConfig(**asdict(cfg.model)))


def prepare_model(model: TrainableModel, cfg: TrainConfig, train_set: MultimodalDataset, *, resume: bool,
                  log=print) -> None:
    """Run the method's set-up hook (:meth:`TrainableModel.prepare`: MCE trains
    its frozen unimodal models there, MoE-Retriever attaches its supporting
    pool). ``resume=True`` means the weights come from a checkpoint: the hook
    only rebuilds caches."""
    model.prepare(train_set, protocol=MissingnessProtocol.parse(cfg.protocol), seed=cfg.seed, resume=resume, log=log)


def _forward_train(net: nn.Module, model: TrainableModel, feats, observed, avail, idx):
    """One training forward through ``net`` (``model`` or its data-parallel
    wrapper); methods that cache per-sample values get the batch's train-set
    indices as ``sample_index``."""
    if model.takes_sample_index:
        return net(feats, observed, avail, mode="train", sample_index=idx)
    return net(feats, observed, avail, mode="train")


def _train_epoch(net: nn.Module, model: TrainableModel, opt, train_set, protocol, gen, cfg: TrainConfig,
                 ctx: DistContext, epoch: int, ckpt_path: Path) -> dict[str, float]:
    """One pass over the training set; returns the mean loss parts (over steps and ranks).

    Every rank draws the same global batch and masks; it trains on its strided
    share, with the loss scaled by its share of the batch so that the ranks'
    averaged gradients are the gradient of the global batch mean."""
    model.train()
    model.set_epoch(epoch)
    perm = torch.randperm(len(train_set), generator=gen)
    sums: dict[str, float] = {}
    steps = 0
    for start in range(0, len(train_set), cfg.batch_size):
        batch = perm[start : start + cfg.batch_size]
        if batch.numel() < ctx.world:  # a trailing batch too small to give every rank a sample
            break
        observed_all = protocol.sample(_available(train_set, batch), gen)  # the global batch's masks
        mine = ctx.shard(torch.arange(batch.numel()))
        idx = batch[mine]
        feats, avail, labels = _batch(train_set, idx)
        out = _forward_train(net, model, feats, observed_all[mine], avail, idx)
        loss, parts = model.loss(out, labels, train_set.ignore_index)
        value = float(loss.detach())
        if ctx.enabled:  # one all-reduce: every rank sees the same value and stops together
            total = torch.tensor([value], dtype=torch.float64)
            ctx.sum_(total)
            value = float(total) / ctx.world
            loss = loss * (idx.numel() * ctx.world / batch.numel())
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss became {value} at epoch {epoch + 1}, step {steps + 1} (parts: {parts}); "
                f"training stopped, the last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none (first epoch)'}"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ctx.enabled:
            average_expert_grads(model, ctx.world)
        opt.step()
        for name, v in parts.items():
            sums[name] = sums.get(name, 0.0) + v
        steps += 1
    return ctx.mean_floats({k: v / max(steps, 1) for k, v in sums.items()})


def _restore_training_state(state: dict, opt, gen, ctx: DistContext, path: Path) -> None:
    """Optimiser, mask generator and this rank's RNG stream from a checkpoint."""
    per_rank = state.get("optimizer_by_rank")
    if per_rank is not None and len(per_rank) != ctx.world:
        raise ValueError(f"{path} was saved by an expert-parallel run of {len(per_rank)} processes; "
                         f"resume it with {len(per_rank)} processes, not {ctx.world}")
    opt.load_state_dict(per_rank[ctx.rank] if per_rank is not None else state["optimizer"])
    gen.set_state(state["generator"])
    by_rank = state.get("torch_rng_by_rank") or [state["torch_rng"]]
    torch.set_rng_state(by_rank[ctx.rank] if len(by_rank) == ctx.world else state["torch_rng"])


def _keep_metrics_through(path: Path, epoch: int) -> None:
    """Drop metric lines of epochs after the checkpoint's (a run killed between
    logging an epoch and checkpointing it repeats that epoch on resume)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["epoch"] <= epoch]
    if len(kept) != len(lines):
        _atomic_write_bytes(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def _write_results(run: Path, summary: dict, test: dict, test_set: MultimodalDataset) -> None:
    with open(run / "results.csv", "w", newline="") as f:
        extra = (["miou"] if test_set.task == "segmentation" else []) + (
            ["apcer", "bpcer", "acer"] if test_set.bona_fide_class is not None else [])
        w = csv.DictWriter(f, fieldnames=["name", "size", "n", "score"] + extra)
        w.writeheader()
        for row in test["subsets"]:
            w.writerow({k: row.get(k) for k in w.fieldnames})
    _write_json(run / "summary.json", summary)
    torch.save({"usage": test.get("usage"), "subsets": [r["name"] for r in test["subsets"]]}, run / "usage.pt")


def _silent(*args, **kwargs) -> None:
    pass


@dataclass
class _Run:
    """What the steps of :func:`train` share: set by :func:`_set_up_run`
    (configuration, directory, process context) and :func:`_build_state`
    (data, model, optimiser, generators, progress through the epochs)."""

    cfg: TrainConfig
    dir: Path
    ctx: DistContext
    resume: bool
    progress: bool
    log: Callable[..., None]
    train_set: MultimodalDataset | None = None
    val_set: MultimodalDataset | None = None
    test_set: MultimodalDataset | None = None
    model: TrainableModel | None = None
    net: nn.Module | None = None  # the model, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer | None = None
    protocol: MissingnessProtocol | None = None
    gen: torch.Generator | None = None  # the batches' and masks' generator (in checkpoints)
    expert_parallel: bool = False
    start_epoch: int = 0
    best: dict | None = None  # {"score", "epoch", "state"}: the best validation epoch so far
    t_start: float = 0.0

    @property
    def ckpt_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    @property
    def main(self) -> bool:
        return self.ctx.is_main


def _set_up_run(cfg: TrainConfig | None, run_dir: str | os.PathLike, resume: bool, progress: bool, log,
                ctx: DistContext) -> _Run:
    """Step 1: the run directory (made on rank 0) and the configuration (read
    back from ``config.json`` on resume). Only rank 0 logs and shows progress."""
    if not ctx.is_main:
        progress, log = False, _silent
    run = Path(run_dir)
    if resume:
        if not (run / "checkpoint.pt").exists():
            raise FileNotFoundError(f"cannot resume: {run / 'checkpoint.pt'} does not exist")
        cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    elif ctx.is_main:
        run.mkdir(parents=True, exist_ok=True)
    return _Run(cfg=cfg, dir=run, ctx=ctx, resume=resume, progress=progress, log=log)


def _build_state(r: _Run, data) -> None:
    """Step 2: data, model (restored from the checkpoint on resume, else the
    run's config and an empty metrics log written), the method's set-up hook,
    expert sharding, optimiser, generators, and the data-parallel wrapper."""
    cfg, ctx = r.cfg, r.ctx
    r.train_set, r.val_set, r.test_set = data if data is not None else load_data(cfg.data, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    r.model = model = make_model(cfg, r.train_set)
    r.protocol = MissingnessProtocol.parse(cfg.protocol)
    r.gen = torch.Generator().manual_seed(cfg.seed)
    r.best = {"score": -math.inf, "epoch": -1, "state": None}
    state = None
    if r.resume:
        state = torch.load(r.ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])  # checkpoints are single-process, also from expert-parallel runs
        r.start_epoch, r.best = state["epoch"], state["best"]
        if r.main:
            _keep_metrics_through(r.dir / "metrics.jsonl", r.start_epoch)
        r.log(f"resuming {r.dir} at epoch {r.start_epoch}/{cfg.epochs}")
    elif r.main:
        _write_json(r.dir / "config.json", cfg.to_dict())
        (r.dir / "metrics.jsonl").write_text("")
    prepare_model(model, cfg, r.train_set, resume=r.resume, log=r.log if r.progress else _silent)
    r.expert_parallel = cfg.expert_parallel and ctx.enabled
    sharded = shard_model_experts(model, cfg.model.method) if r.expert_parallel else []
    r.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if r.resume:
        _restore_training_state(state, r.opt, r.gen, ctx, r.ckpt_path)
    r.net = model
    if ctx.enabled:
        if not r.resume:  # each rank its own dropout/noise stream (a resumed run restored its rank's stream)
            torch.manual_seed(cfg.seed + 7919 * (ctx.rank + 1))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
        r.net = DistributedDataParallel(model, find_unused_parameters=model.may_skip_parameters)


def _epoch_loop(r: _Run) -> None:
    """Step 3: train the remaining epochs; after each, validate, keep the best
    weights, log the epoch (rank 0) and write the checkpoint atomically (rank
    0, with every rank's RNG state and, expert-parallel, optimiser state)."""
    cfg, ctx, model = r.cfg, r.ctx, r.model
    snapshot = (lambda: full_state_dict(model)) if r.expert_parallel else (
        lambda: {k: v.detach().clone() for k, v in model.state_dict().items()})
    bar = Progress(cfg.epochs, enabled=r.progress)
    r.t_start = time.time()
    for epoch in range(r.start_epoch, cfg.epochs):
        with peer_failures(f"epoch {epoch + 1}"):  # also DDP's all-reduce and the shard gathers
            losses = _train_epoch(r.net, model, r.opt, r.train_set, r.protocol, r.gen, cfg, ctx, epoch, r.ckpt_path)
            val = evaluate_subsets(model, r.val_set, ctx=ctx)
            state = snapshot()
            if val["mean"] > r.best["score"]:  # the same decision on every rank (val is summed over ranks)
                r.best = {"score": val["mean"], "epoch": epoch + 1, "state": state}
            record = {"epoch": epoch + 1, "loss": losses, "val_mean": val["mean"], "val_by_size": val["by_size"],
                      "seconds": time.time() - r.t_start}
            checkpoint = {
                "model": state, "generator": r.gen.get_state(), "epoch": epoch + 1, "best": r.best,
                "config": cfg.to_dict(), "world_size": ctx.world,
                "standardizer": getattr(r.train_set.standardizer, "state_dict", lambda: None)(),
            }
            gathered = ctx.all_gather_object((torch.get_rng_state(), r.opt.state_dict() if r.expert_parallel else None))
            rngs = [rng for rng, _ in gathered]
            optimizers = [o for _, o in gathered] if r.expert_parallel else [r.opt.state_dict()]
        if r.main:
            with open(r.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(r.ckpt_path, checkpoint | {
                "optimizer": optimizers[0], "optimizer_by_rank": optimizers if r.expert_parallel else None,
                "torch_rng": rngs[0], "torch_rng_by_rank": rngs,
            })
        ctx.barrier()  # the checkpoint is on disk before any rank starts the next epoch
        shown = sum(v for k, v in losses.items() if "/" not in k)  # "name/modality" parts are logged only
        bar.update(epoch + 1, f"loss {shown:.3f} val {val['mean']:.3f}")


def _final_evaluation(r: _Run) -> tuple[dict, float | None]:
    """Step 4: the best validation epoch's weights on the test set (every
    modality subset), and, for methods with a residual router, the feature vs
    residual router agreement on the test set under the training protocol's
    masks (fixed by seed). -> (test results, agreement or None)."""
    method = methods.get(r.cfg.model.method)
    (load_full_state_dict if r.expert_parallel else nn.Module.load_state_dict)(r.model, r.best["state"])
    num_experts = r.cfg.model.num_experts if method.sparse_moe else None
    with peer_failures("the test evaluation"):
        test = evaluate_subsets(r.model, r.test_set, num_experts=num_experts, ctx=r.ctx)
    agreement = None
    if method.residual_router:
        r.model.eval()
        feats, avail, _ = _batch(r.test_set, torch.arange(len(r.test_set)))
        agreement = r.model.router_agreement(feats, r.protocol.fixed_masks(avail, r.cfg.seed), avail)
    return test, agreement


def _write_run(r: _Run, test: dict, agreement: float | None) -> dict:
    """Step 5: the summary; rank 0 writes results.csv, summary.json and usage.pt."""
    cfg = r.cfg
    summary = {
        "method": cfg.model.method, "data": cfg.data, "seed": cfg.seed, "best_epoch": r.best["epoch"],
        "router_agreement": agreement,
        "val_mean": r.best["score"], "test_mean": test["mean"], "test_by_size": test["by_size"],
        **{f"test_{m}": test[f"{m}_mean"] for m in ("miou", "acer") if f"{m}_mean" in test},
        "train_seconds": time.time() - r.t_start,
        "parameters": sum(r.best["state"][name].numel() for name, _ in r.model.named_parameters()),  # full, not a shard
        "world_size": r.ctx.world,
    }
    if r.main:
        _write_results(r.dir, summary, test, r.test_set)
    r.ctx.barrier()
    return summary


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          data=None, log=print, ctx: DistContext | None = None) -> dict:
    """Train, evaluate on every modality subset, write the run directory; returns
    {"summary", "test", "model", "modalities"}.

    Under ``torchrun`` (or with an explicit ``ctx``) the run is data-parallel
    (see :mod:`mars.distributed`); only rank 0 writes files and shows progress,
    and every rank returns the same summary. The ranks share ``run_dir``.
    ``resume=True`` continues the run in ``run_dir`` (``cfg`` is read from it)."""
    r = _set_up_run(cfg, run_dir, resume, progress, log, ctx or context_from_env())
    _build_state(r, data)
    _epoch_loop(r)
    test, agreement = _final_evaluation(r)
    summary = _write_run(r, test, agreement)
    return {"summary": summary, "test": test, "model": r.model, "modalities": r.test_set.modalities}
