"""Which implementation runs an op: the backend names and the backend table.

A *backend* is what a user picks: ``auto | reference | triton | cuda | cpu``,
per call (``backend=`` on every op), per module (the layers' ``backend``
argument) or process-wide (``MARS_KERNELS_BACKEND``); the first one given
wins. :func:`resolve` turns it into a concrete backend for a device, once per
module call: it returns a :class:`Resolved` name, which the layers hand to
their sub-modules and ops, and which :func:`resolve` then returns as it is
(so a ``SparseMoE`` call resolves once, not once per op).

``auto`` picks ``cuda`` (then ``triton``) for CUDA tensors and ``cpu`` for CPU
tensors. Without the compiled extension (not built, or not loaded:
``MARS_KERNELS_NO_EXTENSION=1``) it takes ``triton`` for CUDA tensors when
Triton is installed, and otherwise falls back to ``reference`` with a one-time
warning; on a GPU the build has no code for (e.g. one newer than its PTX) it
takes ``triton``, with a one-time warning. A backend asked for explicitly that
cannot run raises instead of silently falling back: ``cpu`` and ``cuda`` need
the extension, ``triton`` only the triton package (and CUDA tensors, or
``TRITON_INTERPRET=1`` for CPU tensors).

The *table* (:data:`TABLE`) says, per op family and backend, which
implementation runs:

* ``"torch"``: the op's pure-PyTorch twin (in its module under ``mars_kernels.ops``);
* ``"compiled"``: ``torch.ops.mars_kernels.*``, the C++ kernels for CPU tensors
  and the CUDA kernels for CUDA tensors (``csrc/``);
* ``"triton"``: ``torch.ops.mars_triton.*``, the Triton launchers
  (``mars_kernels/ops/triton/``).

Where the ``cuda`` column says ``"triton"`` the op has no hand-written CUDA
kernel and ``backend="cuda"`` runs its Triton kernels: stated here, not
hidden in the op. A (backend, op) pair missing from the table raises.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import library

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
ENV_VAR = "MARS_KERNELS_BACKEND"
#: Set to 1 to run without the compiled extension even where it is built (only
#: the reference and Triton backends then); setup.py reads it too, to skip the build.
NO_EXTENSION_VAR = "MARS_KERNELS_NO_EXTENSION"

#: op family -> {backend: implementation}.
TABLE: dict[str, dict[str, str]] = {
    "topk_gating": dict(reference="torch", cpu="compiled", cuda="compiled", triton="triton"),
    "router_stats": dict(reference="torch", cpu="compiled", cuda="compiled", triton="triton"),
    "noisy_topk_gating": dict(reference="torch", cpu="compiled", cuda="compiled", triton="triton"),
    "mars_routing": dict(reference="torch", cpu="compiled", cuda="compiled", triton="triton"),
    # The twins of the dispatch metadata and row moves are sync-free on a GPU too.
    "moe_align": dict(reference="torch", cpu="compiled", cuda="compiled", triton="torch"),
    "permute": dict(reference="torch", cpu="compiled", cuda="compiled", triton="torch"),
    "unpermute": dict(reference="torch", cpu="compiled", cuda="compiled", triton="torch"),
    "grouped_mlp": dict(reference="torch", cpu="compiled", cuda="triton", triton="triton"),
    "moe_mlp": dict(reference="torch", cpu="compiled", cuda="triton", triton="triton"),
    "modality_attention": dict(reference="torch", cpu="compiled", cuda="triton", triton="triton"),
    "residual_norm_mean": dict(reference="torch", cpu="compiled", cuda="triton", triton="triton"),
}

#: Rows per block of the dispatch metadata (``moe_align``'s ``block_size``) that
#: each backend's expert MLP expects: the Triton kernels tile expert rows by it.
EXPERT_BLOCK_SIZE = dict(reference=64, cpu=64, cuda=64, triton=64, meta=64)

#: The backend :func:`resolve` gives tensors on the ``meta`` device, whatever
#: was asked: shapes only, through the ops' fake implementations (or the torch
#: twins without the extension). No kernel ever reads a meta tensor.
META = "meta"

_extension_error: str | None = None
if os.environ.get(NO_EXTENSION_VAR, "0").lower() in ("1", "true", "yes", "on"):
    _extension_error = f"not loaded ({NO_EXTENSION_VAR}={os.environ[NO_EXTENSION_VAR]})"
else:
    try:
        # Loading it registers the CPU (and CUDA) kernels of torch.ops.mars_kernels.*,
        # whose schemas the op modules declare after this (see mars_kernels.library).
        from . import _C  # noqa: F401
    except ImportError as exc:  # the build is optional
        _extension_error = str(exc)

# Whether the compiled CUDA kernels hold code GPU `device` can run (the CUDA
# build registers the kernel, csrc/cuda/gating_binding.cpp; no tensor argument,
# so it runs whatever the dispatch keys).
library.register("cuda_kernels_run_on(int device) -> bool")

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def extension_available() -> bool:
    """True when mars_kernels._C (the compiled CPU, and maybe CUDA, ops) is loaded."""
    return _extension_error is None


# Availability is fixed for the life of the process: looked up once (plain
# module state rather than functools.cache, which torch.compile warns about).
_available: dict[str, bool] = {}


def cuda_ops_available() -> bool:
    """True when the extension was built with its CUDA kernels."""
    if "cuda" not in _available:
        _available["cuda"] = extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "mars_kernels::topk_gating_fwd", "CUDA"
        )
    return _available["cuda"]


def cuda_kernels_run_on(device: torch.device) -> bool:
    """Whether the compiled CUDA kernels hold code this GPU can run (the
    matching SASS, or PTX its driver can JIT-compile). A build for sm_80/sm_90
    with compute_90 PTX runs on Hopper, Ampere and newer GPUs; older GPUs, or a
    build restricted by TORCH_CUDA_ARCH_LIST, may have none."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = f"cuda-arch-{index}"
    if key not in _available:
        _available[key] = bool(torch.ops.mars_kernels.cuda_kernels_run_on(index))
    return _available[key]


