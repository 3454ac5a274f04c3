"""Pure-PyTorch ground truth for every op in :mod:`mars_kernels`.

Readable, not fast. Every function has the same signature and semantics as its
public twin in :mod:`mars_kernels.ops`; gradients come from torch autograd, so
the hand-written backward kernels are checked against an independent
derivation. Works in float64, which is what ``gradcheck`` uses.

Shared semantics (DESIGN section 2):

* Routing math runs in float32 (float64 for float64 input); weights come back in
  that dtype, indices as int64.
* Selection order is "larger logit first, lower expert index on ties". NaN
  counts as +inf for selection, so indices are always valid expert ids; a row
  holding NaN or +inf gets NaN weights (as ``torch.softmax`` would).
"""
from __future__ import annotations

import torch

__all__ = [
    "compute_dtype",
    "topk_order",
    "topk_gating",
    "noisy_topk_gating",
    "router_stats",
    "switch_balance_loss",
    "cv_squared",
    "noisy_balance_loss",
    "router_z_loss",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routing math runs in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_order(values: torch.Tensor, m: int) -> torch.Tensor:
    """Indices [T, m] of the m largest entries per row of ``values`` [T, E].

    Descending by value, ties to the lower index, NaN ranked as +inf.
    """
    key = torch.where(torch.isnan(values), torch.full_like(values, float("inf")), values)
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :m]


def topk_gating(
    logits: torch.Tensor, k: int, *, mode: str = "softmax_topk", renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gating. logits [T, E] -> (weights [T, k] float32/64, indices [T, k] int64).

    ``softmax_topk``: p = softmax(logits) over all E experts, keep the k largest;
    with ``renormalize`` divide them by their sum. ``topk_softmax``: keep the k
    largest logits, softmax over those k (``renormalize`` changes nothing).
    """
    x = logits.to(compute_dtype(logits.dtype))
    indices = topk_order(x, k)
    if mode == "softmax_topk":
        weights = torch.softmax(x, dim=-1).gather(1, indices)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif mode == "topk_softmax":
        weights = torch.softmax(x.gather(1, indices), dim=-1)
    else:
        raise ValueError(f"mode must be 'softmax_topk' or 'topk_softmax', got {mode!r}")
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy top-k gating of Shazeer et al. (2017), as FastMoE's NoisyGate.

    x [T, D], w_gate [D, E], w_noise [D, E] -> weights [T, k], indices [T, k],
    importance [E], load [E].

    Training: H = x W_g + eps * (softplus(x W_n) + noise_eps), eps ~ N(0, 1)
    (``noise`` [T, E] or drawn from ``generator``); keep the top k of H and
    softmax over them. importance_e = sum of the gates routed to e. load_e =
    sum_t Phi((clean_te - thr_te) / std_te) where thr is the (k+1)-th noisy
    value if e is among the chosen k and the k-th otherwise (load_e = T when
    k = E: every expert is always chosen). Eval: no noise, softmax over the top
    k clean logits, load = the hard count of tokens routed to each expert.
    """
    ct = compute_dtype(x.dtype)
    clean = (x @ w_gate).to(ct)
    T, E = clean.shape
    if training:
        std = torch.nn.functional.softplus((x @ w_noise).to(ct)) + noise_eps
        if noise is None:
            noise = torch.randn(T, E, generator=generator, device=x.device, dtype=ct)
        noisy = clean + noise.to(ct) * std
    else:
        noisy = clean
    m = min(k + 1, E)
    order = topk_order(noisy, m)
    top_vals = noisy.gather(1, order)
    indices = order[:, :k]
    weights = torch.softmax(top_vals[:, :k], dim=-1)
    gates = torch.zeros_like(clean).scatter(1, indices, weights)
    importance = gates.sum(0)
    if not training:
        load = torch.zeros(E, dtype=ct, device=x.device).index_add_(
            0, indices.reshape(-1), torch.ones(T * k, dtype=ct, device=x.device)
        )
    elif k == E:
        load = torch.full((E,), float(T), dtype=ct, device=x.device)
    else:
        chosen = torch.zeros_like(clean, dtype=torch.bool).scatter(1, indices, True)
        threshold = torch.where(chosen, top_vals[:, k : k + 1], top_vals[:, k - 1 : k])
        load = torch.special.ndtr((clean - threshold) / std).sum(0)
    return weights, indices, importance, load


def router_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (lse [T], prob_sum [E]): row log-sum-exp and the sum over
    tokens of softmax(logits), the statistics behind the auxiliary losses."""
    x = logits.to(compute_dtype(logits.dtype))
    return torch.logsumexp(x, dim=-1), torch.softmax(x, dim=-1).sum(0)


def switch_balance_loss(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss, E * sum_e f_e * P_e.

    logits [T, E], indices [T, k]; f_e is the fraction of the T*k assignments
    that went to expert e (no gradient), P_e the mean router probability of e.
    Equals 1 when routing is perfectly uniform; 0 for T = 0.
    """
    T, E = logits.shape
    p = torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
    if T == 0:
        return p.sum()
    counts = torch.zeros(E, dtype=p.dtype, device=p.device).index_add_(
        0, indices.reshape(-1), torch.ones(indices.numel(), dtype=p.dtype, device=p.device)
    )
    return E * (counts / indices.numel() * p.mean(0)).sum()


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(v) / (mean(v)^2 + 1e-10); 0 for one element."""
    v = v.to(compute_dtype(v.dtype))
    if v.numel() <= 1:
        return v.sum() * 0
    return v.var() / (v.mean() ** 2 + 1e-10)


def noisy_balance_loss(importance: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Shazeer et al.'s balance loss, CV^2(importance) + CV^2(load)."""
    return cv_squared(importance) + cv_squared(load)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss, mean over tokens of logsumexp(logits)^2; 0 for T = 0."""
    lse = torch.logsumexp(logits.to(compute_dtype(logits.dtype)), dim=-1)
    if lse.numel() == 0:
        return lse.sum()
    return (lse**2).mean()
