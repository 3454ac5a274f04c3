"""Properties a real GPU would expose and the Triton interpreter hides, checked
here on CPU: scalars that reach compiled kernels as tensors of the compute
dtype (compiled Triton types Python floats as float32), and launch grids
within CUDA's limits."""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")

from helpers import CUDA, INTERPRETING  # noqa: E402

pytestmark = pytest.mark.skipif(not (CUDA or INTERPRETING), reason="needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"


class _Recorder:
    """Stands in for a kernel module: records every launch's arguments, then launches."""

    def __init__(self, module):
        self._module, self.launches = module, []

    def __getattr__(self, name):
        kernel = getattr(self._module, name)
        if not hasattr(kernel, "__getitem__"):
            return kernel
        recorder = self

        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    recorder.launches.append((name, grid, args, kwargs))
                    return kernel[grid](*args, **kwargs)
                return run
        return Launch()


def _tensors_of(launch):
    return [a for a in launch[2] if isinstance(a, torch.Tensor) and a.numel() == 1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_scale_reaches_the_kernels_as_a_tensor_of_the_compute_dtype(monkeypatch, dtype):
    from mars_kernels.ops.triton import modality_attention as launcher

    rec = _Recorder(launcher._k)
    monkeypatch.setattr(launcher, "_k", rec)
    qkv = torch.randn(5, 3, 3 * 8, dtype=dtype, device=DEVICE)
    out, probs = launcher.modality_attention_fwd(qkv, 2, None)
    launcher.modality_attention_bwd(torch.randn_like(out), qkv, probs, None, None, None, 2)
    scaled = [launch for launch in rec.launches if "grads" not in launch[0]]
    assert {launch[0] for launch in scaled} == {"modality_attention_fwd_kernel", "modality_attention_bwd_scores_kernel"}
    for launch in scaled:
        assert not any(isinstance(a, float) for a in launch[2]), f"{launch[0]} got a Python float"
        (scale,) = _tensors_of(launch)
        assert scale.dtype == dtype and float(scale) == pytest.approx(1 / 4 ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layernorm_eps_reaches_the_kernel_as_a_tensor_of_the_compute_dtype(monkeypatch, dtype):
    from mars_kernels.ops.triton import residual_norm as launcher

    rec = _Recorder(launcher._k)
    monkeypatch.setattr(launcher, "_k", rec)
    h = torch.randn(4, 3, 8, dtype=dtype, device=DEVICE)
    launcher.residual_norm_mean_fwd(torch.randn_like(h), h, torch.ones(8, dtype=dtype, device=DEVICE),
                                    torch.zeros(8, dtype=dtype, device=DEVICE), None, None, 1e-5)
    (launch,) = rec.launches
    assert not any(isinstance(a, float) for a in launch[2])
    (eps,) = _tensors_of(launch)
    assert eps.dtype == dtype and float(eps) == pytest.approx(1e-5)


def test_weight_gradient_grid_puts_tiles_on_axis_0(monkeypatch):
    """Grid axis 1 is limited to 65535 programs: the per-expert weight-gradient
    tiles (which grow with the expert size) must be on axis 0, the experts on 1."""
    import mars_kernels as mk
    from mars_kernels.ops.triton import expert_mlp as launcher

    rec = _Recorder(launcher._k)
    monkeypatch.setattr(launcher, "_k", rec)
    E, D, H = 3, 40, 72
    x = torch.randn(9, D, device=DEVICE, requires_grad=True)
    w1 = torch.randn(E, D, H, device=DEVICE, requires_grad=True)
    w2 = torch.randn(E, H, D, device=DEVICE, requires_grad=True)
    _, idx = mk.topk_gating(torch.randn(9, E, device=DEVICE), 2)
    meta = mk.moe_align(idx, E, 64)
    mk.moe_mlp(x, torch.rand(9, 2, device=DEVICE), meta, w1, None, w2, None, "gelu", backend="triton").sum().backward()
    wgrad = [launch for launch in rec.launches if launch[0] == "moe_wgrad_kernel"]
    assert len(wgrad) == 2
    for _, grid, _, _ in wgrad:
        assert grid[1] == E and grid[0] > 1
