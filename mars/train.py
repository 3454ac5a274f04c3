"""Training loop: run directory, atomic checkpoints, resume, NaN stop.

A run directory holds ``config.json`` (the resolved configuration),
``metrics.jsonl`` (one line per epoch), ``checkpoint.pt`` (written atomically
at the end of every epoch: model, optimiser, RNG states, best weights),
``results.csv`` (test score per modality subset), ``summary.json`` and the
plots. ``resume=True`` continues from ``checkpoint.pt`` and, on CPU with the
same seed, ends with exactly the results of an uninterrupted run. How the
files are written and read back, and how an existing directory is replaced
(``overwrite=True``), is :mod:`mars.rundir`.

Device and precision (``cfg.device``, ``cfg.precision``; :mod:`mars.devices`):
the splits are moved to the device once; each step indexes its batch there,
with the batch order and the missingness masks drawn on the CPU by the run's
generator and moved (the same masks on every device); the forward pass and
the loss run under :func:`mars.devices.autocast`; evaluation runs on the
device; checkpoints hold CPU tensors (and, on a GPU, every rank's CUDA RNG
state), so they load anywhere.

Everything that can be checked is checked before the run directory is
touched (:func:`check_setup`: non-empty splits, the protocol against the
data's modalities, a model that fits in memory). A loss that becomes NaN or
infinite, or weights that do after an epoch, stop training
(:class:`TrainingDiverged`); non-finite weights are never checkpointed.

:func:`train` runs five steps: set up the run (:func:`_set_up_run`), build or
restore the state (:func:`_build_state`), the epoch loop (:func:`_epoch_loop`),
the final evaluation (:func:`_final_evaluation`) and the results
(:func:`_write_run`). The model is used through :class:`mars.interface.TrainableModel`.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import methods
from .config import ConfigError, TrainConfig
from .data import MissingnessProtocol, MultimodalDataset, load_data, resolve_source
from .data.missingness import MAX_SUBSET_MODALITIES
from .data.sources import TrainMissingError
from .devices import (
    autocast,
    check_precision,
    cuda_rng_state,
    memory_bytes,
    resolve_device,
    set_cuda_rng_state,
    set_up_device,
    stored_device,
)
from .distributed import DistContext, DistributedFailure, context_from_env, peer_failures, world_from_env
from .evaluate import evaluate_subsets, router_agreement
from .expert_sharding import (
    average_expert_grads,
    check_expert_parallel,
    full_state_dict,
    load_full_state_dict,
    shard_model_experts,
)
from .interface import TrainableModel
from .methods import build_model
from .rundir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    OutputDir,
    RunFileError,
    RunLock,
    append_line,
    atomic_write_bytes,
    check_config_matches,
    check_data_matches,
    keep_metrics_through,
    load_checkpoint,
    lock_run,
    open_output,
    read_config,
    recover_interrupted_swap,
    save_checkpoint,
    write_json,
    write_text,
)

__all__ = ["TrainConfig", "TrainingDiverged", "train", "make_model", "prepare_model", "save_checkpoint", "Progress",
           "check_setup", "load_weights", "on_device", "requested_device", "to_cpu"]

BYTES_PER_PARAMETER = 16  # float32 weights, gradients and AdamW's two moments


class TrainingDiverged(RuntimeError):
    """The loss, or the weights, became NaN or infinite; the last good checkpoint is kept."""


class Progress:
    """The epochs' progress on ``stream`` (default: stderr): a tqdm bar on a
    terminal, plain lines ``epoch 3/40 <message>`` otherwise (a pipe or a log
    file). ``initial``: the epochs already done (a resumed run)."""

    def __init__(self, total: int, enabled: bool = True, stream=None, initial: int = 0):
        self.total, self.enabled = total, enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = (tqdm(total=total, initial=initial, file=self.stream, unit="epoch", dynamic_ncols=True)
                    if self.tty else None)

    def update(self, done: int, message: str) -> None:
        """``done`` epochs of ``total`` are complete; ``message`` describes the last."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(message, refresh=False)
            self.bar.update(done - self.bar.n)
            if done >= self.total:
                self.close()
        else:
            self.stream.write(f"epoch {done}/{self.total} {message}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _available(data: MultimodalDataset, idx: torch.Tensor) -> torch.Tensor:
    if data.available is None:
        return torch.ones(idx.numel(), data.num_modalities, dtype=torch.bool, device=data.device)
    return data.available[idx]


def _batch(data: MultimodalDataset, idx: torch.Tensor):
    """The features, availability and labels of the samples ``idx`` (moved to
    the data's device: a no-op when it is already there)."""
    idx = idx.to(data.device)
    feats = {m: data.features[m][idx] for m in data.modalities}
    return feats, _available(data, idx), data.labels[idx]


def on_device(data: MultimodalDataset, device: torch.device) -> MultimodalDataset:
    """``data`` with every tensor on ``device``, moved once per run; ``data``
    itself (nothing copied) when it is there already. The copy is not
    validated again (``MultimodalDataset.to`` would, reading values back from
    the device): ``data`` was validated when it was made."""
    tensors = [*data.features.values(), data.labels] + ([data.available] if data.available is not None else [])
    if all(t.device == device for t in tensors):
        return data
    moved = copy.copy(data)
    moved.features = {m: x.to(device) for m, x in data.features.items()}
    moved.labels = data.labels.to(device)
    moved.available = None if data.available is None else data.available.to(device)
    return moved


def to_cpu(obj, _memo: dict | None = None):
    """``obj`` (dicts, lists and tuples of tensors and plain values) with
    every tensor on the CPU; a tensor shared by two entries stays shared, and
    CPU tensors are returned as they are."""
    memo = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().cpu()
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: to_cpu(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v, memo) for v in obj)
    return obj


