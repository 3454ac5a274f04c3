"""Rules every op shares, written once: the dtype routing math runs in, the
selection order of top-k, and how random draws are made. Used by the
pure-PyTorch twins, the fake implementations and the Triton launchers alike."""
from __future__ import annotations

import torch

__all__ = ["compute_dtype", "topk_order", "randn", "rand"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routing and reduction math runs in: float64 stays, every other
    float dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_order(values: torch.Tensor, m: int) -> torch.Tensor:
    """Indices [T, m] of the m largest entries per row of ``values`` [T, E].

    Descending by value, ties to the lower index, NaN ranked as +inf.
    """
    key = torch.where(torch.isnan(values), torch.full_like(values, float("inf")), values)
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :m]


def _generator(generator: torch.Generator | None) -> dict:
    # Passed only when given: under torch.compile(dynamic=True) the generator
    # overload of randn/rand (even with None) needs concrete sizes.
    return {} if generator is None else {"generator": generator}


def randn(*size, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """``torch.randn(*size, generator=generator, **kwargs)``, traceable with symbolic sizes."""
    return torch.randn(*size, **_generator(generator), **kwargs)


def rand(*size, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """``torch.rand(*size, generator=generator, **kwargs)``, traceable with symbolic sizes."""
    return torch.rand(*size, **_generator(generator), **kwargs)
