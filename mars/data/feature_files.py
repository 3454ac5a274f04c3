"""Feature directories: the on-disk layout for user data and for pre-extracted
features of the MARS benchmarks (CREMA-D, UPMC Food-101, CASIA-SURF, MCubeS;
see :mod:`mars.data.benchmarks`).

Layout
------
A dataset is one directory with a ``meta.json`` and its arrays, either in one
folder (split by ``splits.json`` or by a stratified split fixed by the seed)::

    my_dataset/
        meta.json          what the data is (required)
        <modality>.npy     one per modality listed in meta.json (required)
        labels.npy         the targets (required)
        available.npy      which modalities each sample really has (optional)
        splits.json        the train/val/test indices (optional)

or with one folder per split, each holding one array file per modality::

    my_dataset/
        meta.json
        train/  <modality>.npy ...  labels.npy  [available.npy]   (required)
        val/    <modality>.npy ...  labels.npy  [available.npy]   (optional:
                absent or empty = a stratified quarter of train/, fixed by the seed)
        test/   <modality>.npy ...  labels.npy  [available.npy]   (required, non-empty)

``meta.json``, a JSON object:

* ``"task"``: ``"classification"`` or ``"segmentation"`` (required);
* ``"modalities"``: list of modality names, e.g. ``["audio", "visual"]``
  (required; letters, digits, ``_ . -``; not ``labels`` / ``available``);
  the order is the column order of ``available.npy`` and of the model;
* ``"num_classes"``: K, an integer >= 1 (required);
* ``"ignore_index"``: segmentation only, the label of unlabelled pixels,
  outside ``[0, K)``, e.g. 255 (optional);
* ``"benchmark"``: one of ``crema-d``, ``food-101``, ``casia-surf``,
  ``mcubes``: the directory is checked against that benchmark's modalities,
  task and classes (optional);
* ``"bona_fide_class"``: 2-class anti-spoofing data only, the label of real
  samples (0 or 1; CASIA-SURF: 1); evaluation then reports APCER, BPCER and
  ACER (optional);
* ``"name"``, ``"description"``, ``"class_names"`` (list of K strings):
  optional, informational. Any other key is an error (it catches typos).

``<modality>.npy``: float array (any float dtype; read as float32) of shape
``[N, d]`` (a feature vector per sample, e.g. pooled encoder features) or
``[N, C, H, W]`` (a feature map); either every modality is a vector or every
one is a map (the model fuses them token by token). All maps share ``H, W``; for
segmentation every modality is a map of the label maps' ``H, W``. Values of
unavailable entries are ignored (NaN allowed there) and set to 0. In the
split-folder layout N is the split's size and the per-sample shapes agree
across splits.

``labels.npy``: integer array, ``[N]`` class indices for classification or
``[N, H, W]`` per-pixel class indices for segmentation, in ``[0, K)`` (or
``ignore_index``).

``available.npy``: ``[N, M]`` bool (or 0/1 integers), True where the sample
has that modality; every row needs at least one True. Absent = all True.

``splits.json`` (one-folder layout only): ``{"train": [...], "val": [...],
"test": [...]}``, lists of distinct sample indices in ``[0, N)``; no index in
two splits; ``train`` and ``test`` non-empty; samples listed nowhere are
unused. ``"val": []`` = a stratified quarter of ``train``, fixed by the seed
(as for a split-folder dataset without ``val/``). Absent = a stratified
0.6/0.2/0.2 split fixed by the seed (``mars.data.splits.stratified_split``),
which needs enough samples for a non-empty test split (4 for 0.6/0.2/0.2).

A validation split taken from ``train`` needs at least 3 training samples.

Example (CREMA-D, audio + visual embeddings, 6 emotions)::

    meta.json        {"benchmark": "crema-d", "task": "classification",
                      "modalities": ["audio", "visual"], "num_classes": 6}
    train/audio.npy  float32 [N_train, 512]    train/visual.npy  float32 [N_train, 512]
    train/labels.npy int64 [N_train]           (and the same in val/ and test/)

and MCubeS (4 modalities, 20 materials) as downsampled feature maps with
``labels.npy`` int64 [N, H, W] and ``"ignore_index": 255``.

Every error raised while reading (missing/unreadable/malformed file, wrong
shape or dtype, N mismatch, bad JSON, bad split indices) is a
``DataFormatError`` whose message starts with the offending file's path and
says what was expected. Hostile files are read safely: JSON nested too deeply,
an integer of more digits than Python converts, a ``.npy`` header whose shape
and dtype do not match the bytes after it (checked before anything is
allocated), an object array (never unpickled), a FIFO or directory named like
a data file are all such errors.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .dataset import MultimodalDataset, concat_datasets
from .errors import DataFormatError
from .benchmarks import benchmark_spec, check_meta_against_benchmark
from .splits import DEFAULT_FRACTIONS, SPLIT_NAMES, split_indices, standardize_splits, stratified_split, stratify_keys

META_FILE = "meta.json"
LABELS_FILE = "labels.npy"
AVAILABLE_FILE = "available.npy"
SPLITS_FILE = "splits.json"
REQUIRED_META = ("task", "modalities", "num_classes")
OPTIONAL_META = ("ignore_index", "bona_fide_class", "benchmark", "name", "description", "class_names")
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_RESERVED = {"labels", "available", "meta", "splits"}
MAX_NUM_CLASSES = 2**62  # labels are int64; a model that large is refused later by the memory check
MAX_NPY_HEADER = 10000  # bytes, numpy's own default limit


def _short(x: Any, limit: int = 80) -> str:
    """``repr(x)`` cut to ``limit`` characters (values from hostile files can be huge)."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _regular_file(path: str, what: str) -> None:
    """``path`` is an existing regular file (a directory, FIFO or device named
    like a data file is refused: reading a FIFO would block)."""
    if os.path.isfile(path):
        return
    if os.path.lexists(path):
        raise DataFormatError(f"is not a regular file (a directory, FIFO, device or broken link); expected {what}", path)
    raise DataFormatError(f"file not found; expected {what}", path)