def run_data(cfg: TrainConfig, *, with_fingerprint: bool = False):
    """(train, val, test) of a run: ``cfg.data`` split by ``cfg.seed`` with
    the run's test split and training-data regime (:func:`mars.data.load_data`);
    with ``with_fingerprint`` also the data's fingerprint."""
    try:
        return load_data(cfg.data, seed=cfg.seed, test_split=cfg.test_split, train_missing=cfg.train_missing,
                         with_fingerprint=with_fingerprint)
    except TrainMissingError as e:
        raise ConfigError("train_missing", str(e)) from None


def _shapes(data: MultimodalDataset) -> dict[str, tuple[int, ...]]:
    return {m: tuple(data.features[m].shape[1:]) for m in data.modalities}


def make_model(cfg: TrainConfig, data: MultimodalDataset) -> TrainableModel:
    return build_model(data.modalities, _shapes(data), data.num_classes, data.task, copy.deepcopy(cfg.model))


def _parameter_count(cfg: TrainConfig, data: MultimodalDataset) -> int:
    """Parameters and buffers of the model, counted on the meta device (nothing
    allocated); at least the readout's num_classes x d_model if that fails."""
    try:
        with torch.device("meta"):
            model = make_model(cfg, data)
        return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    except Exception:  # a builder that needs real data: the real build reports its own errors
        return data.num_classes * cfg.model.d_model


def check_setup(cfg: TrainConfig, splits, device: torch.device | None = None) -> None:
    """What a run needs of its data, checked before anything is written: every
    split non-empty, at most ``MAX_SUBSET_MODALITIES`` modalities (evaluation
    scores all 2^M - 1 subsets), every modality a vector or every one a map,
    the missingness protocol fits the data's modalities, and
    the model (counted without allocating it) fits in the memory of ``device``
    (default: this machine's). Raises ``ValueError`` (:class:`ConfigError` for
    the protocol)."""
    train_set, val_set, test_set = splits
    for name, split in (("training", train_set), ("validation", val_set), ("test", test_set)):
        if len(split) == 0:
            raise ValueError(f"{cfg.data}: the {name} split is empty; expected at least one sample in each of "
                             "train, val and test")
    M = train_set.num_modalities
    if M > MAX_SUBSET_MODALITIES:
        raise ValueError(f"{cfg.data}: {M} modalities; evaluation scores every non-empty subset of the modalities "
                         f"(2^{M} - 1 = {2**M - 1:,}), so at most {MAX_SUBSET_MODALITIES} are supported; expected "
                         "fewer modalities")
    ranks = {m: len(s) for m, s in train_set.feature_shapes.items()}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"{cfg.data}: the modalities mix vectors and feature maps (per-sample shapes "
                         f"{train_set.feature_shapes}); expected every modality to be vectors or every one maps")
    try:
        MissingnessProtocol.parse(cfg.protocol).drop_probs(train_set.num_modalities)
    except ValueError as e:
        raise ConfigError("protocol", f"{e}; the data {cfg.data!r} has the modalities {list(train_set.modalities)}") from None
    n = _parameter_count(cfg, train_set)
    device = torch.device("cpu") if device is None else device
    need, have = n * BYTES_PER_PARAMETER, memory_bytes(device)
    if need > have:
        raise ValueError(
            f"{cfg.data}: the {cfg.model.method} model for this data (num_classes={train_set.num_classes}, "
            f"{train_set.num_modalities} modalities, d_model={cfg.model.d_model}, d_hidden={cfg.model.d_hidden}, "
            f"experts={cfg.model.num_experts}) would have {n:,} parameters, needing at least {need / 2**30:,.1f} GiB "
            f"for weights, gradients and optimiser state; {'this machine' if device.type == 'cpu' else str(device)} "
            f"has {have / 2**30:,.1f} GiB; expected a "
            "smaller num_classes or model")


