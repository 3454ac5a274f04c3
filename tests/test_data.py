"""mars.data: datasets, splits, standardisation, missingness protocols, the
embedded mfeat data, the synthetic segmentation set and feature directories."""
from __future__ import annotations

import io
import itertools
import json
import os

import numpy as np
import pytest
import torch

from mars.data import (
    DataFormatError,
    MissingnessProtocol,
    MultimodalDataset,
    Standardizer,
    all_subsets,
    generate_segmentation,
    load_data,
    load_feature_dir,
    load_mfeat,
    make_segmentation,
    read_feature_dir,
    read_mfeat,
    split_dataset,
    split_sizes,
    stratified_split,
    stratify_keys,
    subset_masks,
    subset_name,
    write_feature_dir,
)
from mars.data.missingness import MAX_REDRAWS
from mars.data import mfeat as mfeat_module
from mars.data.mfeat import MFEAT_VIEWS


def _toy(n=40, num_classes=4, seed=0, available=None, task="classification"):
    g = torch.Generator().manual_seed(seed)
    feats = {"a": torch.randn(n, 5, generator=g), "b": torch.randn(n, 3, generator=g) * 10 + 3}
    labels = torch.arange(n) % num_classes
    return MultimodalDataset(["a", "b"], feats, labels, num_classes, task, available=available, name="toy")


# ------------------------------------------------------------------ dataset
def test_dataset_basics_and_subset():
    avail = torch.ones(40, 2, dtype=torch.bool)
    avail[::3, 1] = False
    d = _toy(available=avail)
    assert len(d) == 40 and d.num_modalities == 2 and not d.is_complete
    assert d.feature_shapes == {"a": (5,), "b": (3,)}
    assert bool((d.features["b"][::3] == 0).all()), "unavailable entries are zero-filled"
    s = d.subset([3, 1, 2])
    assert len(s) == 3 and s.labels.tolist() == [3, 1, 2]
    assert torch.equal(s.available, avail[[3, 1, 2]])
    assert len(d.subset(torch.arange(40) < 10)) == 10
    assert len(d.subset([])) == 0
    with pytest.raises(IndexError):
        d.subset([40])
    assert d.to("cpu").labels.device.type == "cpu"


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(features={"a": torch.randn(39, 5), "b": torch.randn(40, 3)}), "modality 'a'.*39 samples, expected N=40"),
        (dict(features={"a": torch.randn(40, 5)}), "no features for modality 'b'"),
        (dict(features={"a": torch.randn(40, 5), "b": torch.randn(40, 3), "c": torch.randn(40, 1)}), "unknown modality 'c'"),
        (dict(features={"a": torch.randn(40, 5), "b": torch.ones(40, 3, dtype=torch.long)}), "modality 'b'.*floating point"),
        (dict(features={"a": torch.randn(40, 5, 2), "b": torch.randn(40, 3)}), r"modality 'a'.*\[N, d\] or \[N, C, H, W\]"),
        (dict(labels=torch.arange(40) % 5), r"labels must lie in \[0, 4\)"),
        (dict(labels=torch.zeros(40)), "labels must be integers"),
        (dict(available=torch.zeros(40, 2, dtype=torch.bool)), "at least one available modality"),
        (dict(available=torch.ones(40, 3, dtype=torch.bool)), r"available must have shape \[N, M\] = \[40, 2\]"),
        (dict(features={"a": torch.full((40, 5), float("nan")), "b": torch.randn(40, 3)}), "modality 'a'.*NaN"),
        (dict(task="regression"), "task must be one of"),
        (dict(modalities=["a", "a"]), "unique"),
    ],
)
def test_dataset_validation(change, match):
    args = dict(modalities=["a", "b"], features={"a": torch.randn(40, 5), "b": torch.randn(40, 3)},
                labels=torch.arange(40) % 4, num_classes=4, name="toy")
    args.update(change)
    with pytest.raises(DataFormatError, match=match):
        MultimodalDataset(**args)


def test_dataset_segmentation_validation():
    feats = {"x": torch.randn(4, 2, 8, 8), "y": torch.randn(4, 3, 8, 8)}
    labels = torch.zeros(4, 8, 8, dtype=torch.long)
    labels[0, 0, 0] = 255
    d = MultimodalDataset(["x", "y"], feats, labels, 3, "segmentation", ignore_index=255)
    assert d.feature_shapes["y"] == (3, 8, 8)
    with pytest.raises(DataFormatError, match=r"labels must lie in \[0, 3\)"):
        MultimodalDataset(["x", "y"], feats, labels, 3, "segmentation")
    with pytest.raises(DataFormatError, match="modality 'y'.*label maps' size 8x8"):
        MultimodalDataset(["x", "y"], {"x": feats["x"], "y": torch.randn(4, 3, 4, 4)}, labels, 3, "segmentation", ignore_index=255)
    with pytest.raises(DataFormatError, match="modality 'x'.*segmentation needs feature maps"):
        MultimodalDataset(["x", "y"], {"x": torch.randn(4, 2), "y": feats["y"]}, labels, 3, "segmentation", ignore_index=255)
    with pytest.raises(DataFormatError, match="ignore_index 1 must lie outside"):
        MultimodalDataset(["x", "y"], feats, labels.clamp(max=2), 3, "segmentation", ignore_index=1)


