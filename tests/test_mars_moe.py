"""MarsMoE (MARS as a layer on any backbone) and the MarsRouter options that
narrow the train-test router gap: the observed mask for the feature router,
the bottleneck residual, mixed routing, top-k cross-entropy imitation."""
import pytest
import torch

import mars_kernels as mk
from helpers import assert_close

D, H, E, K, M = 12, 16, 5, 2, 3


def _moe(**kw):
    torch.manual_seed(0)
    return mk.MarsMoE(D, H, E, K, backend=kw.pop("backend", "reference"), **kw)


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
    no_skip = _moe(residual=False, lambda_imit=2.0, lambda_balance=0.5)
    y2, aux2 = no_skip(z_i, z_c, mode="train", noise=noise)
    assert_close(y2, want - z_i, torch.float32, "no skip")
    assert_close(aux2["loss"], 2.0 * aux2["imitation_loss"] + 0.5 * aux2["balance_loss"], torch.float32, "lambdas")


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
    moe = _moe(num_modalities=M, mask_router=True).eval()
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


def test_mask_experts_shift_the_expert_input_only():
    moe = _moe(num_modalities=M, mask_experts=True).eval()
    z_i, _, observed = _inputs()
    y0, aux0 = moe(z_i, observed=observed)
    with torch.no_grad():
        moe.mask_embed.weight.copy_(torch.randn(D, M))
    y1, aux1 = moe(z_i, observed=observed)
    assert torch.equal(aux0["indices"], aux1["indices"])  # the router does not read the mask
    x = z_i + observed.float() @ moe.mask_embed.weight.T
    want = z_i + moe.experts(x.reshape(-1, D), aux1["weights"].reshape(-1, K), aux1["indices"].reshape(-1, K)).reshape(z_i.shape)
    assert_close(y1, want, torch.float32, "mask experts")
    assert not torch.allclose(y0, y1)
    moe.train()
    z_i, z_c, observed = _inputs()
    y, aux = moe(z_i, z_c, observed, mode="train")
    (y.square().sum() + aux["loss"]).backward()
    assert moe.mask_embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_modalities"):
        mk.MarsMoE(D, H, E, K, mask_experts=True)


def test_bottleneck_residual_router():
    router = mk.MarsRouter(D, E, K, residual_input="bottleneck", residual_dim=3, backend="reference")
    assert router.residual_router[0].weight.shape == (3, D)
    z_i, z_c, _ = _inputs()
    noise = torch.randn(14, E, generator=torch.Generator().manual_seed(3))
    r = router(z_i, z_c, mode="train", noise=noise)
    l_r = router.residual_router((z_c - z_i).detach().reshape(-1, D))
    l_f = router.feature_router(z_i.reshape(-1, D))
    w, idx, *_ = mk.mars_routing(l_r, l_f, K, sigma_0=1.0, sigma_max=1.0, noise=noise, backend="reference")
    assert torch.equal(r.indices.reshape(-1, K), idx)


def test_topk_ce_imitation():
    router = mk.MarsRouter(D, E, K, imitation="topk_ce", backend="reference")
    z_i, z_c, _ = _inputs()
    r = router(z_i, z_c, mode="train")
    l_r = router.residual_router(router.residual(z_i, z_c).reshape(-1, 2 * D))
    l_f = router.feature_router(z_i.reshape(-1, D))
    top = l_r.topk(K, dim=1).indices
    want = -torch.log_softmax(l_f, 1).gather(1, top).mean()
    assert_close(r.aux["imitation_loss"], want, torch.float32, "topk ce")
    r.aux["imitation_loss"].backward()
    assert router.feature_router.weight.grad.abs().sum() > 0
    assert router.residual_router.weight.grad is None


def test_mix_prob_hands_disagreeing_tokens_to_the_feature_router():
    z_i, z_c, _ = _inputs(T=200)
    l = {}
    for scale in (0.0, 1e6):
        router = mk.MarsRouter(D, E, K, mix="prob", mix_scale=scale, noise="none", backend="reference")
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


def test_mix_blend_is_the_mixture_of_the_two_distributions():
    z_i, z_c, _ = _inputs()
    router = mk.MarsRouter(D, E, K, mix="blend", mix_scale=0.7, sigma_0=0.5, sigma_max=2.0, backend="reference")
    noise = torch.randn(14, E, generator=torch.Generator().manual_seed(3))
    r = router(z_i, z_c, mode="train", noise=noise)
    l_r, l_f = router.residual_logits(z_i, z_c), router.feature_logits(z_i)
    p_r, p_f = torch.softmax(l_r, 1), torch.softmax(l_f, 1)
    d = (p_r * (p_r.log() - p_f.log())).sum(1)
    a = 1 - torch.exp(-0.7 * d)
    sigma = torch.clamp(0.5 * d, max=2.0)
    p = (1 - a)[:, None] * torch.softmax(l_r + sigma[:, None] * noise, 1) + a[:, None] * p_f
    top = p.topk(K, dim=1)
    assert torch.equal(r.indices.reshape(-1, K), top.indices)
    assert_close(r.weights.reshape(-1, K), top.values / top.values.sum(1, keepdim=True), torch.float32, "blend")
    assert_close(r.aux["feature_share"], a.mean(), torch.float32, "share")