def load_weights(model: nn.Module, weights: dict, path: str | os.PathLike) -> None:
    """``model.load_state_dict(weights)``; a mismatch is a :class:`RunFileError` naming ``path``."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        text = str(e).strip().splitlines()
        raise RunFileError(path, f"its weights do not fit the model of {CONFIG_FILE} "
                                 f"({text[0] if text else type(e).__name__}{' ...' if len(text) > 1 else ''})") from None


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


def scheduled_lr(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``
    under ``cfg.lr_schedule`` (:class:`mars.config.TrainConfig`)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _train_epoch(net: nn.Module, model: TrainableModel, opt, train_set, protocol, gen, cfg: TrainConfig,
                 ctx: DistContext, epoch: int, ckpt_path: Path) -> dict[str, float]:
    """One pass over the training set; returns the mean loss parts (over steps and ranks).

    Every rank draws the same global batch and masks; it trains on its strided
    share, with the loss scaled by its share of the batch so that the ranks'
    averaged gradients are the gradient of the global batch mean.

    The split lives on the run's device; the batch order and the masks are
    drawn on the CPU (``gen`` is a CPU generator, so every device draws the
    same ones) and only the batch's indices and masks are moved per step. The
    forward pass and the loss run under ``cfg.precision``'s autocast.

    ``cfg.masks_per_step`` P > 1 draws P masks per sample (P draws of the
    protocol, one after the other); a model with ``takes_mask_stack`` gets
    them as observed [P, b, M], any other the batch repeated P times
    (mask-major) with one mask per copy."""
    model.train()
    model.set_epoch(epoch)
    device = train_set.device
    available = train_set.available.cpu()  # the masks' input, on the generator's device (no copy on CPU)
    perm = torch.randperm(len(train_set), generator=gen)
    P, stack = cfg.masks_per_step, getattr(model, "takes_mask_stack", False)
    sums: dict[str, float] = {}
    steps = 0
    per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    for start in range(0, len(train_set), cfg.batch_size):
        batch = perm[start : start + cfg.batch_size]
        if batch.numel() < ctx.world:  # a trailing batch too small to give every rank a sample
            break
        mine = ctx.shard(torch.arange(batch.numel()))
        idx = batch[mine].to(device)
        if P == 1:
            observed = protocol.sample(available[batch], gen)[mine]  # the global batch's masks, this rank's rows
        else:
            observed = torch.stack([protocol.sample(available[batch], gen) for _ in range(P)])[:, mine]
            if not stack:  # the batch repeated P times, one mask per copy
                idx = idx.repeat(P)
                observed = observed.reshape(-1, observed.shape[-1])
        feats, avail, labels = _batch(train_set, idx)
        with autocast(device, cfg.precision):
            out = _forward_train(net, model, feats, observed.to(device), avail, idx)
            loss, parts = model.loss(out, labels, train_set.ignore_index)
        value = float(loss.detach())
        if ctx.enabled:  # one all-reduce: every rank sees the same value and stops together
            total = torch.tensor([value], dtype=torch.float64)
            ctx.sum_(total)
            value = float(total) / ctx.world
            loss = loss * (mine.numel() * ctx.world / batch.numel())
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss became {value} at epoch {epoch + 1}, step {steps + 1} (parts: {parts}); "
                f"training stopped, the last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none (first epoch)'}"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ctx.enabled:
            average_expert_grads(model, ctx.world)
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(cfg, epoch * per_epoch + steps, cfg.epochs * per_epoch)
        opt.step()
        for name, v in parts.items():
            sums[name] = sums.get(name, 0.0) + v
        steps += 1
    return ctx.mean_floats({k: v / max(steps, 1) for k, v in sums.items()})


def _restore_training_state(state: dict, opt, gen, ctx: DistContext, path: Path, device: torch.device,
                            seed: int) -> None:
    """Optimiser, mask generator and this rank's RNG streams from a checkpoint
    (the CPU one, and on a GPU the CUDA one when the checkpoint was written on
    a GPU by as many processes; otherwise the CUDA RNG is seeded from ``seed``)."""
    per_rank = state.get("optimizer_by_rank")
    if per_rank is not None and len(per_rank) != ctx.world:
        raise ValueError(f"{path} was saved by an expert-parallel run of {len(per_rank)} processes; "
                         f"resume it with {len(per_rank)} processes, not {ctx.world}")
    try:
        opt.load_state_dict(per_rank[ctx.rank] if per_rank is not None else state["optimizer"])
        for group in opt.param_groups:  # load_state_dict does not compare the shapes
            for p in group["params"]:
                for name, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                        raise ValueError(f"{name} has shape {tuple(v.shape)}, its parameter {tuple(p.shape)}")
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise RunFileError(path, f"its optimiser state does not fit the model ({e})") from None
    by_rank = state.get("torch_rng_by_rank") or [state["torch_rng"]]
    cuda_by_rank = state.get("cuda_rng_by_rank") or []
    try:
        gen.set_state(state["generator"])
        torch.set_rng_state(by_rank[ctx.rank] if len(by_rank) == ctx.world else state["torch_rng"])
        set_cuda_rng_state(device, cuda_by_rank[ctx.rank] if len(cuda_by_rank) == ctx.world else None, seed)
    except (RuntimeError, ValueError, TypeError) as e:
        raise RunFileError(path, f"an RNG state in it is invalid ({e})") from None


def _write_results(run: Path, summary: dict, test: dict, test_set: MultimodalDataset) -> None:
    buf = io.StringIO(newline="")
    extra = (["miou"] if test_set.task == "segmentation" else []) + (
        ["apcer", "bpcer", "acer"] if test_set.bona_fide_class is not None else [])
    w = csv.DictWriter(buf, fieldnames=["name", "size", "n", "score"] + extra)
    w.writeheader()
    for row in test["subsets"]:
        w.writerow({k: row.get(k) for k in w.fieldnames})
    write_text(run / "results.csv", buf.getvalue())
    write_json(run / "summary.json", summary)
    usage = {"usage": test.get("usage"), "usage_counts": test.get("usage_counts"),
             "subsets": [r["name"] for r in test["subsets"]]}
    atomic_write_bytes(run / "usage.pt", lambda f: torch.save(usage, f))


def _silent(*args, **kwargs) -> None:
    pass


@dataclass
class _Run:
    """What the steps of :func:`train` share: set by :func:`_set_up_run`
    (configuration, directory, process context, the checkpoint on resume) and
    :func:`_build_state` (data, model, optimiser, generators, progress through
    the epochs)."""

    cfg: TrainConfig
    dir: Path  # where the files are written now (a sibling of the final directory while replacing one)
    ctx: DistContext
    device: torch.device  # where this process computes (cfg.device resolved)
    resume: bool
    progress: bool
    log: Callable[..., None]
    overwrite: bool = False
    config_changed: bool = False  # on resume: config.json gets the new epoch budget
    state: dict | None = None  # the checkpoint being resumed
    out: OutputDir | None = None  # a new run's directory (None on resume)
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
    evaluate: str = "test"  # the split of the final evaluation: "test", or "val" (the test split never read)
    lock: RunLock | None = None  # on resume (rank 0): the run directory's lock; a new run's is in out
    data_fingerprint: str | None = None  # of the data loaded from cfg.data (None: data given in memory)
    finish: Callable | None = None  # rank 0, before a replacement is committed: finish(run_dir, {"summary", "test"})

    def release(self) -> None:
        """Drop the run directory's lock(s)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.out is not None:
            self.out.release()

    @property
    def ckpt_path(self) -> Path:
        return self.dir / CHECKPOINT_FILE

    @property
    def main(self) -> bool:
        return self.ctx.is_main


