"""The router modules: backend switching keeps parameters and results, the
state_dict does not depend on the backend, leading dims, compile."""
import pytest
import torch

import mars_kernels as mk
from helpers import assert_close

BACKENDS = ["reference", "cpu", "triton"]


@pytest.mark.parametrize("cls", [mk.TopKRouter, mk.NoisyTopKRouter])
def test_backend_switch_keeps_parameters_and_results(cls):
    torch.manual_seed(0)
    router = cls(12, 7, 2, backend="reference")
    if cls is mk.NoisyTopKRouter:  # zero init would route every token alike
        torch.nn.init.normal_(router.w_gate, std=0.5)
        torch.nn.init.normal_(router.w_noise, std=0.5)
    keys = sorted(router.state_dict())
    x = torch.randn(3, 5, 12)
    noise = torch.randn(15, 7)
    outs = {}
    for b in BACKENDS:
        router.backend = b
        router.zero_grad()
        kw = {"noise": noise} if cls is mk.NoisyTopKRouter else {}
        r = router(x, **kw)
        (r.weights.sum() + r.aux["balance_loss"]).backward()
        outs[b] = (r, [p.grad.clone() for p in router.parameters()])
        assert sorted(router.state_dict()) == keys
        assert r.weights.shape == (3, 5, 2) and r.indices.shape == (3, 5, 2)
    ref, ref_grads = outs["reference"]
    for b in BACKENDS[1:]:
        r, grads = outs[b]
        assert torch.equal(r.indices, ref.indices)
        assert_close(r.weights, ref.weights, torch.float32, f"{b} weights")
        for key in ref.aux:
            assert_close(r.aux[key].float(), ref.aux[key].float(), torch.float32, f"{b} aux[{key}]")
        for g, rg in zip(grads, ref_grads):
            assert_close(g, rg, torch.float32, f"{b} parameter grad")


def test_noisy_router_eval_is_deterministic_and_counts_load():
    router = mk.NoisyTopKRouter(6, 5, 2).eval()
    torch.nn.init.normal_(router.w_gate)
    x = torch.randn(40, 6)
    a, b = router(x), router(x)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.indices, b.indices)
    assert float(a.aux["load"].sum()) == 80.0


def test_router_rejects_bad_input():
    with pytest.raises(ValueError, match=r"k must be in \[1, E=4\], got 5"):
        mk.TopKRouter(8, 4, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.TopKRouter(8, 4, 2, backend="gpu")
    with pytest.raises(ValueError, match=r"x must have shape \[..., d_model=8\]"):
        mk.TopKRouter(8, 4, 2)(torch.randn(3, 7))


def test_backend_from_environment_under_compile(monkeypatch):
    monkeypatch.setenv("MARS_KERNELS_BACKEND", "cpu")
    torch.manual_seed(0)
    router = mk.TopKRouter(8, 6, 2)
    x = torch.randn(32, 8)
    eager = router(x)
    compiled = torch.compile(router, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled.indices, eager.indices)
    torch.testing.assert_close(compiled.weights, eager.weights)
    torch.testing.assert_close(compiled.aux["balance_loss"], eager.aux["balance_loss"])
