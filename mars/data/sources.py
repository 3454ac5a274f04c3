"""One entry point for the CLI's ``--data``: a name or a feature directory."""
from __future__ import annotations

import os

from .benchmarks import BENCHMARKS, benchmark_spec
from .dataset import MultimodalDataset
from .feature_files import load_feature_dir
from .mfeat import load_mfeat
from .synthetic import make_segmentation
from .synthetic_missing import make_missing

BUILTIN_SOURCES = ("mfeat", "synthetic-missing", "synthetic-seg")


def load_data(source: str | os.PathLike, seed: int = 0, standardize: bool = True) -> tuple[MultimodalDataset, MultimodalDataset, MultimodalDataset]:
    """(train, val, test) for ``source``: ``"mfeat"`` (embedded UCI Multiple
    Features), ``"synthetic-missing"`` (``make_missing`` defaults: the
    controlled classification set of :mod:`mars.data.synthetic_missing`),
    ``"synthetic-seg"`` (``make_segmentation`` defaults), a path
    to a feature directory (see ``mars.data.feature_files``), or
    ``"<benchmark>:<path>"`` (e.g. ``"casia-surf:/data/surf"``): a feature
    directory checked against that benchmark (``mars.data.benchmarks``)."""
    text = os.fspath(source)
    name, sep, path = text.partition(":")
    if sep and name.strip().lower().replace("_", "-") in BENCHMARKS:
        spec = benchmark_spec(name)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"benchmark {spec.name!r}: {path!r} is not a directory; expected a feature directory "
                                    "(see mars.data.feature_files)")
        return load_feature_dir(path, seed=seed, standardize=standardize, benchmark=spec.name)
    if text == "mfeat":
        return load_mfeat(seed=seed, standardize=standardize)
    if text == "synthetic-missing":
        return make_missing(seed=seed, standardize=standardize)
    if text == "synthetic-seg":
        return make_segmentation(seed=seed, standardize=standardize)
    if os.path.isdir(text):
        return load_feature_dir(text, seed=seed, standardize=standardize)
    raise ValueError(f"unknown data source {text!r}: expected one of {BUILTIN_SOURCES}, a feature directory (meta.json, <modality>.npy, labels.npy), or <benchmark>:<directory> with a benchmark in {sorted(BENCHMARKS)}")