def _main_decides(ctx: DistContext, fn):
    """``fn()`` on rank 0 only (it looks at or creates the run directory);
    every rank returns its result or raises its error."""
    if not ctx.enabled:
        return fn()
    value, error = None, None
    if ctx.is_main:
        try:
            value = fn()
        except Exception as e:  # handed to the other ranks, raised here below
            error = e
    shared, message = ctx.broadcast_object((value, None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:
        raise ValueError(message)
    return value if ctx.is_main else shared  # rank 0 keeps its own object (an OutputDir holds the locks)


def requested_device(cfg: TrainConfig | None, run_dir: str | os.PathLike, *, resume: bool,
                     device: str | None = None) -> str:
    """The ``--device`` a run asks for: ``device`` when given, else the new
    run's ``cfg.device``, else (resume) the device in the run's ``config.json``."""
    if device is not None:
        return device
    if not resume:
        return cfg.device if cfg is not None else TrainConfig.device
    return read_config(Path(run_dir)).device


def _run_device(spec: str, ctx: DistContext, saved_in: Path | None = None) -> torch.device:
    """``spec`` resolved for this process (:func:`mars.devices.resolve_device`),
    which must be the process group's device type under torchrun. ``saved_in``:
    the ``config.json`` the device comes from (a resumed run), for the message."""
    device = resolve_device(spec, world=ctx.world, local_rank=ctx.local_rank, saved_in=saved_in)
    if ctx.enabled and torch.device(ctx.device).type != device.type:
        raise ConfigError("device", f"the run is on {spec} ({device}), but the process group was set up for "
                                    f"{ctx.device}; expected the same device for both")
    return device


def _set_up_run(cfg: TrainConfig | None, run_dir: str | os.PathLike, resume: bool, progress: bool, log,
                ctx: DistContext, overwrite: bool, epochs: int | None, device: str | None = None) -> _Run:
    """Step 1: the configuration and the device. On resume it is read back
    from ``config.json`` and checked against the checkpoint (read and checked
    here, by every rank), with the epoch budget raised to ``epochs`` and the
    run moved to ``device`` if given; a new run's directory is only checked
    here (created in step 2, after the data and the model). The device is
    resolved (an unavailable one is a :class:`ConfigError` of ``device``) and
    ``cfg.device`` holds its stored spelling. Only rank 0 logs and shows
    progress."""
    if not ctx.is_main:
        progress, log = False, _silent
    if not os.fspath(run_dir).strip():
        raise RunFileError(os.fspath(run_dir), "an empty path; expected a directory for the run (e.g. runs/mine)")
    run = Path(run_dir)
    if not resume:
        if cfg is None:
            raise ValueError("train: cfg is required for a new run (only resume=True reads it from the run directory)")
        spec = cfg.device if device is None else device
        where = _run_device(spec, ctx)
        check_precision(cfg.precision, where)
        # the data as an absolute path: mars eval and --resume read it from any working directory
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "device": stored_device(spec, where),
                                     "data": resolve_source(cfg.data)})
        return _Run(cfg=cfg, dir=run, ctx=ctx, device=where, resume=False, progress=progress, log=log,
                    overwrite=overwrite)
    _main_decides(ctx, lambda: recover_interrupted_swap(run))  # an --overwrite killed half way: completed
    if not run.is_dir():
        raise RunFileError(run, "not a directory; expected the directory of a run to resume")
    held: list[RunLock] = []  # one writer: rank 0 holds the run's lock until the run ends
    if (run / CONFIG_FILE).is_file():  # else not a run: read_config says so (no .lock left in someone's folder)
        _main_decides(ctx, lambda: held.append(lock_run(run)))
    try:
        return _resume_setup(run, ctx, progress, log, epochs, device, held[0] if held else None)
    except BaseException:
        for lock in held:
            lock.release()
        raise


