"""``--device`` and ``--precision`` of the ``mars`` command (tier 1, CPU).

The CUDA path is the CPU path with another ``torch.device``; without a GPU
here, device resolution is tested with ``torch.cuda`` mocked, the rest on the
CPU: bf16 training (autocast) against fp32, the configuration round trip
(old ``config.json`` files without the keys), errors for devices this machine
does not have, checkpoints written on a GPU loading on the CPU, a run moved
between devices on resume, no copies of the splits on the CPU, the masks
drawn on the CPU whatever the device, and the tqdm progress bar."""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from helpers import model_config
from mars import cli, devices, rundir
from mars import train as train_mod
from mars.config import ConfigError, ModelConfig, TrainConfig
from mars.data import MissingnessProtocol, load_feature_dir, load_mfeat, write_feature_dir
from mars.train import Progress, on_device, to_cpu, train

MODEL = ["--d-model", "8", "--d-hidden", "8", "--experts", "2", "--batch-size", "16", "--quiet"]
MODEL_ANY = ["--d-model", "8", "--d-hidden", "8", "--batch-size", "16", "--quiet"]  # options every method reads


def _tiny_data(n: int = 48, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    feats = {m: torch.randn(n, 4, generator=g) + labels[:, None].float() for m in ("a", "b")}
    return {"features": feats, "labels": labels, "num_classes": 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return Path(write_feature_dir(tmp_path_factory.mktemp("data") / "d", _tiny_data()))


@pytest.fixture(scope="module")
def mfeat_small():
    train_set, val_set, test_set = load_mfeat(seed=0)
    return train_set.subset(torch.arange(160)), val_set.subset(torch.arange(60)), test_set.subset(torch.arange(60))


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    code, err = mars("train", "--data", data_dir, "--epochs", "1", "--device", "cpu", *MODEL, "--out", run)
    assert code == 0, err
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(base_run, dest)
    return dest


def mars(*args) -> tuple[int, str]:
    """``mars ARGS`` in this process -> (exit code, stderr); a traceback fails the test."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main([str(a) for a in args])
    return code, err.getvalue()


def assert_error(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.startswith("mars: ")]
    assert len(lines) == 1 and lines[0].startswith("mars: error: "), err
    for name in names:
        assert name in lines[0], (name, err)


def no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def fake_gpus(monkeypatch, count: int) -> None:
    """torch.cuda says ``count`` GPUs are there (nothing may run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


# ------------------------------------------------------------ device resolution
def test_device_resolution_with_and_without_gpus(monkeypatch):
    no_cuda(monkeypatch)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "cuda:7"):
        with pytest.raises(ConfigError, match="CUDA is not available") as info:
            devices.resolve_device(spec)
        assert info.value.field == "device"
    fake_gpus(monkeypatch, 2)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"cuda:7: this machine has 2 CUDA device\(s\) \(cuda:0 \.\. cuda:1\)"):
        devices.resolve_device("cuda:7")
    # torchrun: each process on cuda:LOCAL_RANK; auto falls back to cpu when the node has fewer GPUs than processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert devices.resolve_device("cuda", world=2, local_rank=1) == torch.device("cuda", 1)
    assert devices.resolve_device("auto", world=4, local_rank=1) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert devices.resolve_device("auto", world=3, local_rank=2) == torch.device("cpu")
    with pytest.raises(ConfigError, match="LOCAL_RANK 2, but this machine has 2 CUDA device"):
        devices.resolve_device("cuda", world=3, local_rank=2)
    with pytest.raises(ConfigError, match="each process uses cuda:LOCAL_RANK; expected cuda, got cuda:1"):
        devices.resolve_device("cuda:1", world=2, local_rank=0)
    with pytest.raises(ConfigError, match=r"the run was trained on cuda:7 \(run/config.json\), but cuda:7: this"):
        devices.resolve_device("cuda:7", saved_in="run/config.json")
    # what config.json records
    assert devices.stored_device("auto", torch.device("cuda", 0)) == "cuda"
    assert devices.stored_device("auto", torch.device("cpu")) == "cpu"
    assert devices.stored_device("cuda:1", torch.device("cuda", 1)) == "cuda:1"


@pytest.mark.parametrize("command", ["train", "compare", "eval"])
@pytest.mark.parametrize("device, expected", [
    ("cuda", "CUDA is not available on this machine"),
    ("cuda:7", "CUDA is not available on this machine"),
    ("gpu", "expected auto, cpu, cuda or cuda:N"),
])
def test_unavailable_device_is_a_clear_error_before_anything_is_written(command, device, expected, base_run, data_dir,
                                                                       tmp_path, monkeypatch):
    no_cuda(monkeypatch)
    if command == "eval":
        before = {p.name: p.read_bytes() for p in base_run.iterdir()}
        code, err = mars("eval", base_run, "--device", device)
        assert {p.name: p.read_bytes() for p in base_run.iterdir()} == before
    else:
        extra = ["--seeds", "1", "--methods", "late-fusion"] if command == "compare" else []
        code, err = mars(command, "--data", data_dir, "--epochs", "1", *(MODEL_ANY if extra else MODEL), *extra,
                         "--device", device,
                         "--out", tmp_path / "out")
        assert not (tmp_path / "out").exists()
    assert_error(code, err, "mars: error: --device: ", expected)


def test_more_gpus_asked_for_than_there_are_is_a_clear_error(data_dir, tmp_path, monkeypatch):
    fake_gpus(monkeypatch, 2)
    code, err = mars("train", "--data", data_dir, "--epochs", "1", *MODEL, "--device", "cuda:7", "--out", tmp_path / "o")
    assert_error(code, err, "--device: cuda:7: this machine has 2 CUDA device(s)")
    assert not (tmp_path / "o").exists()


def test_torchrun_with_cuda_and_no_gpu_stops_before_the_process_group(data_dir, tmp_path, monkeypatch):
    """Each rank refuses the device itself, before waiting for its peers."""
    import torch.distributed as dist

    no_cuda(monkeypatch)
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1", "MARS_DIST_TIMEOUT": "5"}.items():
        monkeypatch.setenv(key, value)
    code, err = mars("train", "--data", data_dir, "--epochs", "1", *MODEL, "--device", "cuda", "--out", tmp_path / "o")
    assert_error(code, err, "--device: CUDA is not available")
    assert not dist.is_initialized() and not (tmp_path / "o").exists()


# ------------------------------------------------------------ configuration
def test_config_round_trip_and_config_files_from_before_the_device_keys(tmp_path):
    cfg = TrainConfig(device="cuda:01", precision="bf16", model=model_config(d_model=8, fusion_heads=2))
    assert cfg.device == "cuda:1"
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = TrainConfig().to_dict()  # a version-1 config.json: flat model keys, no device or precision
    del old["device"], old["precision"], old["version"], old["model"]["mars"], old["model"]["research"]
    del old["test_split"], old["train_missing"]
    assert (TrainConfig.from_dict(old).device, TrainConfig.from_dict(old).precision) == ("cpu", "fp32")
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert rundir.read_config(tmp_path).device == "cpu"
    for kwargs, field in ((dict(device="gpu"), "device"), (dict(device="cuda:-1"), "device"),
                          (dict(device=0), "device"), (dict(precision="fp16"), "precision")):
        with pytest.raises(ConfigError) as info:
            TrainConfig(**kwargs)
        assert info.value.field == field


def test_the_device_may_differ_from_the_checkpoint_but_not_the_precision(run):
    state = rundir.load_checkpoint(run / "checkpoint.pt", resume=True)
    cfg = rundir.read_config(run)
    moved = TrainConfig.from_dict({**cfg.to_dict(), "device": "cuda"})
    rundir.check_config_matches(state, moved, run / "config.json", run / "checkpoint.pt")
    other = TrainConfig.from_dict({**cfg.to_dict(), "precision": "bf16"})
    with pytest.raises(rundir.RunFileError, match="precision: 'bf16' here, 'fp32' in the checkpoint"):
        rundir.check_config_matches(state, other, run / "config.json", run / "checkpoint.pt")


# ------------------------------------------------------------ bf16 on the CPU
def _cfg(precision: str, epochs: int = 3, method: str = "mars") -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=32, device="cpu", precision=precision, model=model_config(
        method=method, d_model=16, d_hidden=16, num_experts=4, fusion_heads=2, dropout=0.0, backend="cpu",
        mce_teacher_epochs=1, retriever_candidates=2, retriever_shared=1, retriever_k=2))


