"""Shared test utilities: per-dtype tolerances (written once), the backends
that can run here, and input makers."""
from __future__ import annotations

import os

import torch

import mars_kernels as mk

#: A CUDA GPU is present: the GPU tier runs and the Triton kernels run compiled.
CUDA = torch.cuda.is_available()
#: The Triton kernels run on CPU tensors under the interpreter (set by conftest.py without a GPU).
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# (atol, rtol) for values produced in a given dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, what: str = ""):
    """Compare at the tolerance of ``dtype`` (default: ``actual``'s dtype)."""
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def compiled_backends(device: str = "cpu", *, interpreting: bool | None = None) -> list[str]:
    """Compiled backends to test against the reference on ``device``: on CPU,
    cpu and (only under TRITON_INTERPRET=1, i.e. without a GPU) triton; on
    CUDA, cuda and triton."""
    if device == "cuda":
        return ["cuda", "triton"]
    interpreting = INTERPRETING if interpreting is None else interpreting
    return ["cpu", "triton"] if interpreting else ["cpu"]


def cpu_backends(reference: bool = False) -> list[str]:
    """The backends that run on CPU tensors here (the reference first if asked)."""
    return (["reference"] if reference else []) + compiled_backends("cpu")


def make_logits(T: int, E: int, dtype=torch.float32, device="cpu", seed: int = 0, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:
        # Few distinct values, exactly representable in every dtype: many ties.
        x = torch.randint(-3, 4, (T, E), generator=g).to(torch.float32) / 2
    else:
        x = torch.randn(T, E, generator=g) * 2
    return x.to(dtype=dtype, device=device)


def backend_params(*, interpreting: bool | None = None):
    """(device, backend) pairs: the CPU tier here, the GPU tier marked ``gpu``
    (skipped without a GPU by conftest.py)."""
    import pytest

    cpu = [pytest.param("cpu", b, id=f"cpu-{b}") for b in compiled_backends("cpu", interpreting=interpreting)]
    gpu = [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu) for b in compiled_backends("cuda")]
    return cpu + gpu


def train_interrupted(make_config, epochs: int, stop_after: int, root, data):
    """Train ``make_config(epochs)`` uninterrupted in root/full, and again in
    root/part stopped after ``stop_after`` epochs then resumed to ``epochs``
    (the config edited as if the longer run had been interrupted).
    -> (full result, resumed result, part directory)."""
    import json

    from mars.train import train

    full = train(make_config(epochs), root / "full", data=data, progress=False)
    part = root / "part"
    train(make_config(stop_after), part, data=data, progress=False)
    cfg = json.loads((part / "config.json").read_text())
    cfg["epochs"] = epochs
    (part / "config.json").write_text(json.dumps(cfg))
    return full, train(None, part, resume=True, data=data, progress=False), part


def model_config(method: str = "mars", **options):
    """A ``mars.config.ModelConfig`` of ``method`` from flat keyword options
    spelled like the command line's (``experts``/``num_experts``, ``mix``,
    ``residual_input``, ``retriever_k``, ``mce_teacher_epochs``...); options
    the method does not read are left out, so one set of options can serve
    several methods."""
    from mars.options import config_for, flag_paths

    paths = flag_paths()
    paths.setdefault("num_experts", "model.num_experts")
    values = {}
    for name, value in options.items():
        if name not in paths:
            raise TypeError(f"model_config: unknown option {name!r}")
        values[paths[name]] = value
    return config_for(method, values, strict=False).model