# ------------------------------------------------------------------- splits
def test_split_sizes_exact():
    assert split_sizes(2000) == [1200, 400, 400]
    assert split_sizes(10) == [6, 2, 2]
    for n in range(0, 60):
        for f in [(0.6, 0.2, 0.2), (0.7, 0.15, 0.15), (0.8, 0.2, 0.0), (1 / 3, 1 / 3, 1 / 3)]:
            sizes = split_sizes(n, f)
            assert sum(sizes) == n and all(abs(s - n * x) < 1 for s, x in zip(sizes, f))
    for bad in [(0.5, 0.5), (0.6, 0.3, 0.3), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)]:
        with pytest.raises(ValueError, match="fractions"):
            split_sizes(10, bad)


def test_stratified_split_exact_stratified_reproducible():
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        k = int(torch.randint(1, 8, (1,), generator=g))
        keys = torch.randint(k, (int(torch.randint(1, 120, (1,), generator=g)),), generator=g)
        n = keys.numel()
        parts = stratified_split(keys, seed=trial)
        assert [len(p) for p in parts] == split_sizes(n)
        allidx = torch.cat(parts)
        assert torch.equal(allidx.sort().values, torch.arange(n)), "disjoint and covering"
        for p in parts:
            assert torch.equal(p, p.sort().values)
        for c in keys.unique():
            nc = int((keys == c).sum())
            for p, size in zip(parts, split_sizes(n)):
                got = int((keys[p] == c).sum())
                assert abs(got - nc * size / n) < 2, (nc, size, n, got)
    keys = torch.arange(2000) % 10
    a, b = stratified_split(keys, seed=3), stratified_split(keys, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = stratified_split(keys, seed=4)
    assert not torch.equal(a[0], c[0])
    for p, per_class in zip(a, (120, 40, 40)):
        assert torch.bincount(keys[p]).tolist() == [per_class] * 10


def test_stratified_split_every_class_in_every_split_when_possible():
    keys = torch.tensor([0] * 100 + [1] * 3 + [2] * 3 + [3] * 3)
    parts = stratified_split(keys, seed=0)
    for p in parts:
        assert set(keys[p].tolist()) == {0, 1, 2, 3}
    keys = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    for p in stratified_split(keys, seed=5):
        assert set(keys[p].tolist()) == {0, 1, 2}
    keys = torch.tensor([0] * 2 + [1] * 4 + [2] * 2)  # sizes 6/1/1: class 1 (4 samples) goes everywhere
    for p in stratified_split(keys, seed=0):
        assert 1 in keys[p].tolist()


def test_stratify_keys_segmentation():
    y = torch.zeros(3, 4, 4, dtype=torch.long)
    y[0] = 2
    y[1, :3] = 255
    y[1, 3] = 1
    y[2, :, :1] = 1
    assert stratify_keys(y, ignore_index=255).tolist() == [2, 1, 0]


# ---------------------------------------------------------- standardisation
def test_standardizer_fits_on_train_only_and_round_trips():
    train, val = _toy(n=40, seed=0), _toy(n=20, seed=1)
    val.features["a"] += 100.0  # must not leak into the statistics
    st = Standardizer().fit(train)
    tr, va = st.transform(train), st.transform(val)
    for m in ("a", "b"):
        x = train.features[m].double()
        assert torch.allclose(st.mean[m].double(), x.mean(0), atol=1e-5)
        assert torch.allclose(st.std[m].double(), x.std(0, unbiased=False), atol=1e-5)
        assert torch.allclose(tr.features[m].mean(0), torch.zeros(1), atol=1e-5)
        assert torch.allclose(tr.features[m].std(0, unbiased=False), torch.ones(1), atol=1e-4)
    expect = (val.features["a"] - st.mean["a"]) / st.std["a"]
    assert torch.allclose(va.features["a"], expect)
    assert float(va.features["a"].mean()) > 10, "val keeps its shift: train statistics only"
    assert va.standardizer is st

    buf = io.BytesIO()
    torch.save(st.state_dict(), buf)
    buf.seek(0)
    st2 = Standardizer.from_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(st2.transform(val).features["a"], va.features["a"])
    assert st2.modalities == ["a", "b"]
    with pytest.raises(DataFormatError):
        Standardizer().load_state_dict({"modalities": ["a"]})


def test_standardizer_constant_feature_unavailable_rows_and_maps():
    avail = torch.ones(40, 2, dtype=torch.bool)
    avail[:10, 1] = False
    d = _toy(available=avail)
    d.features["a"][:, 0] = 7.0
    d.features["b"][10:] += 50.0  # the zero rows of unavailable samples must not drag the mean
    st = Standardizer().fit(d)
    out = st.transform(d)
    assert float(st.std["a"][0]) == 1.0 and torch.isfinite(out.features["a"]).all()
    assert torch.allclose(st.mean["b"], d.features["b"][10:].mean(0))
    assert bool((out.features["b"][:10] == 0).all())
    tr, va, te = make_segmentation(n=60, size=8, seed=0)
    assert tr.standardizer is va.standardizer is te.standardizer
    assert tr.standardizer.mean["m1"].shape == (5,)
    x = tr.features["m1"]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(5), atol=1e-3)