# ---------------------------------------------------------------- reading
def _read_json(path: str, what: str) -> Any:
    _regular_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"invalid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected {what}", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"cannot read ({e}); expected {what}", path) from None
    except RecursionError:
        raise DataFormatError(f"JSON nested too deeply to read; expected {what}", path) from None
    except (ValueError, MemoryError) as e:  # e.g. an integer of more digits than Python converts
        raise DataFormatError(f"invalid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              f"expected {what}", path) from None


def _check_npy_header(path: str, what: str) -> None:
    """The .npy header's shape and dtype describe exactly the bytes the file
    holds after it, checked before anything is allocated (a 128-byte file
    whose header claims 10^11 elements would otherwise ask for 745 GiB). An
    .npz archive (a zip file) is left to ``np.load``, which reports it."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if f.read(2) == b"PK":
                return
            f.seek(0)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except OSError as e:
        raise DataFormatError(f"cannot read ({e.strerror or e}); expected {what}", path) from None
    except Exception as e:  # noqa: BLE001 - any malformed header (ValueError, SyntaxError, RecursionError ...)
        text = str(e).strip().splitlines()
        raise DataFormatError(f"not a readable .npy array (bad header: {text[0][:200] if text else type(e).__name__}); "
                              f"expected {what}", path) from None
    if dtype.hasobject:
        raise DataFormatError(f"holds Python objects (dtype {dtype}), which are never loaded; expected {what}", path)
    count = 1
    for d in shape:
        count *= d
    need, have = count * dtype.itemsize, size - offset
    if any(d < 0 for d in shape) or need != have:
        raise DataFormatError(f"its header declares shape {_short(tuple(shape))} of dtype {dtype} ({need:,} bytes of "
                              f"data), but the file holds {have:,} bytes after the header; truncated or corrupt? "
                              f"expected {what}", path)


def _read_npy(path: str, what: str) -> np.ndarray:
    _regular_file(path, what)
    _check_npy_header(path, what)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, MemoryError) as e:
        raise DataFormatError(f"not a readable .npy array ({_first(e)}); expected {what}", path) from None
    if not isinstance(arr, np.ndarray):  # an .npz archive renamed to .npy
        arr.close()
        raise DataFormatError(f"is an .npz archive, not a single .npy array; expected {what}", path)
    return arr


def _first(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_meta(path: str | os.PathLike, benchmark: str | None = None) -> dict:
    """Parse and check ``<path>/meta.json``; returns the meta dict. With
    ``benchmark``, the directory must be that benchmark's (see
    :mod:`mars.data.benchmarks`)."""
    file = os.path.join(os.fspath(path), META_FILE)
    what = 'a JSON object with "task", "modalities", "num_classes" (and optionally "ignore_index")'
    meta = _read_json(file, what)
    if not isinstance(meta, dict):
        raise DataFormatError(f"expected {what}, got a JSON {type(meta).__name__}", file)
    for key in REQUIRED_META:
        if key not in meta:
            raise DataFormatError(f"missing key {key!r}; expected {what}", file)
    unknown = [k for k in meta if k not in REQUIRED_META + OPTIONAL_META]
    if unknown:
        raise DataFormatError(f"unknown key {unknown[0]!r}; allowed keys: {', '.join(REQUIRED_META + OPTIONAL_META)}", file)
    if meta["task"] not in ("classification", "segmentation"):
        raise DataFormatError(f'"task" must be "classification" or "segmentation", got {_short(meta["task"])}', file)
    mods = meta["modalities"]
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        raise DataFormatError(f'"modalities" must be a non-empty list of names, got {_short(mods)}', file)
    for m in mods:
        if not _NAME_RE.fullmatch(m) or m in _RESERVED or m in (".", ".."):
            raise DataFormatError(
                f'modality name {_short(m)} is not usable as a file name <modality>.npy; use letters, digits, "_", '
                f'".", "-" and none of {sorted(_RESERVED)}', file)
    if len(set(mods)) != len(mods):
        raise DataFormatError(f'"modalities" must be unique, got {_short(mods)}', file)
    if not _is_int(meta["num_classes"]) or not 1 <= meta["num_classes"] <= MAX_NUM_CLASSES:
        raise DataFormatError(f'"num_classes" must be an integer in [1, 2**62], got {_short(meta["num_classes"])}', file)
    ign = meta.get("ignore_index")
    if ign is not None:
        if meta["task"] != "segmentation":
            raise DataFormatError('"ignore_index" is only allowed for "task": "segmentation"', file)
        if not _is_int(ign) or 0 <= ign < meta["num_classes"] or not -2**63 <= ign < 2**63:
            raise DataFormatError(f'"ignore_index" must be an int64 outside [0, {meta["num_classes"]}), got '
                                  f'{_short(ign)}', file)
    names = meta.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != meta["num_classes"] or not all(isinstance(s, str) for s in names)):
        raise DataFormatError(f'"class_names" must be a list of {meta["num_classes"]} strings', file)
    bona = meta.get("bona_fide_class")
    if bona is not None and (meta["task"] != "classification" or meta["num_classes"] != 2 or bona not in (0, 1)
                             or not _is_int(bona)):
        raise DataFormatError(f'"bona_fide_class" must be 0 or 1 for a 2-class classification task, got {_short(bona)}', file)
    for key in ("benchmark", "name", "description"):
        if key in meta and not isinstance(meta[key], str):
            raise DataFormatError(f'"{key}" must be a string, got {_short(meta[key])}', file)
    if benchmark is not None:
        declared = meta.setdefault("benchmark", benchmark)
        try:
            same = benchmark_spec(declared) == benchmark_spec(benchmark)
        except ValueError as e:
            raise DataFormatError(f'"benchmark": {e}', file) from None
        if not same:
            raise DataFormatError(f'"benchmark" is {_short(declared)}, but the data was loaded as {benchmark!r}', file)
    if "benchmark" in meta:
        spec = check_meta_against_benchmark(meta, file)
        if spec.bona_fide_class is not None:
            meta["bona_fide_class"] = spec.bona_fide_class
    return meta


def _read_splits(file: str, n: int) -> tuple[list[int], list[int], list[int]]:
    what = '{"train": [...], "val": [...], "test": [...]} with sample indices'
    obj = _read_json(file, what)
    if not isinstance(obj, dict):
        raise DataFormatError(f"expected {what}, got a JSON {type(obj).__name__}", file)
    if set(obj) != set(SPLIT_NAMES):
        raise DataFormatError(f"expected exactly the keys train, val, test, got {_short(sorted(obj))}", file)
    seen: dict[int, str] = {}
    out = []
    for s in SPLIT_NAMES:
        idx = obj[s]
        if not isinstance(idx, list) or not all(_is_int(i) for i in idx):
            raise DataFormatError(f'"{s}" must be a list of integer indices', file)
        for i in idx:
            if not 0 <= i < n:
                raise DataFormatError(f'"{s}" has index {_short(i)}, out of range: expected indices in [0, {n}) (N from {LABELS_FILE})', file)
            if i in seen:
                where = "twice in" if seen[i] == s else f'in both "{seen[i]}" and'
                raise DataFormatError(f'index {i} appears {where} "{s}"; expected every index in at most one split, once', file)
            seen[i] = s
        out.append(idx)
    if not out[0]:
        raise DataFormatError('"train" is empty; expected at least one training index', file)
    if not out[2]:
        raise DataFormatError('"test" is empty; expected at least one test index (the test split is what a run '
                              'reports)', file)
    return tuple(out)  # type: ignore[return-value]


def _with_val(labels: torch.Tensor, ignore_index: int | None, idx, seed: int, file: str):
    """(train, val, test) index lists; an empty ``val`` is a stratified quarter
    of ``train`` fixed by ``seed`` (``train`` keeps the rest)."""
    train, val, test = (list(x) for x in idx)
    if val:
        return train, val, test
    keys = stratify_keys(labels[torch.as_tensor(train, dtype=torch.long)], ignore_index)
    tr, va, _ = stratified_split(keys, (0.75, 0.25, 0.0), seed)
    if tr.numel() == 0 or va.numel() == 0:
        raise DataFormatError(f"the validation split is empty and the training split has {len(train)} samples, too few "
                              "to set a quarter aside for validation; expected at least 3 training samples or a "
                              "non-empty validation split", file)
    return [train[i] for i in tr.tolist()], [train[i] for i in va.tolist()], test


def _read_labels(folder: str, meta: dict) -> np.ndarray:
    task, K = meta["task"], meta["num_classes"]
    lab_file = os.path.join(folder, LABELS_FILE)
    shape_txt = "[N]" if task == "classification" else "[N, H, W]"
    labels = _read_npy(lab_file, f"integer class labels {shape_txt}")
    if labels.dtype.kind not in "iu":
        raise DataFormatError(f"labels must be integers, got dtype {labels.dtype}; expected integer {shape_txt}", lab_file)
    if labels.ndim != (1 if task == "classification" else 3):
        raise DataFormatError(f"labels have shape {list(labels.shape)}; expected {shape_txt} for task {task!r}", lab_file)
    ign = meta.get("ignore_index")
    valid = (labels >= 0) & (labels < K)
    if ign is not None:
        valid |= labels == ign
    if not valid.all():
        bad = labels[~valid]
        extra = f" or {ign} (ignore_index)" if ign is not None else ""
        raise DataFormatError(f"{bad.size} labels out of range (e.g. {int(bad.flat[0])}); expected values in [0, {K}){extra} (num_classes from meta.json)", lab_file)
    return labels


def _read_available(folder: str, n: int, mods: list[str]) -> torch.Tensor | None:
    av_file = os.path.join(folder, AVAILABLE_FILE)
    if not os.path.exists(av_file):
        return None
    a = _read_npy(av_file, f"bool [N, M] = [{n}, {len(mods)}]")
    if a.shape != (n, len(mods)):
        raise DataFormatError(f"shape {list(a.shape)}; expected bool [N, M] = [{n}, {len(mods)}] (N from labels.npy, M from meta.json)", av_file)
    if a.dtype != np.bool_:
        if a.dtype.kind not in "iu" or not np.isin(a, (0, 1)).all():
            raise DataFormatError(f"dtype {a.dtype} with values other than 0/1; expected bool [N, M]", av_file)
        a = a != 0
    empty = ~a.any(axis=1)
    if empty.any():
        raise DataFormatError(f"{int(empty.sum())} samples have no available modality (e.g. sample {int(np.argmax(empty))}); expected at least one True per row", av_file)
    return torch.from_numpy(np.ascontiguousarray(a))


def _read_features(folder: str, meta: dict, labels: np.ndarray, avail: torch.Tensor | None) -> dict[str, torch.Tensor]:
    task, n = meta["task"], labels.shape[0]
    features = {}
    spatial = kind = None
    for j, m in enumerate(meta["modalities"]):
        f = os.path.join(folder, f"{m}.npy")
        want = "float [N, C, H, W]" if task == "segmentation" else "float [N, d] or [N, C, H, W]"
        x = _read_npy(f, f"{want} features of modality {m!r} (listed in meta.json)")
        if x.dtype.kind != "f":
            raise DataFormatError(f"dtype {x.dtype}; expected {want}", f)
        if x.ndim not in ((4,) if task == "segmentation" else (2, 4)):
            raise DataFormatError(f"shape {list(x.shape)}; expected {want}", f)
        if x.shape[0] != n:
            raise DataFormatError(f"{x.shape[0]} samples; expected N = {n} (from labels.npy)", f)
        if kind is not None and (x.ndim == 4) != (kind[1] == 4):
            this, other = ("a feature map [N, C, H, W]", "vectors [N, d]") if x.ndim == 4 else \
                ("vectors [N, d]", "feature maps [N, C, H, W]")
            raise DataFormatError(f"shape {list(x.shape)} is {this}, but {kind[0]}.npy holds {other}; expected every "
                                  "modality to be vectors or every one feature maps (the model fuses them token by "
                                  "token)", f)
        kind = kind or (m, x.ndim)
        if x.ndim == 4:
            hw = tuple(x.shape[2:])
            if task == "segmentation" and hw != tuple(labels.shape[1:]):
                raise DataFormatError(f"maps are {hw[0]}x{hw[1]}; expected the label maps' size {labels.shape[1]}x{labels.shape[2]}", f)
            if spatial is not None and hw != spatial[1]:
                raise DataFormatError(f"maps are {hw[0]}x{hw[1]}; expected {spatial[1][0]}x{spatial[1][1]} like {spatial[0]}.npy", f)
            spatial = spatial or (m, hw)
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        rows_ok = torch.isfinite(x.flatten(1)).all(dim=1)
        have = avail[:, j] if avail is not None else torch.ones(n, dtype=torch.bool)
        bad = have & ~rows_ok
        if bool(bad.any()):
            raise DataFormatError(f"{int(bad.sum())} available samples have NaN/inf values (e.g. sample {int(bad.nonzero()[0])}); expected finite features (or mark them unavailable in available.npy)", f)
        if not bool(rows_ok.all()):
            x[~rows_ok] = 0.0
        features[m] = x
    return features


def _read_arrays(folder: str, meta: dict, name: str) -> MultimodalDataset:
    """One folder of arrays (<modality>.npy, labels.npy, optional available.npy)."""
    labels = _read_labels(folder, meta)
    avail = _read_available(folder, labels.shape[0], meta["modalities"])
    features = _read_features(folder, meta, labels, avail)
    try:
        return MultimodalDataset(
            modalities=meta["modalities"], features=features, labels=torch.from_numpy(labels.astype(np.int64)),
            num_classes=meta["num_classes"], task=meta["task"], available=avail, ignore_index=meta.get("ignore_index"),
            bona_fide_class=meta.get("bona_fide_class"), name=name,
        )
    except DataFormatError as e:  # pragma: no cover - the checks above come first
        raise DataFormatError(str(e), folder) from None


def _check_shapes_agree(parts: dict[str, MultimodalDataset], root: str) -> None:
    first_name, first = next(iter(parts.items()))
    for s, d in parts.items():
        for m in d.modalities:
            if d.features[m].shape[1:] != first.features[m].shape[1:]:
                raise DataFormatError(
                    f"{m}.npy has per-sample shape {list(d.features[m].shape[1:])}; expected "
                    f"{list(first.features[m].shape[1:])} like {first_name}/{m}.npy", os.path.join(root, s))
        if d.labels.shape[1:] != first.labels.shape[1:]:
            raise DataFormatError(f"label maps are {list(d.labels.shape[1:])}; expected {list(first.labels.shape[1:])} "
                                  f"like {first_name}/{LABELS_FILE}", os.path.join(root, s, LABELS_FILE))


def read_feature_dir(path: str | os.PathLike, seed: int = 0, benchmark: str | None = None) -> tuple[MultimodalDataset, tuple[list[int], list[int], list[int]] | None]:
    """The whole directory as one ``MultimodalDataset`` (raw values), and the
    (train, val, test) index lists (``None`` when the directory fixes no split).

    One-folder layout: the lists of ``splits.json`` if present. Split-folder
    layout: the samples of ``train/``, ``val/``, ``test/`` in that order; with
    no ``val/``, a stratified quarter of ``train/`` fixed by ``seed``."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise DataFormatError("not a directory; expected a feature directory with meta.json, <modality>.npy, labels.npy", root)
    meta = read_meta(root, benchmark)
    name = meta.get("name") or meta.get("benchmark") or os.path.basename(os.path.abspath(root))
    if not os.path.exists(os.path.join(root, LABELS_FILE)) and os.path.isdir(os.path.join(root, "train")):
        return _read_split_folders(root, meta, name, seed)
    data = _read_arrays(root, meta, name)
    sp_file = os.path.join(root, SPLITS_FILE)
    if not os.path.exists(sp_file):
        return data, None
    return data, _with_val(data.labels, data.ignore_index, _read_splits(sp_file, len(data)), seed, sp_file)


