"""Residual + LayerNorm + mean over modalities, the end of the MARS fusion
(docs/design.md section 3), as one op.

After the modality attention and its out-projection y, the fusion adds the
(missing-filled) tokens, applies a LayerNorm and averages over the M
modalities. In PyTorch that is a where, an add, a LayerNorm and a mean over
[P, T, M, D] tensors, forward and backward: memory-bound passes that cost more
than the attention itself. The compiled kernels do one pass per position.

Kernel-level ops (schemas below, beside their callers): ``residual_norm_mean_fwd/_bwd``;
C++ in ``csrc/cpu/residual_norm.cpp``, Triton in
``ops/triton/residual_norm.py`` (also what ``cuda`` runs).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .. import checks as check
from .. import library
from .common import compute_dtype

__all__ = ["residual_norm_mean", "residual_norm_mean_torch"]


@functools.cache
def _launchers():
    """The Triton launchers, imported on first call (triton is optional)."""
    from .triton import residual_norm

    return residual_norm


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
    :func:`residual_norm_mean_torch`.
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
    check.nonnegative_float(eps, "eps", finite=False)
    check.same_device(tensors)
    impl = _backend.implementation("residual_norm_mean", _backend.resolve(backend, h.device))
    if impl == "torch":
        return residual_norm_mean_torch(y, h, weight, bias, missing, observed, float(eps))
    if missing is not None:
        missing, observed = missing.contiguous(), observed.contiguous()
    z, _, _ = library.namespace(impl).residual_norm_mean_fwd(
        y.contiguous(), h.contiguous(), weight.contiguous(), bias.contiguous(), missing, observed, float(eps)
    )
    return z


def residual_norm_mean_torch(
    y: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    missing: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The pure-PyTorch twin of :func:`residual_norm_mean`: z = mean_m LayerNorm(y + x).

    h [T, M, D] tokens; x = h, or (with missing [M, D] and observed [T, M] or
    [P, T, M] bool, both or neither) missing[m] where observed[.., t, m] is
    false. y [T, M, D] (or [P, T, M, D] for a [P, T, M] mask), e.g. the attention
    output after its out-projection. LayerNorm over D with ``weight``, ``bias``
    [D] and ``eps`` (biased variance). -> z [T, D] or [P, T, D] in h's dtype.
    Math in float32 (float64 for float64).
    """
    x = h if missing is None else torch.where(observed[..., None], h, missing)
    cdt = compute_dtype(h.dtype)
    r = y.to(cdt) + x.to(cdt)
    return F.layer_norm(r, (h.shape[-1],), weight.to(cdt), bias.to(cdt), eps).mean(dim=-2).to(h.dtype)

def _fwd_fake(y, h, weight, bias, missing, observed, eps):
    T, M, D = h.shape
    lead = check.leading_shape(observed, T)
    stats = h.new_empty((*lead, M), dtype=compute_dtype(h.dtype))
    return h.new_empty((*lead, D)), stats, torch.empty_like(stats)


def _bwd_fake(grad_z, y, h, weight, missing, observed, mean, rstd):
    grad_missing = h.new_empty((0,)) if missing is None else torch.empty_like(missing)
    return torch.empty_like(y), torch.empty_like(h), torch.empty_like(weight), torch.empty_like(weight), grad_missing


def _setup(ctx, args, output):
    _z, mean, rstd = output
    ctx.save_for_backward(args["y"], args["h"], args["weight"], args["missing"], args["observed"], mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ops, ctx, grad_z, _grad_mean, _grad_rstd):
    y, h, weight, missing, observed, mean, rstd = ctx.saved_tensors
    if grad_z is None:
        return {}
    gy, gh, gw, gb, gm = ops.residual_norm_mean_bwd(grad_z.contiguous(), y, h, weight, missing, observed, mean, rstd)
    return {"y": gy, "h": gh, "weight": gw, "bias": gb, "missing": gm if missing is not None else None}


# See reference.residual_norm_mean. h [T,M,D] f16/bf16/f32/f64 (M, D >= 1), y
# [T,M,D] (or [P,T,M,D] with a [P,T,M] observed), weight and bias [D], missing
# [M,D] and observed [T,M]/[P,T,M] bool (both or neither); all of h's dtype and
# contiguous. x = h[t,m] where observed[p,t,m], else missing[m];
# -> z [T,D] / [P,T,D] in h's dtype: mean_m LayerNorm(y + x) (biased variance,
#    eps), mean and rstd [T,M] / [P,T,M] f32 (f64 for f64): each row's mean
#    and 1 / sqrt(variance + eps).
library.register(
    "residual_norm_mean_fwd(Tensor y, Tensor h, Tensor weight, Tensor bias, Tensor? missing, Tensor? observed,"
    " float eps) -> (Tensor z, Tensor mean, Tensor rstd)",
    fake=_fwd_fake, triton=lambda *args: _launchers().residual_norm_mean_fwd(*args),
    setup=_setup, backward=_backward,
)
# -> grad_y (y's shape), grad_h [T,M,D] (summed over the masks; zero on rows no
#    mask observes), grad_weight, grad_bias [D], grad_missing [M,D] (an empty [0]
#    tensor without missing). Sums over positions in position-block order.
library.register(
    "residual_norm_mean_bwd(Tensor grad_z, Tensor y, Tensor h, Tensor weight, Tensor? missing, Tensor? observed,"
    " Tensor mean, Tensor rstd) -> (Tensor grad_y, Tensor grad_h, Tensor grad_weight, Tensor grad_bias,"
    " Tensor grad_missing)",
    fake=_bwd_fake, triton=lambda *args: _launchers().residual_norm_mean_bwd(*args),
)
