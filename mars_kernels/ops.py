"""Public functional API: routing ops and auxiliary losses.

Every op validates its inputs, picks a backend (see :mod:`mars_kernels.backend`)
and runs either the pure-PyTorch twin in :mod:`mars_kernels.reference` or a
compiled kernel behind one ``torch.autograd.Function``.

Conventions: T tokens, E experts, k experts per token. Routing math is float32
(float64 for float64 input) whatever the input dtype; weights are returned in
that dtype and indices as int64, ordered by descending weight with ties to the
lower expert index.

Non-finite logits: ``-inf`` marks an expert as unavailable (weight 0, chosen
only if fewer than k experts are finite). A row holding NaN or ``+inf`` gets NaN
weights, its NaN/+inf experts ranked first; other rows are unaffected. Pass
``check_values=True`` to raise a ``ValueError`` instead (costs one extra pass
and, on a GPU, a device-to-host sync).
"""
from __future__ import annotations

import torch

from . import _validate as check
from . import backend as _backend
from . import reference
from ._autograd import MarsRouting, NoisyTopKGating, RouterStats, TopKGating

__all__ = [
    "topk_gating",
    "noisy_topk_gating",
    "router_stats",
    "expert_counts",
    "switch_balance_loss",
    "router_z_loss",
    "cv_squared",
    "noisy_balance_loss",
    "mars_routing",
]

MODES = ("softmax_topk", "topk_softmax")

cv_squared = reference.cv_squared
noisy_balance_loss = reference.noisy_balance_loss


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
    name = _backend.resolve(backend, logits.device)
    if name == "reference":
        return reference.topk_gating(logits, k, mode=mode, renormalize=renormalize)
    weights, indices, _ = TopKGating.apply(logits.contiguous(), k, mode == "softmax_topk", renormalize, name)
    return weights, indices


