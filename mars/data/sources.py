"""One entry point for the CLI's ``--data``: a name or a feature directory.

A run records its data as :func:`resolve_source` spells it (a directory made
absolute, so ``mars eval`` and ``--resume`` from another folder read the same
data) and the data's :func:`data_fingerprint`, which they compare with the
data they load (``load_data(..., with_fingerprint=True)``)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch

from .benchmarks import BENCHMARKS, benchmark_spec
from .dataset import MultimodalDataset
from .errors import DataFormatError
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
    if text in BUILTIN_SOURCES or text.startswith(("synthetic-regimes:", "synthetic-missing:")) or not os.path.isdir(text):
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


def load_data(source: str | os.PathLike, seed: int = 0, standardize: bool = True, *, test_split: str = "fixed",
              train_missing: str = "none", with_fingerprint: bool = False):
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
    method sees them. Validation and test stay as the source has them.

    ``with_fingerprint``: ``((train, val, test), data_fingerprint)``, the
    fingerprint taken before standardisation (after ``train_missing``)."""
    if test_split not in TEST_SPLITS:
        raise ValueError(f"test_split must be one of {TEST_SPLITS}, got {test_split!r}")
    test_seed = FIXED_TEST_SEED if test_split == "fixed" else None
    splits = _load_splits(source, seed, test_seed)
    if train_missing != "none":
        splits = (drop_training_modalities(splits[0], MissingnessProtocol.parse(train_missing), seed), *splits[1:])
    fingerprint = data_fingerprint(splits) if with_fingerprint else None
    if standardize:
        try:
            splits = standardize_splits(*splits)
        except DataFormatError as e:  # values that do not standardise: name the data
            raise DataFormatError(str(e), os.fspath(source)) from None
    return (splits, fingerprint) if with_fingerprint else splits


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


def _generator_args(text: str, fields: dict) -> dict:
    """``NAME:KEY=VALUE,...`` -> {KEY: int or float} for the generator
    arguments ``fields`` ({name: "int" | "float"})."""
    _, _, args = text.partition(":")
    values = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in fields:
            raise ValueError(f"data {text!r}: expected {text.partition(':')[0]}:NAME=VALUE,... with NAME one of "
                             f"{sorted(fields)}, got {item!r}")
        kind = fields[name] if isinstance(fields[name], str) else fields[name].__name__
        try:
            values[name] = int(value) if kind == "int" else float(value)
        except ValueError:
            raise ValueError(f"data {text!r}: {name} must be a{'n integer' if kind == 'int' else ' number'}, "
                             f"got {value!r}") from None
    return values


def regimes_spec(text: str) -> RegimesSpec:
    """``synthetic-regimes`` or ``synthetic-regimes:NAME=VALUE,...`` (fields of
    :class:`RegimesSpec`, e.g. ``synthetic-regimes:kappa=0,conflict=0.5``)."""
    return RegimesSpec(**_generator_args(text, {f.name: f.type for f in dataclasses.fields(RegimesSpec)}))


#: ``synthetic-missing:NAME=VALUE,...``: the arguments of ``make_missing`` that may be given.
MISSING_ARGS = {"n": "int", "num_modalities": "int", "num_classes": "int", "data_seed": "int",
                "latent_per_modality": "int", "strong": "float", "weak": "float", "noise": "float",
                "latent_noise": "float"}


def _load_splits(source, seed: int, test_seed: int | None):
    """(train, val, test) of ``source``, unstandardised."""
    standardize = False
    text = os.fspath(source)
    bench = _benchmark_path(text)
    if bench is not None:
        name, path = bench
        spec = benchmark_spec(name)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"benchmark {spec.name!r}: {path!r} is not a directory; expected a feature directory "
                                    "(see mars.data.feature_files)")
        return load_feature_dir(path, seed=seed, standardize=standardize, benchmark=spec.name, test_seed=test_seed)
    if text == "mfeat":
        return load_mfeat(seed=seed, standardize=standardize, test_seed=test_seed)
    if text == "synthetic-missing" or text.startswith("synthetic-missing:"):
        kwargs = _generator_args(text, MISSING_ARGS)
        if not 1 <= kwargs.get("n", 1) <= 10**6 or not 2 <= kwargs.get("num_modalities", 2) <= 16:
            raise ValueError(f"data {text!r}: n must be in [1, 10**6] and num_modalities in [2, 16]")
        return make_missing(seed=seed, standardize=standardize, test_seed=test_seed, **kwargs)
    if text == "synthetic-seg":
        return make_segmentation(seed=seed, standardize=standardize, test_seed=test_seed)
    if text == "synthetic-regimes" or text.startswith("synthetic-regimes:"):
        return make_regimes(seed=seed, standardize=standardize, test_seed=test_seed, spec=regimes_spec(text))
    if os.path.isdir(text):
        return load_feature_dir(text, seed=seed, standardize=standardize, test_seed=test_seed)
    raise ValueError(f"unknown data source {text!r}: expected one of {BUILTIN_SOURCES}, a feature directory (meta.json, <modality>.npy, labels.npy), or <benchmark>:<directory> with a benchmark in {sorted(BENCHMARKS)}")
