"""One entry point for the CLI's ``--data``: a name or a feature directory."""
from __future__ import annotations

import dataclasses
import os

import torch

from .benchmarks import BENCHMARKS, benchmark_spec
from .dataset import MultimodalDataset
from .feature_files import load_feature_dir
from .mfeat import load_mfeat
from .missingness import MissingnessProtocol
from .splits import standardize_splits
from .synthetic import make_segmentation
from .synthetic_missing import make_missing
from .synthetic_regimes import RegimesSpec, make_regimes

BUILTIN_SOURCES = ("mfeat", "synthetic-missing", "synthetic-seg", "synthetic-regimes")
TEST_SPLITS = ("fixed", "per-seed")
#: The seed that fixes the test split (``test_split="fixed"``): the same test
#: samples for every run seed.
FIXED_TEST_SEED = 0
#: Mixed into the seed that draws each training sample's fixed observed
#: subset (``train_missing``), so it differs from every other draw of the run.
TRAIN_MISSING_SALT = 0x5EED


def load_data(source: str | os.PathLike, seed: int = 0, standardize: bool = True, *, test_split: str = "fixed",
              train_missing: str = "none") -> tuple[MultimodalDataset, MultimodalDataset, MultimodalDataset]:
    """(train, val, test) for ``source``: ``"mfeat"`` (embedded UCI Multiple
    Features), ``"synthetic-missing"`` (``make_missing`` defaults: the
    controlled classification set of :mod:`mars.data.synthetic_missing`),
    ``"synthetic-seg"`` (``make_segmentation`` defaults),
    ``"synthetic-regimes"`` (``make_regimes`` defaults: hidden regimes where
    routing must matter, :mod:`mars.data.synthetic_regimes`), a path
    to a feature directory (see ``mars.data.feature_files``), or
    ``"<benchmark>:<path>"`` (e.g. ``"casia-surf:/data/surf"``): a feature
    directory checked against that benchmark (``mars.data.benchmarks``).

    ``test_split``: "fixed" (the test samples are the same for every
    ``seed``, which draws the train/val split only) or "per-seed" (the split
    of earlier releases: all three drawn by ``seed``). A feature directory
    with its own splits keeps them either way.

    ``train_missing``: "none" (complete training data, as the source has it),
    or a missingness protocol (``"independent:0.2,0.5,0.8"``,
    :class:`MissingnessProtocol`): each training sample then keeps a fixed
    observed subset of its modalities, drawn once from the protocol (the
    same for every method of a seed); the others become unavailable, so no
    method sees them. Validation and test stay as the source has them."""
    if test_split not in TEST_SPLITS:
        raise ValueError(f"test_split must be one of {TEST_SPLITS}, got {test_split!r}")
    test_seed = FIXED_TEST_SEED if test_split == "fixed" else None
    splits = _load_splits(source, seed, test_seed, standardize=standardize and train_missing == "none")
    if train_missing == "none":
        return splits
    train = drop_training_modalities(splits[0], MissingnessProtocol.parse(train_missing), seed)
    splits = (train, *splits[1:])
    return standardize_splits(*splits) if standardize else splits


class TrainMissingError(ValueError):
    """A ``train_missing`` protocol that does not fit the data."""


def drop_training_modalities(train: MultimodalDataset, protocol: MissingnessProtocol, seed: int) -> MultimodalDataset:
    """``train`` with each sample keeping one subset of its available
    modalities drawn from ``protocol`` (a generator seeded by ``seed`` and
    :data:`TRAIN_MISSING_SALT`); the rest unavailable (their features zeroed)."""
    gen = torch.Generator().manual_seed(int(seed) ^ TRAIN_MISSING_SALT)
    try:
        protocol.drop_probs(train.num_modalities)
    except ValueError as e:
        raise TrainMissingError(f"{e}; the data have the modalities {list(train.modalities)}") from None
    kept = protocol.sample(train.available.cpu(), gen)
    return train.with_available(kept)


def regimes_spec(text: str) -> RegimesSpec:
    """``synthetic-regimes`` or ``synthetic-regimes:NAME=VALUE,...`` (fields of
    :class:`RegimesSpec`, e.g. ``synthetic-regimes:kappa=0,conflict=0.5``)."""
    _, _, args = text.partition(":")
    fields = {f.name: f.type for f in dataclasses.fields(RegimesSpec)}
    values = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in fields:
            raise ValueError(f"data {text!r}: expected synthetic-regimes:NAME=VALUE,... with NAME one of "
                             f"{sorted(fields)}, got {item!r}")
        kind = fields[name] if isinstance(fields[name], str) else fields[name].__name__
        try:
            values[name] = int(value) if kind == "int" else float(value)
        except ValueError:
            raise ValueError(f"data {text!r}: {name} must be a{'n integer' if kind == 'int' else ' number'}, "
                             f"got {value!r}") from None
    return RegimesSpec(**values)


def _load_splits(source, seed: int, test_seed: int | None, standardize: bool):
    text = os.fspath(source)
    name, sep, path = text.partition(":")
    if sep and name.strip().lower().replace("_", "-") in BENCHMARKS:
        spec = benchmark_spec(name)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"benchmark {spec.name!r}: {path!r} is not a directory; expected a feature directory "
                                    "(see mars.data.feature_files)")
        return load_feature_dir(path, seed=seed, standardize=standardize, benchmark=spec.name, test_seed=test_seed)
    if text == "mfeat":
        return load_mfeat(seed=seed, standardize=standardize, test_seed=test_seed)
    if text == "synthetic-missing":
        return make_missing(seed=seed, standardize=standardize, test_seed=test_seed)
    if text == "synthetic-seg":
        return make_segmentation(seed=seed, standardize=standardize, test_seed=test_seed)
    if text == "synthetic-regimes" or text.startswith("synthetic-regimes:"):
        return make_regimes(seed=seed, standardize=standardize, test_seed=test_seed, spec=regimes_spec(text))
    if os.path.isdir(text):
        return load_feature_dir(text, seed=seed, standardize=standardize, test_seed=test_seed)
    raise ValueError(f"unknown data source {text!r}: expected one of {BUILTIN_SOURCES}, a feature directory (meta.json, <modality>.npy, labels.npy), or <benchmark>:<directory> with a benchmark in {sorted(BENCHMARKS)}")
