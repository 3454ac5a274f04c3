"""MARS as one layer: :class:`MarsConfig` (its options and defaults),
:class:`MarsRouter` (the residual and feature routers), :class:`MarsMoE`
(router + experts + skip connection) and the router-input interface
(:mod:`.inputs`) that variants under study plug into. The MARS-specific ops
under them: :func:`mars_kernels.mars_routing` (routing) and
:func:`mars_kernels.modality_attention` / :func:`mars_kernels.residual_norm_mean`
(the fusion of the ``mars`` package's backbone)."""
from .config import MIX_MODES, NOISE_MODES, ROUTINGS, MarsConfig
from .inputs import ConcatResidual, IncompleteTokens, RouterInput, mask_tokens
from .moe import MarsMoE
from .router import MODES, MarsRouter

__all__ = ["MarsConfig", "MarsRouter", "MarsMoE", "RouterInput", "IncompleteTokens", "ConcatResidual", "mask_tokens",
           "ROUTINGS", "NOISE_MODES", "MIX_MODES", "MODES"]