def noisy_topk_gating(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    k: int,
    *,
    training: bool,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_eps: float = 1e-2,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy top-k gating (Shazeer et al. 2017, as FastMoE's NoisyGate).

    x [T, D], w_gate [D, E], w_noise [D, E] -> weights [T, k], indices [T, k],
    importance [E], load [E]. See :func:`mars_kernels.reference.noisy_topk_gating`
    for the formulas. ``noise`` [T, E] (standard normal draws) makes a call
    reproducible; otherwise it is drawn with ``torch.randn`` from ``generator``.
    Gradients flow to x, w_gate and w_noise (load through the normal CDF).
    ``training=False`` adds no noise and reports hard counts as the load.
    """
    check.float_matrix(x, "x")
    check.float_matrix(w_gate, "w_gate")
    check.float_matrix(w_noise, "w_noise")
    T, D = x.shape
    if w_gate.shape[0] != D or w_gate.shape[1] < 1:
        raise ValueError(f"w_gate must have shape [D={D}, E>=1] to match x [T, D], got {tuple(w_gate.shape)}")
    E = w_gate.shape[1]
    check.shape(w_noise, (D, E), "w_noise", "[D, E] like w_gate")
    for name_, t in (("w_gate", w_gate), ("w_noise", w_noise)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name_} must have the dtype of x ({x.dtype}), got {t.dtype}")
    check.top_k(k, E)
    check.flag(training, "training")
    noise_eps = check.positive_float(noise_eps, "noise_eps")
    tensors = {"x": x, "w_gate": w_gate, "w_noise": w_noise}
    if noise is not None:
        check.float_matrix(noise, "noise")
        check.shape(noise, (T, E), "noise", "[T, E]")
        tensors["noise"] = noise
    check.same_device(tensors)
    name = _backend.resolve(backend, x.device)
    if name == "reference":
        return reference.noisy_topk_gating(
            x, w_gate, w_noise, k, training=training, noise=noise, generator=generator, noise_eps=noise_eps
        )
    ct = reference.compute_dtype(x.dtype)
    clean = x @ w_gate
    if not training:
        weights, indices = topk_gating(clean, k, mode="topk_softmax", backend=name)
        flat = indices.reshape(-1)
        importance = weights.new_zeros(E).index_add(0, flat, weights.reshape(-1))
        load = expert_counts(indices, E, ct)
        return weights, indices, importance, load
    if noise is None:
        noise = torch.randn(T, E, generator=generator, device=x.device, dtype=ct)
    raw = x @ w_noise
    weights, indices, _, importance, load = NoisyTopKGating.apply(
        clean.contiguous(), raw.contiguous(), noise.to(ct).contiguous(), k, noise_eps, name
    )
    return weights, indices, importance, load


def expert_counts(indices: torch.Tensor, num_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """How many of the assignments in ``indices`` (any shape) went to each of
    ``num_experts`` experts, as a [E] tensor of ``dtype``. Exact (integer
    counts) and free of device-to-host syncs."""
    flat = indices.reshape(-1).long()
    return torch.zeros(num_experts, dtype=dtype, device=indices.device).index_add_(
        0, flat, torch.ones(flat.numel(), dtype=dtype, device=indices.device)
    )


def router_stats(logits: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (lse [T], prob_sum [E]) in one pass: the row log-sum-exp
    and the sum over tokens of softmax(logits). Differentiable."""
    check.logits(logits)
    name = _backend.resolve(backend, logits.device)
    if name == "reference":
        return reference.router_stats(logits)
    return RouterStats.apply(logits.contiguous(), name)


def switch_balance_loss(
    logits: torch.Tensor, indices: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Switch Transformer balance loss E * sum_e f_e P_e for router logits
    [T, E] and the chosen indices [T, k] (f_e: share of assignments, no
    gradient; P_e: mean router probability). 1 when perfectly uniform."""
    check.logits(logits)
    check.tensor(indices, "indices")
    T, E = logits.shape
    if indices.dim() != 2 or indices.shape[0] != T or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be an int32/int64 [T={T}, k] tensor, got {indices.dtype} {tuple(indices.shape)}")
    check.same_device({"logits": logits, "indices": indices})
    _, prob_sum = router_stats(logits, backend=backend)
    if T == 0:
        return prob_sum.sum()
    counts = expert_counts(indices, E, prob_sum.dtype)
    return E * (counts * prob_sum).sum() / (indices.numel() * T)


def router_z_loss(logits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (0 for T = 0)."""
    lse, _ = router_stats(logits, backend=backend)
    if lse.numel() == 0:
        return lse.sum()
    return (lse**2).mean()


def mars_routing(
    residual_logits: torch.Tensor,
    feature_logits: torch.Tensor,
    k: int,
    *,
    sigma_0: float,
    sigma_max: float,
    sigma_const: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MARS training-time routing, fused: residual-router logits l_r [T, E] and
    feature-router logits l_f [T, E] -> (weights [T, k], indices [T, k],
    imitation [T], divergence [T], prob_sum [E]).

    Gates with the top k of softmax(l_r + sigma * eps), sigma = min(sigma_0 *
    KL(p_r || p_f) + sigma_const, sigma_max) per token (detached); ``imitation``
    is KL(stopgrad(p_r) || p_f) with its gradient to l_f only; ``prob_sum`` sums
    p_r over tokens (for the Switch balance loss on the residual router).
    ``noise`` [T, E] or ``generator`` makes the noise reproducible. See
    :func:`mars_kernels.reference.mars_routing`.
    """
    check.logits(residual_logits, "residual_logits")
    check.logits(feature_logits, "feature_logits")
    T, E = residual_logits.shape
    check.shape(feature_logits, (T, E), "feature_logits", "[T, E] like residual_logits")
    if feature_logits.dtype != residual_logits.dtype:
        raise TypeError(f"feature_logits must have the dtype of residual_logits ({residual_logits.dtype}), got {feature_logits.dtype}")
    check.top_k(k, E)
    for name_, v in (("sigma_0", sigma_0), ("sigma_const", sigma_const), ("sigma_max", sigma_max)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ValueError(f"{name_} must be a finite number >= 0, got {v!r}")
    tensors = {"residual_logits": residual_logits, "feature_logits": feature_logits}
    if noise is not None:
        check.float_matrix(noise, "noise")
        check.shape(noise, (T, E), "noise", "[T, E]")
        tensors["noise"] = noise
    check.same_device(tensors)
    name = _backend.resolve(backend, residual_logits.device)
    kw = dict(sigma_0=float(sigma_0), sigma_max=float(sigma_max), sigma_const=float(sigma_const))
    if name == "reference":
        return reference.mars_routing(residual_logits, feature_logits, k, noise=noise, generator=generator, **kw)
    ct = reference.compute_dtype(residual_logits.dtype)
    if noise is None:
        noise = torch.randn(T, E, generator=generator, device=residual_logits.device, dtype=ct)
    out = MarsRouting.apply(
        residual_logits.contiguous(), feature_logits.contiguous(), noise.to(ct).contiguous(), k,
        kw["sigma_0"], kw["sigma_const"], kw["sigma_max"], name,
    )
    return out[:5]
