"""The run directory under bad inputs (tier 1): checkpoints are loaded safely
(never run code), existing runs are not clobbered, empty splits are handled up
front, corrupt or mismatched run files, torn metric lines, options given with
--resume, non-finite configuration values and weights, failed writes and
out-of-range options all end in one ``mars: error: <what>: ...`` line and exit
code 2 (3 for a diverged run), never in a traceback. Tiny data and models:
each test takes seconds."""
from __future__ import annotations

import contextlib
import errno
import io
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import model_config
from mars import cli, rundir
from mars import train as train_mod
from mars.config import ConfigError, ModelConfig, TrainConfig
from mars.data import load_feature_dir, read_feature_dir, write_feature_dir
from mars.train import run_data, train

MODEL = ["--d-model", "8", "--d-hidden", "8", "--experts", "2", "--batch-size", "16", "--quiet"]
MODEL_ANY = ["--d-model", "8", "--d-hidden", "8", "--batch-size", "16", "--quiet"]  # options every method reads
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _tiny_data(n: int = 48, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    feats = {m: torch.randn(n, 4, generator=g) + labels[:, None].float() for m in ("a", "b")}
    return {"features": feats, "labels": labels, "num_classes": 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return Path(write_feature_dir(tmp_path_factory.mktemp("data") / "d", _tiny_data()))


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory) -> Path:
    """A complete one-epoch run, copied by the tests that change it."""
    run = tmp_path_factory.mktemp("base") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["train", "--data", str(data_dir), "--epochs", "1", *MODEL, "--out", str(run)]) == 0
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(base_run, dest)
    return dest


