"""What MARS's two routers read: router inputs as small strategy modules.

A router input maps the incomplete tokens z_i [..., D] (and, where it reads
them, the complete tokens z_c and the observed-modality mask) to the router's
input [..., width]. The layer's defaults are :class:`IncompleteTokens` for the
feature router (z_i: what inference has) and :class:`ConcatResidual` for the
residual router ([z_i, stopgrad(z_c)]: the contrast of the two passes).
Variants under study (the difference z_c - z_i, its per-pattern mean, a
router on the mask) live in the model package (``mars.research``) and are
passed to :class:`~mars_kernels.MarsRouter` as instances of this interface.
"""
from __future__ import annotations

import abc

import torch
from torch import nn

__all__ = ["RouterInput", "IncompleteTokens", "ConcatResidual", "mask_tokens"]


class RouterInput(nn.Module, abc.ABC):
    """Interface: ``width(d_model)`` is the input's last dimension;
    ``forward(z_i, z_c, observed)`` -> [..., width] with z_i's leading dims.

    ``reads_complete``: forward reads z_c (residual-router inputs);
    ``reads_mask``: forward reads ``observed`` [..., M] bool (then every call
    that runs this router must pass it).
    """

    reads_complete = False
    reads_mask = False

    @abc.abstractmethod
    def width(self, d_model: int) -> int:
        """The input's last dimension for tokens of width ``d_model``."""

    @abc.abstractmethod
    def forward(self, z_i: torch.Tensor, z_c: torch.Tensor | None = None,
                observed: torch.Tensor | None = None) -> torch.Tensor:
        """-> the router's input [..., width(D)]."""


class IncompleteTokens(RouterInput):
    """z_i itself: the feature router's input (the only one at inference)."""

    def width(self, d_model: int) -> int:
        return d_model

    def forward(self, z_i, z_c=None, observed=None):
        return z_i


class ConcatResidual(RouterInput):
    """[z_i, stopgrad(z_c)] [..., 2D]: the residual router's input. ``z_c`` may
    have fewer leading dims than z_i (one complete pass for P incomplete ones):
    it is broadcast."""

    reads_complete = True

    def width(self, d_model: int) -> int:
        return 2 * d_model

    def forward(self, z_i, z_c=None, observed=None):
        return torch.cat([z_i, z_c.detach().expand_as(z_i)], dim=-1)


def mask_tokens(observed: torch.Tensor | None, z: torch.Tensor, width: int) -> torch.Tensor:
    """The observed-modality mask per token: observed [..., M] bool (M =
    ``width``), broadcast to the leading dims of the tokens z [..., D] ->
    [T, M] in z's dtype and device."""
    if observed is None:
        raise ValueError(f"this router reads the observed-modality mask; pass observed [..., {width}] bool")
    if not isinstance(observed, torch.Tensor) or observed.dim() < 1 or observed.shape[-1] != width:
        got = tuple(observed.shape) if isinstance(observed, torch.Tensor) else type(observed).__name__
        raise ValueError(f"observed must be a [..., M={width}] tensor, got {got}")
    lead = z.shape[:-1]
    try:
        m = observed.to(device=z.device, dtype=z.dtype).expand(*lead, width)
    except RuntimeError:
        raise ValueError(f"observed {tuple(observed.shape)} does not broadcast to the tokens' leading dims "
                         f"{tuple(lead)}") from None
    return m.reshape(-1, width)