def _read_split_folders(root: str, meta: dict, name: str, seed: int):
    if os.path.exists(os.path.join(root, SPLITS_FILE)):
        raise DataFormatError("a split-folder dataset (train/, test/) must not also have splits.json; remove one of them",
                              os.path.join(root, SPLITS_FILE))
    if not os.path.isdir(os.path.join(root, "test")):
        raise DataFormatError("has train/ but no test/ folder; expected train/, test/ and optionally val/, each with "
                              "<modality>.npy, labels.npy (and optionally available.npy)", root)
    present = [s for s in SPLIT_NAMES if os.path.isdir(os.path.join(root, s))]
    parts = {s: _read_arrays(os.path.join(root, s), meta, name) for s in present}
    _check_shapes_agree(parts, root)
    for s in ("train", "test"):
        if len(parts[s]) == 0:
            raise DataFormatError(f"has no samples; expected a non-empty {'training' if s == 'train' else 'test'} split",
                                  os.path.join(root, s, LABELS_FILE))
    starts = np.cumsum([0] + [len(parts[s]) for s in present])
    ranges = {s: list(range(int(starts[i]), int(starts[i + 1]))) for i, s in enumerate(present)}
    data = concat_datasets([parts[s] for s in present], name=name)
    where = os.path.join(root, "val") if "val" in parts else root
    return data, _with_val(data.labels, data.ignore_index, (ranges["train"], ranges.get("val", []), ranges["test"]),
                           seed, where)


