"""mars_kernels: fused Triton, CUDA and CPU kernels for sparse mixture-of-experts
routing, each op with a pure-PyTorch twin (:mod:`mars_kernels.reference`).

>>> import torch, mars_kernels as mk
>>> weights, indices = mk.topk_gating(torch.randn(16, 8), k=2)

Layout: :mod:`mars_kernels.ops` (one module per op family), :mod:`mars_kernels.layers`
(nn.Modules), :mod:`mars_kernels.backend` (backend names and the backend table),
:mod:`mars_kernels.library` (the torch.library registration path).
"""
from . import backend, reference
from .backend import extension_available
from .expert_parallel import ShardedExperts, expert_parallel, gather_experts, shard_experts, shard_range
from .layers import Experts, MarsConfig, MarsMoE, MarsRouter, NoisyTopKRouter, Routing, SparseMoE, TopKRouter
from .ops import (
    MoEMeta,
    apply_capacity,
    attention_keep_mask,
    cv_squared,
    expert_counts,
    grouped_mlp,
    mars_routing,
    modality_attention,
    moe_align,
    moe_mlp,
    noisy_balance_loss,
    noisy_topk_gating,
    permute,
    residual_norm_mean,
    router_stats,
    router_z_loss,
    switch_balance_loss,
    topk_gating,
    unpermute,
)

__version__ = "0.1.0"

__all__ = [
    "backend",
    "reference",
    "extension_available",
    "Routing",
    "TopKRouter",
    "NoisyTopKRouter",
    "MarsConfig",
    "MarsRouter",
    "MarsMoE",
    "Experts",
    "SparseMoE",
    "topk_gating",
    "noisy_topk_gating",
    "router_stats",
    "expert_counts",
    "switch_balance_loss",
    "router_z_loss",
    "cv_squared",
    "noisy_balance_loss",
    "mars_routing",
    "residual_norm_mean",
    "MoEMeta",
    "moe_align",
    "apply_capacity",
    "permute",
    "unpermute",
    "grouped_mlp",
    "moe_mlp",
    "ShardedExperts",
    "shard_experts",
    "gather_experts",
    "expert_parallel",
    "shard_range",
    "modality_attention",
    "attention_keep_mask",
]
