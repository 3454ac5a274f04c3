"""Shapley credit of each modality from batch coalition values, as one matrix
product, and MCE's batch-level factor b_m (method note sections 3.2 and 8.3).

Coalition values v are indexed by the 2^M - 1 non-empty subsets in
``mars.data.all_subsets`` order (v(empty) = 0 is implicit), so the credit is
phi = W v with W [M, 2^M - 1] from ``shapley_matrix``.
"""
from __future__ import annotations

from math import factorial

import torch
from torch import Tensor

from mars.data import subset_masks
from ..config import SHAPLEY_VARIANTS


def shapley_matrix(num_modalities: int, variant: str = "exact", players: int | None = None) -> Tensor:
    """W [M, 2^M - 1] float64 with phi = W v.

    ``"exact"``: the textbook Shapley value with v(empty) = 0,
        phi_m = sum_{S not containing m} |S|! (M-|S|-1)! / M! [v(S + m) - v(S)].
    ``"code"``: the formula of the official MCE code,
        phi_m = v({m}) / L + sum_{S containing m, |S| >= 2} (|S|-1)! (L-|S|)! / L! [v(S) - v({m})],
        with L = ``players`` (default M, as in the IEMOCAP code when every
        modality occurs in the batch; the AV-MNIST and nuScenes copies use
        L = 2^M - 1). ``players`` is only meaningful for ``"code"``.
    """
    M = int(num_modalities)
    if M < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
    if variant not in SHAPLEY_VARIANTS:
        raise ValueError(f"variant must be one of {SHAPLEY_VARIANTS}, got {variant!r}")
    if variant == "exact" and players is not None:
        raise ValueError("players (L) applies only to variant='code'")
    L = M if players is None else int(players)
    if L < M:
        raise ValueError(f"players (L) must be >= num_modalities={M}, got {players}")
    masks = subset_masks(M)
    sizes = masks.sum(dim=1).tolist()
    W = torch.zeros(M, masks.shape[0], dtype=torch.float64, device="cpu")
    for col, (mask, s) in enumerate(zip(masks.tolist(), sizes)):
        for m in range(M):
            if variant == "exact":
                # v(T) enters phi_m with + weight(|T| - 1) when m is in T (as S + m), with
                # - weight(|T|) when it is not (as S); weight(s) = s! (M-s-1)! / M!.
                if mask[m]:
                    W[m, col] = factorial(s - 1) * factorial(M - s) / factorial(M)
                else:
                    W[m, col] = -factorial(s) * factorial(M - s - 1) / factorial(M)
            elif mask[m] and s >= 2:
                W[m, col] = factorial(s - 1) * factorial(L - s) / factorial(L)
    if variant == "code":
        singleton = sizes.index(1)  # the M singletons are the first M columns, in modality order
        for m in range(M):
            W[m, singleton + m] = 1.0 / L - W[m].sum()
    return W


def coalition_values(correct: Tensor) -> Tensor:
    """correct [B, C]: per sample, the score of the prediction from each
    subset (0 where the subset is not within the sample's observed set) ->
    v [C], the batch-level counts (not normalised)."""
    return correct.sum(dim=0)


def batch_factors(correct: Tensor, observed: Tensor, teacher_correct: Tensor, weights: Tensor) -> dict[str, Tensor]:
    """MCE's batch-level factor b_m = relu(u_m - phi_m) / n_m (0 when n_m = 0).

    correct [B, C] float: score (1/0, or pixel accuracy) of the prediction of
    sample b from subset column c; 0 for subsets not within O_b. observed [B, M]
    bool. teacher_correct [B, M] float: score of the frozen unimodal model of m
    on sample b. weights: W [M, C] (``shapley_matrix``).
    -> {"b", "u", "phi", "n": [M], "v": [C]}, all detached, no host sync.
    """
    correct, teacher_correct = correct.detach(), teacher_correct.detach()
    E = observed.to(correct.dtype)
    v = coalition_values(correct)
    phi = weights.to(v.dtype) @ v
    u = (teacher_correct.to(v.dtype) * E).sum(dim=0)
    n = E.sum(dim=0)
    b = torch.where(n > 0, torch.relu(u - phi) / n.clamp(min=1), torch.zeros_like(n))
    return {"b": b, "u": u, "phi": phi, "n": n, "v": v}
