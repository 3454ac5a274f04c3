"""`MultimodalDataset`: a validated, in-memory container of M modalities.

Shapes (N samples, M modalities, K classes):

* ``features[m]``: ``[N, d_m]`` feature vectors, or ``[N, C_m, H, W]`` feature
  maps, floating point. All map modalities share one ``(H, W)`` (the model
  fuses modalities token by token, so token positions must line up).
* ``labels``: ``[N]`` int64 for ``task="classification"``; ``[N, H, W]`` int64
  for ``task="segmentation"`` (every modality is then a map with the labels'
  ``H, W``). Values lie in ``[0, K)``; segmentation may also use
  ``ignore_index`` for unlabelled pixels.
* ``available``: ``[N, M]`` bool, column order = ``modalities``: which
  modalities the data really has for each sample (all True for complete data).
  Every sample has at least one. Feature values of unavailable entries carry no
  information and are set to 0 (a copy is made only when some are not 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import DataFormatError

TASKS = ("classification", "segmentation")


def as_index_tensor(indices: Any, n: int, what: str = "indices") -> Tensor:
    """Turn a list / range / numpy array / tensor of ints, or a bool mask of
    length ``n``, into a 1-D int64 CPU tensor of positions in ``[0, n)``."""
    if isinstance(indices, Tensor):
        t = indices.detach().cpu()
    else:
        t = torch.as_tensor(np.asarray(list(indices) if isinstance(indices, range) else indices))
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise IndexError(f"{what}: a bool mask must have shape [{n}], got {list(t.shape)}")
        return t.nonzero().flatten()
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dim() != 1:
        raise IndexError(f"{what}: expected a 1-D sequence of integer indices, got dtype {t.dtype}, shape {list(t.shape)}")
    t = t.long()
    if int(t.min()) < 0 or int(t.max()) >= n:
        raise IndexError(f"{what}: indices must lie in [0, {n}), got min {int(t.min())}, max {int(t.max())}")
    return t


@dataclass(eq=False)
class MultimodalDataset:
    """M modalities of N samples with labels; validated on construction.

    Attributes:
        modalities: the M modality names, in column order of ``available``.
        features: per modality, ``[N, d_m]`` or ``[N, C_m, H, W]`` floats.
        labels: ``[N]`` (classification) or ``[N, H, W]`` (segmentation) int64.
        num_classes: K.
        task: ``"classification"`` or ``"segmentation"``.
        available: ``[N, M]`` bool; ``None`` means all True.
        ignore_index: segmentation only: the label of unlabelled pixels
            (outside ``[0, K)``), or ``None``.
        name: where the data came from; used in error messages.
        standardizer: the fitted ``Standardizer`` that was applied (loaders
            set it; save ``standardizer.state_dict()`` in a checkpoint).
        bona_fide_class: binary anti-spoofing data (e.g. CASIA-SURF): the
            label of real faces; evaluation then also reports APCER, BPCER
            and ACER. ``None`` otherwise.
    """

    modalities: list[str]
    features: dict[str, Tensor]
    labels: Tensor
    num_classes: int
    task: str = "classification"
    available: Tensor | None = None
    ignore_index: int | None = None
    name: str = ""
    standardizer: Any = field(default=None, repr=False)
    bona_fide_class: int | None = None

    # ------------------------------------------------------------------ checks
    def _fail(self, message: str):
        raise DataFormatError(f"{self.name}: {message}" if self.name else message)

    def __post_init__(self):
        self.modalities = list(self.modalities)
        if not self.modalities:
            self._fail("expected at least one modality, got none")
        for m in self.modalities:
            if not isinstance(m, str) or not m:
                self._fail(f"modality names must be non-empty strings, got {m!r}")
        if len(set(self.modalities)) != len(self.modalities):
            self._fail(f"modality names must be unique, got {self.modalities}")
        if self.task not in TASKS:
            self._fail(f"task must be one of {TASKS}, got {self.task!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            self._fail(f"num_classes must be a positive integer, got {self.num_classes!r}")
        self.num_classes = int(self.num_classes)
        self._check_labels()
        if self.bona_fide_class is not None:
            if self.task != "classification" or self.num_classes != 2:
                self._fail(f"bona_fide_class needs a 2-class classification task, got task {self.task!r} "
                           f"with num_classes={self.num_classes}")
            if isinstance(self.bona_fide_class, bool) or int(self.bona_fide_class) not in (0, 1):
                self._fail(f"bona_fide_class must be 0 or 1, got {self.bona_fide_class!r}")
            self.bona_fide_class = int(self.bona_fide_class)
        n = self.labels.shape[0]
        self._check_features(n)
        self._check_available(n)
        self._check_finite_and_zero_unavailable()

    def _check_labels(self):
        y = self.labels
        if not isinstance(y, Tensor):
            self._fail(f"labels must be a torch.Tensor, got {type(y).__name__}")
        if y.dtype != torch.long:
            if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
                self._fail(f"labels must be integers (int64), got dtype {y.dtype}")
            self.labels = y = y.long()
        want_dim = 1 if self.task == "classification" else 3
        if y.dim() != want_dim:
            shape = "[N]" if want_dim == 1 else "[N, H, W]"
            self._fail(f"labels for task {self.task!r} must have shape {shape}, got {list(y.shape)}")
        if self.ignore_index is not None:
            if self.task != "segmentation":
                self._fail("ignore_index is only meaningful for task 'segmentation'")
            self.ignore_index = int(self.ignore_index)
            if 0 <= self.ignore_index < self.num_classes:
                self._fail(f"ignore_index {self.ignore_index} must lie outside the class range [0, {self.num_classes})")
        if y.numel():
            valid = (y >= 0) & (y < self.num_classes)
            if self.ignore_index is not None:
                valid |= y == self.ignore_index
            if not bool(valid.all()):
                bad = y[~valid]
                extra = f" or equal ignore_index {self.ignore_index}" if self.ignore_index is not None else ""
                self._fail(
                    f"labels must lie in [0, {self.num_classes}){extra}; found {bad.numel()} out of range "
                    f"(e.g. {int(bad[0])}; min {int(y.min())}, max {int(y.max())})"
                )

    def _check_features(self, n: int):
        if not isinstance(self.features, dict):
            self._fail(f"features must be a dict of modality name -> tensor, got {type(self.features).__name__}")
        missing = [m for m in self.modalities if m not in self.features]
        extra = [m for m in self.features if m not in self.modalities]
        if missing:
            self._fail(f"no features for modality {missing[0]!r} (modalities: {self.modalities})")
        if extra:
            self._fail(f"features given for unknown modality {extra[0]!r} (modalities: {self.modalities})")
        self.features = {m: self.features[m] for m in self.modalities}  # column order
        spatial = None
        for m, x in self.features.items():
            if not isinstance(x, Tensor):
                self._fail(f"modality {m!r}: features must be a torch.Tensor, got {type(x).__name__}")
            if not x.dtype.is_floating_point:
                self._fail(f"modality {m!r}: features must be floating point, got dtype {x.dtype}")
            if x.dim() not in (2, 4):
                self._fail(f"modality {m!r}: features must have shape [N, d] or [N, C, H, W], got {list(x.shape)}")
            if x.shape[0] != n:
                self._fail(f"modality {m!r}: features have {x.shape[0]} samples, expected N={n} (from labels)")
            if x.dim() == 2 and self.task == "segmentation":
                self._fail(f"modality {m!r}: segmentation needs feature maps [N, C, H, W], got {list(x.shape)}")
            if x.dim() == 4:
                hw = tuple(x.shape[2:])
                if self.task == "segmentation" and hw != tuple(self.labels.shape[1:]):
                    self._fail(
                        f"modality {m!r}: feature maps are {hw[0]}x{hw[1]}, expected the label maps' size "
                        f"{self.labels.shape[1]}x{self.labels.shape[2]}"
                    )
                if spatial is not None and hw != spatial[1]:
                    self._fail(
                        f"modality {m!r}: feature maps are {hw[0]}x{hw[1]}, expected {spatial[1][0]}x{spatial[1][1]} "
                        f"like modality {spatial[0]!r} (all map modalities share one H, W)"
                    )
                spatial = spatial or (m, hw)
            if min(x.shape[1:]) == 0:
                self._fail(f"modality {m!r}: features have an empty dimension, shape {list(x.shape)}")

    def _check_available(self, n: int):
        M = len(self.modalities)
        a = self.available
        if a is None:
            self.available = torch.ones(n, M, dtype=torch.bool, device=self.labels.device)
            return
        if not isinstance(a, Tensor):
            a = torch.as_tensor(np.asarray(a))
        if tuple(a.shape) != (n, M):
            self._fail(f"available must have shape [N, M] = [{n}, {M}], got {list(a.shape)}")
        if a.dtype != torch.bool:
            if a.dtype.is_complex or not bool(((a == 0) | (a == 1)).all()):
                self._fail(f"available must be bool (or 0/1), got dtype {a.dtype} with other values")
            a = a != 0
        if n and not bool(a.any(dim=1).all()):
            row = int((~a.any(dim=1)).nonzero()[0])
            self._fail(f"every sample needs at least one available modality; sample {row} has none")
        self.available = a

    def _check_finite_and_zero_unavailable(self):
        for j, m in enumerate(self.modalities):
            x = self.features[m]
            avail = self.available[:, j]
            rows = x.flatten(1)
            if x.numel() and bool(torch.isfinite(x.sum())):
                bad = None  # fast path: a sum with a NaN/inf in it is not finite
            else:
                bad = avail & ~torch.isfinite(rows).all(dim=1)
            if bad is not None and bool(bad.any()):
                self._fail(
                    f"modality {m!r}: {int(bad.sum())} available samples have NaN/inf features "
                    f"(e.g. sample {int(bad.nonzero()[0])}); mark them unavailable or fix the values"
                )
            missing = ~avail
            if bool(missing.any()) and bool((rows[missing] != 0).any()):
                keep = avail.view(-1, *([1] * (x.dim() - 1)))
                self.features[m] = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

    # --------------------------------------------------------------- queries
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per modality, the shape of one sample: ``(d_m,)`` or ``(C_m, H, W)``."""
        return {m: tuple(x.shape[1:]) for m, x in self.features.items()}

    @property
    def is_complete(self) -> bool:
        """True when every modality is available for every sample."""
        return bool(self.available.all())

    def modality_index(self, name: str) -> int:
        try:
            return self.modalities.index(name)
        except ValueError:
            raise KeyError(f"unknown modality {name!r}; modalities: {self.modalities}") from None

    # ------------------------------------------------------------- transforms
    def subset(self, indices: Any) -> "MultimodalDataset":
        """The samples at ``indices`` (ints, or a bool mask [N]), in that order."""
        idx = as_index_tensor(indices, len(self)).to(self.device)
        return replace(
            self,
            features={m: x[idx] for m, x in self.features.items()},
            labels=self.labels[idx],
            available=self.available[idx],
        )

    def with_available(self, available: Tensor) -> "MultimodalDataset":
        """A copy in which only ``available`` [N, M] bool (a subset of the
        current availability) is available; the other entries' features
        become 0 (checked like a new dataset)."""
        available = torch.as_tensor(available, dtype=torch.bool, device=self.available.device)
        if available.shape != self.available.shape:
            raise ValueError(f"available must have shape {list(self.available.shape)}, got {list(available.shape)}")
        return replace(self, features=dict(self.features), available=available & self.available)

    def to(self, device: torch.device | str) -> "MultimodalDataset":
        """A copy with every tensor on ``device`` (the standardizer stays as is)."""
        return replace(
            self,
            features={m: x.to(device) for m, x in self.features.items()},
            labels=self.labels.to(device),
            available=self.available.to(device),
        )

    def __repr__(self) -> str:
        shapes = ", ".join(f"{m}: {list(s)}" for m, s in self.feature_shapes.items())
        return (
            f"MultimodalDataset(name={self.name!r}, task={self.task!r}, N={len(self)}, "
            f"num_classes={self.num_classes}, complete={self.is_complete}, features={{{shapes}}})"
        )