def _resume_setup(run: Path, ctx: DistContext, progress: bool, log, epochs: int | None, device: str | None,
                  lock: RunLock | None) -> _Run:
    """Step 1 of a resumed run (:func:`_set_up_run`), under the run's lock."""
    cfg = read_config(run)
    state = load_checkpoint(run / CHECKPOINT_FILE, resume=True)
    check_config_matches(state, cfg, run / CONFIG_FILE, run / CHECKPOINT_FILE)
    done = state["epoch"]
    changes = {}
    if epochs is not None and epochs != cfg.epochs:
        if epochs < done:
            raise ConfigError("epochs", f"the run in {run} has trained {done} epochs already; expected at least {done} "
                                        "(the total to train up to)")
        changes["epochs"] = epochs
    elif cfg.epochs < done:
        raise RunFileError(run / CONFIG_FILE, f"epochs is {cfg.epochs}, but {CHECKPOINT_FILE} has trained {done} "
                                              f"epochs; expected at least {done}")
    spec = cfg.device if device is None else device
    where = _run_device(spec, ctx, None if device is not None else run / CONFIG_FILE)
    check_precision(cfg.precision, where)
    if stored_device(spec, where) != cfg.device:
        changes["device"] = stored_device(spec, where)
    if changes:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **changes})
    return _Run(cfg=cfg, dir=run, ctx=ctx, device=where, resume=True, progress=progress, log=log,
                config_changed=bool(changes), state=state, lock=lock)


