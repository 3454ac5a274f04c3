"""Bad input gets a clear error naming the argument; backend selection rules."""
import pytest
import torch

import mars_kernels as mk
from mars_kernels import backend as be


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_topk_gating_rejects_bad_input(backend):
    x = torch.randn(4, 6)
    cases = [
        (dict(logits=x, k=0), ValueError, r"k must be in \[1, E=6\], got 0"),
        (dict(logits=x, k=7), ValueError, r"k must be in \[1, E=6\], got 7"),
        (dict(logits=x, k=2.0), TypeError, "k must be an int"),
        (dict(logits=x, k=True), TypeError, "k must be an int"),
        (dict(logits=x[0], k=1), ValueError, r"logits must be 2-D, got shape \(6,\)"),
        (dict(logits=x[None], k=1), ValueError, "logits must be 2-D"),
        (dict(logits=x.long(), k=1), TypeError, "logits must be float16, bfloat16, float32 or float64, got torch.int64"),
        (dict(logits=x[:, :0], k=1), ValueError, "at least one expert"),
        (dict(logits=[[1.0]], k=1), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=x, k=2, mode="softmax"), ValueError, "mode must be one of"),
        (dict(logits=x, k=2, renormalize=1), TypeError, "renormalize must be a bool"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            mk.topk_gating(**kwargs, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_noisy_gating_rejects_bad_input(backend):
    x, wg, wn = torch.randn(5, 3), torch.randn(3, 4), torch.randn(3, 4)

    def call(**over):
        args = dict(x=x, w_gate=wg, w_noise=wn, k=2, training=True, backend=backend) | over
        return mk.noisy_topk_gating(**args)

    with pytest.raises(ValueError, match=r"w_gate must have shape \[D=3, E>=1\]"):
        call(w_gate=torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"w_noise must have shape \[D, E\] like w_gate = \(3, 4\), got \(3, 5\)"):
        call(w_noise=torch.randn(3, 5))
    with pytest.raises(TypeError, match="w_gate must have the dtype of x"):
        call(w_gate=wg.double())
    with pytest.raises(ValueError, match=r"noise must have shape \[T, E\] = \(5, 4\)"):
        call(noise=torch.randn(5, 3))
    with pytest.raises(ValueError, match="noise_eps must be a finite number > 0"):
        call(noise_eps=0.0)
    with pytest.raises(TypeError, match="training must be a bool"):
        call(training=None)
    with pytest.raises(ValueError, match=r"k must be in \[1, E=4\], got 5"):
        call(k=5)
    with pytest.raises(ValueError, match="tensors must be on one device, got x on cpu, w_gate on meta"):
        call(w_gate=wg.to("meta"))


def test_backend_names_and_environment(monkeypatch):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.topk_gating(x, 1, backend="gpu")
    monkeypatch.setenv("MARS_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="MARS_KERNELS_BACKEND must be one of"):
        mk.topk_gating(x, 1)
    monkeypatch.setenv("MARS_KERNELS_BACKEND", "reference")
    assert be.resolve(None, x.device) == "reference"
    assert be.resolve("cpu", x.device) == "cpu"  # the per-call choice wins over the variable
    monkeypatch.delenv("MARS_KERNELS_BACKEND")
    assert be.resolve(None, x.device) == "cpu"
    assert be.resolve("auto", x.device) == "cpu"


def test_backend_device_mismatch():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors, got tensors on cpu"):
        be.resolve("cuda", cpu)
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        be.resolve("cpu", torch.device("cuda"))


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        be.resolve("triton", torch.device("cpu"))


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(be, "_extension_error", "No module named 'mars_kernels._C'")
    monkeypatch.setattr(be, "_warned", set())
    x = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch reference path"):
        assert be.resolve(None, x.device) == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert be.resolve(None, x.device) == "reference"  # no second warning
    with pytest.raises(RuntimeError, match="backend='cpu' needs the compiled extension"):
        be.resolve("cpu", x.device)


def test_switch_loss_rejects_bad_indices():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"indices must be an int32/int64 \[T=4, k\] tensor"):
        mk.switch_balance_loss(x, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"indices must be an int32/int64 \[T=4, k\]"):
        mk.switch_balance_loss(x, torch.zeros(3, 2, dtype=torch.long))


def test_test_collection_with_a_gpu_present():
    """On a CUDA machine (no TRITON_INTERPRET) the CPU tier must not ask for the
    triton backend on CPU tensors, and every GPU case carries the gpu mark."""
    from helpers import backend_params, compiled_backends

    assert compiled_backends("cpu", interpreting=False) == ["cpu"]
    assert compiled_backends("cpu", interpreting=True) == ["cpu", "triton"]
    params = backend_params(interpreting=False)
    assert [p.values for p in params] == [("cpu", "cpu"), ("cuda", "cuda"), ("cuda", "triton")]
    for p in params:
        assert (p.values[0] == "cuda") == any(m.name == "gpu" for m in p.marks)


def test_triton_test_modules_join_the_gpu_tier_on_a_gpu(monkeypatch):
    """The compiled-Triton test modules mark themselves gpu when CUDA is present."""
    import importlib
    import sys

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("test_triton_gating", "test_triton_mars", "test_triton_moe"):
        saved = sys.modules.pop(name, None)
        try:
            module = importlib.import_module(name)
            assert module.DEVICE == "cuda"
            assert [m.name for m in module.pytestmark] == ["gpu"]
        finally:
            sys.modules.pop(name, None)
            if saved is not None:
                sys.modules[name] = saved


def test_auto_takes_triton_on_a_gpu_the_cuda_build_cannot_run(monkeypatch):
    """CUDA mocked: compiled CUDA kernels present but without code for this GPU
    (e.g. a Blackwell GPU and a build without PTX) -> triton, warned once;
    asked for explicitly -> a clear error."""
    monkeypatch.setattr(be, "_available", {"cuda": True, "triton": True, "cuda-arch-0": False})
    monkeypatch.setattr(be, "_warned", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    gpu = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="no code for cuda:0 .compute capability 12.0"):
        assert be.resolve(None, gpu) == "triton"
    assert be.resolve(None, gpu) == "triton"  # no second warning
    with pytest.raises(RuntimeError, match="rebuild with TORCH_CUDA_ARCH_LIST"):
        be.resolve("cuda", gpu)
    monkeypatch.setattr(be, "_available", {"cuda": True, "triton": True, "cuda-arch-0": True})
    assert be.resolve(None, gpu) == "cuda"


def test_triton_needs_no_extension(monkeypatch):
    """Without mars_kernels._C (CUDA mocked): auto takes triton for CUDA tensors,
    and triton asked for explicitly runs; cpu and cuda asked for explicitly raise."""
    monkeypatch.setattr(be, "_extension_error", "No module named 'mars_kernels._C'")
    monkeypatch.setattr(be, "_available", {"cuda": False, "triton": True})
    monkeypatch.setattr(be, "_warned", set())
    gpu = torch.device("cuda", 0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert be.resolve(None, gpu) == "triton"
        assert be.resolve("triton", gpu) == "triton"
    with pytest.raises(RuntimeError, match="backend='cuda' needs mars_kernels._C built with CUDA"):
        be.resolve("cuda", gpu)
    with pytest.raises(RuntimeError, match="backend='cpu' needs the compiled extension"):
        be.resolve("cpu", torch.device("cpu"))
    monkeypatch.setattr(be, "_available", {"cuda": False, "triton": False})
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch reference path"):
        assert be.resolve(None, gpu) == "reference"


@pytest.mark.parametrize("router", ["topk", "noisy"])
def test_sparse_moe_resolves_its_backend_once_per_call(monkeypatch, router):
    """SparseMoE resolves the backend once and hands the Resolved name to the
    router, the experts and every op, which take it as it is."""
    calls = []
    decide = be._resolve
    monkeypatch.setattr(be, "_resolve", lambda backend, device: calls.append(backend) or decide(backend, device))
    layer = mk.SparseMoE(8, 16, 4, 2, router=router, capacity_factor=1.0)
    for training in (True, False):
        layer.train(training)
        calls.clear()
        y, aux = layer(torch.randn(2, 5, 8))
        (y.sum() + aux["balance_loss"]).backward()
        assert len(calls) == 1, calls


def test_resolved_names():
    import copy
    import pickle

    cpu = torch.device("cpu")
    name = be.resolve("reference", cpu)
    assert isinstance(name, be.Resolved) and name == "reference" and str(name) == "reference"
    assert be.resolve(name, cpu) is name and be.TABLE["moe_mlp"][name] == "torch"
    assert pickle.loads(pickle.dumps(name)) == name and copy.deepcopy(name).device_type == "cpu"
    # Resolved for another device type: resolved again, with that device's checks.
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        be.resolve(be.resolve("cpu", cpu), torch.device("cuda"))