def test_bf16_training_on_cpu_is_close_to_fp32(tmp_path, mfeat_small):
    runs = {p: train(_cfg(p), tmp_path / p, data=mfeat_small, progress=False, log=lambda *a, **k: None)
            for p in ("fp32", "bf16")}
    losses = {p: [json.loads(l)["loss"]["task"] for l in (tmp_path / p / "metrics.jsonl").read_text().splitlines()]
              for p in runs}
    assert all(math.isfinite(v) for v in losses["bf16"])
    for a, b in zip(losses["bf16"], losses["fp32"], strict=True):
        assert a == pytest.approx(b, rel=0.15)
    assert losses["bf16"][-1] < losses["bf16"][0]  # it learns
    fp32, bf16 = runs["fp32"]["summary"], runs["bf16"]["summary"]
    assert bf16["test_mean"] > 0.5 and abs(bf16["test_mean"] - fp32["test_mean"]) < 0.1  # 10 classes: chance is 0.1
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"
    state = rundir.load_checkpoint(tmp_path / "bf16" / "checkpoint.pt", resume=True)
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float32}  # master weights
    exp_avg = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert exp_avg and {t.dtype for t in exp_avg} == {torch.float32}


@pytest.mark.parametrize("method", ["moe", "late_fusion", "moe_retriever", "mce"])
def test_bf16_trains_every_method(method, tmp_path, data_dir):
    result = train(_cfg("bf16", epochs=1, method=method), tmp_path / "run", data=load_feature_dir(data_dir),
                   progress=False, log=lambda *a, **k: None)
    loss = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["loss"]
    assert all(math.isfinite(v) for v in loss.values()), loss
    assert 0.0 <= result["summary"]["test_mean"] <= 1.0


