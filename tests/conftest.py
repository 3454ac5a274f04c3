"""Test-wide setup. TRITON_INTERPRET must be set before triton is imported,
so it is decided here, before any test module imports mars_kernels."""
import os

# Before any GEMM (MKL reads it at its first call): bit-reproducible CPU GEMMs
# whatever the operands' alignment, as the mars package sets for its users.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (tier 3)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: two workers at most (one per core of the CI machine; the
    kernels' own threads use the rest of a larger machine)."""
    return max(1, min(2, os.cpu_count() or 1))


_HF_COVERAGE: dict = {}


def _hf_coverage() -> dict:
    import sys

    module = sys.modules.get("test_hf_transformers")
    return dict(getattr(module, "COVERAGE", None) or {})


def pytest_sessionfinish(session):
    """In an xdist worker: hand the HF coverage table to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["hf_coverage"] = _hf_coverage()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """In the xdist controller: gather the workers' HF coverage tables."""
    _HF_COVERAGE.update(getattr(node, "workeroutput", {}).get("hf_coverage", {}))


def pytest_terminal_summary(terminalreporter):
    """The HF coverage table, when the integration tier ran."""
    coverage = {**_hf_coverage(), **_HF_COVERAGE}
    if coverage:
        terminalreporter.section("HF experts classes with experts_implementation='mars_kernels'")
        native = sorted(n for n, how in coverage.items() if how.startswith("native"))
        terminalreporter.write_line(f"{len(native)} of {len(coverage)} classes run natively")
        for name in sorted(coverage):
            terminalreporter.write_line(f"  {name}: {coverage[name]}")
