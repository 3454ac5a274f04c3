"""Stratified train/val/test splits and per-modality standardisation.

``stratified_split`` is exact and reproducible:

1. split sizes are ``fractions * N`` rounded by largest remainder (ties go to
   the earlier split), so they sum to N and do not depend on the seed;
2. the per-class counts are ``n_c * size_s / N`` rounded so that the class
   totals and the split sizes both come out exact; leftover samples go first
   to (class, split) pairs that would otherwise be empty, and a class still
   missing from a split then swaps places with a larger class, so every class
   with at least one sample per split is in every split whenever the split
   sizes allow it (with many tiny classes this takes val/test places from the
   large classes: presence comes before proportionality);
3. which samples of a class go where is a permutation drawn from a
   ``torch.Generator`` seeded with ``seed``.

The stratification key is the label for classification and, for
segmentation, each sample's most frequent labelled class (``stratify_keys``).

``Standardizer`` centres and scales each modality with statistics fitted on
the TRAIN split only, over the samples where that modality is available:
per feature for vectors ``[N, d]`` (mean/std ``[d]``), per channel for maps
``[N, C, H, W]`` (mean/std ``[C]``). A std below ``min_std`` (a constant
feature) is replaced by 1, so such a feature is only centred and nothing is
divided by ~0. Unavailable entries stay 0. ``state_dict()`` /
``load_state_dict()`` save and restore it (e.g. in a checkpoint).
"""
from __future__ import annotations

from dataclasses import replace

from typing import Sequence

import torch
from torch import Tensor

from .dataset import MultimodalDataset
from .errors import DataFormatError

DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
SPLIT_NAMES = ("train", "val", "test")


# --------------------------------------------------------------------- splits
def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    f = tuple(float(x) for x in fractions)
    if len(f) != 3 or any(not (x >= 0) for x in f) or abs(sum(f) - 1.0) > 1e-6 or f[0] <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1 with train > 0, got {fractions}")
    return f  # type: ignore[return-value]


