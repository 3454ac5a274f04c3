"""mars_kernels: fused Triton, CUDA and CPU kernels for sparse mixture-of-experts
routing, each with a pure-PyTorch reference twin (:mod:`mars_kernels.reference`).

>>> import torch, mars_kernels as mk
>>> weights, indices = mk.topk_gating(torch.randn(16, 8), k=2)
"""
from . import backend, reference
from .attention import attention_keep_mask, modality_attention
from .backend import extension_available
from .residual_norm import residual_norm_mean
from .dispatch import MoEMeta, apply_capacity, grouped_mlp, moe_align, moe_mlp, permute, unpermute
from .layers import Experts, NoisyTopKRouter, Routing, SparseMoE, TopKRouter
from .expert_parallel import ShardedExperts, expert_parallel, gather_experts, shard_experts, shard_range
from .ops import (
    cv_squared,
    expert_counts,
    mars_routing,
    noisy_balance_loss,
    noisy_topk_gating,
    router_stats,
    router_z_loss,
    switch_balance_loss,
    topk_gating,
)

if extension_available():
    from ._autograd import register_op_autograd
    from ._fake import register_fakes

    register_fakes()
    register_op_autograd()

__version__ = "0.1.0"

__all__ = [
    "backend",
    "reference",
    "extension_available",
    "Routing",
    "TopKRouter",
    "NoisyTopKRouter",
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