def mars(*args) -> tuple[int, str]:
    """``mars ARGS`` in this process -> (exit code, stderr). An exception
    escaping ``main`` (a traceback for the user) fails the test."""
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


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# -------------------------------------------------- 1. loading never runs code
class _Payload:
    """Unpickling calls exec(code): writes the marker file."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.mark.parametrize("where", ["whole", "inside"])
def test_malicious_checkpoint_runs_nothing_on_eval_or_resume(run, tmp_path, where):
    marker = tmp_path / "marker"
    ckpt = run / "checkpoint.pt"
    if where == "whole":
        torch.save({"model": _Payload(marker), "best": _Payload(marker)}, ckpt)
    else:  # a real checkpoint with one object hidden in it
        state = torch.load(ckpt, weights_only=True)
        state["best"]["extra"] = _Payload(marker)
        torch.save(state, ckpt)
    for args in (["eval", run], ["train", "--resume", run, "--quiet"]):
        code, err = mars(*args)
        assert_error(code, err, str(ckpt), "refusing to load it")
        assert "weights_only" not in err  # no advice to load it unsafely
        assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(ckpt, weights_only=False)
    assert marker.read_text() == "pwned"


def test_usage_file_and_checkpoints_of_every_method_load_with_weights_only(data_dir, tmp_path):
    for method in ("mars", "moe", "late_fusion", "moe_retriever", "mce"):
        cfg = TrainConfig(data=str(data_dir), epochs=1, batch_size=16, model=model_config(
            method=method, d_model=8, d_hidden=8, num_experts=2, fusion_heads=2, mce_teacher_epochs=1,
            retriever_candidates=2, retriever_shared=1, retriever_k=2))
        splits = run_data(cfg)  # the data `mars eval` loads for the run
        out = tmp_path / method
        train(cfg, out, data=splits, progress=False, log=lambda *a, **k: None)
        state = rundir.load_checkpoint(out / "checkpoint.pt", resume=True)
        assert state["epoch"] == 1 and state["config"]["model"]["method"] == method
        torch.load(out / "usage.pt", weights_only=True)
        code, err = mars("eval", out)
        assert code == 0, err


# -------------------------------------------------- 2. --out never destroys a run
def test_refused_out_leaves_the_existing_run_byte_identical(run, data_dir):
    before = snapshot(run)
    # a protocol with the wrong number of rates for the data: refused before any write
    code, err = mars("train", "--data", data_dir, "--epochs", "1", "--missing", "independent:0.2,0.5,0.8", *MODEL,
                     "--out", run)
    assert_error(code, err, "--missing", "3 rates", "(2)")
    assert snapshot(run) == before
    # a valid run onto an existing run directory: refused without --overwrite
    code, err = mars("train", "--data", data_dir, "--epochs", "1", *MODEL, "--out", run)
    assert_error(code, err, str(run), "already exists", "--overwrite")
    assert snapshot(run) == before
    assert siblings(run) == []


def test_overwrite_keeps_the_old_run_until_the_new_one_is_complete(run, data_dir, monkeypatch):
    before = snapshot(run)
    real_loop = train_mod._epoch_loop
    seen = {}

    def loop(r):
        seen["old intact"] = snapshot(run) == before
        seen["building in"] = r.dir
        real_loop(r)

    monkeypatch.setattr(train_mod, "_epoch_loop", loop)
    code, err = mars("train", "--data", data_dir, "--epochs", "1", "--method", "late-fusion", *MODEL_ANY, "--out", run,
                     "--overwrite")
    assert code == 0, err
    assert seen["old intact"] and seen["building in"].parent == run.parent and seen["building in"] != run
    assert json.loads((run / "config.json").read_text())["model"]["method"] == "late_fusion"
    assert not (run / "expert_usage.png").exists()  # a file of the old run only: the directory was replaced
    assert siblings(run) == []


def test_failed_overwrite_leaves_the_old_run_and_no_partial_directory(run, data_dir, monkeypatch):
    before = snapshot(run)

    def full(state, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.torch, "save", full)
    code, err = mars("train", "--data", data_dir, "--epochs", "1", *MODEL, "--out", run, "--overwrite")
    assert_error(code, err, "checkpoint.pt", "No space left on device")
    assert snapshot(run) == before
    assert siblings(run) == []


def test_out_must_be_a_usable_new_directory(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_args = ["train", "--data", data_dir, "--epochs", "1", *MODEL]
    code, err = mars(*train_args, "--out", "")
    assert_error(code, err, "--out", "empty")
    assert os.listdir(tmp_path) == []  # nothing written into the current directory
    (tmp_path / "file").write_text("keep")
    code, err = mars(*train_args, "--out", "file")
    assert_error(code, err, "file", "is a file")
    code, err = mars(*train_args, "--out", "file/run")
    assert_error(code, err, "file/run", "lies under file, which is a file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    code, err = mars(*train_args, "--out", "notes", "--overwrite")
    assert_error(code, err, "notes", "not a mars run directory")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep"
    assert (tmp_path / "file").read_text() == "keep"
    (tmp_path / "empty").mkdir()  # an empty directory is as good as a new one
    code, err = mars(*train_args, "--out", "empty")
    assert code == 0, err
    assert (tmp_path / "empty" / "checkpoint.pt").exists()


def test_compare_refuses_an_existing_out_unless_overwrite(tmp_path, data_dir):
    out = tmp_path / "cmp"
    args = ["compare", "--data", data_dir, "--epochs", "1", *MODEL_ANY, "--seeds", "1", "--methods", "late-fusion",
            "--out", out]
    code, err = mars(*args)
    assert code == 0, err
    before = snapshot(out)
    assert "late_fusion_seed0/checkpoint.pt" in before and "compare.md" in before
    code, err = mars(*args)
    assert_error(code, err, str(out), "already exists", "--overwrite")
    assert snapshot(out) == before
    code, err = mars(*args, "--overwrite")
    assert code == 0, err
    assert sorted(snapshot(out)) == sorted(before) and siblings(out) == []


def _ddp_onto_existing_run(rank, world, root, overwrite):
    from mars.distributed import DistContext

    cfg = TrainConfig(data=str(Path(root) / "d"), epochs=1, batch_size=16, model=model_config(
        method="late_fusion", d_model=8, d_hidden=8, num_experts=2))
    try:
        result = train(cfg, Path(root) / "run", progress=False, log=lambda *a, **k: None,
                       ctx=DistContext(rank=rank, world=world), overwrite=overwrite)
    except ValueError as e:
        return f"refused: {e}"
    return result["run_dir"]


def test_data_parallel_ranks_agree_on_refusing_or_replacing_an_existing_run(base_run, data_dir, tmp_path):
    from dist_utils import run_distributed

    shutil.copytree(data_dir, tmp_path / "d")
    shutil.copytree(base_run, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    refused = run_distributed(_ddp_onto_existing_run, 2, args=(str(tmp_path), False), timeout_s=60)
    assert all(r.startswith("refused: ") and "already exists" in r for r in refused), refused
    assert snapshot(tmp_path / "run") == before
    done = run_distributed(_ddp_onto_existing_run, 2, args=(str(tmp_path), True), timeout_s=60)
    assert done == [str(Path(os.path.abspath(tmp_path / "run")))] * 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["method"] == "late_fusion"
    assert sorted(os.listdir(tmp_path)) == ["d", "run"]


# -------------------------------------------------- 5. empty validation / test splits
def test_empty_val_in_splits_json_falls_back_to_a_slice_of_train(tmp_path, data_dir):
    d = Path(write_feature_dir(tmp_path / "d", _tiny_data(),
                               splits={"train": list(range(32)), "val": [], "test": list(range(32, 48))}))
    data, (tr, va, te) = read_feature_dir(d)
    assert (len(tr), len(va), len(te)) == (24, 8, 16)
    assert sorted(tr + va) == list(range(32)) and te == list(range(32, 48))
    assert set(data.labels[va].tolist()) == {0, 1, 2}  # stratified
    code, err = mars("train", "--data", d, "--epochs", "1", *MODEL, "--out", tmp_path / "run")
    assert code == 0, err


def test_empty_val_folder_falls_back_to_a_slice_of_train(tmp_path):
    data = _tiny_data()
    root = tmp_path / "d"
    for split, idx in (("train", range(32)), ("val", range(0)), ("test", range(32, 48))):
        (root / split).mkdir(parents=True)
        idx = list(idx)
        for m, x in data["features"].items():
            np.save(root / split / f"{m}.npy", x[idx].numpy().reshape(len(idx), 4))
        np.save(root / split / "labels.npy", data["labels"][idx].numpy())
    (root / "meta.json").write_text(json.dumps({"task": "classification", "modalities": ["a", "b"], "num_classes": 3}))
    tr, va, te = load_feature_dir(root, standardize=False)
    assert (len(tr), len(va), len(te)) == (24, 8, 16)
    code, err = mars("train", "--data", root, "--epochs", "1", *MODEL, "--out", tmp_path / "run")
    assert code == 0, err


def test_empty_test_split_is_refused_before_training(tmp_path):
    d = Path(write_feature_dir(tmp_path / "d", _tiny_data(), splits={"train": list(range(40)), "val": list(range(40, 48)),
                                                                      "test": []}))
    code, err = mars("train", "--data", d, "--epochs", "1", *MODEL, "--out", tmp_path / "run")
    assert_error(code, err, str(d / "splits.json"), '"test" is empty')
    assert not (tmp_path / "run").exists()
    three = Path(write_feature_dir(tmp_path / "three", _tiny_data(n=3)))
    code, err = mars("train", "--data", three, "--epochs", "1", *MODEL, "--out", tmp_path / "run")
    assert_error(code, err, str(three / "labels.npy"), "test split would be empty")
    assert not (tmp_path / "run").exists()


def test_train_refuses_empty_splits_given_in_memory(tmp_path, data_dir):
    tr, va, te = load_feature_dir(data_dir)
    cfg = TrainConfig(epochs=1, model=model_config(d_model=8, d_hidden=8, num_experts=2))
    with pytest.raises(ValueError, match="the validation split is empty"):
        train(cfg, tmp_path / "run", data=(tr, va.subset(torch.arange(0)), te), progress=False)
    assert not (tmp_path / "run").exists()


# -------------------------------------------------- 6. corrupt or mismatched run files
def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _config_edit(**changes):
    def edit(p: Path):
        cfg = json.loads(p.read_text())
        for key, value in changes.items():
            target = cfg["model"] if key in cfg["model"] else cfg
            target[key] = value
        p.write_text(json.dumps(cfg))
    return edit


CORRUPTIONS = {
    "checkpoint truncated": ("checkpoint.pt", _truncate, "truncated or corrupt"),
    "checkpoint random": ("checkpoint.pt", lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "not a checkpoint"),
    "checkpoint empty": ("checkpoint.pt", lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "checkpoint deleted": ("checkpoint.pt", lambda p: p.unlink(), "file not found"),
    "checkpoint a directory": ("checkpoint.pt", lambda p: (p.unlink(), p.mkdir()), "is a directory"),
    "checkpoint byte flipped": ("checkpoint.pt", lambda p: _flip_weight(p), "checksum of record"),
    "checkpoint not a dict": ("checkpoint.pt", lambda p: torch.save([1, 2], p), "not a dict"),
    "checkpoint wrong shapes": ("checkpoint.pt", lambda p: torch.save(_reshaped(p), p), "do not fit the model"),
    "config invalid JSON": ("config.json", lambda p: p.write_text('{"epochs": 1,'), "invalid JSON"),
    "config wrong type": ("config.json", _config_edit(epochs="1"), "epochs: expected int"),
    "config out of range": ("config.json", _config_edit(lr=-1.0), "lr: must be a finite number > 0"),
    "config other method": ("config.json", _config_edit(method="late_fusion"),
                            "model.num_experts: is not used by late-fusion"),
    "config other precision": ("config.json", _config_edit(precision="bf16"), "precision: 'bf16' here"),
    "config unknown key": ("config.json", _config_edit(colour="blue"), "unknown keys ['colour']"),
    "config deleted": ("config.json", lambda p: p.unlink(), "file not found"),
    "config binary": ("config.json", lambda p: p.write_bytes(b"\xff\xfe\x00"), "not UTF-8"),
}


def _flip(data: bytes, at: int, mask: int = 0x5A) -> bytes:
    b = bytearray(data)
    b[at] ^= mask
    return bytes(b)


def _flip_weight(p: Path) -> None:
    """Flip a byte inside a tensor's data record (torch.load alone would not notice)."""
    import struct
    import zipfile

    with zipfile.ZipFile(p) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 16)
    data = p.read_bytes()
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    p.write_bytes(_flip(data, info.header_offset + 30 + name_len + extra_len + 3))


