"""Triton backend of mars_kernels (GPU; also runs on CPU under ``TRITON_INTERPRET=1``).

The functions here mirror the ``torch.ops.mars_kernels`` schemas one to one.
Importing this package raises ImportError when Triton is not installed; callers
guard the import.
"""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mars_kernels.triton needs the 'triton' package (pip install triton); "
        "use the 'reference', 'cpu' or 'cuda' backend instead"
    ) from exc

from .gating import (
    noisy_topk_gating_bwd,
    noisy_topk_gating_fwd,
    router_stats_bwd,
    router_stats_fwd,
    topk_gating_bwd,
    topk_gating_fwd,
)
from .attention import modality_attention_bwd, modality_attention_fwd
from .mars import mars_routing_bwd, mars_routing_fwd
from .moe import BLOCK_M, moe_mlp_bwd, moe_mlp_fwd
from .residual_norm import residual_norm_mean_bwd, residual_norm_mean_fwd

__all__ = [
    "residual_norm_mean_fwd",
    "residual_norm_mean_bwd",
    "topk_gating_fwd",
    "topk_gating_bwd",
    "noisy_topk_gating_fwd",
    "noisy_topk_gating_bwd",
    "router_stats_fwd",
    "router_stats_bwd",
    "mars_routing_fwd",
    "mars_routing_bwd",
    "BLOCK_M",
    "moe_mlp_fwd",
    "moe_mlp_bwd",
    "modality_attention_fwd",
    "modality_attention_bwd",
]
