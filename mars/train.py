"""Training loop: run directory, atomic checkpoints, resume, NaN stop.

A run directory holds ``config.json`` (the resolved configuration),
``metrics.jsonl`` (one line per epoch), ``checkpoint.pt`` (written atomically
at the end of every epoch: model, optimiser, RNG states, best weights),
``results.csv`` (test score per modality subset), ``summary.json`` and the
plots. ``resume=True`` continues from ``checkpoint.pt`` and, on CPU with the
same seed, ends with exactly the results of an uninterrupted run.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .data import MissingnessProtocol, MultimodalDataset, load_data
from .distributed import DistContext, context_from_env, peer_failures
from .evaluate import evaluate_subsets
from .expert_sharding import average_expert_grads, full_state_dict, load_full_state_dict, shard_model_experts
from .model import SPARSE_MOE_METHODS, ModelConfig, build_model


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    data: str = "mfeat"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    protocol: str = "uniform"
    expert_parallel: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        MissingnessProtocol.parse(self.protocol)  # validates

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)


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


def make_model(cfg: TrainConfig, data: MultimodalDataset):
    return build_model(data.modalities, _shapes(data), data.num_classes, data.task, ModelConfig(**asdict(cfg.model)))


def prepare_model(model, cfg: TrainConfig, train_set: MultimodalDataset, *, resume: bool, log=print) -> None:
    """Run a method's optional set-up hook ``model.prepare(train_set, protocol=,
    seed=, resume=, log=)`` (MCE trains its frozen unimodal models there,
    MoE-Retriever attaches its supporting pool). ``resume=True`` means the
    weights come from a checkpoint: the hook only rebuilds caches."""
    hook = getattr(model, "prepare", None)
    if hook is not None:
        hook(train_set, protocol=MissingnessProtocol.parse(cfg.protocol), seed=cfg.seed, resume=resume, log=log)


def _forward_train(model, feats, observed, avail, idx):
    """One training forward; methods that cache per-sample values (MCE) get
    the batch's train-set indices as ``sample_index``."""
    if getattr(model, "takes_sample_index", False):
        return model(feats, observed, avail, mode="train", sample_index=idx)
    return model(feats, observed, avail, mode="train")


