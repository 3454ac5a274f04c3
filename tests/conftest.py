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


def pytest_terminal_summary(terminalreporter):
    """The HF coverage table, when the integration tier ran."""
    import sys

    module = sys.modules.get("test_hf_transformers")
    coverage = getattr(module, "COVERAGE", None)
    if coverage:
        terminalreporter.section("HF experts classes with experts_implementation='mars_kernels'")
        native = sorted(n for n, how in coverage.items() if how.startswith("native"))
        terminalreporter.write_line(f"{len(native)} of {len(coverage)} classes run natively")
        for name in sorted(coverage):
            terminalreporter.write_line(f"  {name}: {coverage[name]}")