def _build_state(r: _Run, data) -> None:
    """Step 2: data and model, checked (:func:`check_setup`) before anything is
    written; then the model restored from the checkpoint on resume, or a new
    run directory made (rank 0) with the run's config and an empty metrics
    log; the splits and the model moved to the device; the method's set-up
    hook, expert sharding, optimiser, generators, and the data-parallel
    wrapper. The model is built on the CPU from the seed (the same initial
    weights on every device) and moved."""
    cfg, ctx, device = r.cfg, r.ctx, r.device
    if data is not None:
        splits, fingerprint = data, None
    else:
        splits, fingerprint = run_data(cfg, with_fingerprint=True)
    if r.resume:  # the data the run was trained on, wherever the command runs
        check_data_matches(r.state, fingerprint, splits[0], cfg.data, r.ckpt_path)
        fingerprint = fingerprint if fingerprint is not None else r.state.get("data_fingerprint")
    r.data_fingerprint = fingerprint
    check_setup(cfg, splits, device)
    if cfg.expert_parallel and ctx.enabled:
        check_expert_parallel(cfg.model.method, cfg.model.num_experts, ctx.world)
    set_up_device(device)
    r.train_set, r.val_set, r.test_set = (on_device(split, device) for split in splits)
    torch.manual_seed(cfg.seed)
    r.model = model = make_model(cfg, r.train_set)
    r.protocol = MissingnessProtocol.parse(cfg.protocol)
    r.gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU whatever the device: the same batches and masks
    r.best = {"score": -math.inf, "epoch": -1, "state": None}
    state = r.state
    if r.resume:
        load_weights(model, state["model"], r.ckpt_path)  # checkpoints are single-process, also from expert-parallel runs
        r.start_epoch, r.best = state["epoch"], state["best"]
        if r.main:
            keep_metrics_through(r.dir / METRICS_FILE, r.start_epoch)
            if r.config_changed:
                write_json(r.dir / CONFIG_FILE, cfg.to_dict())
        r.log(f"resuming {r.dir} at epoch {r.start_epoch}/{cfg.epochs}")
    else:
        r.out = _main_decides(ctx, lambda: open_output(r.dir, overwrite=r.overwrite))
        r.dir = r.out.build
        if r.main:
            write_json(r.dir / CONFIG_FILE, cfg.to_dict())
            write_text(r.dir / METRICS_FILE, "")
    model.to(device)
    prepare_model(model, cfg, r.train_set, resume=r.resume, log=r.log if r.progress else _silent)
    r.expert_parallel = cfg.expert_parallel and ctx.enabled
    sharded = shard_model_experts(model, cfg.model.method) if r.expert_parallel else []
    r.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if r.resume:
        # a run that comes from another device has no CUDA RNG state: seeded from the run's seed, rank and epoch
        cuda_seed = (cfg.seed + 7919 * (ctx.rank + 1) + 104729 * r.start_epoch) % 2**63
        _restore_training_state(state, r.opt, r.gen, ctx, r.ckpt_path, device, cuda_seed)
        r.state = None  # not needed any more
    r.net = model
    if ctx.enabled:
        if not r.resume:  # each rank its own dropout/noise stream (a resumed run restored its rank's stream)
            torch.manual_seed(cfg.seed + 7919 * (ctx.rank + 1))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
        r.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=model.may_skip_parameters)


def _weights_finite(model: nn.Module, ctx: DistContext) -> bool:
    """Every floating parameter and buffer is finite (on every rank: expert
    shards differ between ranks, so the ranks agree on one answer). One
    device-to-host read."""
    checks = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    flag = (~torch.stack(checks)).any().double().reshape(1) if checks else torch.zeros(1, dtype=torch.float64)
    ctx.sum_(flag)
    return float(flag) == 0.0


def _better(score: float, best: dict) -> bool:
    """The first validated epoch, then any with a higher score (a NaN score,
    e.g. no labelled pixel, ranks lowest)."""
    if best["state"] is None:
        return True
    rank = lambda x: x if x == x else -math.inf  # noqa: E731
    return rank(score) > rank(best["score"])


def _epoch_loop(r: _Run) -> None:
    """Step 3: train the remaining epochs; after each, check that the weights
    are finite, validate, keep the best weights, log the epoch (rank 0) and
    write the checkpoint atomically (rank 0, with every rank's RNG states and,
    expert-parallel, optimiser state; every tensor copied to the CPU)."""
    cfg, ctx, model = r.cfg, r.ctx, r.model
    snapshot = (lambda: full_state_dict(model)) if r.expert_parallel else (
        lambda: {k: v.detach().clone() for k, v in model.state_dict().items()})
    bar = Progress(cfg.epochs, enabled=r.progress, initial=r.start_epoch)
    r.t_start = time.time()
    try:
        _epochs(r, snapshot, bar)
    finally:
        bar.close()


