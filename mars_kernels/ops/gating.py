"""Top-k softmax gating and the router statistics behind the auxiliary losses.

Shapes: T tokens, E experts, k experts chosen per token. Routing math runs in
float32 (float64 for float64 logits) whatever the input dtype; weights come
back in that dtype and indices as int64, ordered by descending weight with ties
to the lower expert index.

Non-finite logits: ``-inf`` marks an expert as unavailable (weight 0, chosen
only if fewer than k experts are finite). A row holding NaN or ``+inf`` gets NaN
weights, its NaN/+inf experts ranked first; other rows are unaffected. Pass
``check_values=True`` to raise a ``ValueError`` instead (costs one extra pass
and, on a GPU, a device-to-host sync).

Kernel-level ops (schemas below, beside their callers): ``topk_gating_fwd/_bwd``
and ``router_stats_fwd/_bwd``; C++ in ``csrc/cpu/gating.cpp``, CUDA in
``csrc/cuda/gating.cu`` (+ ``gating_binding.cpp``), Triton in
``ops/triton/gating.py``.
"""
from __future__ import annotations

import functools

import torch

from .. import backend as _backend
from .. import checks as check
from .. import library
from .common import compute_dtype, topk_order

__all__ = ["MODES", "topk_gating", "topk_gating_torch", "router_stats", "router_stats_torch"]

MODES = ("softmax_topk", "topk_softmax")


@functools.cache
def _launchers():
    """The Triton launchers, imported on first call (triton is optional)."""
    from .triton import gating

    return gating


# --------------------------------------------------------------------------- top-k gating


