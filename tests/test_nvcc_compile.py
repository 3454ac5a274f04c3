"""Compile checks for the CUDA sources; no GPU needed.

* Every ``csrc/cuda/*.cu`` file is compiled with ``nvcc -c -std=c++17 -O3`` for
  the build's default targets, Hopper (``sm_90`` plus ``compute_90`` PTX) and
  Ampere (``sm_80``), with the ``__CUDA_NO_HALF*``
  defines torch's extension builder passes (no implicit half / bfloat16
  conversions). Skipped when ``nvcc`` is not on PATH.
* Every ``csrc/cuda/*.cpp`` file (the torch bindings) gets a host-compiler
  syntax check (``g++ -fsyntax-only``) against torch's headers and the CUDA
  runtime headers, in C++17 and in C++20 (what torch's extension builder uses).
  Skipped when ``g++``, torch, torch's ``c10/cuda`` headers or
  ``cuda_runtime.h`` cannot be found.

All compilations run once per session, at most two at a time, in a pytest
temporary directory; each test then reports one of them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_SRC.glob("*.cu"))
CPP_FILES = sorted(CUDA_SRC.glob("*.cpp"))

NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
# The build's default targets (setup.py DEFAULT_CUDA_ARCHS "8.0;9.0+PTX"):
# sm_90 SASS with compute_90 PTX, and sm_80 SASS.
ARCHS = {
    "sm_90+ptx": "arch=compute_90,code=[sm_90,compute_90]",
    "sm_80": "arch=compute_80,code=sm_80",
}
CXX_STDS = ("c++17", "c++20")
# What torch.utils.cpp_extension adds to every nvcc command line.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
MAX_JOBS = 2
TIMEOUT_S = 600


def _nvcc_include_dirs() -> list[Path]:
    """The include directories nvcc itself passes to the host compiler."""
    if NVCC is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out = subprocess.run(
                [NVCC, "--dryrun", "-c", "probe.cu"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return []
    text = out.stdout + out.stderr
    dirs: list[Path] = []
    for line in text.splitlines():
        if "INCLUDES=" not in line:
            continue
        dirs += [Path(m) for m in re.findall(r'-I"?([^"\s]+)', line)]
        dirs += [Path(m) for m in re.findall(r'"-isystem"\s+"([^"]+)"', line)]
    return [d for d in dirs if d.is_dir()]


def _cuda_include_dirs() -> list[Path]:
    """Include dirs with cuda_runtime.h (plus nvcc's other host include dirs)."""
    candidates = _nvcc_include_dirs()
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    if not any((d / "cuda_runtime.h").is_file() for d in candidates):
        return []
    seen: list[Path] = []
    for d in candidates:
        if d.is_dir() and d not in seen:
            seen.append(d)
    return seen


def _torch_include_dirs() -> list[Path]:
    try:
        from torch.utils.cpp_extension import include_paths
    except Exception:  # pragma: no cover - torch is a hard dependency
        return []
    return [Path(p) for p in include_paths()]


def _binding_command(src: Path, std: str) -> list[str] | str:
    """The g++ syntax-check command for `src`, or a reason to skip."""
    if GXX is None:
        return "g++ not on PATH"
    torch_dirs = _torch_include_dirs()
    if not any((d / "c10" / "cuda" / "CUDAGuard.h").is_file() for d in torch_dirs):
        return "torch's c10/cuda headers not found"
    cuda_dirs = _cuda_include_dirs()
    if not cuda_dirs:
        return "cuda_runtime.h not found"
    cmd = [GXX, f"-std={std}", "-fsyntax-only", "-Wall"]
    # A CPU-only torch wheel ships c10/cuda headers but not the CMake-generated
    # c10/cuda/impl/cuda_cmake_macros.h; torch's headers know this switch.
    if not any((d / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for d in torch_dirs):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for d in torch_dirs + cuda_dirs:
        cmd += ["-isystem", str(d)]
    cmd.append(str(src))
    return cmd


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, -1, "", f"timed out after {exc.timeout} s")


@pytest.fixture(scope="session")
def compile_results(tmp_path_factory):
    """Runs every compile job (at most MAX_JOBS at a time) and maps job id ->
    CompletedProcess, or -> str (the reason the job was skipped)."""
    out_dir = tmp_path_factory.mktemp("nvcc")
    jobs: dict[str, list[str]] = {}
    results: dict[str, subprocess.CompletedProcess | str] = {}
    for cu in CU_FILES:
        for arch, gencode in ARCHS.items():
            job = f"{cu.name}-{arch}"
            if NVCC is None:
                results[job] = "nvcc not on PATH"
                continue
            jobs[job] = [
                NVCC, "-std=c++17", "-O3", *TORCH_NVCC_DEFINES, "-gencode", gencode,
                "-c", str(cu), "-o", str(out_dir / f"{cu.stem}.{arch}.o"),
            ]
    for cpp in CPP_FILES:
        for std in CXX_STDS:
            job = f"{cpp.name}-{std}"
            cmd = _binding_command(cpp, std)
            if isinstance(cmd, str):
                results[job] = cmd
            else:
                jobs[job] = cmd
    with ThreadPoolExecutor(max_workers=MAX_JOBS) as pool:
        futures = {job: pool.submit(_run, cmd) for job, cmd in jobs.items()}
        for job, fut in futures.items():
            results[job] = fut.result()
    return results


def _check(results, job: str) -> None:
    res = results[job]
    if isinstance(res, str):
        pytest.skip(res)
    assert res.returncode == 0, (
        f"{job} failed (exit {res.returncode}):\n$ {' '.join(res.args)}\n"
        f"{res.stdout}\n{res.stderr}"
    )


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(compile_results, cu: Path, arch: str) -> None:
    _check(compile_results, f"{cu.name}-{arch}")


@pytest.mark.parametrize("std", CXX_STDS)
@pytest.mark.parametrize("cpp", CPP_FILES, ids=lambda p: p.name)
def test_binding_syntax(compile_results, cpp: Path, std: str) -> None:
    _check(compile_results, f"{cpp.name}-{std}")


def test_sources_found() -> None:
    """The globs above must see the gating kernels (guards against a moved tree)."""
    assert (CUDA_SRC / "gating.cu") in CU_FILES
    assert (CUDA_SRC / "gating_binding.cpp") in CPP_FILES