def load_feature_dir(
    path: str | os.PathLike, seed: int = 0, standardize: bool = True, fractions: Sequence[float] = DEFAULT_FRACTIONS,
    benchmark: str | None = None, test_seed: int | None = None,
) -> tuple[MultimodalDataset, MultimodalDataset, MultimodalDataset]:
    """(train, val, test) from a feature directory: its split folders or
    ``splits.json`` if present, else ``split_indices(fractions, seed,
    test_seed)`` (the test split fixed by ``test_seed`` unless None);
    with ``standardize``, per-modality standardisation fitted on train.
    ``benchmark`` checks the directory against that benchmark's spec."""
    data, idx = read_feature_dir(path, seed=seed, benchmark=benchmark)
    if idx is None:
        file = os.path.join(os.fspath(path), LABELS_FILE)
        idx = [t.tolist() for t in split_indices(stratify_keys(data.labels, data.ignore_index), fractions, seed,
                                                 test_seed)]
        if not idx[2]:
            raise DataFormatError(f"{len(data)} samples are too few for a train/val/test split of {tuple(fractions)}: the "
                                  f"test split would be empty; expected more samples or a {SPLITS_FILE}", file)
        idx = _with_val(data.labels, data.ignore_index, idx, seed, file)
    splits = tuple(data.subset(torch.as_tensor(i, dtype=torch.long)) for i in idx)
    if standardize:
        try:
            splits = standardize_splits(*splits)
        except DataFormatError as e:  # values that do not standardise: name the directory
            raise DataFormatError(str(e), path) from None
    return splits  # type: ignore[return-value]


