"""Argument checks shared by the public ops. Each error names the argument,
what it got and what was expected."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def float_matrix(t, name: str) -> torch.Tensor:
    """A 2-D floating tensor (float16, bfloat16, float32 or float64)."""
    tensor(t, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def logits(t, name: str = "logits") -> torch.Tensor:
    """Router logits [T, E] with E >= 1."""
    float_matrix(t, name)
    if t.shape[1] < 1:
        raise ValueError(f"{name} must have at least one expert column [T, E>=1], got shape {tuple(t.shape)}")
    return t


def top_k(k, num_experts: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"{name} must be in [1, E={num_experts}], got {k}")
    return k


def same_device(named: dict[str, torch.Tensor | None]) -> None:
    """Every tensor argument on one device (``meta`` included: a meta weight
    next to CPU activations is an error, not garbage). None entries are skipped."""
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def integer_tensor(t, name: str) -> torch.Tensor:
    """An int32/int64 tensor (expert ids, counts)."""
    tensor(t, name)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
    return t


def generator(g, device: torch.device | None = None) -> torch.Generator | None:
    """None or a torch.Generator (on ``device``'s type when given)."""
    if g is None:
        return None
    if not isinstance(g, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(g).__name__}")
    if device is not None and device.type != "meta" and g.device.type != device.type:
        raise ValueError(f"generator must be on the tensors' device type {device.type}, got a {g.device.type} generator")
    return g


def values_in_range(t: torch.Tensor, low: int, high: int, name: str, what: str) -> None:
    """Raise if an integer tensor holds values outside [low, high]. Checked on
    CPU tensors only: on a GPU it would cost a device-to-host sync (the
    kernels there rely on the producer), on meta there are no values."""
    if t.device.type != "cpu" or t.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi > high:
        raise ValueError(f"{name} must lie in {what}, got values in [{lo}, {hi}]")


def shape(t: torch.Tensor, expected: tuple[int, ...], name: str, meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def leading_shape(observed: torch.Tensor | None, T: int) -> tuple[int, ...]:
    """Leading shape of the fusion ops' per-instance tensors: (T,) without
    masks or with observed [T, M]; (P, T) with observed [P, T, M]."""
    return (T,) if observed is None else tuple(observed.shape[:-1])


def masks(observed, T: int, M: int) -> tuple[int, ...]:
    """Check observed [T, M] or [P, T, M] bool (P masks over T positions) ->
    :func:`leading_shape`."""
    tensor(observed, "observed")
    if observed.dim() == 3:
        shape(observed, (observed.shape[0], T, M), "observed", "[P, T, M]")
    else:
        shape(observed, (T, M), "observed", "[T, M] or [P, T, M]")
    if observed.dtype != torch.bool:
        raise TypeError(f"observed must be a bool tensor, got {observed.dtype}")
    return leading_shape(observed, T)


def integer(v, name: str, minimum: int | None = None) -> int:
    """A Python int (not a bool) >= ``minimum``."""
    if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an int{bound}, got {v!r}")
    return v


def positive_int(v, name: str) -> int:
    """A Python int >= 1 (not a bool)."""
    return integer(v, name, 1)


# A Python number, or the symbolic number torch.compile(dynamic=True) passes
# for one (a SymFloat has no math.isfinite: finiteness is checked by
# comparisons, which trace as guards).
_REAL = (int, float, torch.SymInt, torch.SymFloat)


def _finite(v) -> bool:
    return v == v and v != math.inf and v != -math.inf


def nonnegative_float(v, name: str, finite: bool = True):
    """A real number >= 0 (not a bool), finite unless ``finite=False``."""
    if isinstance(v, bool) or not isinstance(v, _REAL) or not v >= 0 or (finite and not _finite(v)):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number >= 0, got {v!r}")
    return v if isinstance(v, torch.SymFloat) else float(v)


def positive_float(v, name: str):
    if isinstance(v, bool) or not isinstance(v, _REAL) or not _finite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return v if isinstance(v, torch.SymFloat) else float(v)


def flag(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def no_nan_or_posinf(t: torch.Tensor, name: str) -> None:
    """Raise if ``t`` holds NaN or +inf (-inf, a masked expert, is allowed)."""
    if t.device.type == "meta":
        return
    bad = torch.isnan(t) | torch.isposinf(t)
    if bool(bad.any()):
        row = int(bad.any(dim=-1).nonzero()[0, 0])
        raise ValueError(f"{name} holds NaN or +inf (first in row {row}); only finite values or -inf are allowed")
