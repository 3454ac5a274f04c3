"""The auxiliary losses of MoE routing and the expert counts behind them.

Shapes: T tokens, E experts, k experts per token. The Switch balance loss and
the router z-loss run on :func:`router_stats` (one fused pass over the
logits); a router that already has those statistics (``TopKRouter``, the MARS
routing op's ``prob_sum``) uses :func:`switch_balance_from_stats` and
:func:`z_loss_from_lse` directly, so each loss is written once.
"""
from __future__ import annotations

import torch

from .. import checks as check
from .common import compute_dtype
from .gating import router_stats

__all__ = [
    "expert_counts",
    "switch_balance_loss",
    "switch_balance_loss_torch",
    "switch_balance_from_stats",
    "router_z_loss",
    "router_z_loss_torch",
    "z_loss_from_lse",
    "cv_squared",
    "noisy_balance_loss",
]


def expert_counts(indices: torch.Tensor, num_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """How many of the assignments in ``indices`` (any shape, int32/int64,
    values in [0, num_experts)) went to each of ``num_experts`` experts, as a
    [E] tensor of ``dtype``. Exact (integer counts) and free of device-to-host
    syncs (the range is checked on CPU tensors only)."""
    check.integer_tensor(indices, "indices")
    check.positive_int(num_experts, "num_experts")
    check.values_in_range(indices, 0, num_experts - 1, "indices", f"[0, num_experts={num_experts})")
    flat = indices.reshape(-1).long()
    return torch.zeros(num_experts, dtype=dtype, device=indices.device).index_add_(
        0, flat, torch.ones(flat.numel(), dtype=dtype, device=indices.device)
    )


def _assignments(indices, T: int) -> None:
    check.tensor(indices, "indices")
    if indices.dim() != 2 or indices.shape[0] != T or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be an int32/int64 [T={T}, k] tensor, got {indices.dtype} {tuple(indices.shape)}")


def switch_balance_loss(
    logits: torch.Tensor, indices: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Switch Transformer balance loss E * sum_e f_e P_e for router logits
    [T, E] and the chosen indices [T, k] (f_e: share of assignments, no
    gradient; P_e: mean router probability). 1 when perfectly uniform; 0 for T = 0."""
    check.logits(logits)
    T, E = logits.shape
    _assignments(indices, T)
    check.same_device({"logits": logits, "indices": indices})
    check.values_in_range(indices, 0, E - 1, "indices", f"[0, E={E})")
    _, prob_sum = router_stats(logits, backend=backend)
    return switch_balance_from_stats(prob_sum, expert_counts(indices, E), T, indices.shape[1])


def switch_balance_from_stats(prob_sum: torch.Tensor, counts: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    """The Switch balance loss from the summed router probabilities prob_sum
    [E] (:func:`router_stats`, or a fused router's) and the assignment counts
    [E] of ``num_tokens`` tokens with ``k`` choices each."""
    if num_tokens == 0:
        return prob_sum.sum()
    E = prob_sum.shape[0]
    return E * (counts.to(prob_sum.dtype) * prob_sum).sum() / (num_tokens * k * num_tokens)


def switch_balance_loss_torch(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The pure-PyTorch twin of :func:`switch_balance_loss`, from softmax and
    index_add: E * sum_e (count_e / (T k)) * mean_t p[t, e]."""
    T, E = logits.shape
    p = torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
    if T == 0:
        return p.sum()
    counts = torch.zeros(E, dtype=p.dtype, device=p.device).index_add_(
        0, indices.reshape(-1), torch.ones(indices.numel(), dtype=p.dtype, device=p.device)
    )
    return E * (counts / indices.numel() * p.mean(0)).sum()


def router_z_loss(logits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (0 for T = 0)."""
    lse, _ = router_stats(logits, backend=backend)
    return z_loss_from_lse(lse)


def z_loss_from_lse(lse: torch.Tensor) -> torch.Tensor:
    """The router z-loss from the row log-sum-exps lse [T] (0 for T = 0)."""
    if lse.numel() == 0:
        return lse.sum()
    return (lse**2).mean()


def router_z_loss_torch(logits: torch.Tensor) -> torch.Tensor:
    """The pure-PyTorch twin of :func:`router_z_loss`."""
    return z_loss_from_lse(torch.logsumexp(logits.to(compute_dtype(logits.dtype)), dim=-1))


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(v) / (mean(v)^2 + 1e-10); 0 for one element."""
    v = v.to(compute_dtype(v.dtype))
    if v.numel() <= 1:
        return v.sum() * 0
    return v.var() / (v.mean() ** 2 + 1e-10)


def noisy_balance_loss(importance: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Shazeer et al.'s balance loss, CV^2(importance) + CV^2(load)."""
    return cv_squared(importance) + cv_squared(load)