def _train_epoch(net, model, opt, train_set, protocol, gen, cfg: TrainConfig, ctx: DistContext, epoch: int,
                 ckpt_path: Path) -> dict[str, float]:
    """One pass over the training set; returns the mean loss parts (over steps and ranks).

    Every rank draws the same global batch and masks; it trains on its strided
    share, with the loss scaled by its share of the batch so that the ranks'
    averaged gradients are the gradient of the global batch mean."""
    model.train()
    if hasattr(model, "set_epoch"):
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
        out = _forward_train(net, feats, observed_all[mine], avail, idx)
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


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          data=None, log=print, ctx: DistContext | None = None) -> dict:
    """Train, evaluate on every modality subset, write the run directory; returns the summary.

    Under ``torchrun`` (or with an explicit ``ctx``) the run is data-parallel
    (see :mod:`mars.distributed`); only rank 0 writes files and shows progress,
    and every rank returns the same summary. The ranks share ``run_dir``."""
    ctx = ctx or context_from_env()
    main = ctx.is_main
    if not main:
        progress, log = False, (lambda *a, **k: None)
    run = Path(run_dir)
    ckpt_path = run / "checkpoint.pt"
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"cannot resume: {ckpt_path} does not exist")
        cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    elif main:
        run.mkdir(parents=True, exist_ok=True)
    train_set, val_set, test_set = data if data is not None else load_data(cfg.data, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, train_set)
    protocol = MissingnessProtocol.parse(cfg.protocol)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, best, state = 0, {"score": -math.inf, "epoch": -1, "state": None}, None
    if resume:
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])  # checkpoints are single-process, also from expert-parallel runs
        start_epoch, best = state["epoch"], state["best"]
        if main:
            _keep_metrics_through(run / "metrics.jsonl", start_epoch)
        log(f"resuming {run} at epoch {start_epoch}/{cfg.epochs}")
    elif main:
        _write_json(run / "config.json", cfg.to_dict())
        (run / "metrics.jsonl").write_text("")
    prepare_model(model, cfg, train_set, resume=resume, log=log if progress else (lambda *a, **k: None))
    expert_parallel = cfg.expert_parallel and ctx.enabled
    sharded = shard_model_experts(model, cfg.model.method) if expert_parallel else []
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume:
        _restore_training_state(state, opt, gen, ctx, ckpt_path)
    net = model
    if ctx.enabled:
        if not resume:  # each rank its own dropout/noise stream (a resumed run restored its rank's stream)
            torch.manual_seed(cfg.seed + 7919 * (ctx.rank + 1))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
        # methods whose steps can leave parameters unused (e.g. no missing modality to retrieve) say so
        net = DistributedDataParallel(model, find_unused_parameters=getattr(model, "may_skip_parameters", False))
    snapshot = (lambda: full_state_dict(model)) if expert_parallel else (
        lambda: {k: v.detach().clone() for k, v in model.state_dict().items()})
    num_experts = cfg.model.num_experts if cfg.model.method in SPARSE_MOE_METHODS else None
    bar = Progress(cfg.epochs, enabled=progress)
    t_start = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        with peer_failures(f"epoch {epoch + 1}"):  # also DDP's all-reduce and the shard gathers
            losses = _train_epoch(net, model, opt, train_set, protocol, gen, cfg, ctx, epoch, ckpt_path)
            val = evaluate_subsets(model, val_set, ctx=ctx)
            state = snapshot()
            if val["mean"] > best["score"]:  # the same decision on every rank (val is summed over ranks)
                best = {"score": val["mean"], "epoch": epoch + 1, "state": state}
            record = {"epoch": epoch + 1, "loss": losses, "val_mean": val["mean"], "val_by_size": val["by_size"],
                      "seconds": time.time() - t_start}
            checkpoint = {
                "model": state, "generator": gen.get_state(), "epoch": epoch + 1, "best": best,
                "config": cfg.to_dict(), "world_size": ctx.world,
                "standardizer": getattr(train_set.standardizer, "state_dict", lambda: None)(),
            }
            gathered = ctx.all_gather_object((torch.get_rng_state(), opt.state_dict() if expert_parallel else None))
            rngs = [rng for rng, _ in gathered]
            optimizers = [o for _, o in gathered] if expert_parallel else [opt.state_dict()]
        if main:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(ckpt_path, checkpoint | {
                "optimizer": optimizers[0], "optimizer_by_rank": optimizers if expert_parallel else None,
                "torch_rng": rngs[0], "torch_rng_by_rank": rngs,
            })
        ctx.barrier()  # the checkpoint is on disk before any rank starts the next epoch
        shown = sum(v for k, v in losses.items() if "/" not in k)  # "name/modality" parts are logged only
        bar.update(epoch + 1, f"loss {shown:.3f} val {val['mean']:.3f}")
    (load_full_state_dict if expert_parallel else nn.Module.load_state_dict)(model, best["state"])
    with peer_failures("the test evaluation"):
        test = evaluate_subsets(model, test_set, num_experts=num_experts, ctx=ctx)
    agreement = None
    if cfg.model.method == "mars":  # on the test set under the training protocol's masks, fixed by seed
        model.eval()
        feats, avail, _ = _batch(test_set, torch.arange(len(test_set)))
        agreement = model.router_agreement(feats, protocol.fixed_masks(avail, cfg.seed), avail)
    summary = {
        "method": cfg.model.method, "data": cfg.data, "seed": cfg.seed, "best_epoch": best["epoch"],
        "router_agreement": agreement,
        "val_mean": best["score"], "test_mean": test["mean"], "test_by_size": test["by_size"],
        **{f"test_{m}": test[f"{m}_mean"] for m in ("miou", "acer") if f"{m}_mean" in test},
        "train_seconds": time.time() - t_start,
        "parameters": sum(best["state"][name].numel() for name, _ in model.named_parameters()),  # full, not a shard
        "world_size": ctx.world,
    }
    if main:
        _write_results(run, summary, test, test_set)
    ctx.barrier()
    return {"summary": summary, "test": test, "model": model, "modalities": test_set.modalities}
