"""MarsMoE (MARS as a layer on any backbone): the layer, its defaults (the
MARS of the results tables), mixed routing, and the router inputs under study
(:mod:`mars.research.router_inputs`) plugged into it."""
import pytest
import torch

import mars_kernels as mk
from helpers import assert_close
from mars.research.router_inputs import PatternResidual, TokensAndMask, pattern_mean

D, H, E, K, M = 12, 16, 5, 2, 3


def _moe(*, backend="reference", residual_input=None, feature_input=None, **kw):
    """A layer with MarsConfig(**kw); mix "none" (the pure residual gate) unless asked."""
    torch.manual_seed(0)
    return mk.MarsMoE(D, H, E, K, mk.MarsConfig(**{"mix": "none", **kw}), backend=backend,
                      residual_input=residual_input, feature_input=feature_input)


def _inputs(P=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    z_i = torch.randn(P, T, D, generator=g, requires_grad=True)
    z_c = torch.randn(T, D, generator=g)
    observed = torch.rand(P, T, M, generator=g) > 0.4
    observed[..., 0] = True
    return z_i, z_c, observed


def test_layer_is_router_plus_experts_with_a_skip_connection():
    moe = _moe()
    z_i, z_c, _ = _inputs()
    noise = torch.randn(14, E, generator=torch.Generator().manual_seed(3))
    y, aux = moe(z_i, z_c, mode="train", noise=noise)
    r = moe.router(z_i, z_c, mode="train", noise=noise)
    want = z_i + moe.experts(z_i.reshape(-1, D), r.weights.reshape(-1, K), r.indices.reshape(-1, K)).reshape(z_i.shape)
    assert_close(y, want, torch.float32, "y")
    assert torch.equal(aux["indices"], r.indices)
    assert_close(aux["loss"], 5.0 * r.aux["imitation_loss"] + 0.01 * r.aux["balance_loss"], torch.float32, "loss")
    weighted = _moe(lambda_imit=2.0, lambda_balance=0.5)
    _, aux2 = weighted(z_i, z_c, mode="train", noise=noise)
    assert_close(aux2["loss"], 2.0 * aux2["imitation_loss"] + 0.5 * aux2["balance_loss"], torch.float32, "lambdas")


def test_no_argument_layer_is_the_mars_that_mars_train_builds():
    """MarsMoE(d, h, E, k) with no options is the MARS of the results tables:
    its configuration is the one `mars train` (no options) gives its model."""
    from mars.cli import _config
    from mars.config import default_config
    from mars.data import load_data
    from mars.train import make_model

    layer = mk.MarsMoE(D, H, E, K)
    assert layer.config == mk.MarsConfig() == default_config("mars").model.mars
    assert layer.config.mix == "prob" and layer.config.lambda_imit == 5.0 and layer.config.routing == "residual"
    assert type(layer.router.residual_input).__name__ == "ConcatResidual"
    assert type(layer.router.feature_input).__name__ == "IncompleteTokens"
    import argparse

    from mars.cli import _train_args
    parser = argparse.ArgumentParser()
    _train_args(parser)
    cfg = _config(parser.parse_args([]))  # `mars train` with no option
    assert cfg == default_config("mars")
    train_set, _, _ = load_data("synthetic-missing", seed=0)
    built = make_model(cfg, train_set).moe
    assert built.config == layer.config
    assert type(built.router.residual_input) is type(layer.router.residual_input)
    assert type(built.router.feature_input) is type(layer.router.feature_input)


def test_one_complete_pass_serves_several_incomplete_ones():
    """z_c [T, D] broadcast over z_i [P, T, D] is the same as z_c repeated."""
    moe = _moe()
    z_i, z_c, _ = _inputs()
    noise = torch.randn(14, E, generator=torch.Generator().manual_seed(3))
    y, aux = moe(z_i, z_c, mode="train", noise=noise)
    y_rep, aux_rep = moe(z_i, z_c.expand(2, -1, -1).contiguous(), mode="train", noise=noise)
    torch.testing.assert_close(y, y_rep, rtol=0, atol=0)
    torch.testing.assert_close(aux["loss"], aux_rep["loss"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="z_c must be a tensor shaped like z_i"):
        moe(z_i, z_c[:3], mode="train")


def test_inference_needs_the_incomplete_tokens_only_and_ignores_z_c():
    moe = _moe().eval()
    z_i, z_c, _ = _inputs()
    y, aux = moe(z_i)
    y2, _ = moe(z_i, z_c + 100)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    assert float(aux["loss"]) == 0.0 and "imitation_loss" not in aux
    _, idx = mk.topk_gating(moe.router.feature_router(z_i.reshape(-1, D)), K)
    assert torch.equal(aux["indices"].reshape(-1, K), idx)
    with pytest.raises(ValueError, match="needs z_c"):
        moe(z_i, mode="oracle")
    with pytest.raises(ValueError, match="needs z_c"):
        moe.train()(z_i)


def test_mask_router_reads_the_mask_at_test_time():
    moe = _moe(feature_input=TokensAndMask(M)).eval()
    z_i, _, observed = _inputs()
    y, aux = moe(z_i, observed=observed)
    flipped = observed.clone()
    flipped[..., 1] = ~flipped[..., 1]
    with torch.no_grad():
        moe.router.feature_router.weight[:, D:] = 5 * torch.randn(E, M)
    _, a = moe(z_i, observed=observed)
    _, b = moe(z_i, observed=flipped)
    assert not torch.equal(a["indices"], b["indices"])  # the mask changes the routes
    x = torch.cat([z_i.reshape(-1, D), observed.reshape(-1, M).float()], 1)
    _, idx = mk.topk_gating(moe.router.feature_router(x), K)
    assert torch.equal(a["indices"].reshape(-1, K), idx)
    with pytest.raises(ValueError, match="observed"):
        moe(z_i)
    with pytest.raises(ValueError, match="observed must be"):
        moe(z_i, observed=observed[..., :2])


def test_mix_prob_hands_disagreeing_tokens_to_the_feature_router():
    z_i, z_c, _ = _inputs(T=200)
    l = {}
    for scale in (0.0, 1e6):
        router = mk.MarsRouter(D, E, K, mk.MarsConfig(mix="prob", mix_scale=scale, noise="none"), backend="reference")
        with torch.no_grad():
            router.residual_router.weight.mul_(20)  # routers that disagree
        r = router(z_i, z_c, mode="train", generator=torch.Generator().manual_seed(0))
        _, f_idx = mk.topk_gating(router.feature_logits(z_i), K)
        _, r_idx = mk.topk_gating(router.residual_logits(z_i, z_c), K)
        l[scale] = (r, f_idx, r_idx)
    r0, _, r_idx = l[0.0]
    assert torch.equal(r0.indices.reshape(-1, K), r_idx) and float(r0.aux["feature_share"]) == 0.0
    r1, f_idx, _ = l[1e6]
    assert torch.equal(r1.indices.reshape(-1, K), f_idx) and float(r1.aux["feature_share"]) == 1.0


def test_pattern_residual_is_the_per_pattern_mean_of_the_residual(monkeypatch):
    z_i, z_c, observed = _inputs()
    router = mk.MarsRouter(D, E, K, residual_input=PatternResidual(), backend="reference")
    r = router.residual_input(z_i, z_c, observed)
    assert r.shape == z_i.shape and not r.requires_grad
    diff = (z_c - z_i).detach().reshape(-1, D)
    m = observed.reshape(-1, M)
    for t in range(m.shape[0]):
        same = (m == m[t]).all(dim=1)
        assert_close(r.reshape(-1, D)[t], diff[same].mean(dim=0), torch.float32, f"token {t}")
    # a mask broadcast over tokens ([B, 1, M] for [B, N, D]) gives the same as the expanded mask
    zi, zc = torch.randn(4, 3, D), torch.randn(4, 3, D)
    ob = torch.tensor([[1, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool).unsqueeze(1)
    assert torch.equal(pattern_mean(zc - zi, ob), pattern_mean(zc - zi, ob.expand(4, 3, M)))
    # masks up to 62 wide are grouped by an int64 code, wider ones by their rows: the same means either way
    import mars.research.router_inputs as mars_router
    for width in (62, 63):
        obs = torch.rand(6, 5, width) > 0.5
        obs[3:] = obs[0]  # repeated patterns
        obs[1, :, width - 1] = ~obs[1, :, width - 1]  # differs from others only in the top bit
        rr = torch.randn(6, 5, D)
        got = pattern_mean(rr, obs)
        monkeypatch.setattr(mars_router, "_CODE_BITS", 0)
        assert torch.equal(got, pattern_mean(rr, obs)), width
        monkeypatch.undo()
        flat_obs, flat_r = obs.reshape(-1, width), rr.reshape(-1, D)
        for t in (0, 5, 29):
            same = (flat_obs == flat_obs[t]).all(dim=1)
            assert_close(got.reshape(-1, D)[t], flat_r[same].mean(dim=0), torch.float32, f"width {width} token {t}")
    with pytest.raises(ValueError, match="pattern"):
        router.residual_input(z_i, z_c)
    # the layer hands the mask to the residual router; training, oracle and agreement run
    moe = _moe(residual_input=PatternResidual())
    y, aux = moe(z_i, z_c, observed, mode="train")
    aux["loss"].backward()
    assert moe.router.residual_router.weight.grad is not None
    assert moe(z_i, z_c, observed, mode="oracle")[0].shape == z_i.shape
    assert 0.0 <= moe.agreement(z_i, z_c, observed) <= 1.0
    moe.eval()
    assert moe(z_i)[0].shape == z_i.shape  # inference: the feature router, no mask needed


def test_options_are_validated():
    for kw, match in ((dict(mix="sometimes"), "mix must be"), (dict(mix_scale=-1.0), "mix_scale"),
                      (dict(lambda_imit=float("nan")), "lambda_imit"), (dict(lambda_balance=float("inf")), "lambda_balance")):
        with pytest.raises(ValueError, match=match):
            mk.MarsMoE(D, H, E, K, mk.MarsConfig(**kw))
    with pytest.raises(ValueError, match="activation"):
        mk.MarsMoE(D, H, E, K, activation="tanh2")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_backends_agree_and_bf16_autocast_runs(backend):
    z_i, z_c, observed = _inputs()
    ref, _ = _moe(feature_input=TokensAndMask(M), mix="prob")(z_i, z_c, observed, mode="train",
                                                             generator=torch.Generator().manual_seed(0))
    out, _ = _moe(backend=backend, feature_input=TokensAndMask(M), mix="prob")(
        z_i, z_c, observed, mode="train", generator=torch.Generator().manual_seed(0))
    assert_close(out, ref, torch.float32, backend)
    moe = _moe(backend=backend, feature_input=TokensAndMask(M), mix="prob")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(z_i.bfloat16(), z_c.bfloat16(), observed, mode="train")
    assert y.dtype == torch.bfloat16 and torch.isfinite(aux["loss"])
    (y.float().sum() + aux["loss"]).backward()
    assert moe.experts.w1.grad.dtype == torch.float32
