"""Builds mars_kernels._C.

The CPU ops are always compiled. The CUDA ops (csrc/cuda) are added when the
installed torch has CUDA and nvcc is found, unless MARS_KERNELS_NO_CUDA=1.
The extension is optional: if it cannot be built the package still installs
and falls back to the pure-PyTorch reference path with a warning at import.
Set MARS_KERNELS_STRICT_BUILD=1 to make a failed build an error instead.

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


def _extension():
    sources = ["csrc/module.cpp", "csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off"]
    march = os.environ.get("MARS_KERNELS_MARCH", "native" if platform.machine() in ("x86_64", "AMD64") else "")
    if march:
        cxx.append(f"-march={march}")
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
        nvcc = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]
        nvcc += os.environ.get("MARS_KERNELS_NVCC_FLAGS", "").split()
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)


class BuildWithoutStaleExtension(BuildExtension.with_options(use_ninja=True)):
    """Removes a previously built in-place mars_kernels/_C*.so first, so a
    failed optional build falls back to the reference path instead of
    silently loading old kernels."""

    def run(self):
        for stale in glob.glob(os.path.join("mars_kernels", "_C*.so")) + glob.glob(os.path.join("mars_kernels", "_C*.pyd")):
            os.remove(stale)
        super().run()


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildWithoutStaleExtension})
