"""The router modules: backend switching keeps parameters and results, the
state_dict does not depend on the backend, leading dims, compile."""
import pytest
import torch

import mars_kernels as mk
from helpers import assert_close, cpu_backends

BACKENDS = cpu_backends(reference=True)


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


@pytest.mark.parametrize("router", ["topk", "noisy"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_sparse_moe_backend_switch(router, activation, capacity_factor):
    torch.manual_seed(0)
    layer = mk.SparseMoE(16, 24, 7, 2, router=router, activation=activation, capacity_factor=capacity_factor)
    if router == "noisy":
        torch.nn.init.normal_(layer.router.w_gate, std=0.5)
    layer.eval()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 20, 16)
    results = {}
    for b in BACKENDS:
        layer.backend = b
        layer.zero_grad()
        y, aux = layer(x)
        (y.square().sum() + aux["balance_loss"]).backward()
        results[b] = (y, aux, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
        assert layer.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
    y_ref, aux_ref, g_ref = results["reference"]
    if capacity_factor is not None:
        assert int(aux_ref["dropped"]) > 0 and int(aux_ref["capacity"]) == 12
        assert int(aux_ref["expert_counts"].sum()) == 80 - int(aux_ref["dropped"])
    for b in BACKENDS[1:]:
        y, aux, g = results[b]
        assert_close(y, y_ref, torch.float32, f"{b} y")
        for key in aux_ref:
            assert_close(aux[key].double(), aux_ref[key].double(), torch.float32, f"{b} aux[{key}]")
        assert g.keys() == g_ref.keys()
        for n in g_ref:
            assert_close(g[n], g_ref[n], torch.float32, f"{b} grad {n}")


def test_sparse_moe_state_dict_loads_across_backends():
    a = mk.SparseMoE(8, 12, 4, 2, backend="cpu")
    b = mk.SparseMoE(8, 12, 4, 2, backend="reference")
    b.load_state_dict(a.state_dict())
    x = torch.randn(9, 8)
    assert_close(a(x)[0], b(x)[0], torch.float32, "y")


def test_sparse_moe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="router must be 'topk' or 'noisy'"):
        mk.SparseMoE(8, 12, 4, 2, router="switch")
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        mk.SparseMoE(8, 12, 4, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        mk.SparseMoE(8, 12, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match=r"k must be in \[1, E=4\], got 5"):
        mk.SparseMoE(8, 12, 4, 5)
    with pytest.raises(ValueError, match=r"x must have shape \[..., d_model=8\]"):
        mk.SparseMoE(8, 12, 4, 2)(torch.randn(3, 9))
