"""A small generated multimodal SEGMENTATION dataset (the feature-map path).

Each sample is a ``size x size`` label map with K classes: a Voronoi partition
of the image around a few random seed points, each region with a uniformly
random class. Modality m is a feature map ``[C_m, size, size]`` with
``C_m = K + m`` channels, built per pixel as

    x_m = W_m (a_m * onehot(label) * visible_m) + noise * eps,   eps ~ N(0, I),

then scaled and shifted by a per-modality constant (so standardisation has
something to do). ``W_m`` [C_m, K] has orthonormal columns (a fixed random
embedding of the K class directions), and the amplitudes make the evidence
complementary:

* by class: modality m sees the classes k with ``k % M == m`` strongly
  (amplitude ``strong``) and the others weakly (``weak``), so no modality
  separates all classes well on its own;
* in space: with probability ``occlusion`` a modality is blind
  (``visible_m = 0``) in a random rectangle of each sample, where other
  modalities must take over.

So a model gains from every extra modality and degrades gracefully when some
are missing. All randomness comes from one ``torch.Generator`` seeded with
``seed``: the data is a deterministic function of the arguments.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .dataset import MultimodalDataset
from .splits import DEFAULT_FRACTIONS, split_dataset, standardize_splits


def _label_maps(n: int, size: int, num_classes: int, num_regions: int, gen: torch.Generator) -> Tensor:
    """[n, size, size] int64 Voronoi label maps."""
    seeds = torch.rand(n, num_regions, 2, generator=gen) * size
    classes = torch.randint(num_classes, (n, num_regions), generator=gen)
    coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).reshape(-1, 2).float() + 0.5
    nearest = torch.cdist(coords.expand(n, -1, -1), seeds).argmin(dim=2)  # [n, size*size]
    return classes.gather(1, nearest).reshape(n, size, size)


def _occlusion(n: int, size: int, prob: float, gen: torch.Generator) -> Tensor:
    """[n, size, size] float visibility: 0 inside a random rectangle (side
    size/4 .. size/2) for a fraction ``prob`` of the samples, 1 elsewhere."""
    lo, hi = max(1, size // 4), max(1, size // 2)
    h = torch.randint(lo, hi + 1, (n,), generator=gen)
    w = torch.randint(lo, hi + 1, (n,), generator=gen)
    top = (torch.rand(n, generator=gen) * (size - h + 1)).long()
    left = (torch.rand(n, generator=gen) * (size - w + 1)).long()
    hit = torch.rand(n, generator=gen) < prob
    r = torch.arange(size)
    rows = (r[None] >= top[:, None]) & (r[None] < (top + h)[:, None])
    cols = (r[None] >= left[:, None]) & (r[None] < (left + w)[:, None])
    blind = rows[:, :, None] & cols[:, None, :] & hit[:, None, None]
    return (~blind).float()


def _boundaries(labels: Tensor) -> Tensor:
    """[n, H, W] bool: pixels whose 4-neighbourhood holds another label."""
    b = torch.zeros_like(labels, dtype=torch.bool)
    dv = labels[:, 1:, :] != labels[:, :-1, :]
    dh = labels[:, :, 1:] != labels[:, :, :-1]
    b[:, 1:, :] |= dv
    b[:, :-1, :] |= dv
    b[:, :, 1:] |= dh
    b[:, :, :-1] |= dh
    return b


def generate_segmentation(
    n: int = 600,
    size: int = 16,
    num_modalities: int = 3,
    num_classes: int = 4,
    seed: int = 0,
    *,
    noise: float = 1.0,
    strong: float = 2.0,
    weak: float = 0.7,
    occlusion: float = 0.5,
    num_regions: int = 6,
    unavailable_rate: float = 0.0,
    ignore_index: int | None = None,
) -> MultimodalDataset:
    """One unsplit synthetic segmentation dataset of ``n`` samples.

    Returns a ``MultimodalDataset`` with modalities ``"m0" .. "m{M-1}"``,
    features ``[n, K + m, size, size]`` float32, labels ``[n, size, size]``.
    ``unavailable_rate`` > 0 marks that fraction of (sample, modality) entries
    as absent from the data (``available``; at least one per sample kept).
    With ``ignore_index`` set, region-boundary pixels get that label.
    """
    if n < 1 or size < 2 or num_modalities < 1 or num_classes < 2 or num_regions < 1:
        raise ValueError(
            f"generate_segmentation: need n >= 1, size >= 2, num_modalities >= 1, num_classes >= 2, num_regions >= 1; "
            f"got n={n}, size={size}, num_modalities={num_modalities}, num_classes={num_classes}, num_regions={num_regions}"
        )
    if not (0.0 <= unavailable_rate < 1.0) or not (0.0 <= occlusion <= 1.0):
        raise ValueError("generate_segmentation: unavailable_rate must be in [0, 1) and occlusion in [0, 1]")
    gen = torch.Generator().manual_seed(int(seed))
    M, K = num_modalities, num_classes
    labels = _label_maps(n, size, K, num_regions, gen)
    onehot = torch.nn.functional.one_hot(labels, K).permute(0, 3, 1, 2).float()  # [n, K, H, W]
    modalities = [f"m{m}" for m in range(M)]
    features = {}
    for m in range(M):
        amp = torch.tensor([strong if k % M == m else weak for k in range(K)])
        visible = _occlusion(n, size, occlusion, gen)
        signal = onehot * amp.view(1, K, 1, 1) * visible[:, None]
        C = K + m
        W = torch.linalg.qr(torch.randn(C, K, generator=gen)).Q  # [C, K], orthonormal columns
        x = torch.einsum("ck,nkhw->nchw", W, signal) + noise * torch.randn(n, C, size, size, generator=gen)
        scale = 0.5 + 2.5 * torch.rand((), generator=gen)
        shift = 4.0 * torch.rand(C, generator=gen) - 2.0
        features[modalities[m]] = (x * scale + shift.view(1, C, 1, 1)).float().contiguous()
    available = None
    if unavailable_rate > 0:
        available = torch.rand(n, M, generator=gen) >= unavailable_rate
        empty = ~available.any(dim=1)
        pick = torch.randint(M, (n,), generator=gen)
        available[empty, pick[empty]] = True
    if ignore_index is not None:
        labels = labels.masked_fill(_boundaries(labels), ignore_index)
    return MultimodalDataset(
        modalities=modalities, features=features, labels=labels, num_classes=K, task="segmentation",
        available=available, ignore_index=ignore_index, name=f"synthetic-segmentation(seed={seed})",
    )


def make_segmentation(
    n: int = 600,
    size: int = 16,
    num_modalities: int = 3,
    num_classes: int = 4,
    seed: int = 0,
    *,
    standardize: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    test_seed: int | None = None,
    **kwargs,
) -> tuple[MultimodalDataset, MultimodalDataset, MultimodalDataset]:
    """(train, val, test) of ``generate_segmentation(n, size, num_modalities,
    num_classes, data seed, **kwargs)``, split on each map's dominant class by
    ``seed`` (:func:`mars.data.splits.split_indices`), per-channel
    standardised on train when ``standardize``. With ``test_seed`` None (the
    earlier releases) the data themselves are drawn by ``seed`` too; with a
    ``test_seed`` they are drawn by it, so every seed meets the same data and
    the same test split."""
    data = generate_segmentation(n, size, num_modalities, num_classes, seed if test_seed is None else test_seed,
                                 **kwargs)
    splits = split_dataset(data, fractions, seed, test_seed)
    if standardize:
        splits = standardize_splits(*splits)
    return splits  # type: ignore[return-value]
