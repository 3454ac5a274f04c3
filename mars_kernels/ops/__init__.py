"""The ops, one module per op family. Each module holds the public function
(docstring with shapes), its validation, its kernel-level ops' schemas with
their ``torch.library`` registration (fake, autograd, Triton twin; see
:mod:`mars_kernels.library`) and its pure-PyTorch twin ``<op>_torch``. Its
kernels sit in files of the same name: the Triton launchers in
``ops/triton/<module>.py`` (``@triton.jit`` bodies in
``ops/triton/_<module>_kernels.py``), the C++ kernels in
``csrc/cpu/<module>.cpp``, the CUDA kernels in ``csrc/cuda/<module>.cu`` with
their torch binding ``csrc/cuda/<module>_binding.cpp``. Which implementation
runs for which backend is the table in :mod:`mars_kernels.backend`.
"""
from .common import compute_dtype, topk_order
from .dispatch import DEFAULT_BLOCK_SIZE, MoEMeta, apply_capacity, moe_align, permute, unpermute
from .expert_mlp import ACTIVATIONS, Activation, grouped_mlp, moe_mlp, parse_activation
from .gating import MODES, router_stats, topk_gating
from .losses import (
    cv_squared,
    expert_counts,
    noisy_balance_loss,
    router_z_loss,
    switch_balance_from_stats,
    switch_balance_loss,
    z_loss_from_lse,
)
from .mars_routing import mars_routing
from .modality_attention import attention_keep_mask, modality_attention
from .noisy_gating import noisy_topk_gating
from .residual_norm import residual_norm_mean

__all__ = [
    "ACTIVATIONS", "Activation", "parse_activation", "DEFAULT_BLOCK_SIZE", "MODES", "MoEMeta",
    "apply_capacity", "attention_keep_mask", "compute_dtype", "cv_squared", "expert_counts", "grouped_mlp",
    "mars_routing", "modality_attention", "moe_align", "moe_mlp", "noisy_balance_loss", "noisy_topk_gating",
    "permute", "residual_norm_mean", "router_stats", "router_z_loss", "switch_balance_from_stats",
    "switch_balance_loss", "topk_gating", "topk_order", "unpermute", "z_loss_from_lse",
]
