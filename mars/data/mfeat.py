"""The embedded UCI Multiple Features ("mfeat") dataset, see ``UCI_MFEAT.md``.

2000 handwritten digits, 10 classes (200 each), six complete views
(``MFEAT_VIEWS``): fourier [2000, 76], profile [2000, 216], karhunen_loeve
[2000, 64], pixel [2000, 240], zernike [2000, 47], morphological [2000, 6].
"""
from __future__ import annotations

import os
import zipfile
from importlib import resources
from typing import Sequence

import numpy as np
import torch

from .dataset import MultimodalDataset
from .errors import DataFormatError
from .splits import DEFAULT_FRACTIONS, split_dataset, standardize_splits

MFEAT_FILE = "uci_mfeat.npz"
MFEAT_VIEWS = ("fourier", "profile", "karhunen_loeve", "pixel", "zernike", "morphological")
MFEAT_NUM_CLASSES = 10
MFEAT_N = 2000


def read_mfeat(path: str | os.PathLike | None = None) -> MultimodalDataset:
    """All 2000 samples as one complete ``MultimodalDataset`` (raw values,
    float32), from ``path`` or else the file shipped with the package."""
    if path is None:
        with resources.as_file(resources.files(__package__).joinpath(MFEAT_FILE)) as p:
            return _read_mfeat(os.fspath(p))
    return _read_mfeat(os.fspath(path))


def _read_mfeat(path: str) -> MultimodalDataset:
    if not os.path.isfile(path):
        raise DataFormatError(
            "embedded mfeat data file not found; it ships inside the package (mars/data/uci_mfeat.npz) - "
            "reinstall the package, or check that package data (*.npz) is included", path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataFormatError(f"cannot read the mfeat .npz archive ({e}); expected keys labels, view_names, {', '.join(MFEAT_VIEWS)}", path) from None
    for key in ("labels", *MFEAT_VIEWS):
        if key not in arrays:
            raise DataFormatError(f"missing array {key!r}; expected keys labels, view_names, {', '.join(MFEAT_VIEWS)}", path)
    views = [str(v) for v in arrays.get("view_names", MFEAT_VIEWS)]
    labels = arrays["labels"]
    if labels.shape != (MFEAT_N,) or labels.dtype.kind not in "iu":
        raise DataFormatError(f"'labels' must be integer [{MFEAT_N}], got {labels.dtype} {list(labels.shape)}", path)
    feats = {}
    for v in views:
        x = arrays[v]
        if x.ndim != 2 or x.shape[0] != MFEAT_N or x.dtype.kind != "f":
            raise DataFormatError(f"view {v!r} must be float [{MFEAT_N}, d], got {x.dtype} {list(x.shape)}", path)
        feats[v] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    try:
        return MultimodalDataset(
            modalities=views, features=feats, labels=torch.from_numpy(labels.astype(np.int64)),
            num_classes=MFEAT_NUM_CLASSES, task="classification", name="mfeat",
        )
    except DataFormatError as e:
        raise DataFormatError(str(e), path) from None


def load_mfeat(
    seed: int = 0, standardize: bool = True, fractions: Sequence[float] = DEFAULT_FRACTIONS,
    test_seed: int | None = None,
) -> tuple[MultimodalDataset, MultimodalDataset, MultimodalDataset]:
    """(train, val, test) of mfeat: stratified 1200/400/400 split
    (:func:`mars.data.splits.split_indices`: the test split fixed by
    ``test_seed``, or with None drawn by ``seed`` too); with ``standardize``,
    per-feature standardisation fitted on train (the ``Standardizer`` is in
    each split's ``.standardizer``)."""
    splits = split_dataset(read_mfeat(), fractions, seed, test_seed)
    if standardize:
        splits = standardize_splits(*splits)
    return splits  # type: ignore[return-value]