def triton_available() -> bool:
    if "triton" not in _available:
        try:
            import triton  # noqa: F401
        except ImportError:
            _available["triton"] = False
        else:
            _available["triton"] = True
    return _available["triton"]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class Resolved(str):
    """A concrete backend name that :func:`resolve` checked for tensors of one
    device type (``device_type``). It is the plain name to everything else
    (compares, hashes and prints as ``"cpu"``, ``"triton"``, ...); given to
    :func:`resolve` again for that device type, it is returned as it is."""

    def __new__(cls, name: str, device_type: str):
        self = super().__new__(cls, name)
        self.device_type = device_type
        return self

    def __reduce__(self):
        return Resolved, (str(self), self.device_type)


# One object per (name, device type), made up front: torch.compile traces
# resolve() and reads these as constants (nothing is created while tracing).
_RESOLVED = {(name, device_type): Resolved(name, device_type)
             for name in (*BACKENDS[1:], META) for device_type in ("cpu", "cuda", "meta")}


def check_name(backend: str | None) -> str | None:
    """A backend name as a module or call accepts it (None: decide later)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def resolve(backend: str | None, device: torch.device) -> Resolved:
    """The concrete backend (never ``auto``) to run on tensors on ``device``.

    ``backend`` None means: ``MARS_KERNELS_BACKEND`` if set, else ``auto``. A
    :class:`Resolved` name for ``device``'s type (what this returns) is
    returned unchanged: a layer resolves once per call and hands the result on.
    """
    if isinstance(backend, Resolved) and backend.device_type == device.type:
        return backend
    name = _resolve(backend, device)
    resolved = _RESOLVED.get((name, device.type))
    return resolved if resolved is not None else Resolved(name, device.type)


def _resolve(backend: str | None, device: torch.device) -> str:
    """:func:`resolve`'s decision, as a plain name."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if requested not in BACKENDS and requested != META:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {requested!r}")
    if device.type == "meta":
        return META
    if requested == META:
        raise ValueError(f"backend {META!r} is what meta tensors resolve to; got tensors on {device}")
    on_cuda = device.type == "cuda"
    if requested == "auto":
        if on_cuda:
            if cuda_ops_available():
                if cuda_kernels_run_on(device):
                    return "cuda"
                if triton_available():
                    warn_once(f"arch-{device}", f"mars_kernels: the compiled CUDA kernels have no code for {device} "
                              f"(compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}; "
                              "rebuild with TORCH_CUDA_ARCH_LIST naming it); using the Triton kernels")
                    return "triton"
            if triton_available():
                return "triton"
        elif device.type == "cpu" and extension_available():
            return "cpu"
        warn_once(
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
        if not cuda_kernels_run_on(device):
            raise RuntimeError(f"backend='cuda': the compiled CUDA kernels have no code for {device}; rebuild with "
                               "TORCH_CUDA_ARCH_LIST naming its compute capability, or use backend='triton'")
    elif requested == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install 'mars-kernels[triton]')")
        if not on_cuda and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on {device} "
                "(set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"
            )
    return requested


def implementation(op: str, backend: str) -> str:
    """What runs ``op`` on the concrete ``backend``: "torch", "compiled" or "triton"."""
    if backend == META:  # the ops' fakes propagate shapes without kernels (with or without _C)
        if op not in TABLE:
            raise ValueError(f"mars_kernels has no op {op!r} (see mars_kernels.backend.TABLE)")
        return "compiled"
    try:
        return TABLE[op][backend]
    except KeyError:
        raise ValueError(f"mars_kernels has no {backend!r} implementation of {op!r} (see mars_kernels.backend.TABLE)") from None
