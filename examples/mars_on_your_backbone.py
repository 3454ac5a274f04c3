"""MARS on your own fusion backbone, in a few lines (runs in about a minute on 2 CPU cores).

Your backbone turns the modalities of a sample into a fused vector (or
tokens). MARS needs it twice in training -- on the incomplete input (the
modalities you keep for this step) and on the complete one -- and once at
inference, on what was observed. ``mk.MarsMoE`` does the rest: the residual
router on the complete/incomplete contrast, the feature router that imitates
it, the discrepancy-aware noise and the experts; ``aux["loss"]`` holds its
auxiliary losses. ``mk.MarsMoE(d, h, E, k)`` with no options is the layer of
the ``mars`` command's results; the command's recipe around the layer (8
incomplete masks per step sharing one complete pass, per-modality heads and
their vote) is its model's, :class:`mars.model.MarsModel`.

The script trains the backbone alone and the backbone + MARS on the generated
``synthetic-missing`` data (4 modalities, 8 classes; ``mars.data.make_missing``)
with random missing modalities, and prints both validation accuracies averaged
over the 15 modality subsets. ``python examples/mars_on_your_backbone.py``
"""
from __future__ import annotations

import itertools
import time

import torch
import torch.nn.functional as F
from torch import nn

import mars_kernels as mk
from mars.data import make_missing


class MyFusion(nn.Module):
    """A stand-in for YOUR backbone: per-modality encoders, a learned vector
    for each missing modality, the concatenation through an MLP.
    forward(xs: list of [B, d_m], observed [B, M] bool) -> z [B, D]."""

    def __init__(self, dims: list[int], d: int):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(dm, d), nn.GELU(), nn.LayerNorm(d)) for dm in dims)
        self.missing = nn.Parameter(torch.zeros(len(dims), d))
        self.fuse = nn.Sequential(nn.Linear(len(dims) * d, d), nn.GELU(), nn.LayerNorm(d))

    def forward(self, xs, observed):
        h = torch.stack([enc(x) for enc, x in zip(self.encoders, xs)], dim=1)  # [B, M, D]
        h = torch.where(observed[..., None], h, self.missing)
        return self.fuse(h.flatten(1))


class BackboneWithMars(nn.Module):
    """Your backbone + MARS: the only MARS-specific lines are the MarsMoE and
    the second (complete) backbone pass in training."""

    def __init__(self, dims, d, num_classes, use_mars=True):
        super().__init__()
        self.backbone = MyFusion(dims, d)
        self.moe = mk.MarsMoE(d, 2 * d, num_experts=8, k=2) if use_mars else None
        self.head = nn.Linear(d, num_classes)

    def forward(self, xs, observed, available=None):
        z_i = self.backbone(xs, observed)                       # the incomplete pass
        if self.moe is None:
            return self.head(z_i), {}
        if not self.training:
            y, _ = self.moe(z_i)                                 # inference: z_i only
            return self.head(y), {}
        z_c = self.backbone(xs, available)                       # training: the complete pass too
        y, aux = self.moe(z_i, z_c)
        return self.head(y), {"complete_logits": self.head(z_c), **aux}


def loss_fn(logits, extra, labels):
    loss = F.cross_entropy(logits, labels)
    if "complete_logits" in extra:                               # MARS: complete-pass CE + router losses
        loss = loss + F.cross_entropy(extra["complete_logits"], labels) + extra["loss"]
    return loss


def random_masks(n, M, gen):
    """A uniformly random non-empty subset of the M modalities per sample."""
    while True:
        m = torch.rand(n, M, generator=gen) < 0.5
        empty = ~m.any(1)
        if not empty.any():
            return m
        m[empty] = torch.rand(int(empty.sum()), M, generator=gen) < 0.5


def train_and_score(use_mars: bool, data, epochs=30, seed=0) -> float:
    train_set, val_set, _ = data
    names = train_set.modalities
    M = len(names)
    torch.manual_seed(seed)
    model = BackboneWithMars([train_set.features[m].shape[1] for m in names], 64, train_set.num_classes, use_mars)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    n = len(train_set)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(64):
            xs = [train_set.features[m][idx] for m in names]
            observed = random_masks(len(idx), M, gen)
            complete = torch.ones_like(observed)
            logits, extra = model(xs, observed, complete)
            loss = loss_fn(logits, extra, train_set.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    scores = []
    with torch.no_grad():  # every non-empty subset of modalities, on the validation split
        for size in range(1, M + 1):
            for subset in itertools.combinations(range(M), size):
                observed = torch.zeros(len(val_set), M, dtype=torch.bool)
                observed[:, list(subset)] = True
                logits, _ = model([val_set.features[m] for m in names], observed)
                scores.append((logits.argmax(1) == val_set.labels).float().mean().item())
    return sum(scores) / len(scores)


def main() -> None:
    data = make_missing(seed=0)
    for use_mars in (False, True):
        t0 = time.time()
        score = train_and_score(use_mars, data)
        print(f"{'backbone + MARS' if use_mars else 'backbone alone '}: validation accuracy, mean over 15 "
              f"modality subsets {score:.4f} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