def test_alignment_pulls_the_residual_router_towards_the_feature_router():
    router = mk.MarsRouter(D, E, K, alignment=True, backend="reference")
    z_i, z_c, _ = _inputs()
    r = router(z_i, z_c, mode="train")
    l_r = router.residual_router(router.residual(z_i, z_c).reshape(-1, 2 * D))
    l_f = router.feature_router(z_i.reshape(-1, D))
    p_f = l_f.softmax(1)
    want = (p_f * (p_f.log() - l_r.log_softmax(1))).sum(1).mean()
    assert_close(r.aux["alignment_loss"], want, torch.float32, "alignment")
    r.aux["alignment_loss"].backward()
    assert router.residual_router.weight.grad.abs().sum() > 0
    assert router.feature_router.weight.grad is None  # p_f is the target, not moved
    assert "alignment_loss" not in mk.MarsRouter(D, E, K, backend="reference")(z_i, z_c, mode="train").aux
    # MarsMoE: lambda_align weighs it into the layer's loss
    moe0, moe1 = _moe(), _moe(lambda_align=2.0)
    _, a0 = moe0(z_i, z_c, mode="train", noise=torch.zeros(2 * 7, E))
    _, a1 = moe1(z_i, z_c, mode="train", noise=torch.zeros(2 * 7, E))
    assert_close(a1["loss"], a0["loss"] + 2.0 * a1["alignment_loss"], torch.float32, "layer loss")


def test_reconstruction_pulls_the_output_towards_the_detached_complete_tokens():
    z_i, z_c, _ = _inputs()
    z_c = z_c.clone().requires_grad_(True)
    noise = torch.zeros(2 * 7, E)
    moe0, moe1 = _moe(), _moe(lambda_recon=0.5)
    y0, a0 = moe0(z_i, z_c, mode="train", noise=noise)
    y1, a1 = moe1(z_i, z_c, mode="train", noise=noise)
    assert "reconstruction_loss" not in a0
    want = (y1 - z_c.unsqueeze(0)).abs().mean()  # one complete pass shared by the P = 2 incomplete ones
    assert_close(a1["reconstruction_loss"], want, torch.float32, "reconstruction")
    assert_close(a1["loss"], a0["loss"] + 0.5 * want, torch.float32, "layer loss")
    a1["reconstruction_loss"].backward()
    assert z_c.grad is None  # the complete pass is the target, not moved
    assert moe1.experts.w1.grad.abs().sum() > 0 and z_i.grad.abs().sum() > 0
    moe1.eval()
    assert "reconstruction_loss" not in moe1(z_i, z_c)[1]  # inference: no loss


def test_pattern_residual_is_the_per_pattern_mean_of_the_residual(monkeypatch):
    from mars_kernels.layers.mars_router import pattern_mean
    z_i, z_c, observed = _inputs()
    router = mk.MarsRouter(D, E, K, residual_input="pattern", backend="reference")
    r = router.residual(z_i, z_c, observed)
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
    import mars_kernels.layers.mars_router as mars_router
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
        router.residual(z_i, z_c)
    # the layer hands the mask to the residual router; training, oracle and agreement run
    moe = _moe(residual_input="pattern")
    y, aux = moe(z_i, z_c, observed, mode="train")
    aux["loss"].backward()
    assert moe.router.residual_router.weight.grad is not None
    assert moe(z_i, z_c, observed, mode="oracle")[0].shape == z_i.shape
    assert 0.0 <= moe.agreement(z_i, z_c, observed) <= 1.0
    moe.eval()
    assert moe(z_i)[0].shape == z_i.shape  # inference: the feature router, no mask needed


def test_options_are_validated():
    for kw, match in ((dict(mix="sometimes"), "mix must be"), (dict(imitation="mse"), "imitation must be"),
                      (dict(mask_dim=-1), "mask_dim"), (dict(residual_dim=0), "residual_dim"),
                      (dict(residual_input="bottleneck2"), "residual_input"), (dict(mix_scale=-1.0), "mix_scale")):
        with pytest.raises(ValueError, match=match):
            mk.MarsRouter(D, E, K, **kw)
    with pytest.raises(ValueError, match="lambda_imit"):
        mk.MarsMoE(D, H, E, K, lambda_imit=float("nan"))
    with pytest.raises(ValueError, match="lambda_align"):
        mk.MarsMoE(D, H, E, K, lambda_align=-1.0)
    with pytest.raises(ValueError, match="lambda_recon"):
        mk.MarsMoE(D, H, E, K, lambda_recon=float("inf"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_backends_agree_and_bf16_autocast_runs(backend):
    z_i, z_c, observed = _inputs()
    kw = dict(num_modalities=M, mask_router=True, mask_experts=True, mix="prob")
    ref, _ = _moe(**kw)(z_i, z_c, observed, mode="train", generator=torch.Generator().manual_seed(0))
    out, _ = _moe(backend=backend, **kw)(z_i, z_c, observed, mode="train", generator=torch.Generator().manual_seed(0))
    assert_close(out, ref, torch.float32, backend)
    moe = _moe(backend=backend, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(z_i.bfloat16(), z_c.bfloat16(), observed, mode="train")
    assert y.dtype == torch.bfloat16 and torch.isfinite(aux["loss"])
    (y.float().sum() + aux["loss"]).backward()
    assert moe.experts.w1.grad.dtype == torch.float32
