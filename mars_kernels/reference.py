"""Pure-PyTorch ground truth for every op in :mod:`mars_kernels`: the oracle
the tests import.

Readable, not fast. Each op's twin lives beside the op, in its module under
:mod:`mars_kernels.ops` (``<op>_torch``), with the same signature and
semantics as the public op minus ``backend``; this module gathers them under
the ops' own names. Gradients come from torch autograd, so the hand-written
backward kernels are checked against an independent derivation. Works in
float64, which is what ``gradcheck`` uses. Production code never routes
through this module.

Shared semantics (docs/design.md section 2):

* Routing math runs in float32 (float64 for float64 input); weights come back in
  that dtype, indices as int64.
* Selection order is "larger logit first, lower expert index on ties". NaN
  counts as +inf for selection, so indices are always valid expert ids; a row
  holding NaN or +inf gets NaN weights (as ``torch.softmax`` would).
"""
from __future__ import annotations

import torch

from .ops.common import compute_dtype, topk_order
from .ops.dispatch import apply_capacity_torch as apply_capacity
from .ops.dispatch import moe_align_torch as moe_align
from .ops.dispatch import permute_torch as permute
from .ops.dispatch import unpermute_torch as unpermute
from .ops.expert_mlp import ACTIVATIONS, activation
from .ops.expert_mlp import grouped_mlp_torch as grouped_mlp
from .ops.expert_mlp import moe_mlp_torch as moe_mlp
from .ops.gating import router_stats_torch as router_stats
from .ops.gating import topk_gating_torch as topk_gating
from .ops.losses import cv_squared, noisy_balance_loss
from .ops.losses import router_z_loss_torch as router_z_loss
from .ops.losses import switch_balance_loss_torch as switch_balance_loss
from .ops.mars_routing import mars_routing_torch as mars_routing
from .ops.modality_attention import modality_attention_torch as modality_attention
from .ops.noisy_gating import noisy_topk_gating_torch as noisy_topk_gating
from .ops.residual_norm import residual_norm_mean_torch as residual_norm_mean

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
    "moe_mlp",
    "moe_loop",
    "modality_attention",
    "residual_norm_mean",
]


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