# -------------------------------------------------------------------- mfeat
def test_mfeat_shapes_classes_views():
    tr, va, te = load_mfeat(seed=0)
    dims = {"fourier": 76, "profile": 216, "karhunen_loeve": 64, "pixel": 240, "zernike": 47, "morphological": 6}
    for d, n in zip((tr, va, te), (1200, 400, 400)):
        assert len(d) == n and d.modalities == list(MFEAT_VIEWS) and d.num_classes == 10
        assert d.task == "classification" and d.is_complete
        assert {m: s[0] for m, s in d.feature_shapes.items()} == dims
        assert torch.bincount(d.labels, minlength=10).tolist() == [n // 10] * 10
        assert all(x.dtype == torch.float32 for x in d.features.values())
    assert torch.allclose(tr.features["pixel"].mean(0), torch.zeros(240), atol=1e-4)
    raw = read_mfeat()
    with np.load(os.path.join(os.path.dirname(mfeat_module.__file__), "uci_mfeat.npz")) as z:
        assert np.array_equal(raw.features["zernike"].numpy(), z["zernike"])
        assert np.array_equal(raw.labels.numpy(), z["labels"])
    tr1, _, _ = load_mfeat(seed=1, standardize=False)
    assert tr1.standardizer is None and float(tr1.features["profile"].max()) > 100
    assert not torch.equal(tr1.features["pixel"], raw.features["pixel"][:1200]), "the seed shuffles"


def test_mfeat_missing_or_unreadable_file(tmp_path):
    with pytest.raises(DataFormatError, match="nope.npz.*not found"):
        read_mfeat(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an archive")
    with pytest.raises(DataFormatError, match="bad.npz.*cannot read"):
        read_mfeat(bad)
    part = tmp_path / "part.npz"
    np.savez(part, labels=np.zeros(2000, dtype=np.int64))
    with pytest.raises(DataFormatError, match="part.npz.*missing array 'fourier'"):
        read_mfeat(part)


# -------------------------------------------------------------- missingness
def _holey_available(n=3000, M=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, M, generator=g) < 0.6
    a[~a.any(1), 0] = True
    a[:5] = False
    a[:5, 2] = True  # a few samples with exactly one available modality
    return a


@pytest.mark.parametrize("spec", ["uniform", "rates:0.2,0.5,0.8,0.95", "fixed:0.5", "fixed:0.9", "none"])
def test_protocol_masks_nonempty_within_available_deterministic(spec):
    p = MissingnessProtocol.parse(spec)
    avail = _holey_available()
    m1 = p.sample(avail, torch.Generator().manual_seed(7))
    m2 = p.sample(avail, torch.Generator().manual_seed(7))
    assert m1.shape == avail.shape and m1.dtype == torch.bool
    assert bool(m1.any(1).all()), "never empty"
    assert not bool((m1 & ~avail).any()), "only among available"
    assert bool(m1[:5, 2].all()) and int(m1[:5].sum()) == 5
    assert torch.equal(m1, m2)
    if spec != "none":
        assert not torch.equal(m1, p.sample(avail, torch.Generator().manual_seed(8)))
        assert torch.equal(p.fixed_masks(avail, 3), p.fixed_masks(avail, 3))
    else:
        assert torch.equal(m1, avail)


@pytest.mark.parametrize("spec", ["rates:0.2,0.5,0.8", "fixed:0.3", "fixed:0.7", "uniform"])
def test_protocol_rates_honoured(spec):
    p = MissingnessProtocol.parse(spec)
    avail = torch.ones(20000, 3, dtype=torch.bool)
    obs = p.sample(avail, torch.Generator().manual_seed(0))
    got = (~obs).float().mean(0)
    want = torch.tensor(p.expected_missing_rates(3))
    assert torch.allclose(got, want, atol=0.015), (got, want)
    if spec.startswith("rates"):
        assert got[0] < got[1] < got[2]


def test_uniform_is_uniform_over_nonempty_subsets():
    avail = torch.ones(14000, 3, dtype=torch.bool)
    obs = MissingnessProtocol.parse("uniform").sample(avail, torch.Generator().manual_seed(0))
    code = (obs.long() * torch.tensor([1, 2, 4])).sum(1)
    freq = torch.bincount(code, minlength=8).float() / len(code)
    assert freq[0] == 0
    assert torch.allclose(freq[1:], torch.full((7,), 1 / 7), atol=0.015)


def test_protocol_fallback_and_errors():
    avail = torch.ones(50, 1, dtype=torch.bool)
    obs = MissingnessProtocol("fixed", (0.999999,)).sample(avail, torch.Generator().manual_seed(0))
    assert bool(obs.all()) and MAX_REDRAWS >= 1
    p = MissingnessProtocol.parse("rates:0.2,0.5")
    with pytest.raises(ValueError, match="2 rates, expected one per modality \\(3\\)"):
        p.sample(torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one available"):
        p.sample(torch.zeros(4, 2, dtype=torch.bool))


def test_protocol_parsing():
    assert MissingnessProtocol.parse("uniform") == MissingnessProtocol("uniform")
    assert MissingnessProtocol.parse(" Rates: 0.2, 0.5 ,0.8 ").rates == (0.2, 0.5, 0.8)
    assert MissingnessProtocol.parse("fixed:0.5") == MissingnessProtocol("fixed", (0.5,))
    for s in ["uniform", "none", "fixed:0.5", "rates:0.2,0.5,0.8", "fixed:0"]:
        assert str(MissingnessProtocol.parse(s)) == s
        assert MissingnessProtocol.parse(str(MissingnessProtocol.parse(s))) == MissingnessProtocol.parse(s)
    bad = {
        "": "unknown missingness protocol",
        "dropout": "unknown missingness protocol",
        "fixed": "needs rates",
        "fixed:": "needs rates",
        "fixed:1.0": r"outside \[0, 1\)",
        "fixed:-0.1": r"outside \[0, 1\)",
        "fixed:0.2,0.3": "takes one rate",
        "rates:a,b": "'a' is not a number",
        "rates:0.2,,0.3": "not a number",
        "rates:1": r"outside \[0, 1\)",
        "uniform:0.5": "takes no arguments",
    }
    for s, match in bad.items():
        with pytest.raises(ValueError, match=match):
            MissingnessProtocol.parse(s)
    with pytest.raises(ValueError):
        MissingnessProtocol("fixed", (0.2, 0.3))


def test_all_subsets_order_and_names():
    s3 = [tuple(int(i) for i in m.nonzero().flatten()) for m in all_subsets(3)]
    assert s3 == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    s6 = all_subsets(6)
    assert len(s6) == 63 and len({tuple(m.tolist()) for m in s6}) == 63
    sizes = [int(m.sum()) for m in s6]
    assert sizes == sorted(sizes) and all(m.any() for m in s6)
    idx = [tuple(int(i) for i in m.nonzero().flatten()) for m in s6]
    for k in range(1, 7):
        assert [t for t in idx if len(t) == k] == list(itertools.combinations(range(6), k))
    assert subset_masks(6).shape == (63, 6)
    assert subset_name(torch.tensor([True, False, True]), ["rgb", "depth", "ir"]) == "rgb+ir"
    with pytest.raises(ValueError):
        subset_name(torch.tensor([False, False]), ["a", "b"])
    with pytest.raises(ValueError):
        all_subsets(0)


# ---------------------------------------------------------------- synthetic
def _centroid_accuracy(train, test, mods):
    def pixels(d):
        x = torch.cat([d.features[m] for m in mods], 1)
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), d.labels.reshape(-1)

    X, Y = pixels(train)
    C = torch.stack([X[Y == k].mean(0) for k in range(train.num_classes)])
    Xt, Yt = pixels(test)
    return float((torch.cdist(Xt, C).argmin(1) == Yt).float().mean())


def test_synthetic_segmentation_shapes_and_determinism():
    tr, va, te = make_segmentation(n=100, size=16, num_modalities=3, num_classes=4, seed=0)
    assert (len(tr), len(va), len(te)) == (60, 20, 20)
    assert tr.task == "segmentation" and tr.modalities == ["m0", "m1", "m2"] and tr.num_classes == 4
    assert tr.feature_shapes == {"m0": (4, 16, 16), "m1": (5, 16, 16), "m2": (6, 16, 16)}
    assert tr.labels.shape == (60, 16, 16) and tr.labels.dtype == torch.long
    assert set(torch.cat([tr.labels, va.labels, te.labels]).unique().tolist()) == {0, 1, 2, 3}
    tr2, _, _ = make_segmentation(n=100, size=16, seed=0)
    assert torch.equal(tr.labels, tr2.labels) and torch.equal(tr.features["m2"], tr2.features["m2"])
    tr3, _, _ = make_segmentation(n=100, size=16, seed=1)
    assert not torch.equal(tr.features["m0"], tr3.features["m0"])
    d = generate_segmentation(n=50, size=8, num_modalities=2, num_classes=3, seed=2, unavailable_rate=0.4, ignore_index=255)
    assert not d.is_complete and bool(d.available.any(1).all())
    assert bool((d.labels == 255).any()) and bool((d.labels < 3).any())


def test_synthetic_modalities_are_complementary():
    tr, _, te = make_segmentation(n=200, size=16, num_modalities=3, num_classes=4, seed=0)
    acc = {s: _centroid_accuracy(tr, te, s) for k in (1, 2, 3) for s in itertools.combinations(tr.modalities, k)}
    singles = [a for s, a in acc.items() if len(s) == 1]
    pairs = [a for s, a in acc.items() if len(s) == 2]
    full = acc[tuple(tr.modalities)]
    assert min(singles) > 0.35, "each modality alone is well above chance (0.25)"
    assert full > max(singles) + 0.1, acc
    assert np.mean(singles) < np.mean(pairs) < full, "graceful degradation with fewer modalities"


# ----------------------------------------------------------- feature dirs
def test_feature_dir_round_trip_with_splits(tmp_path):
    avail = torch.ones(40, 2, dtype=torch.bool)
    avail[::4, 0] = False
    parts = split_dataset(_toy(available=avail), seed=1)
    write_feature_dir(tmp_path / "d", parts)
    assert sorted(os.listdir(tmp_path / "d")) == ["a.npy", "available.npy", "b.npy", "labels.npy", "meta.json", "splits.json"]
    loaded = load_feature_dir(tmp_path / "d", standardize=False)
    for a, b in zip(parts, loaded):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.available, b.available)
        assert all(torch.equal(a.features[m], b.features[m]) for m in a.modalities)
    std = load_feature_dir(tmp_path / "d")
    assert std[0].standardizer is not None
    assert torch.allclose(std[0].features["b"].mean(0), torch.zeros(3), atol=1e-5)


def test_feature_dir_without_splits_and_segmentation(tmp_path):
    d = _toy(n=50)
    write_feature_dir(tmp_path / "c", d)
    assert "splits.json" not in os.listdir(tmp_path / "c")
    got = load_feature_dir(tmp_path / "c", seed=3, standardize=False)
    want = split_dataset(d, seed=3)
    assert all(torch.equal(g.labels, w.labels) and torch.equal(g.features["a"], w.features["a"]) for g, w in zip(got, want))
    assert torch.equal(load_data(tmp_path / "c", seed=3, test_split="per-seed")[1].labels, got[1].labels)

    seg = generate_segmentation(n=30, size=8, num_modalities=2, num_classes=3, seed=0, ignore_index=255, unavailable_rate=0.2)
    write_feature_dir(tmp_path / "s", seg, splits={"train": list(range(20)), "val": [20, 21], "test": list(range(22, 30))})
    raw, idx = read_feature_dir(tmp_path / "s")
    assert raw.ignore_index == 255 and raw.task == "segmentation" and idx[1] == [20, 21]
    assert torch.equal(raw.labels, seg.labels) and torch.equal(raw.features["m1"], seg.features["m1"])
    tr, va, te = load_feature_dir(tmp_path / "s")
    assert (len(tr), len(va), len(te)) == (20, 2, 8)

    arrays = {"features": {"rgb": np.random.rand(12, 3, 4, 4).astype(np.float64), "depth": np.random.rand(12, 1, 4, 4)},
              "labels": np.arange(12) % 2, "num_classes": 2}
    write_feature_dir(tmp_path / "m", arrays)
    raw, _ = read_feature_dir(tmp_path / "m")
    assert raw.modalities == ["rgb", "depth"] and raw.features["rgb"].dtype == torch.float32
    with pytest.raises(FileExistsError):
        write_feature_dir(tmp_path / "m", arrays)
    write_feature_dir(tmp_path / "m", arrays, exist_ok=True)


def _fixture(root):
    d = _toy(n=20)
    write_feature_dir(root, d, splits={"train": list(range(12)), "val": list(range(12, 16)), "test": list(range(16, 20))})
    return root


def _meta(root, **change):
    meta = json.loads((root / "meta.json").read_text())
    meta.update(change)
    for k, v in list(meta.items()):
        if v is None:
            del meta[k]
    (root / "meta.json").write_text(json.dumps(meta))


def _splits(root, obj):
    (root / "splits.json").write_text(json.dumps(obj))


MALFORMED = {
    "meta missing": ("meta.json", "not found", lambda r: os.remove(r / "meta.json")),
    "meta bad json": ("meta.json", "invalid JSON", lambda r: (r / "meta.json").write_text("{task: classification")),
    "meta not object": ("meta.json", "JSON object", lambda r: (r / "meta.json").write_text("[1, 2]")),
    "meta missing key": ("meta.json", "missing key 'num_classes'", lambda r: _meta(r, num_classes=None)),
    "meta unknown key": ("meta.json", "unknown key 'num_class'", lambda r: _meta(r, num_class=3)),
    "meta bad task": ("meta.json", '"task" must be', lambda r: _meta(r, task="detection")),
    "meta bad classes": ("meta.json", '"num_classes" must be an integer', lambda r: _meta(r, num_classes="4")),
    "meta bad modality": ("meta.json", "modality name 'labels'", lambda r: _meta(r, modalities=["a", "labels"])),
    "meta ignore cls": ("meta.json", '"ignore_index" is only allowed', lambda r: _meta(r, ignore_index=255)),
    "modality missing": ("b.npy", "not found", lambda r: os.remove(r / "b.npy")),
    "modality unreadable": ("a.npy", "not a readable .npy", lambda r: (r / "a.npy").write_bytes(b"garbage")),
    "modality int": ("a.npy", "dtype int64", lambda r: np.save(r / "a.npy", np.zeros((20, 5), dtype=np.int64))),
    "modality 3-D": ("a.npy", r"shape \[20, 5, 2\]", lambda r: np.save(r / "a.npy", np.zeros((20, 5, 2), dtype=np.float32))),
    "modality N": ("b.npy", "19 samples; expected N = 20", lambda r: np.save(r / "b.npy", np.zeros((19, 3), dtype=np.float32))),
    "modality nan": ("a.npy", "NaN", lambda r: np.save(r / "a.npy", np.full((20, 5), np.nan, dtype=np.float32))),
    "modality object": ("a.npy", "holds Python objects", lambda r: np.save(r / "a.npy", np.array([{}, 1], dtype=object), allow_pickle=True)),
    "modality maps differ": ("b.npy", "like a.npy", lambda r: (np.save(r / "a.npy", np.zeros((20, 2, 4, 4), np.float32)), np.save(r / "b.npy", np.zeros((20, 2, 5, 5), np.float32)))),
    "labels missing": ("labels.npy", "not found", lambda r: os.remove(r / "labels.npy")),
    "labels float": ("labels.npy", "must be integers", lambda r: np.save(r / "labels.npy", np.zeros(20))),
    "labels shape": ("labels.npy", r"expected \[N\]", lambda r: np.save(r / "labels.npy", np.zeros((20, 2), dtype=np.int64))),
    "labels range": ("labels.npy", r"out of range.*\[0, 4\)", lambda r: np.save(r / "labels.npy", np.arange(20))),
    "available shape": ("available.npy", r"expected bool \[N, M\] = \[20, 2\]", lambda r: np.save(r / "available.npy", np.ones((20, 3), bool))),
    "available empty row": ("available.npy", "no available modality", lambda r: np.save(r / "available.npy", np.eye(20, 2, dtype=bool))),
    "available values": ("available.npy", "other than 0/1", lambda r: np.save(r / "available.npy", np.full((20, 2), 2))),
    "splits bad json": ("splits.json", "invalid JSON", lambda r: (r / "splits.json").write_text('{"train": [1,')),
    "splits keys": ("splits.json", "exactly the keys", lambda r: _splits(r, {"train": [0], "test": [1]})),
    "splits range": ("splits.json", r"index 20, out of range: expected indices in \[0, 20\)", lambda r: _splits(r, {"train": [0, 20], "val": [], "test": []})),
    "splits negative": ("splits.json", "index -1, out of range", lambda r: _splits(r, {"train": [-1], "val": [], "test": []})),
    "splits overlap": ("splits.json", 'in both "train" and "test"', lambda r: _splits(r, {"train": [0, 1], "val": [2], "test": [1]})),
    "splits duplicate": ("splits.json", 'twice in "val"', lambda r: _splits(r, {"train": [0], "val": [2, 2], "test": []})),
    "splits not ints": ("splits.json", "list of integer indices", lambda r: _splits(r, {"train": [0.5], "val": [], "test": []})),
    "meta nested deeply": ("meta.json", "nested too deeply", lambda r: (r / "meta.json").write_text("[" * 10**5 + "]" * 10**5)),
    "meta huge classes": ("meta.json", r'"num_classes" must be an integer in \[1, 2\*\*62\]',
                          lambda r: (r / "meta.json").write_text((r / "meta.json").read_text().replace('"num_classes": 4', '"num_classes": 1' + "0" * 400))),
    "meta classes digits": ("meta.json", "invalid JSON", lambda r: (r / "meta.json").write_text('{"num_classes": ' + "9" * 5000 + "}")),
    "meta benchmark list": ("meta.json", '"benchmark" must be a string', lambda r: _meta(r, benchmark=["crema-d"])),
    "meta fifo": ("meta.json", "not a regular file", lambda r: (os.remove(r / "meta.json"), os.mkfifo(r / "meta.json"))),
    "splits nested deeply": ("splits.json", "nested too deeply", lambda r: (r / "splits.json").write_text('{"train": ' + "[" * 10**5 + "]" * 10**5 + "}")),
    "labels header lies": ("labels.npy", r"header declares shape \(100000000000,\) of dtype int64 \(800,000,000,000 bytes",
                           lambda r: _npy_header_only(r / "labels.npy", "<i8", (10**11,))),
    "labels truncated": ("labels.npy", r"declares shape \(20,\).*holds 80 bytes",
                         lambda r: (r / "labels.npy").write_bytes((r / "labels.npy").read_bytes()[:-80])),
    "modality negative shape": ("a.npy", "bad header|declares shape", lambda r: _npy_header_only(r / "a.npy", "<f4", (-1, 5))),
    "modality vector and map": ("b.npy", "is a feature map .*but a.npy holds vectors", lambda r: np.save(r / "b.npy", np.zeros((20, 3, 2, 2), np.float32))),
    "splits empty train": ("splits.json", '"train" is empty', lambda r: _splits(r, {"train": [], "val": [1], "test": []})),
}


def _npy_header_only(path, descr, shape):
    """A .npy file that is only a (valid-looking) header: no data behind it."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * (127 - (10 + len(header)) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_feature_dir_malformed_file_names_the_file(tmp_path, case):
    filename, match, damage = MALFORMED[case]
    root = _fixture(tmp_path / "d")
    damage(root)
    with pytest.raises(DataFormatError, match=match) as info:
        load_feature_dir(root)
    assert info.value.path is not None and os.path.basename(info.value.path) == filename
    assert filename in str(info.value)


def test_feature_dir_not_a_directory(tmp_path):
    with pytest.raises(DataFormatError, match="not a directory"):
        load_feature_dir(tmp_path / "missing")


def test_load_data_sources(monkeypatch):
    from mars.data import sources

    calls = []
    monkeypatch.setattr(sources, "load_mfeat", lambda **kw: calls.append(("mfeat", kw)) or ("tr", "va", "te"))
    monkeypatch.setattr(sources, "make_segmentation", lambda **kw: calls.append(("seg", kw)) or ("tr", "va", "te"))
    monkeypatch.setattr(sources, "standardize_splits", lambda *splits: calls.append(("standardize", splits)) or splits)
    load_data("mfeat", seed=2)
    load_data("synthetic-seg", standardize=False, test_split="per-seed")
    # the loaders give unstandardised splits; load_data standardises them once (on train)
    assert calls == [("mfeat", {"seed": 2, "standardize": False, "test_seed": 0}), ("standardize", ("tr", "va", "te")),
                     ("seg", {"seed": 0, "standardize": False, "test_seed": None})]
    with pytest.raises(ValueError, match="unknown data source"):
        load_data("no-such-thing")


def test_features_near_the_float32_limit_standardise_in_range(tmp_path):
    """Finite values near +-3e38 overflowed in x - mean and were reported as "NaN/inf features"."""
    d = _toy(n=20)
    d.features["a"][:10] = 3e38
    d.features["a"][10:] = -3e38
    root = write_feature_dir(tmp_path / "big", d)
    tr, va, te = load_feature_dir(root)
    for split in (tr, va, te):
        assert bool(torch.isfinite(split.features["a"]).all()) and float(split.features["a"].abs().max()) < 10
    # a value no float32 standardisation can hold (constant training feature: std 1): a clear error naming the
    # directory and the modality, not "NaN/inf features"
    far = _toy(n=20)
    far.features["a"][:] = -2e38
    far.features["a"][19] = 2e38
    root = write_feature_dir(tmp_path / "far", far, splits={"train": list(range(12)), "val": [12], "test": [19]})
    with pytest.raises(DataFormatError, match="modality 'a': sample 0 .*too far from the training mean") as info:
        load_feature_dir(root)
    assert info.value.path == str(root) and "NaN" not in str(info.value)


# ------------------------------------------------------------------ fuzz: hostile feature directories
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
_names = st.sampled_from(["a", "b", "audio.v2", "x-y_z", "labels", ".", "..", "a/b", "", "é", "a\n", "A" * 300]) | \
    st.text(alphabet="ab.-_/\\ %\x00", max_size=5)
_dtypes = st.sampled_from(["<f4", "<f8", "<f2", ">f4", "<i8", "<i4", "|u1", "|b1", "<c8", "|V4", "<U3"])
_shape = st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple)
_raw_text = st.sampled_from(["", "{", "[" * 5000 + "]" * 5000, '{"a": ' * 3000 + "1" + "}" * 3000, "\xff\xfe",
                             '{"num_classes": ' + "9" * 5000 + "}", "NaN", "null"])


@st.composite
def _npy_file(draw, n: int, kind: str, task: str, maps: bool):
    """Bytes of an .npy-ish file: usually a well-formed array of the kind (features, labels, available), else a
    random array (dtype, shape, odd values), a header without or with the wrong amount of data, a truncated
    file, random bytes, or nothing."""
    how = draw(st.sampled_from(["good"] * 10 + ["array", "header", "truncated", "bytes", "absent"]))
    if how == "absent":
        return None
    if how in ("good", "truncated"):
        hw = (2, 2) if task == "segmentation" or maps else ()
        if kind == "labels":
            dtype, shape, pool = draw(st.sampled_from(["<i8", "|u1", "<i4"])), (n, *hw[: 2 if task == "segmentation" else 0]), [0, 1, 2]
        elif kind == "available":
            dtype, shape, pool = "|b1", (n, draw(st.sampled_from([2, 2, 3]))), [1, 1, 0]
        else:
            dtype, shape, pool = draw(st.sampled_from(["<f4", "<f8", "<f2"])), (n, draw(st.integers(1, 3)), *hw), \
                [0.5, -1.0, 2.0, 0.0]
    else:
        dtype, shape = draw(_dtypes), draw(_shape)
        pool = [0, 1, 2, -1, 255, 0.5, 3e38, -3e38, np.inf, np.nan, 1e-40, 2**40]
    if how != "header" and how != "bytes":
        count = int(np.prod(shape))
        values = draw(st.lists(st.sampled_from(pool), min_size=count, max_size=count)) if count <= 64 else [0] * count
        with np.errstate(all="ignore"):
            try:
                arr = np.array(values, dtype=np.float64).astype(dtype).reshape(shape)
            except (TypeError, ValueError):
                arr = np.zeros(shape, dtype=dtype)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        data = buf.getvalue()
        return data[: draw(st.integers(0, len(data) - 1))] if how == "truncated" else data
    if how == "header":
        descr = draw(_dtypes | st.sampled_from(["|O", "garbage", "<f4"]))
        shape = draw(_shape | st.sampled_from([(10**11,), (2**62, 2**62), (-1,), (n,)]))
        header = f"{{'descr': '{descr}', 'fortran_order': {draw(st.booleans())}, 'shape': {shape!r}, }}"
        header += " " * (127 - (10 + len(header)) % 64) + "\n"
        return (b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
                + draw(st.binary(max_size=16)))
    return draw(st.binary(max_size=64))


@st.composite
def _feature_dirs(draw):
    n = draw(st.sampled_from([0, 1, 3, 12, 12, 12]))
    mods = draw(st.lists(_names, min_size=0, max_size=3)) if not draw(st.integers(0, 4)) else \
        draw(st.sampled_from([["a", "b"], ["a"], ["audio.v2", "x-y_z", "b"]]))
    task = draw(st.sampled_from(["classification"] * 3 + ["segmentation"]))
    meta = {"task": task, "modalities": mods,
            "num_classes": 3 if draw(st.integers(0, 3)) else draw(st.sampled_from([1, 2, 10**400, 0, 2**62]))}
    if task == "segmentation" and draw(st.booleans()):
        meta["ignore_index"] = 255
    if not draw(st.integers(0, 4)):
        key = draw(st.sampled_from(["task", "modalities", "num_classes", "ignore_index", "bona_fide_class",
                                    "benchmark", "name", "class_names", "other"]))
        meta[key] = draw(_json)
    meta_text = json.dumps(meta) if draw(st.integers(0, 7)) else draw(_raw_text)
    files = {"meta.json": meta_text.encode("utf-8", "surrogatepass")}
    maps = draw(st.booleans())
    for m in mods:
        if _SAFE_NAME(m):
            files[f"{m}.npy"] = draw(_npy_file(n, "features", task, maps))
    files["labels.npy"] = draw(_npy_file(n, "labels", task, maps))
    files["available.npy"] = draw(_npy_file(n, "available", task, maps)) if draw(st.booleans()) else None
    splits = draw(st.sampled_from(["none", "none", "good", "json", "raw"]))
    if splits == "good":
        idx = list(range(n))
        files["splits.json"] = json.dumps({"train": idx[: n // 2], "val": [], "test": idx[n // 2:]}).encode()
    elif splits == "json":
        files["splits.json"] = json.dumps({"train": draw(_json), "val": [], "test": draw(_json)}).encode()
    elif splits == "raw":
        files["splits.json"] = draw(_raw_text).encode("utf-8", "surrogatepass")
    return draw(st.sampled_from(["single", "single", "split"])), files


def _SAFE_NAME(m: str) -> bool:  # names the test can create as files (the reader must refuse the others itself)
    return bool(m) and "/" not in m and "\x00" not in m and m not in (".", "..") and len(m) < 200


_fuzz_dirs = itertools.count()


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=_feature_dirs())
def test_fuzz_hostile_feature_directories_give_data_or_an_error_naming_the_file(tmp_path, case):
    """Random meta.json / splits.json / .npy headers, names, nesting and dtypes, in one folder or split folders:
    the reader returns splits that the run accepts, or raises DataFormatError naming a file of the directory
    (``mars: error: FILE: ...``), never another exception (a traceback for the user)."""
    from mars.config import ConfigError, ModelConfig, TrainConfig
    from mars.train import check_setup, make_model

    layout, files = case
    root = tmp_path / f"d{next(_fuzz_dirs)}"
    folders = [root] if layout == "single" else [root / "train", root / "test"]
    for folder in folders:
        folder.mkdir(parents=True)
    (root / "meta.json").write_bytes(files.pop("meta.json"))
    for name, data in files.items():
        if data is None or (layout == "split" and name == "splits.json"):
            continue
        for folder in folders:
            (folder / name).write_bytes(data)
    cfg = TrainConfig(data=str(root), epochs=1, model=ModelConfig(d_model=8, d_hidden=8, num_experts=2))
    try:
        splits = load_data(str(root), seed=0)
        check_setup(cfg, splits)
        make_model(cfg, splits[0])
    except DataFormatError as e:
        assert e.path is not None and os.path.abspath(e.path).startswith(str(root)), e
        assert str(e).startswith(e.path + ": "), e
    except (ConfigError, ValueError) as e:  # refused by the run's checks: the message names the data directory
        assert not isinstance(e, DataFormatError)
        assert str(root) in str(e), repr(e)
