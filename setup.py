"""Builds mars_kernels._C, the ``cpu`` and ``cuda`` backends.

The CPU ops are always compiled. The CUDA ops (csrc/cuda) are added when the
installed torch has CUDA and nvcc is found, unless MARS_KERNELS_NO_CUDA=1.
The extension is optional: without a C++ compiler, or if the build fails, the
package still installs, with the reference and Triton backends (a warning at
import says so when ``auto`` falls back to the reference path).
MARS_KERNELS_NO_EXTENSION=1 skips the build altogether (and makes an
installed package ignore an extension built earlier); MARS_KERNELS_STRICT_BUILD=1
makes a missing compiler or a failed build an error instead.

GPU architectures: TORCH_CUDA_ARCH_LIST when set (torch's own variable, e.g.
"9.0" for one H100 machine), else DEFAULT_CUDA_ARCHS: SASS for sm_80 and sm_90
plus compute_90 PTX, which newer GPUs (Blackwell) JIT-compile. CMakeLists.txt
uses the same default.

CPU instruction set: MARS_KERNELS_MARCH when set (empty: none). Otherwise an
in-place build (`pip install -e .`, `setup.py build_ext --inplace`) targets
this machine (-march=native), and any other build (a wheel: `pip wheel .`,
`python -m build`) the portable PORTABLE_MARCH baseline, so the wheel runs on
any x86-64 CPU of the last fifteen years.

Use `pip install --no-build-isolation -e .` so the build sees the installed torch.
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
PORTABLE_MARCH = "x86-64-v2"
_X86 = platform.machine() in ("x86_64", "AMD64")


def _march(in_place: bool) -> str:
    """The -march value: MARS_KERNELS_MARCH, else native in place / portable otherwise (x86-64 only)."""
    if "MARS_KERNELS_MARCH" in os.environ:
        return os.environ["MARS_KERNELS_MARCH"]
    if not _X86:
        return ""
    return "native" if in_place else PORTABLE_MARCH


def _compiler_missing() -> str | None:
    """Why there is no C++ compiler to build with (None when there is one)."""
    cxx = os.environ.get("CXX", "c++").split()
    if not cxx or shutil.which(cxx[0]) is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not found; set CXX)"
    return None


def _extensions() -> list:
    if _flag("MARS_KERNELS_NO_EXTENSION"):
        print("mars_kernels: MARS_KERNELS_NO_EXTENSION=1: not building the extension "
              "(reference and Triton backends only)")
        return []
    missing = _compiler_missing()
    if missing is not None:
        if _flag("MARS_KERNELS_STRICT_BUILD"):
            sys.exit(f"mars_kernels: {missing} and MARS_KERNELS_STRICT_BUILD=1")
        print(f"mars_kernels: {missing}: installing without the extension (reference and Triton backends only)")
        return []
    return [_extension()]


def _extension():
    sources = ["csrc/module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off"]  # -march is added at build time (in place or not)
    if not _flag("MARS_KERNELS_NO_OPENMP"):
        cxx.append("-fopenmp")
    if _flag("MARS_KERNELS_PHASE_PROFILE"):  # per-phase CPU-time profile (csrc/cpu/phase_profile.h), development only
        cxx.append("-DMARS_KERNELS_PHASE_PROFILE")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("MARS_KERNELS_NO_CUDA")
    common = dict(
        name="mars_kernels._C",
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [],
        optional=not _flag("MARS_KERNELS_STRICT_BUILD"),
    )
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_binding.cpp"))
        # torch's builder turns TORCH_CUDA_ARCH_LIST into -gencode flags; none are given here,
        # so a user's list is honoured and ours is only the default.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        nvcc = ["-O3", "-std=c++17"]
        nvcc += os.environ.get("MARS_KERNELS_NVCC_FLAGS", "").split()
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)


class BuildWithoutStaleExtension(BuildExtension.with_options(use_ninja=True)):
    """Removes a previously built in-place mars_kernels/_C*.so first, so a
    failed optional build falls back to the reference path instead of
    silently loading old kernels; adds -march for the kind of build."""

    def run(self):
        for stale in glob.glob(os.path.join("mars_kernels", "_C*.so")) + glob.glob(os.path.join("mars_kernels", "_C*.pyd")):
            os.remove(stale)
        # Read here: setuptools' build_ext.run clears `inplace` while it builds
        # (it builds elsewhere, then copies), so build_extensions would always
        # see a portable build for `setup.py build_ext --inplace`.
        self._in_place = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extensions(self):
        in_place = getattr(self, "_in_place", False)
        march = _march(in_place)
        if march:
            for ext in self.extensions:
                args = ext.extra_compile_args
                (args["cxx"] if isinstance(args, dict) else args).append(f"-march={march}")
        print(f"mars_kernels: building the CPU kernels with {'-march=' + march if march else 'no -march'}"
              f" ({'in place' if in_place else 'portable build'})")
        try:
            super().build_extensions()
        except Exception as exc:  # noqa: BLE001 - torch's builder raises RuntimeError, not a distutils error
            if not all(ext.optional for ext in self.extensions):
                raise
            # The extension is optional (see the module docstring): install without it.
            print(f"mars_kernels: building the extension failed ({type(exc).__name__}: {str(exc)[-2000:]}); "
                  "installing without it (reference and Triton backends only; "
                  "MARS_KERNELS_STRICT_BUILD=1 makes this an error)", file=sys.stderr)


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildWithoutStaleExtension})