def concat_datasets(datasets: Sequence[MultimodalDataset], name: str | None = None) -> MultimodalDataset:
    """Stack datasets with the same modalities, task, classes and feature shapes."""
    if not datasets:
        raise ValueError("concat_datasets: expected at least one dataset")
    first = datasets[0]
    for i, d in enumerate(datasets[1:], 1):
        same = (d.modalities, d.task, d.num_classes, d.ignore_index, d.bona_fide_class, d.feature_shapes,
                tuple(d.labels.shape[1:]))
        want = (first.modalities, first.task, first.num_classes, first.ignore_index, first.bona_fide_class,
                first.feature_shapes, tuple(first.labels.shape[1:]))
        if same != want:
            raise DataFormatError(f"concat_datasets: dataset {i} ({d!r}) does not match dataset 0 ({first!r})")
    return MultimodalDataset(
        modalities=first.modalities,
        features={m: torch.cat([d.features[m] for d in datasets]) for m in first.modalities},
        labels=torch.cat([d.labels for d in datasets]),
        num_classes=first.num_classes,
        task=first.task,
        available=torch.cat([d.available for d in datasets]),
        ignore_index=first.ignore_index,
        bona_fide_class=first.bona_fide_class,
        name=first.name if name is None else name,
        standardizer=first.standardizer,
    )
