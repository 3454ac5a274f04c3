"""The one-shot GPU check: build, GPU test tier, GPU benchmarks and a short
training run, everything written to one folder. For a machine with an
H100/H200 (or any CUDA GPU), in under 10 minutes:

    bash benchmarks/gpu_check.sh OUT_DIR            # = python benchmarks/gpu_check.py OUT_DIR
    bash benchmarks/gpu_check.sh OUT_DIR --dry-run  # on CPU: checks the script itself (CI runs this)

Steps (each logged to OUT_DIR/<step>.log, with its time and exit status in
OUT_DIR/gpu_check.json next to the device name, driver, compute capability
and the torch / triton / CUDA / transformers versions):

1. ``environment``: nvidia-smi and the versions.
2. ``build``: ``pip install --no-build-isolation -e .`` with
   ``MARS_KERNELS_STRICT_BUILD=1`` (a failed CUDA build is an error here).
3. ``gpu_tier``: ``pytest -m gpu``: every backend (cuda, triton) and dtype on
   the GPU, the compiled-Triton modules, large and int64-offset shapes.
4. ``bench_gating``, ``bench_moe``, ``bench_mars``, ``bench_hf_experts``: the
   benchmark scripts in a quick GPU mode (``triton.testing.do_bench``, CUDA
   events), JSON into OUT_DIR: routing at T = 1M tokens against the copy
   bandwidth; SparseMoE bf16 at (16k, 2048, 1024, E=64, k=8) against the
   per-expert loop and grouped_mm; the MARS training step; the HF experts
   interface at Qwen3-30B-A3B's shape.
5. ``train``: ``mars train --device cuda --precision bf16 --epochs 3``.

A failed step does not stop the others; the exit status is 1 if any failed.
``--dry-run`` runs the same steps on CPU with tiny sizes and no rebuild, and
collects the GPU tier instead of running it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def versions() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            info["device_count"] = torch.cuda.device_count()
    except ImportError:
        info["torch"] = None
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    return info


def steps(out: Path, dry: bool, py: str) -> list[tuple[str, list[str], float]]:
    """(name, command, timeout seconds)."""
    bench = ROOT / "benchmarks"
    if dry:
        return [
            ("gpu_tier", [py, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"], 600),
            ("bench_gating", [py, str(bench / "bench_gating.py"), "--device", "cpu", "--T", "4096", "--E", "64",
                              "--k", "2", "--min-run-time", "0.05", "--out", str(out / "bench_gating.json")], 300),
            ("bench_moe", [py, str(bench / "bench_moe.py"), "--device", "cpu", "--T", "512", "--D", "64", "--H", "64",
                           "--E", "8", "--k", "2", "--rounds", "2", "--out", str(out / "bench_moe.json")], 300),
            ("bench_mars", [py, str(bench / "bench_mars.py"), "--device", "cpu", "--batch", "2", "--size", "8",
                            "--d-model", "32", "--d-hidden", "64", "--rounds", "2",
                            "--out", str(out / "bench_mars.json")], 300),
            ("bench_hf_experts", [py, str(bench / "bench_hf_experts.py"), "--device", "cpu", "--shapes", "decode-4",
                                  "--rounds", "1", "--out", str(out / "bench_hf_experts.json")], 300),
            ("train", [py, "-m", "mars.cli", "train", "--device", "cpu", "--precision", "bf16", "--epochs", "1",
                       "--quiet", "--out", str(out / "run")], 600),
        ]
    return [
        ("build", [py, "-m", "pip", "install", "--no-build-isolation", "-e", str(ROOT)], 900),
        ("gpu_tier", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                      "--junitxml", str(out / "gpu_tier.xml")], 1500),
        ("bench_gating", [py, str(bench / "bench_gating.py"), "--device", "cuda", "--T", "1048576", "--E", "64", "128",
                          "--k", "2", "8", "--out", str(out / "bench_gating.json")], 600),
        ("bench_moe", [py, str(bench / "bench_moe.py"), "--device", "cuda", "--dtype", "bfloat16", "--T", "16384",
                       "--D", "2048", "--H", "1024", "--E", "64", "--k", "8", "--out", str(out / "bench_moe.json")], 600),
        ("bench_mars", [py, str(bench / "bench_mars.py"), "--device", "cuda", "--out", str(out / "bench_mars.json")], 600),
        ("bench_hf_experts", [py, str(bench / "bench_hf_experts.py"), "--device", "cuda", "--shapes", "qwen3-30b-a3b",
                              "--out", str(out / "bench_hf_experts.json")], 600),
        ("train", [py, "-m", "mars.cli", "train", "--device", "cuda", "--precision", "bf16", "--epochs", "3",
                   "--quiet", "--out", str(out / "run")], 600),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (created; must be empty or new)")
    p.add_argument("--dry-run", action="store_true", help="on CPU, tiny sizes, no rebuild: checks the script")
    p.add_argument("--only", nargs="*", help="run only these steps")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        print(f"gpu_check: error: {out}: exists and is not empty", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    report = {"dry_run": a.dry_run, "environment": versions(), "steps": []}
    print(json.dumps(report["environment"], indent=1))
    if not a.dry_run and not report["environment"].get("cuda_available"):
        print("gpu_check: error: no CUDA GPU visible (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    env = dict(os.environ, MARS_KERNELS_STRICT_BUILD="1", PYTHONUNBUFFERED="1")
    failed = False
    for name, cmd, timeout in steps(out, a.dry_run, sys.executable):
        if a.only and name not in a.only:
            continue
        start = time.time()
        log = out / f"{name}.log"
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        seconds = round(time.time() - start, 1)
        tail = log.read_text().splitlines()[-3:]
        report["steps"].append({"step": name, "status": rc, "seconds": seconds, "log": log.name, "tail": tail})
        failed |= rc != 0
        print(f"{name:18s} {'ok' if rc == 0 else 'FAILED (' + str(rc) + ')':14s} {seconds:7.1f} s   {log}", flush=True)
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, out / "gpu_check.json")
    print(f"wrote {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