def _reshaped(p: Path) -> dict:
    state = torch.load(p, weights_only=True)
    for weights in (state["model"], state["best"]["state"]):
        name = next(k for k, v in weights.items() if v.dim() == 2)
        weights[name] = torch.zeros(3, 3)
    return state


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_or_mismatched_run_files_are_clear_errors(run, case):
    name, corrupt, expected = CORRUPTIONS[case]
    corrupt(run / name)
    for args in (["eval", run], ["train", "--resume", run, "--quiet"]):
        code, err = mars(*args)
        assert_error(code, err, str(run / name), expected)


def test_unreadable_checkpoint_is_a_clear_error(run, monkeypatch):
    ckpt = run / "checkpoint.pt"
    if AS_ROOT:  # permissions do not stop root: the read fails as it would for another user
        real = rundir.zipfile.ZipFile

        def denied(file, *args, **kwargs):
            if Path(file) == ckpt:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real(file, *args, **kwargs)

        monkeypatch.setattr(rundir.zipfile, "ZipFile", denied)
    ckpt.chmod(0)
    try:
        for args in (["eval", run], ["train", "--resume", run, "--quiet"]):
            code, err = mars(*args)
            assert_error(code, err, str(ckpt), "cannot read it (Permission denied)")
    finally:
        ckpt.chmod(0o644)


