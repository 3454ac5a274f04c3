"""One entry point for the CLI's ``--data``: a name or a feature directory."""
from __future__ import annotations

import os

from .dataset import MultimodalDataset
from .feature_files import load_feature_dir
from .mfeat import load_mfeat
from .synthetic import make_segmentation

BUILTIN_SOURCES = ("mfeat", "synthetic-seg")


def load_data(source: str | os.PathLike, seed: int = 0, standardize: bool = True) -> tuple[MultimodalDataset, MultimodalDataset, MultimodalDataset]:
    """(train, val, test) for ``source``: ``"mfeat"`` (embedded UCI Multiple
    Features), ``"synthetic-seg"`` (``make_segmentation`` defaults), or a path
    to a feature directory (see ``mars.data.feature_files``)."""
    text = os.fspath(source)
    if text == "mfeat":
        return load_mfeat(seed=seed, standardize=standardize)
    if text == "synthetic-seg":
        return make_segmentation(seed=seed, standardize=standardize)
    if os.path.isdir(text):
        return load_feature_dir(text, seed=seed, standardize=standardize)
    raise ValueError(f"unknown data source {text!r}: expected one of {BUILTIN_SOURCES} or a feature directory (meta.json, <modality>.npy, labels.npy)")
