"""Compile checks for the CUDA sources; no GPU needed.

* Every ``csrc/cuda/*.cu`` file is compiled with ``nvcc -c -std=c++17 -O3`` for
  the build's default targets, Hopper (``sm_90`` plus ``compute_90`` PTX) and
  Ampere (``sm_80``), with the ``__CUDA_NO_HALF*``
  defines torch's extension builder passes (no implicit half / bfloat16
  conversions). Skipped when ``nvcc`` is not on PATH.
* Every ``csrc/cuda/*.cpp`` file (the torch bindings) is compiled by the host
  compiler against torch's headers and the CUDA runtime headers: to an object
  in C++17 and a syntax check (``g++ -fsyntax-only``) in C++20 (what torch's
  extension builder uses). Skipped when ``g++``, torch, torch's ``c10/cuda``
  headers or ``cuda_runtime.h`` cannot be found.
* Each binding declares the launchers of its ``.cu`` file itself (there is no
  shared header per op): every ``mars_kernels::cuda`` symbol the binding
  objects leave undefined must be defined by a ``.cu`` object, so a
  declaration that drifted from its definition fails here rather than when
  ``mars_kernels._C`` is loaded on a GPU machine. Needs ``nm``.

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
NM = shutil.which("nm")
# The build's default targets (setup.py DEFAULT_CUDA_ARCHS "8.0;9.0+PTX"):
# sm_90 SASS with compute_90 PTX, and sm_80 SASS.
ARCHS = {
    "sm_90+ptx": "arch=compute_90,code=[sm_90,compute_90]",
    "sm_80": "arch=compute_80,code=sm_80",
}
CXX_STDS = ("c++17", "c++20")
OBJECT_STD = "c++17"  # the bindings are compiled to objects in this standard (the symbol check reads them)
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


def _binding_command(src: Path, std: str, obj: Path | None = None) -> list[str] | str:
    """The g++ command for `src` (an object `obj`, or a syntax check), or a reason to skip."""
    if GXX is None:
        return "g++ not on PATH"
    torch_dirs = _torch_include_dirs()
    if not any((d / "c10" / "cuda" / "CUDAGuard.h").is_file() for d in torch_dirs):
        return "torch's c10/cuda headers not found"
    cuda_dirs = _cuda_include_dirs()
    if not cuda_dirs:
        return "cuda_runtime.h not found"
    cmd = [GXX, f"-std={std}", "-Wall"] + (["-c", "-O0", "-o", str(obj)] if obj else ["-fsyntax-only"])
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
            cmd = _binding_command(cpp, std, out_dir / f"{cpp.stem}.o" if std == OBJECT_STD else None)
            if isinstance(cmd, str):
                results[job] = cmd
            else:
                jobs[job] = cmd
    with ThreadPoolExecutor(max_workers=MAX_JOBS) as pool:
        futures = {job: pool.submit(_run, cmd) for job, cmd in jobs.items()}
        for job, fut in futures.items():
            results[job] = fut.result()
    results["out_dir"] = out_dir
    return results


def _symbols(obj: Path, defined: bool) -> set[str]:
    flag = "--defined-only" if defined else "--undefined-only"
    out = subprocess.run([NM, flag, str(obj)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


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


@pytest.mark.skipif(NM is None, reason="nm not on PATH")
def test_bindings_call_launchers_the_kernels_define(compile_results) -> None:
    """Every launcher a binding declares and calls (a mangled mars_kernels::cuda
    symbol it leaves undefined) is defined, with that exact signature, by the
    sm_90 object of some .cu file."""
    out = compile_results["out_dir"]
    jobs = [f"{cu.name}-sm_90+ptx" for cu in CU_FILES] + [f"{cpp.name}-{OBJECT_STD}" for cpp in CPP_FILES]
    for job in jobs:
        _check(compile_results, job)
    defined = set().union(*(_symbols(out / f"{cu.stem}.sm_90+ptx.o", True) for cu in CU_FILES))
    called = {}
    for cpp in CPP_FILES:
        for sym in _symbols(out / f"{cpp.stem}.o", False):
            if sym.startswith("_ZN12mars_kernels4cuda"):
                called[sym] = cpp.name
    assert called, "no launcher calls found in the bindings"
    missing = sorted(f"{where}: {sym}" for sym, where in called.items() if sym not in defined)
    assert not missing, "launchers declared by a binding but defined by no .cu file:\n" + "\n".join(missing)


def test_sources_found() -> None:
    """The globs above must see the gating kernels (guards against a moved tree)."""
    assert (CUDA_SRC / "gating.cu") in CU_FILES
    assert (CUDA_SRC / "gating_binding.cpp") in CPP_FILES
    # csrc/cuda/<op>.cu mirrors mars_kernels/ops/<op>.py, each with its binding.
    ops = ROOT / "mars_kernels" / "ops"
    for cu in CU_FILES:
        assert (ops / f"{cu.stem}.py").is_file(), f"{cu.name} has no op module ops/{cu.stem}.py"
        assert (CUDA_SRC / f"{cu.stem}_binding.cpp") in CPP_FILES, f"{cu.name} has no binding"
    for cpp in sorted((ROOT / "csrc" / "cpu").glob("*.cpp")):  # and csrc/cpu/<op>.cpp too
        assert (ops / f"{cpp.stem}.py").is_file(), f"csrc/cpu/{cpp.name} has no op module ops/{cpp.stem}.py"