def topk_gating(
    logits: torch.Tensor,
    k: int,
    *,
    mode: str = "softmax_topk",
    renormalize: bool = True,
    backend: str | None = None,
    check_values: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gating: logits [T, E] -> (weights [T, k], indices [T, k] int64).

    ``mode="softmax_topk"``: softmax over all E, keep the k largest, and with
    ``renormalize`` rescale them to sum to 1 (then identical to
    ``topk_softmax``). ``mode="topk_softmax"``: softmax over the k largest logits
    only (``renormalize`` has no effect). Note that with k = 1 the
    ``topk_softmax`` weight is constantly 1, so the router gets no gradient.
    Differentiable with respect to ``logits``.
    """
    check.logits(logits)
    check.top_k(k, logits.shape[1])
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check.flag(renormalize, "renormalize")
    if check_values:
        check.no_nan_or_posinf(logits, "logits")
    impl = _backend.implementation("topk_gating", _backend.resolve(backend, logits.device))
    if impl == "torch":
        return topk_gating_torch(logits, k, mode=mode, renormalize=renormalize)
    weights, indices, _ = library.namespace(impl).topk_gating_fwd(
        logits.contiguous(), k, mode == "softmax_topk", renormalize
    )
    return weights, indices


def topk_gating_torch(
    logits: torch.Tensor, k: int, *, mode: str = "softmax_topk", renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-PyTorch twin of :func:`topk_gating` (no validation).

    ``softmax_topk``: p = softmax(logits) over all E experts, keep the k largest;
    with ``renormalize`` divide them by their sum. ``topk_softmax``: keep the k
    largest logits, softmax over those k (``renormalize`` changes nothing).

    softmax_topk renormalised is computed as topk_softmax, which it equals: the
    weights then depend on the k chosen logits only, so a row holding NaN gets
    a gradient that is NaN at its k chosen experts and 0 elsewhere, as every
    kernel gives (softmax_topk without renormalisation depends on the whole
    row: NaN everywhere).
    """
    x = logits.to(compute_dtype(logits.dtype))
    indices = topk_order(x, k)
    if mode == "softmax_topk" and not renormalize:
        weights = torch.softmax(x, dim=-1).gather(1, indices)
    elif mode in MODES:
        weights = torch.softmax(x.gather(1, indices), dim=-1)
    else:
        raise ValueError(f"mode must be 'softmax_topk' or 'topk_softmax', got {mode!r}")
    return weights, indices


def _topk_fwd_fake(logits, k, softmax_first, renormalize):
    T, acc = logits.shape[0], compute_dtype(logits.dtype)
    return (
        logits.new_empty((T, k), dtype=acc),
        logits.new_empty((T, k), dtype=torch.int64),
        logits.new_empty((T,), dtype=acc),
    )


def _topk_bwd_fake(grad_weights, logits, weights, indices, lse, softmax_first, renormalize):
    return torch.empty_like(logits)


def _topk_setup(ctx, args, output):
    weights, indices, lse = output
    ctx.save_for_backward(args["logits"], weights, indices, lse)
    ctx.flags = (args["softmax_first"], args["renormalize"])
    ctx.mark_non_differentiable(indices, lse)


def _topk_backward(ops, ctx, grad_weights, _grad_indices, _grad_lse):
    logits, weights, indices, lse = ctx.saved_tensors
    if grad_weights is None:
        return {}
    return {"logits": ops.topk_gating_bwd(grad_weights.contiguous(), logits, weights, indices, lse, *ctx.flags)}


# logits [T,E] f16/bf16/f32/f64, contiguous -> weights [T,k] f32, indices [T,k]
# int64, lse [T] f32 ("f32": float64 for float64 logits; indices by descending
# logit, ties to the lower expert index, NaN ranked as +inf). lse is the
# normaliser of the weights: weights[t,j] = exp(logits[t,idx] - lse[t]), the
# log-sum-exp of the whole row when softmax_first && !renormalize, else of the
# k selected logits.
library.register(
    "topk_gating_fwd(Tensor logits, int k, bool softmax_first, bool renormalize)"
    " -> (Tensor weights, Tensor indices, Tensor lse)",
    fake=_topk_fwd_fake, triton=lambda *args: _launchers().topk_gating_fwd(*args),
    setup=_topk_setup, backward=_topk_backward,
)
# -> grad_logits [T,E] in the logits' dtype.
library.register(
    "topk_gating_bwd(Tensor grad_weights, Tensor logits, Tensor weights, Tensor indices,"
    " Tensor lse, bool softmax_first, bool renormalize) -> Tensor",
    fake=_topk_bwd_fake, triton=lambda *args: _launchers().topk_gating_bwd(*args),
)


# --------------------------------------------------------------------------- router statistics


def router_stats(logits: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (lse [T], prob_sum [E]) in one pass: the row log-sum-exp
    and the sum over tokens of softmax(logits). Differentiable; the sum over
    tokens is deterministic (fixed token blocks, no atomics)."""
    check.logits(logits)
    impl = _backend.implementation("router_stats", _backend.resolve(backend, logits.device))
    if impl == "torch":
        return router_stats_torch(logits)
    return library.namespace(impl).router_stats_fwd(logits.contiguous())


def router_stats_torch(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-PyTorch twin of :func:`router_stats`."""
    x = logits.to(compute_dtype(logits.dtype))
    return torch.logsumexp(x, dim=-1), torch.softmax(x, dim=-1).sum(0)


def _stats_fwd_fake(logits):
    T, E = logits.shape
    acc = compute_dtype(logits.dtype)
    return logits.new_empty((T,), dtype=acc), logits.new_empty((E,), dtype=acc)


def _stats_bwd_fake(grad_lse, grad_prob_sum, logits, lse):
    return torch.empty_like(logits)


def _stats_setup(ctx, args, output):
    ctx.save_for_backward(args["logits"], output[0])


def _stats_backward(ops, ctx, grad_lse, grad_prob_sum):
    logits, lse = ctx.saved_tensors
    if grad_lse is None and grad_prob_sum is None:
        return {}
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.contiguous()
    grad_prob_sum = lse.new_zeros(logits.shape[1]) if grad_prob_sum is None else grad_prob_sum.contiguous()
    return {"logits": ops.router_stats_bwd(grad_lse, grad_prob_sum, logits, lse)}


# Softmax statistics for the auxiliary losses, one pass over the logits.
# logits [T,E] -> lse [T] f32 (row log-sum-exp), prob_sum [E] f32 (sum over T
# of softmax(logits), deterministic).
library.register(
    "router_stats_fwd(Tensor logits) -> (Tensor lse, Tensor prob_sum)",
    fake=_stats_fwd_fake, triton=lambda *args: _launchers().router_stats_fwd(*args),
    setup=_stats_setup, backward=_stats_backward,
)
# grad_logits = p * (grad_lse[t] + grad_prob_sum[e] - sum_e' grad_prob_sum[e'] p[t,e']).
library.register(
    "router_stats_bwd(Tensor grad_lse, Tensor grad_prob_sum, Tensor logits, Tensor lse) -> Tensor",
    fake=_stats_bwd_fake, triton=lambda *args: _launchers().router_stats_bwd(*args),
)