# ---------------------------------------------------------------- writing
def _write_arrays(folder: str, data: MultimodalDataset, dtype: Any) -> None:
    os.makedirs(folder, exist_ok=True)
    for m in data.modalities:
        np.save(os.path.join(folder, f"{m}.npy"), data.features[m].detach().cpu().numpy().astype(dtype))
    np.save(os.path.join(folder, LABELS_FILE), data.labels.cpu().numpy().astype(np.int64))
    av_file = os.path.join(folder, AVAILABLE_FILE)
    if not data.is_complete:
        np.save(av_file, data.available.cpu().numpy())
    elif os.path.exists(av_file):
        os.remove(av_file)


def _as_dataset(data: Mapping[str, Any]) -> MultimodalDataset:
    feats = {m: torch.as_tensor(np.asarray(x)) for m, x in data["features"].items()}
    return MultimodalDataset(
        modalities=list(data.get("modalities") or feats), features=feats,
        labels=torch.as_tensor(np.asarray(data["labels"])), num_classes=int(data["num_classes"]),
        task=data.get("task", "classification"),
        available=None if data.get("available") is None else torch.as_tensor(np.asarray(data["available"])),
        ignore_index=data.get("ignore_index"), bona_fide_class=data.get("bona_fide_class"),
    )


def write_feature_dir(
    path: str | os.PathLike,
    data: MultimodalDataset | Sequence[MultimodalDataset] | Mapping[str, Any],
    *,
    splits: Mapping[str, Sequence[int]] | None = None,
    layout: str = "single",
    benchmark: str | None = None,
    exist_ok: bool = False,
    name: str | None = None,
    dtype: Any = np.float32,
) -> str:
    """Write ``data`` in the feature-directory layout; returns the path.

    ``data`` is a ``MultimodalDataset``; or a (train, val, test) triple of
    them; or a mapping of arrays with keys ``features`` ({modality: array}),
    ``labels``, ``num_classes``, optional ``task`` (default classification),
    ``modalities`` (default: the order of ``features``), ``available``,
    ``ignore_index``, ``bona_fide_class``. ``layout="single"`` writes one
    folder (a triple is concatenated with a ``splits.json`` that reproduces
    it; ``splits`` writes ``splits.json`` for a single dataset);
    ``layout="split"`` writes ``train/``, ``val/``, ``test/`` folders from a
    triple. ``benchmark`` records ``"benchmark"`` in ``meta.json`` (checked
    when read). ``available.npy`` is written only when some modality is
    unavailable.
    """
    if layout not in ("single", "split"):
        raise ValueError(f"write_feature_dir: layout must be 'single' or 'split', got {layout!r}")
    parts: list[MultimodalDataset] | None = None
    if isinstance(data, Mapping):
        data = _as_dataset(data)
    elif not isinstance(data, MultimodalDataset):
        parts = list(data)
        if len(parts) != 3 or not all(isinstance(p, MultimodalDataset) for p in parts):
            raise TypeError("write_feature_dir: data must be a MultimodalDataset, a (train, val, test) triple of them, or a mapping of arrays")
        if splits is not None:
            raise ValueError("write_feature_dir: pass either a (train, val, test) triple or splits, not both")
        concat = concat_datasets(parts)  # checks that the parts agree
        if layout == "single":
            starts = np.cumsum([0] + [len(p) for p in parts])
            splits = {s: list(range(int(starts[i]), int(starts[i + 1]))) for i, s in enumerate(SPLIT_NAMES)}
        data = concat
    if layout == "split" and parts is None:
        raise ValueError("write_feature_dir: layout='split' needs a (train, val, test) triple of datasets")
    for m in data.modalities:
        if not _NAME_RE.match(m) or m in _RESERVED:
            raise ValueError(f"write_feature_dir: modality name {m!r} cannot be a file name <modality>.npy")
    root = os.fspath(path)
    os.makedirs(root, exist_ok=True)
    if not exist_ok and os.path.exists(os.path.join(root, META_FILE)):
        raise FileExistsError(f"{os.path.join(root, META_FILE)} exists; pass exist_ok=True to overwrite")
    meta: dict[str, Any] = {"task": data.task, "modalities": list(data.modalities), "num_classes": data.num_classes}
    if data.ignore_index is not None:
        meta["ignore_index"] = data.ignore_index
    if data.bona_fide_class is not None:
        meta["bona_fide_class"] = data.bona_fide_class
    if benchmark is not None:
        meta["benchmark"] = benchmark
        check_meta_against_benchmark(meta, os.path.join(root, META_FILE))
    if name or data.name:
        meta["name"] = name or data.name
    with open(os.path.join(root, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    sp_file = os.path.join(root, SPLITS_FILE)
    if layout == "split":
        for s, part in zip(SPLIT_NAMES, parts):
            _write_arrays(os.path.join(root, s), part, dtype)
        if os.path.exists(sp_file):
            os.remove(sp_file)
        return root
    _write_arrays(root, data, dtype)
    if splits is not None:
        with open(sp_file, "w", encoding="utf-8") as f:
            json.dump({s: [int(i) for i in splits[s]] for s in SPLIT_NAMES}, f)
    elif os.path.exists(sp_file):
        os.remove(sp_file)
    return root
