"""MarsRouter on its own: modes, routings, aux, gradients, the op it wraps,
random routing, options, and the data-parallel declaration of parameters a
routing ablation leaves unused."""
import pytest
import torch

import mars_kernels as mk
from helpers import assert_close
from mars.research.router_inputs import DiffResidual

D, E, K = 12, 5, 2


def _router(*, backend="reference", residual_router=True, residual_input=None, **kw):
    """A router with MarsConfig(**kw); mix "none" (the pure residual gate)
    unless a test asks for another."""
    torch.manual_seed(0)
    return mk.MarsRouter(D, E, K, mk.MarsConfig(**{"mix": "none", **kw}), backend=backend,
                         residual_router=residual_router, residual_input=residual_input)


def _tokens(lead=(3, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, D, generator=g), torch.randn(*lead, D, generator=g)


@pytest.mark.parametrize("mode,routing", [("train", "residual"), ("train", "feature"), ("train", "random"),
                                          ("eval", "residual"), ("oracle", "residual")])
def test_shapes_and_aux_keys(mode, routing):
    router = _router(routing=routing)
    z_i, z_c = _tokens()
    r = router(z_i, z_c, mode=mode)
    assert isinstance(r, mk.Routing)
    assert r.weights.shape == (3, 4, K) and r.indices.shape == (3, 4, K) and r.indices.dtype == torch.int64
    want = {"expert_counts"}
    if mode == "train":
        want |= {"balance_loss"}
        if routing == "residual":
            want |= {"imitation_loss", "divergence"}
    assert set(r.aux) == want
    assert r.aux["expert_counts"].shape == (E,) and float(r.aux["expert_counts"].sum()) == 3 * 4 * K
    assert torch.allclose(r.weights.sum(-1), torch.ones(3, 4))


def test_residual_training_is_the_fused_op_on_the_routers_logits():
    router = _router(noise="adaptive", sigma_0=0.7, sigma_max=0.9)
    z_i, z_c = _tokens()
    noise = torch.randn(12, E, generator=torch.Generator().manual_seed(5))
    r = router(z_i, z_c, mode="train", noise=noise)
    l_f = router.feature_router(z_i.reshape(-1, D))
    l_r = router.residual_router(torch.cat([z_i, z_c], -1).reshape(-1, 2 * D))
    w, idx, imitation, divergence, _ = mk.mars_routing(l_r, l_f, K, sigma_0=0.7, sigma_max=0.9, noise=noise,
                                                       backend="reference")
    assert torch.equal(r.indices.reshape(-1, K), idx)
    assert_close(r.weights.reshape(-1, K), w, torch.float32, "weights")
    assert_close(r.aux["imitation_loss"], imitation.mean(), torch.float32, "imitation")
    assert_close(r.aux["divergence"], divergence.mean(), torch.float32, "divergence")
    # The balance loss is the Switch loss of the residual router (the one that gates).
    assert_close(r.aux["balance_loss"], mk.switch_balance_loss(l_r, idx), torch.float32, "balance")


@pytest.mark.parametrize("noise,sigmas", [("adaptive", (0.7, 0.0)), ("constant", (0.0, 0.4)), ("none", (0.0, 0.0))])
def test_noise_modes_pass_their_sigmas(noise, sigmas):
    router = _router(noise=noise, sigma_0=0.7, sigma_const=0.4)
    assert router.config.sigmas() == sigmas
    z_i, z_c = _tokens()
    eps = torch.randn(12, E, generator=torch.Generator().manual_seed(5))
    r = router(z_i, z_c, mode="train", noise=eps)
    l_f = router.feature_router(z_i.reshape(-1, D))
    l_r = router.residual_router(router.residual_input(z_i, z_c).reshape(12, -1))
    _, idx, *_ = mk.mars_routing(l_r, l_f, K, sigma_0=sigmas[0], sigma_const=sigmas[1], sigma_max=1.0, noise=eps,
                                 backend="reference")
    assert torch.equal(r.indices.reshape(-1, K), idx)


def test_eval_reads_z_i_only_and_oracle_the_residual_router():
    router = _router()
    z_i, z_c = _tokens()
    ev = router(z_i, mode="eval")
    assert torch.equal(ev.indices, router(z_i, z_c * 100, mode="eval").indices)
    _, idx = mk.topk_gating(router.feature_router(z_i.reshape(-1, D)), K)
    assert torch.equal(ev.indices.reshape(-1, K), idx)
    oracle = router(z_i, z_c, mode="oracle")
    _, idx = mk.topk_gating(router.residual_router(torch.cat([z_i, z_c], -1).reshape(-1, 2 * D)), K)
    assert torch.equal(oracle.indices.reshape(-1, K), idx)
    with pytest.raises(ValueError, match="needs z_c"):
        router(z_i, mode="oracle")
    with pytest.raises(ValueError, match="needs z_c"):
        router(z_i, mode="train")
    with pytest.raises(ValueError, match="shaped like z_i"):
        router(z_i, z_c[:1], mode="oracle")


def test_default_mode_follows_training_flag():
    router = _router()
    z_i, z_c = _tokens()
    assert "imitation_loss" in router.train()(z_i, z_c).aux
    assert "balance_loss" not in router.eval()(z_i).aux


def test_gradients_imitation_to_feature_router_only_and_none_to_z_c():
    router = _router()
    z_i, z_c = _tokens()
    z_i.requires_grad_(True)
    z_c.requires_grad_(True)
    r = router(z_i, z_c, mode="train")
    r.aux["imitation_loss"].backward()
    assert router.feature_router.weight.grad.abs().sum() > 0
    assert router.residual_router.weight.grad is None or router.residual_router.weight.grad.abs().sum() == 0
    assert z_c.grad is None
    router.zero_grad()
    r = router(z_i, z_c, mode="train")
    ((r.weights * torch.arange(1, K + 1)).sum() + r.aux["balance_loss"]).backward()
    assert router.residual_router.weight.grad.abs().sum() > 0
    assert z_c.grad is None


def test_random_routing_draws_distinct_uniform_experts_on_the_tokens_device():
    router = _router(routing="random")
    z_i, z_c = _tokens(lead=(4000,))
    g = torch.Generator().manual_seed(3)
    r = router(z_i, None, mode="train", generator=g)
    idx = r.indices
    assert idx.device == z_i.device
    assert (idx[:, 0] != idx[:, 1]).all()
    assert torch.equal(r.weights, torch.full((4000, K), 1.0 / K))
    share = torch.bincount(idx.reshape(-1), minlength=E).float() / idx.numel()
    assert torch.allclose(share, torch.full((E,), 1.0 / E), atol=0.02)
    assert float(r.aux["balance_loss"]) == 0.0 and not r.aux["balance_loss"].requires_grad
    again = router(z_i, None, mode="train", generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.indices, idx)


def test_may_skip_parameters_and_feature_only_router():
    assert not _router(routing="residual").may_skip_parameters
    assert _router(routing="feature").may_skip_parameters  # the residual router idles in training
    assert _router(routing="random").may_skip_parameters
    vanilla = _router(routing="feature", residual_router=False)
    assert not vanilla.may_skip_parameters and not vanilla.has_residual_router
    assert [n for n, _ in vanilla.named_parameters()] == ["feature_router.weight", "feature_router.bias"]
    z_i, z_c = _tokens()
    assert "balance_loss" in vanilla(z_i, mode="train").aux
    with pytest.raises(ValueError, match="no residual router"):
        vanilla(z_i, z_c, mode="oracle")
    with pytest.raises(ValueError, match="routing must be 'feature'"):
        mk.MarsRouter(D, E, K, residual_router=False)
    assert [n for n, _ in mk.MarsRouter(D, E, K, mk.MarsConfig(routing="feature"), residual_router=False)
            .named_parameters()] == ["feature_router.weight", "feature_router.bias"]


def test_options_and_validation():
    mlp = _router(router_mlp=True, residual_input=DiffResidual())
    assert isinstance(mlp.feature_router, torch.nn.Sequential)
    assert mlp.residual_router[0].in_features == D  # diff: width D
    z_i, z_c = _tokens()
    assert mlp(z_i, z_c, mode="train").weights.shape == (3, 4, K)
    with pytest.raises(ValueError, match="k must be"):
        mk.MarsRouter(D, E, 0)
    for kw, match in ((dict(routing="x"), "routing must be"), (dict(noise="x"), "noise must be"),
                      (dict(mix="blend"), "mix must be"), (dict(sigma_0=-1.0), "sigma_0"),
                      (dict(lambda_imit=float("nan")), "lambda_imit"), (dict(router_mlp=1), "router_mlp")):
        with pytest.raises(ValueError, match=match):
            mk.MarsConfig(**kw)
    with pytest.raises(TypeError, match="config must be a MarsConfig"):
        mk.MarsRouter(D, E, K, dict(routing="feature"))
    with pytest.raises(TypeError, match="residual_input must be a mars_kernels RouterInput"):
        mk.MarsRouter(D, E, K, residual_input="diff")
    with pytest.raises(ValueError, match="mode must be"):
        _router()(z_i, z_c, mode="test")
    with pytest.raises(ValueError, match="z_i must be"):
        _router()(torch.randn(3, D + 1), mode="eval")


def test_agreement():
    router = _router()
    with torch.no_grad():  # the residual router reads z_i exactly like the feature router: full agreement
        router.residual_router.weight.zero_()
        router.residual_router.weight[:, :D] = router.feature_router.weight
        router.residual_router.bias.copy_(router.feature_router.bias)
    z_i, z_c = _tokens()
    assert router.agreement(z_i, z_c) == 1.0
    with torch.no_grad():
        router.residual_router.weight.neg_()
        router.residual_router.bias.neg_()
    assert router.agreement(z_i, z_c) == 0.0  # top-2 of 5 against the bottom-2
    assert router.agreement(z_i[:0], z_c[:0]) != router.agreement(z_i[:0], z_c[:0])  # NaN without tokens


@pytest.mark.parametrize("routing", ["residual", "feature"])
def test_backends_agree(routing):
    router = _router(routing=routing)
    z_i, z_c = _tokens()
    noise = torch.randn(12, E, generator=torch.Generator().manual_seed(5))
    outs = {}
    for backend in ("reference", "cpu"):
        router.backend = backend
        router.zero_grad()
        r = router(z_i, z_c, mode="train", noise=noise)
        loss = (r.weights * torch.arange(1, K + 1)).sum() + r.aux["balance_loss"] + r.aux.get("imitation_loss", 0)
        loss.backward()
        outs[backend] = (r, [p.grad.clone() for p in router.parameters() if p.grad is not None])
    (ref, ref_grads), (cpu, cpu_grads) = outs["reference"], outs["cpu"]
    assert torch.equal(ref.indices, cpu.indices)
    assert_close(cpu.weights, ref.weights, torch.float32, "weights")
    for key in ref.aux:
        assert_close(cpu.aux[key].float(), ref.aux[key].float(), torch.float32, key)
    assert len(cpu_grads) == len(ref_grads)
    for g, rg in zip(cpu_grads, ref_grads):
        assert_close(g, rg, torch.float32, "grad")


def test_zero_tokens():
    router = _router()
    z = torch.randn(0, D)
    for mode in ("train", "eval", "oracle"):
        r = router(z, z, mode=mode)
        assert r.weights.shape == (0, K) and r.indices.shape == (0, K)