# -------------------------------------------------- 7. torn metrics line
def test_resume_drops_a_torn_last_metrics_line(run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "loss": {"ta')  # an append cut short
    code, err = mars("train", "--resume", run, "--epochs", "2", "--quiet")
    assert code == 0, err
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_bad_metrics_line_before_the_last_names_the_line(run):
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text("not json\n" + text)
    code, err = mars("train", "--resume", run, "--epochs", "2", "--quiet")
    assert_error(code, err, str(run / "metrics.jsonl"), "line 1")


# -------------------------------------------------- 8. options given with --resume
def test_resume_refuses_other_options_and_extends_with_epochs(run, capsys):
    before = snapshot(run)
    code, err = mars("train", "--resume", run, "--epochs", "5", "--lr", "0.5", "--method", "late-fusion", "--out", "X")
    assert_error(code, err, "--resume", "--lr, --method, --out cannot be given", "--epochs")
    assert snapshot(run) == before and not Path("X").exists()
    code, err = mars("train", "--resume", run, "--epochs", "0", "--quiet")
    assert_error(code, err, "--epochs", "at least 1")
    code, err = mars("train", "--resume", run, "--epochs", "2", "--quiet")
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert rundir.load_checkpoint(run / "checkpoint.pt", resume=True)["epoch"] == 2
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--resume RUN_DIR takes only --epochs" in " ".join(capsys.readouterr().out.split())


# -------------------------------------------------- 9. non-finite values
@pytest.mark.parametrize("kwargs, field", [
    (dict(lr=float("inf")), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=0.0), "lr"),
    (dict(weight_decay=float("nan")), "weight_decay"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(seed=-1), "seed"), (dict(seed=2**70), "seed"), (dict(epochs=True), "epochs"),
    (dict(model=dict(dropout=float("nan"))), "model.dropout"), (dict(model=dict(dropout=1.0)), "model.dropout"),
    (dict(model=dict(mars=dict(lambda_imit=float("inf")))), "model.mars.lambda_imit"),
    (dict(model=dict(mars=dict(lambda_balance=-5.0))), "model.mars.lambda_balance"),
    (dict(model=dict(method="moe_retriever", retriever=dict(lambda_gate=float("nan")))), "model.retriever.lambda_gate"),
    (dict(model=dict(mars=dict(sigma_0=float("inf")))), "model.mars.sigma_0"),
    (dict(model=dict(mars=dict(sigma_max=-1.0))), "model.mars.sigma_max"),
    (dict(model=dict(mars=dict(sigma_const=float("nan")))), "model.mars.sigma_const"),
    (dict(model=dict(lambda_unimodal=10**400)), "model.lambda_unimodal"),
    (dict(model=dict(method="mce", mars=dict(sigma_0=2.0))), "model.mars.sigma_0"),  # an option mce does not read
    (dict(model=dict(num_experts=0)), "model.num_experts"), (dict(model=dict(fusion_heads=0)), "model.fusion_heads"),
])
def test_config_values_must_be_finite_and_in_range(kwargs, field):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**kwargs)
    assert info.value.field == field


def test_non_finite_weights_after_an_epoch_stop_training_and_are_never_saved(tmp_path, data_dir, monkeypatch):
    real = train_mod._train_epoch

    def poisoned(net, model, opt, train_set, protocol, gen, cfg, ctx, epoch, ckpt_path):
        losses = real(net, model, opt, train_set, protocol, gen, cfg, ctx, epoch, ckpt_path)
        if epoch == 1:  # the last step of epoch 2 left an infinite weight; its loss was finite
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")
        return losses

    monkeypatch.setattr(train_mod, "_train_epoch", poisoned)
    code, err = mars("train", "--data", data_dir, "--epochs", "3", *MODEL, "--out", tmp_path / "run")
    assert code == 3 and "weights became NaN or infinite in epoch 2" in err, err
    state = rundir.load_checkpoint(tmp_path / "run" / "checkpoint.pt", resume=True)  # checks finiteness
    assert state["epoch"] == 1 and state["best"]["epoch"] == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


