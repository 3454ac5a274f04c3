"""Data-parallel ``mars train`` on 2 CPU processes (Gloo): it matches the
single-process run, a dead worker stops the other with a clear error within
the timeout, and ``--resume`` after a kill loses no completed epoch."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with Gloo")

REPO = Path(__file__).resolve().parents[1]
# on the CPU also where a GPU is present (--device auto would train the single-process runs there)
SMALL = ["--d-model", "32", "--d-hidden", "32", "--experts", "4", "--quiet", "--device", "cpu"]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("WORLD_SIZE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), "-m", "mars.cli", "train", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _single(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mars.cli", "train", *args], env=_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_two_processes_match_one_process(tmp_path):
    # No dropout, no balance term (it is computed per rank's tokens): the same
    # global batch then gives the same gradients up to the order of float sums.
    args = ["--method", "vanilla-moe", "--epochs", "2", "--dropout", "0", "--lambda-balance", "0", *SMALL]
    two = _torchrun([*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    one = _single([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip(_metrics(tmp_path / "two"), _metrics(tmp_path / "one"), strict=True):
        assert a["loss"]["task"] == pytest.approx(b["loss"]["task"], rel=1e-5)
        assert a["val_mean"] == pytest.approx(b["val_mean"], abs=2e-3)
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s2["test_mean"] == pytest.approx(s1["test_mean"], abs=2e-3)
    # only rank 0 printed the results table
    assert two.stdout.count("test score, mean over all") == 1


def _launch_rank(rank: int, port: int, args: list[str], timeout_s: float) -> subprocess.Popen:
    env = _env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               MARS_DIST_TIMEOUT=timeout_s)
    return subprocess.Popen([sys.executable, "-m", "mars.cli", "train", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_worker_stops_the_other_and_resume_loses_no_epoch(tmp_path):
    run = tmp_path / "run"
    args = ["--method", "vanilla-moe", "--epochs", "40", *SMALL, "--out", str(run)]
    timeout_s = 30.0
    port = _free_port()
    procs = [_launch_rank(r, port, args, timeout_s) for r in (0, 1)]
    try:
        deadline = time.time() + 180
        while len(_metrics(run)) < 2 if (run / "metrics.jsonl").exists() else True:
            assert time.time() < deadline, "training did not complete two epochs in time"
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, err = procs[0].communicate(timeout=timeout_s + 60)
        assert time.time() - killed_at < timeout_s + 60
        assert procs[0].returncode == 4, err[-2000:]
        assert "a peer process failed or timed out" in err and "--resume" in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    done = _metrics(run)
    completed = len(done)
    assert [r["epoch"] for r in done] == list(range(1, completed + 1))
    config = json.loads((run / "config.json").read_text())
    config["epochs"] = completed + 1  # finish quickly: one more epoch
    (run / "config.json").write_text(json.dumps(config))
    resumed = _torchrun(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    import torch

    epoch_in_checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)["epoch"]
    assert epoch_in_checkpoint == completed + 1
    assert [r["epoch"] for r in _metrics(run)] == list(range(1, completed + 2))


def test_expert_parallel_training_matches_one_process_and_saves_a_single_process_checkpoint(tmp_path):
    args = ["--method", "vanilla-moe", "--epochs", "2", "--dropout", "0", "--lambda-balance", "0", *SMALL]
    ep = _torchrun([*args, "--expert-parallel", "--out", str(tmp_path / "ep")])
    assert ep.returncode == 0, ep.stderr[-3000:]
    one = _single([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip(_metrics(tmp_path / "ep"), _metrics(tmp_path / "one"), strict=True):
        assert a["loss"]["task"] == pytest.approx(b["loss"]["task"], rel=1e-5)
    s_ep = json.loads((tmp_path / "ep" / "summary.json").read_text())
    s_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s_ep["parameters"] == s_one["parameters"]  # the full model, not one rank's shard
    # the checkpoint holds the gathered experts: single-process eval reads it as is
    evaluated = subprocess.run([sys.executable, "-m", "mars.cli", "eval", str(tmp_path / "ep")], env=_env(),
                               capture_output=True, text=True, timeout=120, cwd=REPO)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"test mean over subsets {s_ep['test_mean']:.4f}" in evaluated.stdout
    # resuming needs the same number of processes (each rank's optimiser state is saved)
    config = json.loads((tmp_path / "ep" / "config.json").read_text())
    config["epochs"] = 3
    (tmp_path / "ep" / "config.json").write_text(json.dumps(config))
    alone = _single(["--resume", str(tmp_path / "ep")])
    assert alone.returncode == 2 and "resume it with 2 processes, not 1" in alone.stderr
    resumed = _torchrun(["--resume", str(tmp_path / "ep")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in _metrics(tmp_path / "ep")] == [1, 2, 3]


def _tiny_dir(root: Path) -> Path:
    import torch

    from mars.data import write_feature_dir

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(48) % 3
    feats = {m: torch.randn(48, 4, generator=g) + labels[:, None].float() for m in ("a", "b")}
    return Path(write_feature_dir(root, {"features": feats, "labels": labels, "num_classes": 3}))


@pytest.mark.parametrize("experts", [3, 5])
def test_expert_parallel_with_an_expert_count_the_world_size_does_not_divide(tmp_path, experts):
    # The ranks own 2 + 1 (E = 3) or 3 + 2 (E = 5) experts: their routing tables differ in length, and DDP used
    # to broadcast them (a collective mismatch that aborted rank 1, also on --resume).
    data = _tiny_dir(tmp_path / "d")
    run = tmp_path / "run"
    args = ["--data", str(data), "--method", "vanilla-moe", "--experts", str(experts), "--k", "1", "--epochs", "1",
            "--d-model", "8", "--d-hidden", "8", "--batch-size", "16", "--quiet", "--device", "cpu", "--expert-parallel"]
    first = _torchrun([*args, "--out", str(run)])
    assert first.returncode == 0, first.stderr[-3000:]
    if experts == 3:
        resumed = _torchrun(["--resume", str(run), "--epochs", "2"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert [r["epoch"] for r in _metrics(run)] == [1, 2]


def test_expert_parallel_with_fewer_experts_than_processes_is_refused_before_writing(tmp_path):
    # checked before any collective and before --out is touched (no process group needed to see it)
    from mars.config import ConfigError, ModelConfig, TrainConfig
    from mars.distributed import DistContext
    from mars.train import train

    data = _tiny_dir(tmp_path / "d")
    cfg = TrainConfig(data=str(data), epochs=1, expert_parallel=True,
                      model=ModelConfig(method="moe", d_model=8, d_hidden=8, num_experts=1, k=1))
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path / "run", progress=False, ctx=DistContext(rank=0, world=2))
    assert info.value.field == "model.num_experts", info.value
    assert "over 2 processes needs at least 2 experts" in info.value.message
    assert not (tmp_path / "run").exists()
    # a method without one set of experts: refused by the configuration itself
    with pytest.raises(ConfigError) as info:
        TrainConfig(data=str(data), epochs=1, expert_parallel=True,
                    model=ModelConfig(method="late_fusion", d_model=8, d_hidden=8))
    assert info.value.field == "expert_parallel" and "shards the experts of mars, vanilla-moe" in info.value.message
    assert not (tmp_path / "run").exists()
