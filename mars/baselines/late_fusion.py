"""Late fusion: per-modality classifiers on the shared encoders, logits
averaged. No MoE.

Shapes: B samples, M modalities, N tokens per sample (1 for feature vectors,
H*W for feature maps), D model width, K classes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..components import ModalityEncoders, cross_entropy, total_and_parts
from ..interface import MethodModel, Output

if TYPE_CHECKING:
    from ..config import ModelConfig


class LateFusion(MethodModel):
    """Late-fusion baseline: the same encoders and missing-modality embeddings,
    one classifier per modality, logits averaged over the M modalities (missing
    ones through their learned embedding; ``config.late_fusion.average="all"``)
    or over the observed ones only (``"observed"``). No MoE.

    forward(features {m: [B, d_m] or [B, C_m, H, W]}, observed [B, M] bool,
    available=None (unused), mode="train" | "eval" (the same computation)) ->
    Output(logits [B, K] or [B, K, H, W], {}). ``observed`` may be a stack
    [P, B, M] of masks (``--masks-per-step``): the tokens are encoded once and
    the logits are [P * B, ...], mask-major.
    """

    takes_mask_stack = True

    def __init__(self, modalities: list[str], shapes: dict[str, tuple[int, ...]], num_classes: int,
                 task: str, config: ModelConfig):
        super().__init__()
        self.config, self.task, self.num_classes = config, task, num_classes
        self.modalities = list(modalities)
        d = config.d_model
        self.encode = ModalityEncoders(modalities, shapes, d, config.dropout)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d, config.d_hidden), nn.GELU(), nn.Linear(config.d_hidden, num_classes))
            for _ in modalities
        )
        self.map_size = self.encode.map_size

    def forward(self, features, observed, available=None, mode: str = "eval") -> Output:
        h = self.encode(features)
        if observed.dim() == 3:  # P masks: [P * B, N, M, D], the encoding shared
            P = observed.shape[0]
            h = self.encode.with_missing(h.repeat(P, 1, 1, 1), observed.reshape(-1, observed.shape[-1]))
        else:
            h = self.encode.with_missing(h, observed)  # [B, N, M, D]
        per_modality = torch.stack([head(h[:, :, m]) for m, head in enumerate(self.heads)], dim=2)  # [B', N, M, K]
        if self.config.late_fusion.average == "observed":
            w = observed.reshape(-1, observed.shape[-1]).to(per_modality.dtype)[:, None, :, None]  # [B', 1, M, 1]
            logits = (per_modality * w).sum(dim=2) / w.sum(dim=2).clamp(min=1)
        else:
            logits = per_modality.mean(dim=2)
        B, N, K = logits.shape
        if self.map_size is None:
            return Output(logits.mean(dim=1), {})
        return Output(logits.transpose(1, 2).reshape(B, K, *self.map_size), {})

    def loss(self, out: Output, labels: torch.Tensor, ignore_index: int | None = None) -> tuple[torch.Tensor, dict]:
        """The task cross-entropy (the only part), over every pass."""
        passes = out.logits.shape[0] // max(labels.shape[0], 1)
        if passes > 1:
            labels = labels.repeat(passes, *([1] * (labels.dim() - 1)))
        return total_and_parts({"task": cross_entropy(out.logits, labels, ignore_index)})
