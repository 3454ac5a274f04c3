"""Timing, environment capture and JSON output shared by the benchmark scripts.

CPU timings use ``torch.utils.benchmark.Timer.adaptive_autorange`` (warm-up,
then repeated blocks until the median is stable); GPU timings use
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). Every
figure a script prints is a ratio against a peer measured in the same run.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def median_seconds(fn, device: torch.device, min_run_time: float = 0.3) -> float:
    """Median wall time of ``fn()`` in seconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    from torch.utils.benchmark import Timer

    fn()  # warm-up (first-call allocations, lazy init)
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return m.adaptive_autorange(min_run_time=min_run_time).median


def training_step(opt, loss_fn):
    """A closure running one optimiser step on ``loss_fn()`` (for timing)."""
    def run():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    return run


def interleaved_medians(fns: dict, device: torch.device, rounds: int = 9) -> dict:
    """Median seconds of each callable in ``fns``, timed round-robin (one call
    of each per round) so that drifting machine load hits every peer alike.
    GPU: triton's do_bench per callable."""
    if device.type == "cuda":
        return {name: median_seconds(fn, device) for name, fn in fns.items()}
    import statistics
    import time

    for fn in fns.values():
        fn()  # warm-up
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def exact_rss_env() -> dict:
    """Environment under which glibc returns every allocation above 64 KiB to
    the OS on free, so the resident set tracks live memory and peak-RSS figures
    compare fairly (otherwise glibc keeps freed heap pages, hiding the peaks of
    code that allocates many mid-sized tensors). It slows allocation, so use it
    for memory measurements only, in a separate process."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")


def peak_memory_bytes(fn, device: torch.device) -> int | None:
    """Peak memory one call of ``fn`` adds on top of what is already live.

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux): the process's peak
    resident set (VmHWM), reset through /proc/self/clear_refs before the call;
    None where that is not available."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_bytes("VmRSS")
        fn()
        return max(_proc_status_bytes("VmHWM") - base, 0)
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores visible, {torch.get_num_threads()} threads)"
    env.update(cpu_identity())
    return env


#: The CPU flags that decide which GEMM and vector code paths run (recorded
#: next to every figure: machines of one name differ in these).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def cpu_identity() -> dict:
    """The CPU's model name and its ISA flags from ISA_FLAGS (Linux: from
    /proc/cpuinfo; elsewhere what platform reports, flags unknown)."""
    model, flags = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.processor() or platform.machine()):
                    model = value.strip()
                elif key == "flags" and flags is None:
                    present = set(value.split())
                    flags = [flag for flag in ISA_FLAGS if flag in present]
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": flags}


def write_results(name: str, env: dict, rows: list[dict], out: str | None = None) -> Path:
    """Write ``{"environment": env, "results": rows}`` to benchmarks/results/."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if "cuda" in env else "cpu"
    path = Path(out) if out else RESULTS_DIR / f"{name}_{tag}.json"
    if path.exists():  # replace only earlier results (never a file a benchmark did not write)
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            earlier = None
        if path.is_dir() or not (isinstance(earlier, dict) and set(earlier) == {"environment", "results"}):
            raise SystemExit(f"{path}: exists and is not a benchmark results file; choose another --out")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": env, "results": rows}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _width(header: str) -> int:
    return max(len(header), 9)


def print_header(columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    print("  ".join(h.rjust(_width(h)) for _, h, _ in columns), flush=True)


def print_rows(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    for r in rows:
        cells = ("-" if r.get(k) is None else format(r[k], f) for k, _, f in columns)
        print("  ".join(c.rjust(_width(h)) for c, (_, h, _) in zip(cells, columns)), flush=True)
