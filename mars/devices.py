"""Where a run computes: the device (``--device``) and the precision (``--precision``).

Devices. ``auto`` is ``cuda`` when ``torch.cuda.is_available()`` (under
torchrun: when every process of the node gets its own GPU, i.e.
``LOCAL_WORLD_SIZE <= torch.cuda.device_count()``), else ``cpu``. ``cuda``
is the current CUDA device of a single process and ``cuda:LOCAL_RANK`` for
each process under torchrun; ``cuda:N`` names one GPU (single process only).
A device this machine does not have is a :class:`mars.config.ConfigError` of
the field ``device`` (``mars: error: --device: ...``, exit code 2), raised
before anything is written. A run's ``config.json`` stores the resolved
spelling (``cpu``, ``cuda`` or ``cuda:N``, never ``auto``), so a resumed run
stays where it was unless ``--resume RUN --device ...`` moves it.

The CPU and CUDA paths are the same code with another ``torch.device``: the
splits are moved to the device once, the batches are indexed there, the
missingness masks and the batch order are drawn on the CPU by the run's
``torch.Generator`` and then moved (so a CPU and a GPU run draw the same
masks), evaluation runs on the device, and checkpoints hold CPU tensors.

Precision. ``fp32`` runs everything in float32. ``bf16`` runs the forward
pass and the loss under ``torch.autocast(device_type, dtype=torch.bfloat16)``
(matmuls and convolutions in bfloat16; the fused ops get every argument in
the activations' dtype, see :func:`mars.components.as_dtype`); the weights,
their gradients and the optimiser state stay float32 (master weights), and no
loss scaling is needed for bfloat16. Evaluation runs under the same autocast.

Determinism on CUDA (:func:`set_up_device`): ``torch.backends.cudnn.benchmark
= False``, ``torch.backends.cudnn.deterministic = True``,
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless already set) and
``torch.use_deterministic_algorithms(True, warn_only=True)``: PyTorch picks its
deterministic implementation where it has one and warns where it has none.
Nothing of this is set for a CPU run.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .config import PRECISIONS, ConfigError, check_device_spec

__all__ = ["resolve_device", "stored_device", "autocast", "set_up_device", "check_precision", "cuda_rng_state",
           "set_cuda_rng_state", "memory_bytes"]


def _no_cuda() -> str:
    version = torch.__version__
    why = "this torch is built without CUDA" if torch.version.cuda is None else "no usable CUDA GPU was found"
    return (f"CUDA is not available on this machine ({why}: torch {version}, torch.cuda.is_available() is False); "
            "expected cpu or auto")


def _local_world(world: int) -> int:
    try:
        return int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        return world


def resolve_device(spec: str, *, world: int = 1, local_rank: int = 0, saved_in=None) -> torch.device:
    """The ``torch.device`` this process computes on for ``--device spec``,
    with ``world`` processes of which this one has ``local_rank`` on its node.
    Raises :class:`ConfigError` (field ``device``) for a device this machine
    does not have; ``saved_in`` names the ``config.json`` that ``spec`` comes
    from (a run being resumed or evaluated), for the message."""
    try:
        return _resolve(spec, world, local_rank)
    except ConfigError as e:
        if saved_in is None:
            raise
        raise ConfigError("device", f"the run was trained on {spec} ({saved_in}), but {e.message}; give --device "
                                    "cpu (or another device this machine has) to run it there") from None


def _resolve(spec: str, world: int, local_rank: int) -> torch.device:
    spec = check_device_spec(spec)
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if spec == "auto":
        if not available or (world > 1 and _local_world(world) > count):
            return torch.device("cpu")
        spec = "cuda"
    if not available:
        raise ConfigError("device", _no_cuda())
    _, _, index = spec.partition(":")
    if world > 1:
        if index:
            raise ConfigError("device", f"under torchrun each process uses cuda:LOCAL_RANK; expected cuda, got {spec}")
        if local_rank >= count:
            raise ConfigError("device", f"this process has LOCAL_RANK {local_rank}, but this machine has {count} CUDA "
                                        f"device(s); expected at most {count} processes per node, or cpu")
        return torch.device("cuda", local_rank)
    if index:
        if int(index) >= count:
            names = "cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}"
            raise ConfigError("device", f"{spec}: this machine has {count} CUDA device(s) ({names})")
        return torch.device("cuda", int(index))
    return torch.device("cuda", torch.cuda.current_device())


def stored_device(spec: str, device: torch.device) -> str:
    """What ``config.json`` records for ``--device spec`` resolved to
    ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (``auto`` is resolved)."""
    spec = check_device_spec(spec)
    if spec == "auto":
        return device.type
    return spec


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 on a GPU that has no bfloat16 is a :class:`ConfigError`."""
    if precision not in PRECISIONS:
        raise ConfigError("precision", f"must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision", f"{torch.cuda.get_device_name(device)} has no bfloat16 support; expected fp32")


def autocast(device: torch.device, precision: str):
    """The context of a forward pass and its loss: ``torch.autocast`` to
    bfloat16 for ``bf16``, nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_up_device(device: torch.device) -> None:
    """Make ``device`` this process's current CUDA device and ask PyTorch for
    deterministic CUDA algorithms (see the module docstring); nothing on CPU."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA RNG state of ``device`` (dropout and routing noise draw from
    it on a GPU), None on CPU."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_cuda_rng_state(device: torch.device, state: torch.Tensor | None, seed: int) -> None:
    """Restore the CUDA RNG of ``device`` from ``state``, or, when the run
    comes from another device (no state saved), seed it with ``seed``."""
    if device.type != "cuda":
        return
    if state is not None:
        torch.cuda.set_rng_state(state, device)
    else:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def memory_bytes(device: torch.device) -> int:
    """The memory a model on ``device`` can use: the GPU's, or the machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        return 1 << 40
