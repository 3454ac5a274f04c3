"""Silent missingness (research, validation only): a missing modality is not
flagged, its encoder tokens are replaced by noise with the statistics of that
modality's real tokens, and the model is told every modality is present. The
pattern is then not given to the model at any point, so whatever depends on
it — the missing embeddings, the attention mask, a router reading the mask,
the vote over observed heads — has to be inferred from the tokens themselves:
the setting where MARS's feature router, trained to imitate a router that saw
the complete/incomplete contrast, has real work to do
(``model.research.missing_signal = "silent"``; ``docs/mars_research.md``).

Shapes: h [B, N, M, D] encoder tokens, masks [P, B, M] bool.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MISSING_SIGNALS", "SilentNoise"]

#: flag: the model is given the mask (missing embeddings, masked attention);
#: silent: corrupted tokens and no mask.
MISSING_SIGNALS = ("flag", "silent")


class SilentNoise(nn.Module):
    """forward(h [B, N, M, D], masks [P, B, M] bool) -> [P, B, N, M, D]: for
    each mask, the tokens of the modalities it leaves out replaced by Gaussian
    noise with the running per-(token, modality, channel) mean and variance
    of the real tokens (updated from each training batch, like batch norm's;
    no gradient through them). The noise never depends on the sample's own
    missing values, and has the scale and offset of real tokens, so a
    corrupted token is not told apart by its size. In evaluation the noise
    is drawn from a fixed seed (the same on every call)."""

    def __init__(self, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("var", torch.zeros(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("mean", "var"):  # the statistics' shape comes with the checkpoint
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, h: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if h.dim() != 4 or masks.dim() != 3 or masks.shape[1:] != (h.shape[0], h.shape[2]):
            raise ValueError(f"SilentNoise needs h [B, N, M, D] and masks [P, B, M], got {tuple(h.shape)} and "
                             f"{tuple(masks.shape)}")
        if self.training:
            with torch.no_grad():
                x = h.detach().float()
                mean, var = x.mean(dim=0), x.var(dim=0, unbiased=False)
                if self.mean.shape != mean.shape:
                    self.mean, self.var = mean.clone(), var.clone()
                else:
                    self.mean.lerp_(mean, self.momentum)
                    self.var.lerp_(var, self.momentum)
        elif self.mean.shape != h.shape[1:]:
            raise RuntimeError("SilentNoise has no token statistics for this shape: train the model first "
                               f"(statistics {tuple(self.mean.shape)}, tokens {tuple(h.shape[1:])})")
        P = masks.shape[0]
        # evaluation draws the same noise on every call, so a score does not depend on what ran before
        gen = None if self.training else torch.Generator(device=h.device).manual_seed(0)
        noise = torch.randn((P, *h.shape), dtype=h.dtype, device=h.device, generator=gen)
        noise = self.mean.to(h.dtype) + self.var.sqrt().to(h.dtype) * noise
        keep = masks.to(h.device)[:, :, None, :, None]  # [P, B, 1, M, 1]
        return torch.where(keep, h.unsqueeze(0), noise)
