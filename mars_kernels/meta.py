"""The dispatch metadata that moves token rows to experts and back."""
from __future__ import annotations

from typing import NamedTuple

import torch


class MoEMeta(NamedTuple):
    """Built by :func:`mars_kernels.moe_align` from indices [T, k].

    S = T * k assignments; assignment ``flat = t * k + j`` is token t's j-th
    expert. Sorted order groups assignments by expert (stable: by flat index
    within an expert); assignments to the sentinel expert E (dropped by a
    capacity limit) come last. All index tensors are int64.

    counts      [E]    assignments per expert (dropped ones excluded)
    offsets     [E+1]  expert e owns sorted slots offsets[e] .. offsets[e+1]-1;
                       offsets[E] = number of kept assignments
    permutation [S]    sorted slot -> flat assignment (token = permutation // k)
    inverse     [S]    flat assignment -> sorted slot
    block_expert [NB]  expert of row block b, -1 for an unused block
    block_start [NB]   first sorted slot of block b; block b covers slots
                       block_start .. min(block_start + block_size, offsets[e+1]) - 1
    NB = ceil(S / block_size) + E, the worst case, so no device-to-host sync is
    needed to size it.
    """

    num_experts: int
    top_k: int
    block_size: int
    counts: torch.Tensor
    offsets: torch.Tensor
    permutation: torch.Tensor
    inverse: torch.Tensor
    block_expert: torch.Tensor
    block_start: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.permutation.shape[0] // self.top_k if self.top_k else 0


def max_blocks(num_assignments: int, num_experts: int, block_size: int) -> int:
    """NB: the most row blocks any routing of S assignments can need."""
    return -(-num_assignments // block_size) + num_experts
