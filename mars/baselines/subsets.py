"""Batched enumeration of modality subsets for MCE's subset passes.

Subsets of M modalities are [M] bool masks; their *column* is their position
in ``mars.data.all_subsets(M)`` (by size, then lexicographic), so every table
over subsets (coalition values, Shapley coefficients) has 2^M - 1 columns in
that order. A subset's *code* is its bit pattern, sum_m mask_m * 2^m.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mars.data import subset_masks


def subset_codes(masks: Tensor) -> Tensor:
    """masks [..., M] bool -> bit codes [...] int64 (modality m is bit m)."""
    M = masks.shape[-1]
    bits = 2 ** torch.arange(M, device=masks.device, dtype=torch.long)
    return (masks.long() * bits).sum(dim=-1)


def subset_table(num_modalities: int) -> tuple[Tensor, Tensor]:
    """-> (masks [C, M] bool with C = 2^M - 1 in ``all_subsets`` order,
    column_of_code [2^M] int64: the column of each code, -1 for the empty set)."""
    masks = subset_masks(num_modalities)
    column_of_code = torch.full((2 ** num_modalities,), -1, dtype=torch.long)
    column_of_code[subset_codes(masks)] = torch.arange(masks.shape[0])
    return masks, column_of_code


def observed_columns(observed: Tensor, column_of_code: Tensor) -> Tensor:
    """observed [B, M] bool -> the column of each sample's observed set O_b, [B]
    int64 (-1 for a sample with nothing observed)."""
    return column_of_code[subset_codes(observed)]


def proper_subset_pairs(observed: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """All pairs (b, S) with S a non-empty proper subset of O_b.

    observed [B, M] bool, masks [C, M] bool (``subset_table``) ->
    (sample [P] int64, column [P] int64), sample-major, columns ascending.
    P depends on the data, so this is the one host synchronisation of the
    subset pass (``nonzero``)."""
    inside = ~(masks[None] & ~observed[:, None]).any(dim=2)  # [B, C]: S within O_b
    proper = inside & (masks.sum(dim=1)[None] < observed.sum(dim=1, keepdim=True))
    sample, column = proper.nonzero(as_tuple=True)
    return sample, column


def subsets_per_sample(observed: Tensor) -> Tensor:
    """K_b = 2^|O_b| - 1, the number of non-empty subsets of each sample's
    observed set (O_b itself included), as float [B]."""
    return torch.exp2(observed.sum(dim=1).to(torch.float32)) - 1