def test_cli_bf16_run_is_evaluated_in_its_precision(tmp_path, data_dir, monkeypatch):
    code, err = mars("train", "--data", data_dir, "--epochs", "1", *MODEL, "--device", "cpu", "--precision", "bf16",
                     "--out", tmp_path / "run")
    assert code == 0, err
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["device"], cfg["precision"]) == ("cpu", "bf16")
    from mars import evaluate

    seen, real = [], evaluate.evaluate_subsets

    def spy(*args, **kwargs):
        seen.append(kwargs.get("precision"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_subsets", spy)
    assert mars("eval", tmp_path / "run")[0] == 0
    assert mars("eval", tmp_path / "run", "--precision", "fp32")[0] == 0
    assert seen == ["bf16", "fp32"]


# ------------------------------------------------------------ checkpoints on any device
def test_to_cpu_keeps_cpu_tensors_and_shared_entries():
    t = torch.ones(3)
    obj = {"a": t, "b": [t, (t, 1)], "c": "x"}
    out = to_cpu(obj)
    assert out["a"] is t and out["b"][1][0] is t and out["c"] == "x" and isinstance(out["b"][1], tuple)


def test_checkpoint_written_on_a_gpu_loads_on_a_cpu_only_machine(run, monkeypatch):
    """Tensors saved from cuda:0 (their storage location is recorded in the
    archive) load on the CPU: load_checkpoint maps them there; eval and
    resume of such a run on this machine work with --device cpu."""
    import torch.serialization as serialization

    ckpt = run / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["config"]["device"] = "cuda"
    state["cuda_rng_by_rank"] = [torch.zeros(16, dtype=torch.uint8)]
    with monkeypatch.context() as m:
        m.setattr(serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, ckpt)
    if not torch.cuda.is_available():  # the archive really says cuda: a plain load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(ckpt, weights_only=True)
    loaded = rundir.load_checkpoint(ckpt, resume=True)
    assert {v.device.type for v in loaded["model"].values()} == {"cpu"}
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "device": "cuda"}))
    no_cuda(monkeypatch)
    code, err = mars("eval", run)
    assert_error(code, err, "--device: the run was trained on cuda", "config.json", "give --device cpu")
    code, err = mars("train", "--resume", run, "--quiet")
    assert_error(code, err, "--device: the run was trained on cuda", "config.json")
    assert mars("eval", run, "--device", "cpu")[0] == 0
    code, err = mars("train", "--resume", run, "--epochs", "2", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["device"] == "cpu"  # moved
    again = rundir.load_checkpoint(ckpt, resume=True)
    assert again["epoch"] == 2 and again["cuda_rng_by_rank"] is None and again["config"]["device"] == "cpu"


def test_a_bad_cuda_rng_state_is_a_clear_error(run):
    ckpt = run / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["cuda_rng_by_rank"] = [torch.zeros(3, 2)]
    torch.save(state, ckpt)
    code, err = mars("train", "--resume", run, "--epochs", "2", "--quiet")
    assert_error(code, err, str(ckpt), "cuda_rng_by_rank[0] is not an RNG state")


def test_resume_takes_device_but_not_precision(run):
    code, err = mars("train", "--resume", run, "--precision", "bf16", "--quiet")
    assert_error(code, err, "--resume", "--precision cannot be given", "--device to move the run")
    code, err = mars("train", "--resume", run, "--epochs", "2", "--device", "auto", "--quiet")
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------ resume on the CPU stays bit-identical
def _drop_device_keys(run: Path) -> None:
    """Make ``run`` look written before the device and precision keys existed."""
    cfg = json.loads((run / "config.json").read_text())
    del cfg["device"], cfg["precision"]
    (run / "config.json").write_text(json.dumps(cfg))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["config"]["device"], state["config"]["precision"], state["cuda_rng_by_rank"]
    torch.save(state, run / "checkpoint.pt")


def test_resume_on_cpu_is_bit_identical(tmp_path, data_dir):
    """Resumed with --device cpu, or a run from before the device keys (its
    config.json and checkpoint without them): the same metrics and results as
    the uninterrupted run, bit for bit (dropout and routing noise included)."""
    cfg = lambda epochs: TrainConfig(epochs=epochs, batch_size=16, model=model_config(  # noqa: E731
        d_model=8, d_hidden=8, num_experts=2, fusion_heads=2, backend="cpu"))
    quiet = dict(data=load_feature_dir(data_dir), progress=False, log=lambda *a, **k: None)
    full = train(cfg(3), tmp_path / "full", **quiet)
    strip = lambda run: [{k: v for k, v in json.loads(l).items() if k != "seconds"}  # noqa: E731
                         for l in (run / "metrics.jsonl").read_text().splitlines()]
    for how in ("--device cpu", "an old run"):
        part = tmp_path / how.replace(" ", "_")
        train(cfg(2), part, **quiet)
        if how == "an old run":
            _drop_device_keys(part)
            resumed = train(None, part, resume=True, epochs=3, **quiet)
        else:
            resumed = train(None, part, resume=True, epochs=3, device="cpu", **quiet)
        assert resumed["test"]["subsets"] == full["test"]["subsets"], how
        assert strip(part) == strip(tmp_path / "full"), how
        assert json.loads((part / "config.json").read_text())["device"] == "cpu"


# ------------------------------------------------------------ data on the device
def test_splits_already_on_the_device_are_not_copied(tmp_path, mfeat_small, monkeypatch):
    split = mfeat_small[0]
    assert on_device(split, torch.device("cpu")) is split
    seen = []
    real_batch = train_mod._batch

    def batch(data, idx):
        feats, avail, labels = real_batch(data, idx)
        seen.append((data, idx.device, {t.device.type for t in (*feats.values(), avail, labels)}))
        return feats, avail, labels

    monkeypatch.setattr(train_mod, "_batch", batch)
    draws = []
    real_sample = MissingnessProtocol.sample

    def sample(self, available, generator=None):
        draws.append((available.device.type, generator.device.type))
        return real_sample(self, available, generator)

    monkeypatch.setattr(MissingnessProtocol, "sample", sample)
    train(_cfg("fp32", epochs=1), tmp_path / "run", data=mfeat_small, progress=False, log=lambda *a, **k: None)
    # the batches come from the given splits themselves (none copied), indexed on the CPU
    assert seen and all(data in mfeat_small and dev.type == "cpu" and types == {"cpu"} for data, dev, types in seen)
    assert draws and set(draws) == {("cpu", "cpu")}  # the masks: drawn on the CPU by the CPU generator


def test_batches_of_a_split_on_another_device():
    """A split on another device (meta stands in for cuda) is moved once; a
    batch is indexed there with the CPU indices of the batch order moved."""
    split = load_mfeat(seed=0)[0].subset(torch.arange(16))
    meta = on_device(split, torch.device("meta"))
    assert meta is not split and meta.device.type == "meta" and split.device.type == "cpu"
    feats, avail, labels = train_mod._batch(meta, torch.arange(4))
    assert {t.device.type for t in (*feats.values(), avail, labels)} == {"meta"}
    assert labels.shape == (4,) and avail.shape == (4, split.num_modalities)


# ------------------------------------------------------------ progress
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_tqdm_on_a_terminal_and_plain_lines_otherwise():
    term = _Terminal()
    bar = Progress(3, stream=term, initial=1)
    bar.update(2, "loss 1.000 val 0.500")
    bar.update(3, "loss 0.500 val 0.750")
    text = term.getvalue()
    assert "3/3" in text and "%|" in text and "loss 0.500 val 0.750" in text and bar.bar is None
    plain = io.StringIO()
    bar = Progress(2, stream=plain)
    bar.update(1, "loss 1.000 val 0.500")
    bar.update(2, "loss 0.500 val 0.750")
    assert plain.getvalue() == "epoch 1/2 loss 1.000 val 0.500\nepoch 2/2 loss 0.500 val 0.750\n"
    silent = io.StringIO()
    Progress(2, enabled=False, stream=silent).update(1, "x")
    assert silent.getvalue() == ""


def test_training_prints_plain_epoch_lines_when_stderr_is_not_a_terminal(tmp_path, data_dir):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train(_cfg("fp32", epochs=2, method="late_fusion"), tmp_path / "run", data=load_feature_dir(data_dir),
              log=lambda *a, **k: None)
    lines = [l for l in err.getvalue().splitlines() if l.startswith("epoch ")]
    assert [l.split(" loss ")[0] for l in lines] == ["epoch 1/2", "epoch 2/2"], err.getvalue()
    assert "\r" not in err.getvalue()


# ------------------------------------------------------------ bf16 with data and expert parallelism (Gloo)
def _ep_bf16(rank, world, root):
    from mars.distributed import DistContext

    train_set, val_set, test_set = load_mfeat(seed=0)
    data = (train_set.subset(torch.arange(64)), val_set.subset(torch.arange(16)), test_set.subset(torch.arange(16)))
    cfg = TrainConfig(epochs=1, batch_size=16, expert_parallel=True, precision="bf16", model=model_config(
        d_model=16, d_hidden=16, num_experts=4, fusion_heads=2, backend="cpu"))
    result = train(cfg, root, data=data, progress=False, log=lambda *a, **k: None,
                   ctx=DistContext(rank=rank, world=world))
    return result["summary"]["test_mean"], json.loads((Path(root) / "metrics.jsonl").read_text())["loss"]


def test_expert_parallel_bf16_training_on_two_cpu_processes(tmp_path):
    """bf16 autocast through DistributedDataParallel and the expert shards
    (their parameters cast for the call, bfloat16 token rows over Gloo)."""
    from dist_utils import run_distributed

    results = run_distributed(_ep_bf16, 2, args=(str(tmp_path / "run"),), timeout_s=120)
    assert results[0] == results[1]
    mean, loss = results[0]
    assert 0.0 <= mean <= 1.0 and all(math.isfinite(v) for v in loss.values()), loss
    state = rundir.load_checkpoint(tmp_path / "run" / "checkpoint.pt", resume=True)
    assert state["world_size"] == 2 and {v.dtype for v in state["model"].values() if v.is_floating_point()} == {
        torch.float32}
