"""Fusion backbones of the models built on :class:`mars.model.MarsModel`
(MARS, vanilla MoE, and the backbone alone), chosen by ``ModelConfig.backbone``.

Every backbone maps the modality tokens h [B, N, M, D] (from
:class:`mars.components.ModalityEncoders`), the learned missing embeddings
[M, D] and P observed masks [P, B, M] bool to P fused representations
z [P, B, N, D] (``fuse_stack``); a modality a mask leaves out is replaced by
its missing embedding. The tokens are encoded once for all masks.

* ``"attention"`` (default): attention across the modality axis at each token
  position, residual LayerNorm, mean over modalities
  (:class:`mars.components.ModalityAttentionFusion`, on the fused ops
  ``modality_attention`` / ``residual_norm_mean``, all masks in one call).
* ``"late"``: late-fusion style: a per-modality MLP tower D -> H -> D on each
  modality's token, mean over modalities; no interaction before the mean. The
  towers run once on the tokens and once on the missing embeddings, and each
  mask picks its rows.
* ``"mce"``: MCE's backbone: its completion Transformer block across the M
  modality tokens (with a learned per-modality position vector) and its
  concatenating readout, here a projection of the M*D concatenation to D. Its
  missing modalities enter as the missing embeddings (MCE itself zeroes
  them). One Transformer pass per mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .baselines.mce import CompletionTransformer
from .components import ModalityAttentionFusion, as_dtype

__all__ = ["LateTowers", "CompletionFusion", "make_fusion"]


def _substitute(h: torch.Tensor, missing: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """h [B, N, M, D], missing [M, D], observed [P, B, M] -> [P, B, N, M, D]
    with the unobserved modalities' tokens replaced by their embedding."""
    return torch.where(observed[:, :, None, :, None], h.unsqueeze(0), as_dtype(missing, h.dtype))


class LateTowers(nn.Module):
    """Late-fusion-style backbone: z = mean_m Tower_m(x_m), Tower_m: Linear(D, H)
    -> GELU -> Dropout -> Linear(H, D), x_m the token of modality m or its
    missing embedding. Parameters w1 [M, D, H], b1 [M, H], w2 [M, H, D], b2 [M, D]."""

    def __init__(self, num_modalities: int, d: int, d_hidden: int, dropout: float):
        super().__init__()
        M = num_modalities
        self.w1 = nn.Parameter(torch.empty(M, d, d_hidden))
        self.b1 = nn.Parameter(torch.empty(M, d_hidden))
        self.w2 = nn.Parameter(torch.empty(M, d_hidden, d))
        self.b2 = nn.Parameter(torch.empty(M, d))
        for w, b, fan_in in ((self.w1, self.b1, d), (self.w2, self.b2, d_hidden)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        self.drop = nn.Dropout(dropout)
        self.backend = None  # runs on torch ops only

    def towers(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., M, D] -> [..., M, D], tower m on column m."""
        dt = x.dtype
        a = F.gelu(torch.einsum("...md,mdh->...mh", x, as_dtype(self.w1, dt)) + as_dtype(self.b1, dt))
        return torch.einsum("...mh,mhd->...md", self.drop(a), as_dtype(self.w2, dt)) + as_dtype(self.b2, dt)

    def fuse_stack(self, h: torch.Tensor, missing: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        t = self.towers(h)  # [B, N, M, D], once for every mask
        t_missing = self.towers(as_dtype(missing, h.dtype))  # [M, D]
        return torch.where(observed[:, :, None, :, None], t.unsqueeze(0), t_missing).mean(dim=-2)


class CompletionFusion(nn.Module):
    """MCE's backbone: (x + p) through one pre-LN Transformer block across the
    modality axis at each token (:class:`mars.baselines.mce.CompletionTransformer`),
    then Linear(M * D, D) on the concatenated modality tokens."""

    def __init__(self, num_modalities: int, d: int, heads: int, d_hidden: int, dropout: float):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(num_modalities, d))
        self.complete = CompletionTransformer(d, heads, d_hidden, dropout)
        self.project = nn.Linear(num_modalities * d, d)
        self.backend = None  # runs on torch ops only

    def fuse_stack(self, h: torch.Tensor, missing: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        x = _substitute(h, missing, observed) + as_dtype(self.position, h.dtype)  # [P, B, N, M, D]
        return self.project(self.complete(x).flatten(-2))


def make_fusion(name: str, num_modalities: int, d: int, heads: int, d_hidden: int, dropout: float,
                backend: str | None = None) -> nn.Module:
    """The backbone ``name`` ("attention", "late", "mce"); see the module docstring."""
    if name == "attention":
        return ModalityAttentionFusion(d, heads, dropout, backend)
    if name == "late":
        return LateTowers(num_modalities, d, d_hidden, dropout)
    if name == "mce":
        return CompletionFusion(num_modalities, d, heads, d_hidden, dropout)
    raise ValueError(f"backbone must be one of ('attention', 'late', 'mce'), got {name!r}")
