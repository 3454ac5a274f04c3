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

import math

import torch
import torch.nn.functional as F

from .meta import MoEMeta, max_blocks

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
    "mars_routing",
    "ACTIVATIONS",
    "activation",
    "apply_capacity",
    "moe_align",
    "permute",
    "unpermute",
    "grouped_mlp",
    "moe_loop",
    "modality_attention",
    "residual_norm_mean",
]

ACTIVATIONS = ("gelu", "silu", "swiglu")


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MARS training-time routing (DESIGN 2.3), one pass over both routers' logits.

    residual_logits l_r [T, E], feature_logits l_f [T, E] -> weights [T, k],
    indices [T, k], imitation [T], divergence [T], prob_sum [E]:

    * p_r = softmax(l_r), p_f = softmax(l_f); divergence d = KL(p_r || p_f) per
      token, detached;
    * sigma = min(sigma_0 * d + sigma_const, sigma_max) (detached); noisy
      logits l_r + sigma * eps with eps [T, E] standard normal (``noise``, or
      drawn from ``generator``);
    * weights/indices: top k of softmax(noisy), renormalised (a softmax over the
      k chosen noisy logits); gradient to l_r;
    * imitation = KL(stopgrad(p_r) || p_f) per token; gradient to l_f only;
    * prob_sum = sum over tokens of p_r (clean), for the Switch balance loss on
      the residual router; gradient to l_r.
    """
    ct = compute_dtype(residual_logits.dtype)
    lr, lf = residual_logits.to(ct), feature_logits.to(ct)
    log_pr, log_pf = torch.log_softmax(lr, dim=-1), torch.log_softmax(lf, dim=-1)
    pr = log_pr.exp()
    divergence = (pr * (log_pr - log_pf)).sum(-1).detach()
    sigma = torch.clamp(sigma_0 * divergence + sigma_const, max=sigma_max)
    if noise is None:
        noise = torch.randn(lr.shape, generator=generator, device=lr.device, dtype=ct)
    noisy = lr + sigma.unsqueeze(-1) * noise.to(ct)
    indices = topk_order(noisy.detach(), k)
    weights = torch.softmax(noisy.gather(1, indices), dim=-1)
    sg_pr, sg_log_pr = pr.detach(), log_pr.detach()
    imitation = (sg_pr * (sg_log_pr - log_pf)).sum(-1)
    return weights, indices, imitation, divergence, pr.sum(0)


# --------------------------------------------------------------------------- dispatch and experts


def activation(h: torch.Tensor, name: str) -> torch.Tensor:
    """gelu (exact, erf), silu, or swiglu: h = [gate | up] -> silu(gate) * up."""
    if name == "gelu":
        return F.gelu(h)
    if name == "silu":
        return F.silu(h)
    if name == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def apply_capacity(
    indices: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` assignments per expert.

    Priority: every token's first choice before any second choice, and within
    a choice rank, earlier tokens first (GShard / Switch). indices [T, k],
    weights [T, k] -> (indices with dropped assignments set to the sentinel
    ``num_experts``, weights with dropped ones zeroed, number dropped (int64
    scalar tensor)). Kept weights are not renormalised.
    """
    T, k = indices.shape
    prio = indices.t().reshape(-1).long()  # position p = j * T + t
    order = torch.sort(prio, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=prio.device).index_add_(0, prio, torch.ones_like(prio))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(prio.numel(), device=prio.device) - starts[prio[order]]
    keep = (rank < capacity).view(k, T).t()
    kept_indices = torch.where(keep, indices.long(), torch.full_like(indices.long(), num_experts))
    return kept_indices, weights * keep, (~keep).sum()


def moe_align(indices: torch.Tensor, num_experts: int, block_size: int) -> MoEMeta:
    """Dispatch metadata for indices [T, k] with values in [0, E] (E: dropped)."""
    T, k = indices.shape
    E, bs = num_experts, block_size
    flat = indices.reshape(-1).long()
    S = flat.numel()
    dev = flat.device
    permutation = torch.sort(flat, stable=True).indices
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(S, device=dev)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).index_add_(0, flat, torch.ones_like(flat))[:E]
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    blocks = (counts + bs - 1) // bs
    block_end = torch.cumsum(blocks, 0)
    b = torch.arange(max_blocks(S, E, bs), device=dev)
    owner = torch.searchsorted(block_end, b, right=True)
    valid = owner < E
    e = owner.clamp(max=E - 1)
    start = offsets[e] + (b - (block_end[e] - blocks[e])) * bs
    return MoEMeta(
        num_experts=E,
        top_k=k,
        block_size=bs,
        counts=counts,
        offsets=offsets,
        permutation=permutation,
        inverse=inverse,
        block_expert=torch.where(valid, owner, torch.full_like(owner, -1)),
        block_start=torch.where(valid, start, offsets[E].expand_as(start)),
    )