# -------------------------------------------------- 10. failed writes
def test_disk_full_keeps_the_last_checkpoint_and_leaves_no_tmp(tmp_path, data_dir, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's checkpoint
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(rundir.torch, "save", save)
    run = tmp_path / "run"
    code, err = mars("train", "--data", data_dir, "--epochs", "2", *MODEL, "--out", run)
    assert_error(code, err, str(run / "checkpoint.pt"), "No space left on device")
    assert not (run / "checkpoint.pt.tmp").exists()
    assert rundir.load_checkpoint(run / "checkpoint.pt", resume=True)["epoch"] == 1
    monkeypatch.setattr(rundir.torch, "save", real_save)
    code, err = mars("train", "--resume", run, "--quiet")
    assert code == 0, err
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_atomic_write_removes_its_tmp_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    rundir.write_json(target, {"old": 1})

    def boom(f):
        f.write(b"{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        rundir.atomic_write_bytes(target, boom)
    assert info.value.filename == str(target)
    assert json.loads(target.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["f.json"]


def test_read_only_output_is_a_clear_error(run, tmp_path, data_dir, monkeypatch):
    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    before = snapshot(run)
    monkeypatch.setattr(rundir, "open", read_only_open, raising=False)
    code, err = mars("train", "--resume", run, "--epochs", "2", "--quiet")
    assert_error(code, err, str(run), "Read-only file system")
    assert snapshot(run) == before
    monkeypatch.undo()

    def no_mkdir(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", no_mkdir)
    code, err = mars("train", "--data", data_dir, "--epochs", "1", *MODEL, "--out", tmp_path / "new" / "run")
    assert_error(code, err, str(tmp_path / "new"), "Read-only file system")


@pytest.mark.skipif(AS_ROOT, reason="file permissions do not stop root")
def test_out_in_a_read_only_directory_is_a_clear_error(tmp_path, data_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = mars("train", "--data", data_dir, "--epochs", "1", *MODEL, "--out", ro / "run")
        assert_error(code, err, str(ro / "run"), "Permission denied")
    finally:
        ro.chmod(0o755)


# -------------------------------------------------- 11. options out of range
@pytest.mark.parametrize("args, option, expected", [
    (["compare", "--seeds", "0"], "--seeds", "must be >= 1"),
    (["train", "--experts", "0"], "--experts", "must be >= 1"),
    (["train", "--d-model", "0"], "--d-model", "must be >= 1"),
    (["train", "--seed", str(2**70)], "--seed", "must be an integer in [0, 2**62]"),
    (["train", "--lambda-balance", "-5"], "--lambda-balance", "finite number >= 0"),
    (["train", "--batch-size", "0"], "--batch-size", "must be >= 1"),
    (["train", "--epochs", "-1"], "--epochs", "must be >= 1"),
    (["train", "--lr", "inf"], "--lr", "finite number > 0"),
    (["train", "--dropout", "nan"], "--dropout", "must be in [0, 1)"),
    (["train", "--sigma-max", "inf"], "--sigma-max", "finite number >= 0"),
    (["train", "--k", "3", "--experts", "2"], "--k", "must be in [1, num_experts=2]"),
])
def test_out_of_range_options_name_the_option(tmp_path, args, option, expected):
    code, err = mars(*args, "--quiet", "--out", tmp_path / "out")
    assert_error(code, err, f"mars: error: {option}: ", expected)
    assert not (tmp_path / "out").exists()


def test_huge_num_classes_is_refused_without_allocating(tmp_path):
    d = Path(write_feature_dir(tmp_path / "d", _tiny_data()))
    meta = json.loads((d / "meta.json").read_text())
    meta["num_classes"] = 10**12
    (d / "meta.json").write_text(json.dumps(meta))
    code, err = mars("train", "--data", d, "--epochs", "1", *MODEL, "--out", tmp_path / "run")
    assert_error(code, err, str(d), "num_classes=1000000000000", "parameters")
    assert not (tmp_path / "run").exists()


# -------------------------------------------------- fuzz: eval and resume of damaged runs
_FILES = ("checkpoint.pt", "config.json", "metrics.jsonl")
_damage = st.lists(st.tuples(st.sampled_from(_FILES), st.sampled_from(("truncate", "flip", "delete", "append")),
                             st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=3)
_fuzz_runs = itertools.count()


def _apply(run: Path, name: str, op: str, where: float, byte: int) -> None:
    p = run / name
    if not p.exists():
        return
    data = p.read_bytes()
    at = min(int(len(data) * where), len(data) - 1)
    if op == "delete":
        p.unlink()
    elif op == "truncate":
        p.write_bytes(data[: int(len(data) * where)])
    elif op == "flip" and data:
        p.write_bytes(_flip(data, at, byte))
    elif op == "append":
        p.write_bytes(data + bytes([byte]) * 7)


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damage=_damage)
def test_fuzz_damaged_run_directories_never_give_a_traceback(base_run, tmp_path, damage):
    run = tmp_path / f"run{next(_fuzz_runs)}"
    shutil.copytree(base_run, run)
    for d in damage:
        _apply(run, *d)
    try:
        for args in (["eval", run], ["train", "--resume", run, "--quiet"]):
            code, err = mars(*args)
            if code != 0:
                assert_error(code, err)
    finally:
        shutil.rmtree(run, ignore_errors=True)


# -------------------------------------------------- 12. hostile data for every method
def _tiny(method: str) -> list[str]:
    """The small-run options that ``method`` reads (an option it does not read is refused)."""
    extra = {"mars": ["--experts", "2"], "vanilla-moe": ["--experts", "2"], "mce": ["--mce-teacher-epochs", "1"],
             "moe-retriever": ["--retriever-candidates", "2", "--retriever-shared", "1", "--retriever-k", "2"]}
    return MODEL_ANY + extra.get(method, [])
ALL_METHODS = ("mars", "vanilla-moe", "late-fusion", "moe-retriever", "mce", "backbone")


def test_a_modality_name_with_a_dot_trains_and_evaluates_with_every_method(tmp_path):
    data = _tiny_data(n=24)
    data["features"] = {"audio.v2": data["features"]["a"], "audio_v2": data["features"]["b"]}
    d = Path(write_feature_dir(tmp_path / "d", data))
    for method in ALL_METHODS:
        out = tmp_path / method
        code, err = mars("train", "--data", d, "--epochs", "1", *_tiny(method), "--method", method, "--out", out)
        assert code == 0, (method, err)
        state = rundir.load_checkpoint(out / "checkpoint.pt", resume=False)
        assert any("audio%2Ev2" in k for k in state["best"]["state"]), method  # the escaped module name
        code, err = mars("eval", out)
        assert code == 0, (method, err)


def test_a_segmentation_batch_with_only_ignored_pixels_adds_zero_loss(tmp_path):
    from mars.components import cross_entropy

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    ignored = torch.full((2, 4, 4), 255)
    loss = cross_entropy(logits, ignored, 255)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    some = ignored.clone()
    some[0, :2] = 1
    expected = torch.nn.functional.cross_entropy(logits, some, ignore_index=255)
    assert torch.allclose(cross_entropy(logits, some, 255), expected)  # the mean over labelled pixels, as before
    g = torch.Generator().manual_seed(0)
    labels = (torch.arange(24) % 3)[:, None, None].repeat(1, 4, 4)
    labels[::2] = 255  # half the samples have no labelled pixel: batch size 1 meets them
    d = Path(write_feature_dir(tmp_path / "seg", {
        "features": {m: torch.randn(24, 2, 4, 4, generator=g) for m in ("a", "b")}, "labels": labels,
        "num_classes": 3, "task": "segmentation", "ignore_index": 255}))
    for method in ("mars", "mce"):
        code, err = mars("train", "--data", d, "--epochs", "1", *_tiny(method), "--batch-size", "1", "--method", method,
                         "--out", tmp_path / method)
        assert code == 0, (method, err)


# -------------------------------------------------- 13. limits checked up front, bounded plots
def _many_modalities(root: Path, M: int) -> Path:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 3
    feats = {f"m{i}": torch.randn(24, 2, generator=g) + labels[:, None].float() for i in range(M)}
    return Path(write_feature_dir(root, {"features": feats, "labels": labels, "num_classes": 3}))


def test_too_many_modalities_are_refused_before_anything_is_written(tmp_path):
    d = _many_modalities(tmp_path / "d21", 21)
    code, err = mars("train", "--data", d, "--epochs", "1", *MODEL, "--out", tmp_path / "run")
    assert_error(code, err, str(d), "21 modalities", "at most 20")
    assert not (tmp_path / "run").exists()


def test_the_expert_usage_heatmap_is_bounded_for_many_missing_patterns(tmp_path):
    import struct
    import time

    from mars.plots import MAX_USAGE_ROWS, plot_usage

    patterns = 2**14 - 1  # 14 modalities
    g = torch.Generator().manual_seed(0)
    counts = (torch.rand(patterns, 8, generator=g) * 10).round()
    counts[123] = 1000  # the pattern with the most tokens is shown
    usage = (counts / counts.sum(1, keepdim=True).clamp(min=1)).tolist()
    names = [f"p{i}" for i in range(patterns)]
    start = time.time()
    plot_usage(usage, names, tmp_path / "u.png", title="t", counts=counts.tolist())
    assert time.time() - start < 20
    width, height = struct.unpack(">II", (tmp_path / "u.png").read_bytes()[16:24])  # the PNG's IHDR
    assert height <= 120 * (0.14 * MAX_USAGE_ROWS + 2) and width < 2000
    plot_usage(usage[:5], names[:5], tmp_path / "small.png")  # few patterns: all shown, as before


# -------------------------------------------------- 14. output that is not UTF-8
def test_a_non_utf8_data_path_prints_on_a_strict_utf8_stdout(tmp_path, data_dir, monkeypatch):
    name = os.fsdecode(b"d\xffata")  # a surrogate escape, as sys.argv holds it
    shutil.copytree(data_dir, tmp_path / name)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr("sys.stdout", stdout)
    code = cli.main(["train", "--data", str(tmp_path / name), "--epochs", "1", *MODEL, "--out", str(tmp_path / "run")])
    assert code == 0
    stdout.flush()
    assert b"d\\udcffata" in stdout.buffer.getvalue() and b"run directory:" in stdout.buffer.getvalue()
    assert (tmp_path / "run" / "score_by_observed.png").exists() and (tmp_path / "run" / "expert_usage.png").exists()


# -------------------------------------------------- 15. one writer per run directory
def test_a_second_writer_is_refused_with_the_holders_pid(run, data_dir, tmp_path):
    before = snapshot(run)
    held = rundir.RunLock.acquire(run)  # another writer (a second open file description: flock conflicts)
    try:
        for args in (["train", "--data", data_dir, "--epochs", "1", *MODEL, "--out", run, "--overwrite"],
                     ["train", "--resume", run, "--epochs", "2", "--quiet"]):
            code, err = mars(*args)
            assert_error(code, err, f"mars: error: {run} is in use by process {os.getpid()}")
        assert snapshot(run) == before and siblings(run) == []
        empty = tmp_path / "empty"
        empty.mkdir()
        held_empty = rundir.RunLock.acquire(empty)  # a new run starting there
        code, err = mars("train", "--data", data_dir, "--epochs", "1", *MODEL, "--out", empty)
        assert_error(code, err, f"{empty} is in use by process {os.getpid()}")
        held_empty.release()
    finally:
        held.release()
    code, err = mars("train", "--resume", run, "--epochs", "2", "--quiet")
    assert code == 0, err
    assert rundir.load_checkpoint(run / "checkpoint.pt", resume=True)["epoch"] == 2


def test_concurrent_train_and_overwrite_and_a_killed_writers_lock(data_dir, tmp_path):
    """The reliability issue's repro: a run training in another process; --overwrite (and --resume) of it
    are refused with its PID instead of mixing two runs' files; once it is killed, its lock blocks nothing."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "ow"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mars.cli", "train", "--data", str(data_dir), "--epochs", "100000",
                             *MODEL, "--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        code, err = mars("train", "--data", data_dir, "--epochs", "2", "--seed", "5", *MODEL, "--out", run, "--overwrite")
        assert_error(code, err, f"{run} is in use by process {proc.pid}")
        code, err = mars("train", "--resume", run, "--quiet")
        assert_error(code, err, f"{run} is in use by process {proc.pid}")
        assert json.loads((run / "config.json").read_text())["seed"] == 0 and siblings(run) == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    done = rundir.load_checkpoint(run / "checkpoint.pt", resume=True)["epoch"]
    code, err = mars("train", "--resume", run, "--epochs", done + 1, "--quiet")  # the dead process's lock: no block
    assert code == 0, err
    code, err = mars("train", "--data", data_dir, "--epochs", "1", "--seed", "5", *MODEL, "--out", run, "--overwrite")
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["seed"] == 5 and siblings(run) == []
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_overwrite_is_one_atomic_exchange(run, data_dir, monkeypatch):
    calls = []
    real = rundir._exchange

    def exchange(a, b):
        calls.append((a.parent, b))
        return real(a, b)

    monkeypatch.setattr(rundir, "_exchange", exchange)
    code, err = mars("train", "--data", data_dir, "--epochs", "1", "--seed", "3", *MODEL, "--out", run, "--overwrite")
    assert code == 0, err
    assert calls == [(run.parent, run)]
    assert json.loads((run / "config.json").read_text())["seed"] == 3 and siblings(run) == []


class _Killed(BaseException):
    """Stands in for SIGKILL between the two renames (no handler runs for it)."""


@pytest.mark.parametrize("next_command", ["eval", "resume", "overwrite"])
def test_an_overwrite_killed_between_its_renames_is_completed_by_the_next_command(run, data_dir, monkeypatch,
                                                                                  next_command):
    # where renameat2(RENAME_EXCHANGE) is unavailable the swap is two renames under a journal
    monkeypatch.setattr(rundir, "_exchange", lambda a, b: False)
    real_rename, seen = os.rename, []

    def rename(src, dst):
        seen.append(Path(dst))
        if len(seen) == 3:  # 1: the journal into place, 2: the old run aside, 3: the new run in
            raise _Killed()
        return real_rename(src, dst)

    monkeypatch.setattr(rundir.os, "rename", rename)
    with pytest.raises(_Killed):
        mars("train", "--data", data_dir, "--epochs", "1", "--seed", "7", *MODEL, "--out", run, "--overwrite")
    monkeypatch.setattr(rundir.os, "rename", real_rename)
    assert not run.exists()  # no run at --out: both runs only in hidden siblings, and the journal
    assert any(n.startswith(".run.old-") for n in siblings(run)) and ".run.swap" in siblings(run)
    args = {"eval": ["eval", run], "resume": ["train", "--resume", run, "--epochs", "2", "--quiet"],
            "overwrite": ["train", "--data", data_dir, "--epochs", "1", "--seed", "8", *MODEL, "--out", run,
                          "--overwrite"]}[next_command]
    code, err = mars(*args)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["seed"] == (8 if next_command == "overwrite" else 7)
    assert siblings(run) == []


def test_recovery_of_every_interrupted_swap_state(tmp_path):
    def make(state):
        root = tmp_path / state
        root.mkdir()
        target, old, new = root / "run", root / ".run.old-0000000a", root / ".run.new-0000000b"
        for d, seed in ((target, 0), (old, 0), (new, 1)):
            d.mkdir()
            (d / "config.json").write_text(json.dumps({"seed": seed}))
        (root / ".run.swap").write_text(json.dumps({"target": "run", "old": old.name, "new": new.name}))
        return root, target, old, new

    cases = {"before the first rename": lambda t, o, n: shutil.rmtree(o),
             "between the renames": lambda t, o, n: shutil.rmtree(t),
             "after the second rename": lambda t, o, n: (shutil.rmtree(t), n.rename(t)),
             "the new run gone": lambda t, o, n: (shutil.rmtree(t), shutil.rmtree(n))}
    for state, damage in cases.items():
        root, target, old, new = make(state.replace(" ", "_"))
        damage(target, old, new)
        assert rundir.recover_interrupted_swap(target)
        want = 0 if state == "the new run gone" else 1
        assert json.loads((target / "config.json").read_text())["seed"] == want, state
        assert sorted(os.listdir(root)) == ["run"], state
    # a journal naming anything but the run's own siblings is refused, not followed
    root, target, old, new = make("hostile")
    (root / ".run.swap").write_text(json.dumps({"target": "run", "old": "../../etc", "new": new.name}))
    with pytest.raises(rundir.RunFileError, match="not a replacement journal"):
        rundir.recover_interrupted_swap(target)
    assert old.exists() and new.exists()


def test_out_through_a_symlink_writes_at_its_target_and_keeps_the_link(base_run, data_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    shutil.copytree(base_run, real / "run")
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "run"
    link.symlink_to(real / "run")
    code, err = mars("train", "--data", data_dir, "--epochs", "1", "--seed", "4", *MODEL, "--out", link, "--overwrite")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real / "run")
    assert json.loads((real / "run" / "config.json").read_text())["seed"] == 4
    assert sorted(os.listdir(real)) == ["run"] and sorted(os.listdir(tmp_path / "links")) == ["run"]
    (real / "fresh").mkdir()
    (tmp_path / "links" / "fresh").symlink_to(real / "fresh")
    code, err = mars("train", "--data", data_dir, "--epochs", "1", *MODEL, "--out", tmp_path / "links" / "fresh")
    assert code == 0, err
    assert (real / "fresh" / "checkpoint.pt").exists() and (tmp_path / "links" / "fresh").is_symlink()


def test_compare_overwrite_accepts_its_own_expert_usage_plots(tmp_path, data_dir):
    out = tmp_path / "cmp"
    args = ["compare", "--data", data_dir, "--epochs", "1", *MODEL, "--seeds", "1", "--methods", "mars", "--out", out]
    code, err = mars(*args)
    assert code == 0, err
    assert (out / "expert_usage_mars.png").exists()
    code, err = mars(*args, "--overwrite")
    assert code == 0, err
    assert (out / "expert_usage_mars.png").exists() and siblings(out) == []
    (out / "expert_usage_notes.txt").write_text("mine")  # not a compare file: still refused
    code, err = mars(*args, "--overwrite")
    assert_error(code, err, str(out), "not a mars compare directory")


# -------------------------------------------------- 16. the run's data: absolute, fingerprinted
def test_eval_and_resume_read_the_runs_data_from_any_directory_and_refuse_changed_data(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    write_feature_dir(a / "data", _tiny_data(seed=0))
    write_feature_dir(b / "data", _tiny_data(seed=1))  # another folder's data/
    monkeypatch.chdir(a)
    code, err = mars("train", "--data", "data", "--epochs", "1", *MODEL, "--out", "run")
    assert code == 0, err
    assert json.loads((a / "run" / "config.json").read_text())["data"] == str(a / "data")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["eval", "run"]) == 0
    here = out.getvalue().splitlines()[0].split(" mean over subsets ")[1]
    monkeypatch.chdir(b)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["eval", str(a / "run")]) == 0
    assert out.getvalue().splitlines()[0].split(" mean over subsets ")[1] == here  # a's data, not b's
    # the data changed after training: eval and resume refuse it, naming the data
    x = np.load(a / "data" / "a.npy")
    x[0, 0] += 1e-3
    np.save(a / "data" / "a.npy", x)
    for args in (["eval", a / "run"], ["train", "--resume", a / "run", "--epochs", "2", "--quiet"]):
        code, err = mars(*args)
        assert_error(code, err, f"{a / 'data'}: is not the data the run", "fingerprint")


def test_a_run_without_a_fingerprint_is_checked_by_its_standardisation(run, data_dir, tmp_path, monkeypatch):
    # a run from before fingerprints: a relative --data in config.json, no fingerprint in the checkpoint
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["data_fingerprint"]
    config = json.loads((run / "config.json").read_text())
    config["data"] = state["config"]["data"] = "data"
    torch.save(state, run / "checkpoint.pt")
    (run / "config.json").write_text(json.dumps(config))
    shutil.copytree(data_dir, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    code, err = mars("eval", run)
    assert code == 0, err
    shutil.rmtree(tmp_path / "data")
    write_feature_dir(tmp_path / "data", _tiny_data(seed=3))  # another data/ in this folder
    for args in (["eval", run], ["train", "--resume", run, "--epochs", "2", "--quiet"]):
        code, err = mars(*args)
        assert_error(code, err, "data: is not the data the run", "differs")


def test_resume_of_a_folder_that_is_no_run_leaves_no_lock_file(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    code, err = mars("train", "--resume", tmp_path / "notes", "--quiet")
    assert_error(code, err, str(tmp_path / "notes" / "config.json"), "file not found")
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]
