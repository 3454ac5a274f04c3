"""Test-wide setup. TRITON_INTERPRET must be set before triton is imported,
so it is decided here, before any test module imports mars_kernels."""
import os

import pytest

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