def split_sizes(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[int]:
    """Sizes of the three splits: ``fractions * n`` rounded by largest
    remainder (ties to the earlier split); they sum to ``n``."""
    f = _check_fractions(fractions)
    ideal = [n * x for x in f]
    sizes = [int(v) for v in ideal]
    order = sorted(range(3), key=lambda s: (-(ideal[s] - sizes[s]), s))
    for s in order[: n - sum(sizes)]:
        sizes[s] += 1
    return sizes


def _class_counts(class_sizes: list[int], sizes: list[int]) -> list[list[int]]:
    """Integer table counts[c][s] with row sums ``class_sizes`` and column sums
    ``sizes``, close to class_size * size / N, with every class that has at
    least one sample per non-empty split present in each when the sizes allow."""
    n = sum(class_sizes)
    C, S = len(class_sizes), len(sizes)
    if n == 0:
        return [[0] * S for _ in range(C)]
    n_pos = sum(1 for z in sizes if z > 0)
    eligible = [cs >= n_pos for cs in class_sizes]
    counts = [[cs * sizes[s] // n for s in range(S)] for cs in class_sizes]
    row_left = [cs - sum(row) for cs, row in zip(class_sizes, counts)]
    col_left = [sizes[s] - sum(row[s] for row in counts) for s in range(S)]
    # +1 per (class, split): first cells of eligible classes that would stay
    # empty, then by largest remainder (ties: earlier class, earlier split).
    cand = sorted(
        ((c, s) for c in range(C) for s in range(S)),
        key=lambda cs: (not (eligible[cs[0]] and counts[cs[0]][cs[1]] == 0), -((class_sizes[cs[0]] * sizes[cs[1]]) % n), cs),
    )
    for c, s in cand:
        if row_left[c] > 0 and col_left[s] > 0:
            counts[c][s] += 1
            row_left[c] -= 1
            col_left[s] -= 1
    for c in range(C):  # leftovers (only after the empty-cell priority): any split with room
        for s in range(S):
            k = min(row_left[c], col_left[s])
            counts[c][s] += k
            row_left[c] -= k
            col_left[s] -= k
    assert not any(row_left) and not any(col_left)
    # Still-empty cells of eligible classes: a 2x2 exchange keeping both
    # margins. Class c takes one place in split s from the class d most over
    # its share there (d keeps >= 1 if it is eligible) and gives d a place in
    # the split s2 where c has the most (c keeps >= 1 there).
    for c in range(C):
        if not eligible[c]:
            continue
        for s in range(S):
            if counts[c][s] or not sizes[s]:
                continue
            s2 = max(range(S), key=lambda t: (counts[c][t], -t))
            donors = [d for d in range(C) if d != c and counts[d][s] >= (2 if eligible[d] else 1)]
            if counts[c][s2] < 2 or not donors:
                continue
            d = max(donors, key=lambda d: (counts[d][s] * n - class_sizes[d] * sizes[s], -d))
            counts[c][s] += 1
            counts[c][s2] -= 1
            counts[d][s] -= 1
            counts[d][s2] += 1
    return counts


def stratify_keys(labels: Tensor, ignore_index: int | None = None) -> Tensor:
    """Per-sample stratification key [N]: the label itself for [N] labels; for
    [N, H, W] label maps, the most frequent class other than ``ignore_index``
    (ties to the smaller class; -1 when a map has no labelled pixel)."""
    if labels.dim() == 1:
        return labels.long().cpu()
    y = labels.reshape(labels.shape[0], -1).long().cpu()
    valid = (y >= 0) if ignore_index is None else ((y >= 0) & (y != ignore_index))
    k = int(y[valid].max()) + 1 if bool(valid.any()) else 1
    onehot_counts = torch.zeros(y.shape[0], k, dtype=torch.long)
    onehot_counts.scatter_add_(1, torch.where(valid, y, 0), valid.long())
    keys = onehot_counts.argmax(dim=1)
    keys[~valid.any(dim=1)] = -1
    return keys


def stratified_split(
    keys: Tensor, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Split N samples with class keys ``keys`` [N] into (train, val, test)
    index tensors (int64, sorted ascending), stratified by key, exact in size
    (``split_sizes``) and fixed by ``seed``. See the module docstring."""
    keys = torch.as_tensor(keys).long().cpu().flatten()
    n = keys.numel()
    sizes = split_sizes(n, fractions)
    classes, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    members = [torch.nonzero(inverse == c).flatten() for c in range(len(classes))]
    counts = _class_counts([len(m) for m in members], sizes)
    gen = torch.Generator().manual_seed(int(seed))
    parts: list[list[Tensor]] = [[], [], []]
    for idx, row in zip(members, counts):
        perm = idx[torch.randperm(len(idx), generator=gen)]
        start = 0
        for s in range(3):
            parts[s].append(perm[start : start + row[s]])
            start += row[s]
    out = tuple(torch.sort(torch.cat(p)).values if p else torch.zeros(0, dtype=torch.long) for p in parts)
    return out  # type: ignore[return-value]


def fixed_test_split(
    keys: Tensor, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0, test_seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`stratified_split`, but the test split is fixed by
    ``test_seed`` whatever ``seed`` is: the test samples are drawn first
    (stratified, ``test_seed``), then the rest is split into train and val
    (stratified, ``seed``). Every seed of a run then meets the same test
    samples, and its validation samples are never another seed's test ones."""
    keys = torch.as_tensor(keys).long().cpu().flatten()
    n = keys.numel()
    sizes = split_sizes(n, fractions)  # the sizes of stratified_split, whatever the seeds
    if n == 0 or sizes[0] + sizes[1] == 0:
        return stratified_split(keys, fractions, test_seed)
    pool, _, test = stratified_split(keys, ((n - sizes[2]) / n, 0.0, sizes[2] / n), test_seed)
    share = sizes[0] / (sizes[0] + sizes[1])
    tr, va, _ = stratified_split(keys[pool], (share, 1.0 - share, 0.0), seed)
    return pool[tr], pool[va], test


def split_indices(keys: Tensor, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                  test_seed: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(train, val, test) indices: :func:`fixed_test_split` with ``test_seed``,
    or with None the split of earlier releases, all three drawn by ``seed``
    (:func:`stratified_split`)."""
    if test_seed is None:
        return stratified_split(keys, fractions, seed)
    return fixed_test_split(keys, fractions, seed, test_seed)


def split_dataset(
    data: MultimodalDataset, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
    test_seed: int | None = None,
) -> tuple[MultimodalDataset, MultimodalDataset, MultimodalDataset]:
    """:func:`split_indices` of a dataset into (train, val, test) datasets."""
    idx = split_indices(stratify_keys(data.labels, data.ignore_index), fractions, seed, test_seed)
    return tuple(data.subset(i) for i in idx)  # type: ignore[return-value]


# ------------------------------------------------------------ standardisation
class Standardizer:
    """Per-modality ``(x - mean) / std``, fitted on a training split.

    ``mean[m]`` / ``std[m]`` have shape ``[d_m]`` (vectors) or ``[C_m]`` (maps).
    """

    def __init__(self, min_std: float = 1e-6):
        self.min_std = float(min_std)
        self.modalities: list[str] = []
        self.mean: dict[str, Tensor] = {}
        self.std: dict[str, Tensor] = {}

    @property
    def fitted(self) -> bool:
        return bool(self.modalities)

    def fit(self, train: MultimodalDataset) -> "Standardizer":
        """Statistics of ``train`` only, per modality over its available samples
        (a modality never available in ``train`` gets mean 0, std 1)."""
        self.modalities = list(train.modalities)
        self.mean, self.std = {}, {}
        for j, m in enumerate(train.modalities):
            x = train.features[m][train.available[:, j]].double()
            if x.dim() == 4:  # per channel: [n, C, H, W] -> [n*H*W, C]
                x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            d = x.shape[1]
            if x.shape[0] == 0:
                mean, std = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
            else:
                mean = x.mean(dim=0)
                std = x.var(dim=0, unbiased=False).sqrt()
                std = torch.where(std < self.min_std, torch.ones_like(std), std)
            self.mean[m] = mean.float().cpu()
            self.std[m] = std.float().cpu()
        return self

    def _require(self, data: MultimodalDataset):
        if not self.fitted:
            raise RuntimeError("Standardizer: call fit() or load_state_dict() first")
        if list(data.modalities) != self.modalities:
            raise DataFormatError(f"Standardizer was fitted on modalities {self.modalities}, got {data.modalities}")
        for m in self.modalities:
            x = data.features[m]
            want = self.mean[m].shape[0]
            if x.shape[1] != want:
                raise DataFormatError(f"Standardizer: modality {m!r} has {x.shape[1]} features/channels, fitted on {want}")

    def transform(self, data: MultimodalDataset) -> MultimodalDataset:
        """A new dataset with standardised features (unavailable entries stay 0)
        and ``standardizer`` set to ``self``."""
        self._require(data)
        feats = {}
        for j, m in enumerate(data.modalities):
            x = data.features[m]
            shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
            mean = self.mean[m].to(x.device, x.dtype).view(shape)
            std = self.std[m].to(x.device, x.dtype).view(shape)
            y = (x - mean) / std
            if not bool(torch.isfinite(y).all()):  # x - mean overflowed (finite values near the dtype's limit)
                y = ((x.double() - self.mean[m].to(x.device).double().view(shape))
                     / self.std[m].to(x.device).double().view(shape)).to(x.dtype)
                bad = ~torch.isfinite(y).flatten(1).all(dim=1) & torch.isfinite(x).flatten(1).all(dim=1)
                if bool(bad.any()):
                    i = int(bad.nonzero()[0])
                    raise DataFormatError(
                        f"{data.name + ': ' if data.name else ''}modality {m!r}: sample {i} (of {int(bad.sum())}) is "
                        f"too far from the training mean to standardise in {x.dtype} (its values reach "
                        f"{float(x[i].abs().max()):.3g}, the training split's std is as small as "
                        f"{float(self.std[m].min()):.3g}); expected features on a scale the training split shares")
            keep = data.available[:, j].view(-1, *([1] * (x.dim() - 1)))
            feats[m] = torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))
        return replace(data, features=feats, standardizer=self)

    def inverse_transform_features(self, modality: str, x: Tensor) -> Tensor:
        """Undo the scaling of one modality's features ``[n, d]`` / ``[n, C, H, W]``."""
        shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
        return x * self.std[modality].to(x.device, x.dtype).view(shape) + self.mean[modality].to(x.device, x.dtype).view(shape)

    def state_dict(self) -> dict:
        """Plain tensors/lists/floats (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "modalities": list(self.modalities),
            "min_std": self.min_std,
            "mean": {m: t.clone() for m, t in self.mean.items()},
            "std": {m: t.clone() for m, t in self.std.items()},
        }

    def load_state_dict(self, state: dict) -> "Standardizer":
        try:
            modalities = [str(m) for m in state["modalities"]]
            mean = {m: torch.as_tensor(state["mean"][m]).float().cpu().clone() for m in modalities}
            std = {m: torch.as_tensor(state["std"][m]).float().cpu().clone() for m in modalities}
            min_std = float(state.get("min_std", self.min_std))
        except (KeyError, TypeError) as e:
            raise DataFormatError(f"Standardizer.load_state_dict: expected keys modalities, mean, std per modality; {e!r}") from None
        for m in modalities:
            if mean[m].dim() != 1 or mean[m].shape != std[m].shape or bool((std[m] <= 0).any()):
                raise DataFormatError(f"Standardizer.load_state_dict: modality {m!r}: expected 1-D mean and positive std of equal shape")
        self.modalities, self.mean, self.std, self.min_std = modalities, mean, std, min_std
        return self

    @classmethod
    def from_state_dict(cls, state: dict) -> "Standardizer":
        return cls().load_state_dict(state)

    def __repr__(self) -> str:
        dims = {m: self.mean[m].shape[0] for m in self.modalities}
        return f"Standardizer(min_std={self.min_std}, fitted={self.fitted}, dims={dims})"


def standardize_splits(
    train: MultimodalDataset, *others: MultimodalDataset, min_std: float = 1e-6
) -> tuple[MultimodalDataset, ...]:
    """Fit a ``Standardizer`` on ``train`` only and apply it to ``train`` and
    every dataset in ``others``; returns them in the same order."""
    st = Standardizer(min_std=min_std).fit(train)
    return tuple(st.transform(d) for d in (train, *others))
