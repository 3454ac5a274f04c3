"""Which implementation runs an op: ``auto | reference | triton | cuda | cpu``.

The choice is made per call (``backend=`` on every op), per module (the
``backend`` argument of the layers) and process-wide with the
``MARS_KERNELS_BACKEND`` environment variable; the first one given wins.

``auto`` picks ``cuda`` (then ``triton``) for CUDA tensors and ``cpu`` for CPU
tensors, and falls back to ``reference`` with a one-time warning when the
compiled extension is missing. An explicitly requested backend that cannot run
raises instead of silently falling back.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
ENV_VAR = "MARS_KERNELS_BACKEND"

_extension_error: str | None = None
try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.mars_kernels.*)
except ImportError as exc:  # the build is optional
    _extension_error = str(exc)

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def extension_available() -> bool:
    """True when mars_kernels._C (the compiled CPU, and maybe CUDA, ops) is loaded."""
    return _extension_error is None


def cuda_ops_available() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mars_kernels::topk_gating_fwd", "CUDA"
    )


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str | None, device: torch.device) -> str:
    """The concrete backend (never ``auto``) to run on tensors on ``device``.

    ``backend`` None means: ``MARS_KERNELS_BACKEND`` if set, else ``auto``.
    """
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if requested not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {requested!r}")
    on_cuda = device.type == "cuda"
    if requested == "auto":
        if on_cuda:
            if cuda_ops_available():
                return "cuda"
            if triton_available():
                return "triton"
        elif device.type == "cpu" and extension_available():
            return "cpu"
        _warn_once(
            f"fallback-{device.type}",
            f"mars_kernels: no compiled kernels for {device.type} tensors "
            f"({_extension_error or 'extension built without them'}); "
            "using the pure-PyTorch reference path (slow).",
        )
        return "reference"
    if requested == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        if not extension_available():
            raise RuntimeError(f"backend='cpu' needs the compiled extension mars_kernels._C: {_extension_error}")
    elif requested == "cuda":
        if not on_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not cuda_ops_available():
            raise RuntimeError("backend='cuda' needs mars_kernels._C built with CUDA (torch with CUDA and nvcc)")
    elif requested == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install 'mars-kernels[triton]')")
        if not on_cuda and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on {device} "
                "(set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"
            )
    return requested


def kernels(name: str):
    """The module holding a compiled backend's kernel-level ops (see csrc/ops.cpp)."""
    if name == "triton":
        from . import triton as triton_kernels

        return triton_kernels
    return torch.ops.mars_kernels
