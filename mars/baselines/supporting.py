"""Supporting groups of MoE-Retriever: for every (sample, missing target
modality) pair, a uniform random draw of pool samples that have the target and
everything the sample observes.

Shapes: Q pairs, M modalities, P pool samples, G = max |O_q| group slots.

For pair q with observed set O_q and target t_q the candidates are the pool
rows j with ``available[j] ⊇ O_q ∪ {t_q}`` (the "complementary modality
combinations" of the paper); |G_q| = |O_q| of them are drawn uniformly
without replacement, as the official code's ``random.sample``. Fallbacks
(the official code has none; it raises when the pool is too small):

* fewer candidates than |O_q| (but some): draw |O_q| with replacement from them;
* no candidate: use the rows that have t_q alone (same two rules);
* no pool row has t_q: the pair gets no group (``source == NONE``) and the
  model keeps the learned missing-modality embedding there.

``exclude[q]`` (a pool row, or -1) is never drawn for pair q: in training the
pool is the train split, which holds the sample itself.

All pairs are drawn at once: candidate sets are grouped by their required
modality bit pattern (at most min(2Q, 2^M) distinct patterns, each a [P]
eligibility row), and the draws work on positions inside those lists, so
memory is O(U * P + Q * G), never O(Q * P). Without replacement, the g-th draw
takes a uniform position among the n - g (minus excluded) positions still
free and shifts it past the taken ones in increasing order — the usual exact
sequential scheme, vectorised over pairs; its loop runs over the G <= M - 1
slots only.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .subsets import subset_codes

ELIGIBLE, TARGET_ONLY, NONE = 0, 1, 2


class SupportingGroups(NamedTuple):
    """index: [Q, G] int64 pool rows (0 in invalid slots); valid: [Q, G] bool
    (slot g < |O_q| and the pair has a group); source: [Q] int64, ELIGIBLE |
    TARGET_ONLY | NONE; replacement: [Q] bool, drawn with replacement."""

    index: Tensor
    valid: Tensor
    source: Tensor
    replacement: Tensor


def _check(pool_available: Tensor, observed: Tensor, target: Tensor, exclude: Tensor | None) -> None:
    if not isinstance(pool_available, Tensor) or pool_available.dtype != torch.bool or pool_available.dim() != 2:
        raise TypeError(f"pool_available must be a [P, M] bool tensor, got {_describe(pool_available)}")
    M = pool_available.shape[1]
    if not isinstance(observed, Tensor) or observed.dtype != torch.bool or observed.dim() != 2 or observed.shape[1] != M:
        raise TypeError(f"observed must be a [Q, M={M}] bool tensor, got {_describe(observed)}")
    Q = observed.shape[0]
    if not isinstance(target, Tensor) or target.dtype != torch.long or tuple(target.shape) != (Q,):
        raise TypeError(f"target must be a [Q={Q}] int64 tensor, got {_describe(target)}")
    if Q and (int(target.min()) < 0 or int(target.max()) >= M):
        raise ValueError(f"target must hold modality indices in [0, {M}), got min {int(target.min())}, max {int(target.max())}")
    if Q and bool(observed.gather(1, target[:, None]).any()):
        raise ValueError("target must be a modality the pair does not observe (observed[q, target[q]] must be False)")
    if exclude is not None:
        if not isinstance(exclude, Tensor) or exclude.dtype != torch.long or tuple(exclude.shape) != (Q,):
            raise TypeError(f"exclude must be a [Q={Q}] int64 tensor of pool rows (or -1), got {_describe(exclude)}")
        if Q and (int(exclude.min()) < -1 or int(exclude.max()) >= pool_available.shape[0]):
            raise ValueError(f"exclude must hold pool rows in [0, {pool_available.shape[0]}) or -1")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


def _shift_past(pos: Tensor, taken: Tensor) -> Tensor:
    """Map pos [Q] (a rank among the free positions) to the actual position,
    skipping taken [Q, j] (unused entries hold a huge value)."""
    for col in taken.sort(dim=1).values.unbind(1):
        pos = pos + (pos >= col).long()
    return pos


def sample_supporting(
    pool_available: Tensor,
    observed: Tensor,
    target: Tensor,
    *,
    generator: torch.Generator | None = None,
    exclude: Tensor | None = None,
) -> SupportingGroups:
    """Draw one supporting group per pair.

    pool_available [P, M] bool (what pool samples really have), observed [Q, M]
    bool (each pair's O_q), target [Q] int64 (t_q, not in O_q), exclude [Q]
    int64 pool row or -1. Random numbers come from ``generator`` (the global
    torch RNG when None) on the tensors' device: Q * G uniforms per call.
    """
    _check(pool_available, observed, target, exclude)
    device = observed.device
    Q, M = observed.shape
    size = observed.sum(1)  # |O_q| = |G_q|
    G = int(size.max()) if Q else 0
    if Q == 0 or pool_available.shape[0] == 0:
        none = torch.full((Q,), NONE, dtype=torch.long, device=device)
        return SupportingGroups(torch.zeros(Q, G, dtype=torch.long, device=device),
                                torch.zeros(Q, G, dtype=torch.bool, device=device), none,
                                torch.zeros(Q, dtype=torch.bool, device=device))
    P = pool_available.shape[0]
    one = torch.ones((), dtype=torch.long, device=device)
    t_code = one << target
    req_code = subset_codes(observed) | t_code
    codes, inverse = torch.unique(torch.cat([req_code, t_code]), return_inverse=True)  # [U]
    pool_code = subset_codes(pool_available)  # [P]
    eligible = (pool_code[None] & codes[:, None]) == codes[:, None]  # [U, P]
    count = eligible.sum(1)
    rank = eligible.long().cumsum(1) - 1  # position of each eligible row in its list
    rows = torch.argsort((~eligible).to(torch.uint8), dim=1, stable=True)  # eligible rows first, ascending

    def candidates(u: Tensor):
        """(list id, free candidates, excluded position or -1) of each pair."""
        if exclude is None:
            return u, count[u], torch.full_like(u, -1)
        ex = exclude.clamp(min=0)
        hit = (exclude >= 0) & eligible[u, ex]
        return u, count[u] - hit.long(), torch.where(hit, rank[u, ex], -1)

    u_req, n_req, ex_req = candidates(inverse[:Q])
    u_t, n_t, ex_t = candidates(inverse[Q:])
    use_req = n_req > 0
    u = torch.where(use_req, u_req, u_t)
    n = torch.where(use_req, n_req, n_t)
    ex_pos = torch.where(use_req, ex_req, ex_t)
    source = torch.where(use_req, ELIGIBLE, torch.where(n_t > 0, TARGET_ONLY, NONE))
    has_group = source != NONE
    replacement = has_group & (n < size)

    draws = torch.rand(Q, G, generator=generator, device=device)
    huge = torch.full((Q, 1), P + G + 1, dtype=torch.long, device=device)
    taken = torch.where(ex_pos[:, None] >= 0, ex_pos[:, None], huge)  # [Q, 1 + g]
    free_pos, with_repl = [], []
    for g in range(G):
        r = (draws[:, g] * (n - g).clamp(min=1)).long().clamp(min=0)
        r = torch.minimum(r, (n - g - 1).clamp(min=0))
        pos = _shift_past(r, taken)
        free_pos.append(pos)
        taken = torch.cat([taken, pos[:, None]], dim=1)
        rr = torch.minimum((draws[:, g] * n.clamp(min=1)).long(), (n - 1).clamp(min=0))
        with_repl.append(rr + ((ex_pos >= 0) & (rr >= ex_pos)).long())
    pos = torch.where(replacement[:, None], torch.stack(with_repl, 1), torch.stack(free_pos, 1)) if G else \
        torch.zeros(Q, 0, dtype=torch.long, device=device)
    valid = (torch.arange(G, device=device)[None] < size[:, None]) & has_group[:, None]
    pos = torch.where(valid, pos, 0).clamp(max=P - 1)
    index = torch.where(valid, rows[u[:, None], pos], 0)
    return SupportingGroups(index, valid, source, replacement)