def _epochs(r: _Run, snapshot, bar: Progress) -> None:
    """The epochs of step 3 (:func:`_epoch_loop`), each ending with ``bar.update``."""
    cfg, ctx, model = r.cfg, r.ctx, r.model
    for epoch in range(r.start_epoch, cfg.epochs):
        with peer_failures(f"epoch {epoch + 1}"):  # also DDP's all-reduce and the shard gathers
            losses = _train_epoch(r.net, model, r.opt, r.train_set, r.protocol, r.gen, cfg, ctx, epoch, r.ckpt_path)
            if not _weights_finite(model, ctx):
                raise TrainingDiverged(
                    f"the weights became NaN or infinite in epoch {epoch + 1} (the loss stayed finite; try a smaller "
                    f"--lr); training stopped, nothing of that epoch was saved; the last good checkpoint is "
                    f"{r.ckpt_path if r.ckpt_path.exists() else 'none (first epoch)'}")
            val = evaluate_subsets(model, r.val_set, ctx=ctx, precision=cfg.precision)
            state = snapshot()
            if _better(val["mean"], r.best):  # the same decision on every rank (val is summed over ranks)
                r.best = {"score": val["mean"], "epoch": epoch + 1, "state": state}
            record = {"epoch": epoch + 1, "loss": losses, "val_mean": val["mean"], "val_by_size": val["by_size"],
                      "seconds": time.time() - r.t_start}
            checkpoint = {
                "model": state, "generator": r.gen.get_state(), "epoch": epoch + 1, "best": r.best,
                "config": cfg.to_dict(), "world_size": ctx.world, "data_fingerprint": r.data_fingerprint,
                "standardizer": getattr(r.train_set.standardizer, "state_dict", lambda: None)(),
            }
            mine = (torch.get_rng_state(), cuda_rng_state(r.device),
                    to_cpu(r.opt.state_dict()) if r.expert_parallel else None)
            gathered = ctx.all_gather_object(mine)
            rngs, cuda_rngs = [g[0] for g in gathered], [g[1] for g in gathered]
            optimizers = [g[2] for g in gathered] if r.expert_parallel else [r.opt.state_dict()]
        if r.main:
            append_line(r.dir / METRICS_FILE, json.dumps(record))
            save_checkpoint(r.ckpt_path, to_cpu(checkpoint | {
                "optimizer": optimizers[0], "optimizer_by_rank": optimizers if r.expert_parallel else None,
                "torch_rng": rngs[0], "torch_rng_by_rank": rngs,
                "cuda_rng_by_rank": cuda_rngs if r.device.type == "cuda" else None,
            }))
        ctx.barrier()  # the checkpoint is on disk before any rank starts the next epoch
        shown = sum(v for k, v in losses.items() if "/" not in k)  # "name/modality" parts are logged only
        bar.update(epoch + 1, f"loss {shown:.3f} val {val['mean']:.3f}")


def _final_evaluation(r: _Run) -> tuple[dict, float | None]:
    """Step 4: the best validation epoch's weights on the test set (every
    modality subset; the validation set with ``evaluate="val"``), and, for
    methods with a residual router, the feature vs residual router agreement
    on that set under the training protocol's masks (fixed by seed).
    -> (results, agreement or None)."""
    method = methods.get(r.cfg.model.method)
    if r.best["state"] is None:
        raise RunFileError(r.ckpt_path, "holds no validated epoch to evaluate; resume with a larger --epochs")
    (load_full_state_dict if r.expert_parallel else nn.Module.load_state_dict)(r.model, r.best["state"])
    num_experts = r.cfg.model.num_experts if method.sparse_moe else None
    split = r.test_set if r.evaluate == "test" else r.val_set
    with peer_failures(f"the {'test' if r.evaluate == 'test' else 'validation'} evaluation"):
        test = evaluate_subsets(r.model, split, num_experts=num_experts, ctx=r.ctx, precision=r.cfg.precision)
    agreement = None
    if method.residual_router:
        agreement = router_agreement(r.model, split, r.protocol, r.cfg.seed, r.cfg.precision)
    return test, agreement


