"""Loaders for the papers' benchmarks (CREMA-D, UPMC Food-101, CASIA-SURF,
MCubeS): tiny files written in the feature-directory layout, checked against
each benchmark's spec, trained for one epoch; errors name the file."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from helpers import model_config
from mars.data import DataFormatError, MultimodalDataset, load_data, read_feature_dir, write_feature_dir
from mars.data.benchmarks import BENCHMARKS, benchmark_spec
from mars.evaluate import evaluate_subsets
from mars.config import ModelConfig
from mars.interface import Output
from mars.train import TrainConfig, train

SPLIT_SIZES = {"train": 40, "val": 12, "test": 12}


def _tiny_split(spec, n: int, gen: torch.Generator, missing: bool) -> MultimodalDataset:
    """Random features with a class signal in every modality."""
    K = spec.num_classes
    if spec.task == "classification":
        labels = torch.arange(n) % K
        signal = torch.nn.functional.one_hot(labels, K).float()
        feats = {m: torch.cat([2 * signal, torch.randn(n, 3, generator=gen)], 1) for m in spec.modalities}
    else:
        labels = torch.randint(0, K, (n, 6, 6), generator=gen)
        labels[:, 0, 0] = spec.ignore_index
        onehot = torch.nn.functional.one_hot(labels.clamp(max=K - 1), K).permute(0, 3, 1, 2).float()
        feats = {m: onehot[:, :3] + 0.1 * torch.randn(n, 3, 6, 6, generator=gen) for m in spec.modalities}
    available = None
    if missing:
        available = torch.rand(n, len(spec.modalities), generator=gen) > 0.3
        available[:, 0] |= ~available.any(dim=1)
        for j, m in enumerate(spec.modalities):
            feats[m][~available[:, j]] = 0.0
    return MultimodalDataset(list(spec.modalities), feats, labels, K, spec.task, available=available,
                             ignore_index=spec.ignore_index if spec.task == "segmentation" else None,
                             bona_fide_class=spec.bona_fide_class)


def _write_benchmark(root, name: str, *, missing: bool = True, layout: str = "split") -> str:
    spec = benchmark_spec(name)
    gen = torch.Generator().manual_seed(0)
    parts = [_tiny_split(spec, SPLIT_SIZES[s], gen, missing) for s in ("train", "val", "test")]
    return write_feature_dir(os.path.join(root, name), parts, layout=layout, benchmark=spec.name)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_each_benchmark_loads_and_trains_one_epoch(tmp_path, name):
    path = _write_benchmark(tmp_path, name)
    train_set, val_set, test_set = load_data(f"{name}:{path}")
    spec = BENCHMARKS[name]
    assert [len(train_set), len(val_set), len(test_set)] == list(SPLIT_SIZES.values())
    assert train_set.modalities == list(spec.modalities) and train_set.num_classes == spec.num_classes
    assert train_set.bona_fide_class == spec.bona_fide_class
    cfg = TrainConfig(data=f"{name}:{path}", epochs=1, batch_size=16,
                      model=model_config(d_model=16, d_hidden=16, num_experts=4, fusion_heads=2))
    summary = train(cfg, tmp_path / "run", progress=False, data=(train_set, val_set, test_set))["summary"]
    assert 0.0 <= summary["test_mean"] <= 1.0
    if spec.task == "segmentation":
        assert 0.0 <= summary["test_miou"] <= 1.0
    if spec.bona_fide_class is not None:
        assert 0.0 <= summary["test_acer"] <= 1.0
        assert "acer" in (tmp_path / "run" / "results.csv").read_text().splitlines()[0]


def test_split_layout_without_val_carves_a_stratified_quarter_of_train(tmp_path):
    path = _write_benchmark(tmp_path, "crema-d", missing=False)
    for f in os.listdir(os.path.join(path, "val")):
        os.remove(os.path.join(path, "val", f))
    os.rmdir(os.path.join(path, "val"))
    data, (tr, va, te) = read_feature_dir(path, seed=3)
    assert len(data) == 40 + 12 and (len(tr), len(va), len(te)) == (30, 10, 12)
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(range(40)) and te == list(range(40, 52))
    assert torch.bincount(data.labels[va], minlength=6).min() >= 1  # stratified
    assert read_feature_dir(path, seed=3)[1] == (tr, va, te)


def test_single_folder_layout_still_reads_with_the_benchmark_check(tmp_path):
    path = _write_benchmark(tmp_path, "food-101", layout="single")
    train_set, _, test_set = load_data(f"food-101:{path}")
    assert train_set.num_classes == 101 and len(test_set) == 12


def test_plain_path_is_checked_against_the_benchmark_meta_declares(tmp_path):
    path = _write_benchmark(tmp_path, "casia-surf")
    assert load_data(path)[0].bona_fide_class == 1


def _meta(path) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def _set_meta(path, **changes) -> None:
    meta = _meta(path) | changes
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)


def test_loading_as_another_benchmark_names_meta_json(tmp_path):
    path = _write_benchmark(tmp_path, "crema-d")
    with pytest.raises(DataFormatError, match=r"meta\.json.*'crema-d'.*'mcubes'"):
        load_data(f"mcubes:{path}")


@pytest.mark.parametrize("change, message", [
    ({"num_classes": 5}, r'"num_classes" is 5; benchmark \'crema-d\' expects 6'),
    ({"modalities": ["visual", "audio"]}, r"\"modalities\".*expects \['audio', 'visual'\]"),
    ({"benchmark": "imagenet"}, r"unknown benchmark 'imagenet'"),
])
def test_meta_that_contradicts_the_benchmark_is_an_error(tmp_path, change, message):
    path = _write_benchmark(tmp_path, "crema-d")
    _set_meta(path, **change)
    with pytest.raises(DataFormatError, match=message) as info:
        load_data(path)
    assert "meta.json" in str(info.value)


def test_split_folder_errors_name_the_file(tmp_path):
    path = _write_benchmark(tmp_path, "crema-d")
    np.save(os.path.join(path, "test", "visual.npy"), np.zeros((12, 7), np.float32))
    with pytest.raises(DataFormatError, match=r"test.*visual\.npy.*\[7\].*expected \[9\]"):
        load_data(path)
    os.remove(os.path.join(path, "test", "audio.npy"))
    with pytest.raises(DataFormatError, match=r"test/audio\.npy.*file not found"):
        load_data(path)
    np.save(os.path.join(path, "val", "labels.npy"), np.full(12, 6))
    with pytest.raises(DataFormatError, match=r"val/labels\.npy.*out of range.*\[0, 6\)"):
        load_data(path)


def test_split_folder_layout_needs_test_and_no_splits_json(tmp_path):
    path = _write_benchmark(tmp_path, "crema-d")
    with open(os.path.join(path, "splits.json"), "w") as f:
        json.dump({"train": [0], "val": [], "test": []}, f)
    with pytest.raises(DataFormatError, match=r"splits\.json.*must not also have splits\.json"):
        load_data(path)
    os.remove(os.path.join(path, "splits.json"))
    os.rename(os.path.join(path, "test"), os.path.join(path, "holdout"))
    with pytest.raises(DataFormatError, match="has train/ but no test/ folder"):
        load_data(path)


def test_missing_benchmark_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"benchmark 'mcubes'.*not a directory"):
        load_data(f"mcubes:{tmp_path / 'nowhere'}")


class _FixedPredictions(torch.nn.Module):
    """Predicts the class stored in the first feature column of modality 'rgb'."""

    def forward(self, features, observed, available=None, mode="eval"):
        pred = features["rgb"][:, 0].long()
        return Output(torch.nn.functional.one_hot(pred, 2).float(), {})


def test_acer_matches_hand_counts():
    # 4 attacks (label 0): 1 accepted as real; 6 real faces (label 1): 2 rejected.
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    preds = torch.tensor([1, 0, 0, 0, 0, 0, 1, 1, 1, 1]).float()
    feats = {m: torch.stack([preds, torch.zeros(10)], 1) for m in ("rgb", "depth", "ir")}
    data = MultimodalDataset(["rgb", "depth", "ir"], feats, labels, 2, bona_fide_class=1)
    res = evaluate_subsets(_FixedPredictions(), data)
    row = res["subsets"][0]
    assert row["apcer"] == pytest.approx(1 / 4) and row["bpcer"] == pytest.approx(2 / 6)
    assert row["acer"] == pytest.approx((1 / 4 + 2 / 6) / 2) and res["acer_mean"] == pytest.approx(row["acer"])
    assert row["score"] == pytest.approx(7 / 10)


def test_bona_fide_class_needs_a_binary_classification_task():
    feats = {"a": torch.zeros(3, 2)}
    with pytest.raises(DataFormatError, match="bona_fide_class needs a 2-class classification task"):
        MultimodalDataset(["a"], feats, torch.tensor([0, 1, 2]), 3, bona_fide_class=1)
