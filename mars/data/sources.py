"""One entry point for the CLI's ``--data``: a name or a feature directory.

A run records its data as :func:`resolve_source` spells it (a directory made
absolute, so ``mars eval`` and ``--resume`` from another folder read the same
data) and the data's :func:`data_fingerprint`, which they compare with the
data they load (``load_data(..., with_fingerprint=True)``)."""
from __future__ import annotations

import hashlib
import json
import os

import torch

from .benchmarks import BENCHMARKS, benchmark_spec
from .dataset import MultimodalDataset
from .errors import DataFormatError
from .feature_files import load_feature_dir
from .mfeat import load_mfeat
from .splits import standardize_splits
from .synthetic import make_segmentation
from .synthetic_missing import make_missing

BUILTIN_SOURCES = ("mfeat", "synthetic-missing", "synthetic-seg")


def _benchmark_path(text: str) -> tuple[str, str] | None:
    name, sep, path = text.partition(":")
    if sep and name.strip().lower().replace("_", "-") in BENCHMARKS:
        return name, path
    return None


def resolve_source(source: str | os.PathLike) -> str:
    """``source`` as a run records it: a built-in name as it is; a feature
    directory (or the directory of ``BENCHMARK:DIR``) as an absolute path, so
    that the run reads the same data from any working directory. Anything else
    is returned unchanged (:func:`load_data` reports it)."""
    text = os.fspath(source)
    bench = _benchmark_path(text)
    if bench is not None:
        name, path = bench
        return f"{name}:{os.path.abspath(path)}" if path.strip() and os.path.isdir(path) else text
    if text in BUILTIN_SOURCES or not os.path.isdir(text):
        return text
    return os.path.abspath(text)


def data_fingerprint(splits) -> str:
    """A hash (BLAKE2b, 32 hex digits) of what a run trains and is scored on:
    each split's modalities, task, classes, labels, availability and raw
    (unstandardised) features, byte for byte, in order. Independent of the
    thread count and the machine, unlike the standardisation statistics."""
    h = hashlib.blake2b(digest_size=16)
    for split in splits:
        h.update(json.dumps([list(split.modalities), split.task, split.num_classes, split.ignore_index,
                             split.bona_fide_class, len(split)]).encode())
        for t in (split.labels, split.available, *(split.features[m] for m in split.modalities)):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)} {t.dtype};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype == torch.bool
                     else t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def load_data(source: str | os.PathLike, seed: int = 0, standardize: bool = True, *, with_fingerprint: bool = False):
    """(train, val, test) for ``source``: ``"mfeat"`` (embedded UCI Multiple
    Features), ``"synthetic-missing"`` (``make_missing`` defaults: the
    controlled classification set of :mod:`mars.data.synthetic_missing`),
    ``"synthetic-seg"`` (``make_segmentation`` defaults), a path
    to a feature directory (see ``mars.data.feature_files``), or
    ``"<benchmark>:<path>"`` (e.g. ``"casia-surf:/data/surf"``): a feature
    directory checked against that benchmark (``mars.data.benchmarks``).
    ``with_fingerprint``: ``((train, val, test), data_fingerprint)``, the
    fingerprint taken before standardisation."""
    if with_fingerprint:
        raw = load_data(source, seed=seed, standardize=False)
        fingerprint = data_fingerprint(raw)
        if standardize:
            try:
                raw = standardize_splits(*raw)
            except DataFormatError as e:  # values that do not standardise: name the data
                raise DataFormatError(str(e), os.fspath(source)) from None
        return raw, fingerprint
    text = os.fspath(source)
    bench = _benchmark_path(text)
    if bench is not None:
        name, path = bench
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