def permute(x: torch.Tensor, meta: MoEMeta) -> torch.Tensor:
    """x [T, D] -> x_sorted [S, D]: row s is the token of sorted slot s."""
    return x.index_select(0, meta.permutation // meta.top_k)


def unpermute(y_sorted: torch.Tensor, meta: MoEMeta, weights: torch.Tensor) -> torch.Tensor:
    """y_sorted [S, D], weights [T, k] -> y [T, D] = sum_j weights[t, j] * y_sorted[inverse[t*k + j]].

    Summed in float32 (float64 for float64) in the order j = 0..k-1; returned in
    y_sorted's dtype.
    """
    T, k = weights.shape
    ct = compute_dtype(y_sorted.dtype)
    rows = y_sorted.index_select(0, meta.inverse).view(T, k, y_sorted.shape[1]).to(ct)
    return (rows * weights.to(ct).unsqueeze(-1)).sum(1).to(y_sorted.dtype)


def grouped_mlp(
    x_sorted: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    meta: MoEMeta,
    activation_name: str,
) -> torch.Tensor:
    """Each expert's MLP on its rows: x_sorted [S, D] -> y_sorted [S, D].

    w1 [E, D, H1], b1 [E, H1], w2 [E, H, D], b2 [E, D] with H1 = 2H for swiglu
    (first half gate, second half up) and H otherwise. Rows of dropped
    assignments (slots from offsets[E] on) give zeros.
    """
    offsets = meta.offsets.tolist()
    pieces = []
    for e in range(meta.num_experts):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        h = x_sorted[lo:hi] @ w1[e]
        if b1 is not None:
            h = h + b1[e]
        y = activation(h, activation_name) @ w2[e]
        if b2 is not None:
            y = y + b2[e]
        pieces.append(y)
    pieces.append(x_sorted.new_zeros(x_sorted.shape[0] - offsets[-1], w2.shape[2]))
    return torch.cat(pieces)


def moe_loop(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation_name: str,
) -> torch.Tensor:
    """The naive per-expert loop (what most MoE code does): for each expert,
    find its tokens, run its MLP, and index_add the gate-weighted result.
    x [T, D], weights/indices [T, k] -> y [T, D] (indices equal to E are skipped)."""
    out = torch.zeros(x.shape[0], w2.shape[2], dtype=compute_dtype(x.dtype), device=x.device)
    for e in range(w1.shape[0]):
        tok, j = (indices == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w1[e]
        if b1 is not None:
            h = h + b1[e]
        y = activation(h, activation_name) @ w2[e]
        if b2 is not None:
            y = y + b2[e]
        out = out.index_add(0, tok, y.to(out.dtype) * weights[tok, j, None].to(out.dtype))
    return out.to(x.dtype)


def modality_attention(
    qkv: torch.Tensor,
    num_heads: int,
    keep: torch.Tensor | None = None,
    missing: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention across the M modality tokens at each of T positions.

    qkv [T, M, 3D]: q | k | v of each modality, each split into ``num_heads``
    heads of D / num_heads columns (the packed in-projection of
    ``nn.MultiheadAttention``). missing [M, 3D] and observed [T, M] bool (both
    or neither): row (t, m) is missing[m] where observed[t, m] is false. keep
    [T, H, M, M] or None multiplies the attention probabilities (a dropout
    mask already scaled by 1 / (1 - p)). -> out [T, M, D] in qkv's dtype:
    out[t, i, head h] = sum_j p'[t, h, i, j] v[t, j, h] with p =
    softmax_j(<q_i, k_j> / sqrt(D / H)), p' = p * keep. Math in float32
    (float64 for float64).

    P masks: observed [P, T, M] runs the attention once per mask on the same
    qkv; keep is then [P, T, H, M, M] and out [P, T, M, D].
    """
    if observed is not None and observed.dim() == 3:
        return torch.stack([
            modality_attention(qkv, num_heads, None if keep is None else keep[p], missing, observed[p])
            for p in range(observed.shape[0])
        ])
    T, M, D3 = qkv.shape
    D = D3 // 3
    dh = D // num_heads
    if missing is not None:
        qkv = torch.where(observed[..., None], qkv, missing)
    q, k, v = qkv.to(compute_dtype(qkv.dtype)).view(T, M, 3, num_heads, dh).unbind(2)  # [T, M, H, dh]
    probs = (torch.einsum("tihd,tjhd->thij", q, k) / math.sqrt(dh)).softmax(dim=-1)
    if keep is not None:
        probs = probs * keep.to(probs.dtype)
    return torch.einsum("thij,tjhd->tihd", probs, v).reshape(T, M, D).to(qkv.dtype)


def residual_norm_mean(
    y: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    missing: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The end of the modality fusion: z = mean_m LayerNorm(y + x).

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
