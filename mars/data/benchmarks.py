"""The papers' benchmarks as feature directories: what each one must contain.

MARS, MoE-Retriever and MCE are evaluated on CREMA-D, UPMC Food-101,
CASIA-SURF and MCubeS. We do not ship or download them: users extract features
with their own backbones and write them in the feature-directory layout
(:mod:`mars.data.feature_files`), with ``"benchmark": "<name>"`` in
``meta.json``. The loader then checks the directory against the benchmark's
specification below (modality names and order, task, number of classes) and
switches on the benchmark's extra metric (ACER for CASIA-SURF; mIoU is
reported for every segmentation set, MCubeS included).

================  =========================  ==============  ===============  ========================
benchmark         modalities (meta order)    task            classes          extra
================  =========================  ==============  ===============  ========================
``crema-d``       audio, visual              classification  6 emotions
``food-101``      image, text                classification  101 dishes
``casia-surf``    rgb, depth, ir             classification  2 (0 attack,     APCER, BPCER, ACER
                                                             1 real face)
``mcubes``        rgb, aolp, dolp, nir       segmentation    20 materials     mIoU; ``ignore_index``
                                                                              255 by default
================  =========================  ==============  ===============  ========================

Use one with ``mars train --data casia-surf:/path/to/features`` (or
``load_data("casia-surf:/path")``); a plain path to a directory whose
``meta.json`` names the benchmark is checked the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import DataFormatError


@dataclass(frozen=True)
class BenchmarkSpec:
    """What a benchmark's feature directory must declare in ``meta.json``."""

    name: str
    modalities: tuple[str, ...]
    task: str
    num_classes: int
    bona_fide_class: int | None = None
    ignore_index: int | None = None
    citation: str = ""


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("crema-d", ("audio", "visual"), "classification", 6,
                      citation="Cao et al., CREMA-D: Crowd-sourced Emotional Multimodal Actors Dataset, IEEE TAC 2014"),
        BenchmarkSpec("food-101", ("image", "text"), "classification", 101,
                      citation="Wang et al., Recipe recognition with large multimodal food dataset (UPMC Food-101), ICME-W 2015"),
        BenchmarkSpec("casia-surf", ("rgb", "depth", "ir"), "classification", 2, bona_fide_class=1,
                      citation="Zhang et al., A Dataset and Benchmark for Large-scale Multi-modal Face Anti-spoofing, CVPR 2019"),
        BenchmarkSpec("mcubes", ("rgb", "aolp", "dolp", "nir"), "segmentation", 20, ignore_index=255,
                      citation="Liang et al., Multimodal Material Segmentation (MCubeS), CVPR 2022"),
    )
}


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The spec of ``name`` (case-insensitive; ``_`` and ``-`` interchangeable)."""
    key = name.strip().lower().replace("_", "-")
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[key]


def check_meta_against_benchmark(meta: dict, file: str) -> BenchmarkSpec:
    """Raise ``DataFormatError`` naming ``file`` unless ``meta`` matches the
    benchmark it declares (``meta["benchmark"]``); returns the spec."""
    try:
        spec = benchmark_spec(str(meta["benchmark"]))
    except ValueError as e:
        raise DataFormatError(f'"benchmark": {e}', file) from None
    expected = {"task": spec.task, "modalities": list(spec.modalities), "num_classes": spec.num_classes}
    for key, want in expected.items():
        if meta[key] != want:
            raise DataFormatError(f'"{key}" is {meta[key]!r}; benchmark {spec.name!r} expects {want!r}', file)
    bona = meta.get("bona_fide_class", spec.bona_fide_class)
    if bona != spec.bona_fide_class:
        raise DataFormatError(f'"bona_fide_class" is {bona!r}; benchmark {spec.name!r} expects {spec.bona_fide_class!r}', file)
    return spec
