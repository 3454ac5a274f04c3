"""The pieces every method shares: modality encoders with learned
missing-modality embeddings, the attention fusion across modalities, the
token readout and the loss assembly.

Shapes: B samples, M modalities, N tokens per sample (1 for feature vectors,
H*W for feature maps), D model width, K classes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import mars_kernels as mk

__all__ = ["make_encoder", "ModalityEncoders", "ModalityAttentionFusion", "token_readout", "cross_entropy",
           "total_and_parts", "as_dtype", "call_in_dtype"]


def as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (a differentiable cast; ``t`` itself when it already
    is, or None). Under ``torch.autocast`` the matmuls return bfloat16 while
    the parameters stay float32 (the master weights); the fused ops take every
    tensor in one dtype, so their parameter arguments are cast at the call."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def call_in_dtype(module: nn.Module, dtype: torch.dtype, *args, **kwargs):
    """``module(*args, **kwargs)`` with its floating parameters cast to
    ``dtype`` for this call (gradients flow back to the float32 parameters);
    a plain call when they already are ``dtype``. For the mars_kernels layers
    that run a fused op on their own parameters (the experts) under autocast."""
    params = dict(module.named_parameters())
    if all(not p.is_floating_point() or p.dtype == dtype for p in params.values()):
        return module(*args, **kwargs)
    cast = {name: as_dtype(p, dtype) if p.is_floating_point() else p for name, p in params.items()}
    return torch.func.functional_call(module, cast, args, kwargs)


def make_encoder(shape: tuple[int, ...], d: int, dropout: float) -> nn.Module:
    """A modality encoder: an MLP for vectors [d_m] -> [D], a small conv net for
    maps [C, H, W] -> [D, H, W]."""
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, d), nn.LayerNorm(d))
    if len(shape) == 3:
        return nn.Sequential(nn.Conv2d(shape[0], d, 3, padding=1), nn.GELU(), nn.Conv2d(d, d, 1))
    raise ValueError(f"modality features must be [d] vectors or [C, H, W] maps, got shape {shape}")


def module_key(modality: str) -> str:
    """The submodule name of a modality's encoder: the name itself, or, when
    it holds a ``.`` (which PyTorch forbids in module names; the data format
    allows it, e.g. ``audio.v2``), the name with ``%`` and ``.`` escaped as
    ``%25`` and ``%2E`` (names without a ``.`` keep their checkpoint keys)."""
    if "." not in modality:
        return modality
    return modality.replace("%", "%25").replace(".", "%2E")


class ModalityEncoders(nn.Module):
    """Per-modality encoders plus learned missing-modality embeddings.

    forward(features: {m: [B, d_m] or [B, C_m, H, W]}) -> h [B, N, M, D].
    ``map_size``: (H, W) for feature maps, None for vectors.
    """

    def __init__(self, modalities: list[str], shapes: dict[str, tuple[int, ...]], d: int, dropout: float):
        super().__init__()
        self.modalities = list(modalities)
        ranks = {len(shapes[m]) for m in modalities}
        if len(ranks) != 1:
            raise ValueError(f"all modalities must be vectors or all maps, got shapes {shapes}")
        self.maps = ranks == {3}
        if self.maps and len({shapes[m][1:] for m in modalities}) != 1:
            raise ValueError(f"feature maps must share H and W, got {shapes}")
        self.map_size = tuple(shapes[modalities[0]][1:]) if self.maps else None
        self.keys = [module_key(m) for m in modalities]
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"modality names {modalities} give the same module name after escaping '.'; rename one")
        self.encoders = nn.ModuleDict({k: make_encoder(tuple(shapes[m]), d, dropout) for k, m in zip(self.keys, modalities)})
        self.missing = nn.Parameter(torch.randn(len(modalities), d) * 0.02)

    def encode_modality(self, m: int, x: torch.Tensor) -> torch.Tensor:
        """Features of modality number m [n, d_m] or [n, C_m, H, W] -> tokens [n, N, D]."""
        h = self.encoders[self.keys[m]](x)
        if self.maps:
            return h.flatten(2).transpose(1, 2)  # [n, D, H, W] -> [n, H*W, D]
        return h.unsqueeze(1)  # [n, 1, D]

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.encode_modality(i, features[m]) for i, m in enumerate(self.modalities)], dim=2)

    def with_missing(self, h: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """Replace the tokens of unobserved modalities: h [B, N, M, D], observed [B, M]."""
        return torch.where(observed[:, None, :, None], h, self.missing.to(h.dtype))


class ModalityHeads(nn.Module):
    """One linear head per modality, batched: x [..., M, D] -> [..., M, K]."""

    def __init__(self, num_modalities: int, d: int, num_classes: int):
        super().__init__()
        bound = 1.0 / math.sqrt(d)  # nn.Linear's default initialisation range
        self.weight = nn.Parameter(torch.empty(num_modalities, num_classes, d).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_modalities, num_classes).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...md,mkd->...mk", x, self.weight) + self.bias


class ModalityAttentionFusion(nn.Module):
    """Self-attention across the modality axis at each token, then the mean
    over modalities: h [B, N, M, D] -> z [B, N, D].

    The parameters are an ``nn.MultiheadAttention`` (``attn``: packed in- and
    out-projections, attention dropout) and a LayerNorm; the attention runs on
    :func:`mars_kernels.modality_attention` and the residual, LayerNorm and mean
    on :func:`mars_kernels.residual_norm_mean`, with ``backend``.
    """

    def __init__(self, d: int, heads: int, dropout: float, backend: str | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.backend = backend

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [..., D] -> packed q | k | v [..., 3D]."""
        return F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)

    def _attend(self, h: torch.Tensor, missing: torch.Tensor | None = None,
                observed: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens h [B, N, M, D] -> z [*P, B, N, D]. With missing [M, D]
        embeddings and ``observed`` [*P, B, M] bool (P masks, or none), the
        tokens a mask leaves out are replaced by their embedding, for all
        masks in one call of each op. The in-projection is per token, so the
        tokens and the embeddings are projected once for all masks and the ops
        pick the rows (and sum the masks' gradients in the kernels)."""
        B, N, M, D = h.shape
        masks = () if observed is None else tuple(observed.shape[:-2])  # () or (P,)
        heads, p = self.attn.num_heads, self.attn.dropout
        keep = None
        if self.training and p > 0:
            keep = mk.attention_keep_mask(math.prod(masks) * B * N, heads, M, p, device=h.device)
            keep = keep.view(*masks, B * N, heads, M, M)
        proj_missing = None
        if observed is not None:
            observed = observed.unsqueeze(-2).expand(*masks, B, N, M).reshape(*masks, B * N, M)
            missing = missing.to(h.dtype)
            proj_missing = self._project(missing)
        tokens = h.reshape(B * N, M, D)
        o = mk.modality_attention(self._project(tokens), heads, keep=keep, missing=proj_missing,
                                  observed=observed, backend=self.backend)
        y = self.attn.out_proj(o)
        weight, bias = as_dtype(self.norm.weight, y.dtype), as_dtype(self.norm.bias, y.dtype)
        z = mk.residual_norm_mean(y, as_dtype(tokens, y.dtype), weight, bias, missing=as_dtype(missing, y.dtype),
                                  observed=observed, eps=self.norm.eps, backend=self.backend)
        return z.view(*masks, B, N, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._attend(h)

    def fuse_stack(self, h: torch.Tensor, missing: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """h [B, N, M, D] tokens, missing [M, D], observed [P, B, M] bool ->
        z [P, B, N, D], one fused representation per mask, every mask in one
        call of each op."""
        return self._attend(h, missing, observed)

    def fuse_masked(self, h: torch.Tensor, missing: torch.Tensor, masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """h [B, N, M, D] tokens, missing [M, D] embeddings, masks [B, M] bool
        -> one z [B, N, D] per mask, with the tokens of each modality the mask
        leaves out replaced by its missing embedding."""
        return list(self._attend(h, missing, torch.stack(list(masks))).unbind(0))


def token_readout(head: nn.Module, y: torch.Tensor, map_size: tuple[int, int] | None) -> torch.Tensor:
    """Task logits from tokens: y [B, N, D] -> head(mean over tokens) [B, K]
    (vectors, ``map_size`` None), or head per token as a map [B, K, H, W]."""
    if map_size is None:
        return head(y.mean(dim=1))
    logits = head(y)  # [B, N, K]
    return logits.transpose(1, 2).reshape(y.shape[0], logits.shape[-1], *map_size)


# ------------------------------------------------------------------ per-sample scores
def _valid(labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    return labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)


def _sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    """[B] or [B, H, W] -> [B] (sums over pixels; works for B = 0)."""
    return t.flatten(1).sum(dim=1) if t.dim() > 1 else t


def ce_sum_count(logits: torch.Tensor, labels: torch.Tensor,
                 ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy summed over valid pixels and the valid count:
    logits [B, K] or [B, K, H, W], labels [B] or [B, H, W] -> ([B], [B])."""
    valid = _valid(labels, ignore_index)
    ce = F.cross_entropy(logits, labels.masked_fill(~valid, 0), reduction="none") * valid
    return _sum_per_sample(ce), _sum_per_sample(valid).to(ce.dtype)


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """CE per sample, the mean over its valid pixels for segmentation: [B]."""
    total, count = ce_sum_count(logits, labels, ignore_index)
    return total / count.clamp(min=1)


def per_sample_score(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """1/0 correctness (classification) or pixel accuracy over valid pixels
    (segmentation; 0 without valid pixels) per sample, detached: [B] float."""
    valid = _valid(labels, ignore_index)
    hit = (logits.detach().argmax(dim=1) == labels) & valid
    return _sum_per_sample(hit).float() / _sum_per_sample(valid).clamp(min=1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """Mean cross-entropy, pixels labelled ``ignore_index`` left out; a batch
    with no labelled pixel at all contributes 0 (with a zero gradient), not
    the NaN of ``F.cross_entropy``'s 0 / 0."""
    if ignore_index is None:
        return F.cross_entropy(logits, labels)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1).to(total.dtype)


def total_and_parts(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss from its (already weighted) parts: (their sum, each
    part as a float for the log)."""
    total = sum(parts.values())
    return total, {name: float(v.detach()) for name, v in parts.items()}
