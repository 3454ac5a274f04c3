"""Residual + LayerNorm + mean over modalities, the end of the MARS fusion
(DESIGN 3), as one op.

After the modality attention and its out-projection y, the fusion adds the
(missing-filled) tokens, applies a LayerNorm and averages over the M
modalities. In PyTorch that is a where, an add, a LayerNorm and a mean over
[P, T, M, D] tensors, forward and backward: memory-bound passes that cost more
than the attention itself. The compiled kernels do one pass per position.
"""
from __future__ import annotations

import torch

from . import _validate as check
from . import backend as _backend
from . import reference
from ._autograd import ResidualNormMean

__all__ = ["residual_norm_mean"]


def residual_norm_mean(
    y: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    missing: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """z = mean over modalities of LayerNorm(y + x) -> [T, D] (or [P, T, D]).

    h [T, M, D] are the tokens and x = h, except that with ``missing`` [M, D]
    and ``observed`` [T, M] bool (both or neither) row (t, m) of x is
    missing[m] wherever observed[t, m] is false. y [T, M, D] is added (in MARS:
    the modality attention after its out-projection). LayerNorm over D with
    ``weight`` and ``bias`` [D] and ``eps``, as ``nn.LayerNorm(D, eps)``.

    Several masks in one call: ``observed`` [P, T, M] with y [P, T, M, D]
    gives z [P, T, D]; h's gradient is summed over the masks in the kernel.
    Gradients flow to y, h, weight, bias and missing.

    Math in float32 (float64 for float64); all tensors share h's dtype. The
    cuda backend runs the Triton kernels. See
    :func:`mars_kernels.reference.residual_norm_mean`.
    """
    check.tensor(h, "h")
    if h.dim() != 3 or h.shape[1] < 1 or h.shape[2] < 1:
        raise ValueError(f"h must be 3-D [T, M, D] with M, D >= 1, got shape {tuple(h.shape)}")
    if h.dtype not in check.FLOAT_DTYPES:
        raise TypeError(f"h must be float16, bfloat16, float32 or float64, got {h.dtype}")
    T, M, D = h.shape
    if (missing is None) != (observed is None):
        raise ValueError("missing and observed must be given together (or neither)")
    lead = (T,)
    tensors = {"h": h, "y": y, "weight": weight, "bias": bias}
    if observed is not None:
        lead = check.masks(observed, T, M)
        check.tensor(missing, "missing")
        check.shape(missing, (M, D), "missing", "[M, D]")
        tensors.update(missing=missing, observed=observed)
    check.tensor(y, "y")
    check.shape(y, (*lead, M, D), "y", "[T, M, D]" if len(lead) == 1 else "[P, T, M, D]")
    for name in ("weight", "bias"):
        check.tensor(tensors[name], name)
        check.shape(tensors[name], (D,), name, "[D]")
    for name, t in tensors.items():
        if name != "observed" and t.dtype != h.dtype:
            raise TypeError(f"{name} must have h's dtype ({h.dtype}), got {t.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    check.same_device(tensors)
    name = _backend.resolve(backend, h.device)
    if name == "reference":
        return reference.residual_norm_mean(y, h, weight, bias, missing, observed, float(eps))
    if missing is not None:
        missing, observed = missing.contiguous(), observed.contiguous()
    z, _, _ = ResidualNormMean.apply(
        y.contiguous(), h.contiguous(), weight.contiguous(), bias.contiguous(), missing, observed, float(eps),
        "triton" if name == "cuda" else name,
    )
    return z