def _write_run(r: _Run, test: dict, agreement: float | None) -> dict:
    """Step 5: the summary; rank 0 writes results.csv, summary.json and usage.pt
    and, when it replaces an existing run, swaps the new directory in. With
    ``evaluate="val"`` the evaluated split is the validation set: the summary
    has ``val_by_size`` (and no test key)."""
    cfg, s = r.cfg, r.evaluate
    summary = {
        "method": cfg.model.method, "data": cfg.data, "seed": cfg.seed, "best_epoch": r.best["epoch"],
        "router_agreement": agreement,
        "specialisation_nmi": test.get("specialisation_nmi"),
        "masks_per_step": cfg.masks_per_step, "evaluated": s,
        "val_mean": r.best["score"], **({"test_mean": test["mean"]} if s == "test" else {}),
        f"{s}_by_size": test["by_size"],
        **{f"{s}_{m}": test[f"{m}_mean"] for m in ("miou", "acer") if f"{m}_mean" in test},
        "train_seconds": time.time() - r.t_start,
        "parameters": sum(r.best["state"][name].numel() for name, _ in r.model.named_parameters()),  # full, not a shard
        "world_size": r.ctx.world,
    }
    if r.main:
        _write_results(r.dir, summary, test, r.test_set)
        if r.finish is not None:  # e.g. the plots: part of the run before it replaces an old one
            r.finish(r.dir, {"summary": summary, "test": test})
        if r.out is not None:
            r.out.commit()
    r.ctx.barrier()
    return summary


def train(cfg: TrainConfig | None, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          data=None, log=print, ctx: DistContext | None = None, overwrite: bool = False,
          epochs: int | None = None, device: str | None = None, evaluate: str = "test",
          finish: Callable | None = None) -> dict:
    """Train, evaluate on every modality subset, write the run directory; returns
    {"summary", "test", "model", "modalities", "run_dir"}.

    ``evaluate="val"`` evaluates the best epoch on the validation split instead
    of the test split ("test" in the result is then the validation results),
    so that choosing options never reads the test split.

    A new run needs ``run_dir`` not to exist or to be empty; ``overwrite=True``
    replaces an existing run directory, atomically once the new run is
    complete (:func:`mars.rundir.open_output`). ``resume=True`` continues the
    run in ``run_dir`` (``cfg`` is read from it; ``epochs`` raises its epoch
    budget). Errors in the run's files are :class:`mars.rundir.RunFileError`.

    ``device`` ("auto", "cpu", "cuda", "cuda:N") overrides ``cfg.device``; on
    resume it moves the run to that device (saved in ``config.json``). A
    device this machine does not have is a :class:`ConfigError` of ``device``.

    One writer per run directory: the run holds its lock (:class:`mars.rundir.RunLock`,
    also on the directory it replaces) from the start to the end; a directory
    another process holds is :class:`mars.rundir.RunInUseError`. ``finish(dir,
    {"summary", "test"})`` runs on rank 0 once the results are written, under
    the lock and before a replacement is committed (``mars train`` draws the
    plots there). A new run records its data as an absolute path
    (:func:`mars.data.resolve_source`) and, in its checkpoint, the data's
    fingerprint; ``--resume`` refuses data that does not match it.

    Under ``torchrun`` (or with an explicit ``ctx``) the run is data-parallel
    (see :mod:`mars.distributed`); only rank 0 writes files and shows progress,
    and every rank returns the same summary. The ranks share ``run_dir``."""
    if ctx is None:  # the process group's device, under torchrun
        ctx = context_from_env(requested_device(cfg, run_dir, resume=resume, device=device)
                               if world_from_env() > 1 else "cpu")
    if evaluate not in ("test", "val"):
        raise ValueError(f"evaluate must be 'test' or 'val', got {evaluate!r}")
    r = _set_up_run(cfg, run_dir, resume, progress, log, ctx, overwrite, epochs, device)
    r.evaluate = evaluate
    r.finish = finish
    try:
        _build_state(r, data)
        _epoch_loop(r)
        test, agreement = _final_evaluation(r)
        summary = _write_run(r, test, agreement)
    except BaseException as e:
        out = r.out
        if out is None or not out.replacing or not r.main:
            raise
        if isinstance(e, (TrainingDiverged, DistributedFailure)):  # keep the new run's last good checkpoint
            raise type(e)(f"{e} (the new run is in {out.build}; {out.path} still holds the old one)") from e
        if isinstance(e, Exception):
            out.discard()
        raise
    finally:
        r.release()
    final = r.out.path if r.out is not None else r.dir
    return {"summary": summary, "test": test, "model": r.model, "modalities": r.test_set.modalities,
            "run_dir": str(final)}
