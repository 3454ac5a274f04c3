"""Builds mars_kernels._C.

The CPU ops are always compiled. The CUDA ops (csrc/cuda) are added when the
installed torch has CUDA and nvcc is found, unless MARS_KERNELS_NO_CUDA=1.
The extension is optional: if it cannot be built the package still installs
and falls back to the pure-PyTorch reference path with a warning at import.
Set MARS_KERNELS_STRICT_BUILD=1 to make a failed build an error instead.

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


def _extension():
    sources = ["csrc/module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off"]  # -march is added at build time (in place or not)
    if not _flag("MARS_KERNELS_NO_OPENMP"):
        cxx.append("-fopenmp")
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
        super().run()

    def build_extensions(self):
        in_place = bool(self.inplace or getattr(self, "editable_mode", False))
        march = _march(in_place)
        if march:
            for ext in self.extensions:
                args = ext.extra_compile_args
                (args["cxx"] if isinstance(args, dict) else args).append(f"-march={march}")
        print(f"mars_kernels: building the CPU kernels with {'-march=' + march if march else 'no -march'}"
              f" ({'in place' if in_place else 'portable build'})")
        super().build_extensions()


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildWithoutStaleExtension})
