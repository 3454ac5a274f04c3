"""The fused MARS routing op on every compiled backend against the reference."""
import pytest
import torch

import mars_kernels as mk
from mars_kernels import reference as ref
from helpers import ALL_DTYPES, assert_close, backend_params, make_logits, cpu_backends

SHAPES = [(0, 6, 2), (1, 1, 1), (5, 7, 3), (33, 7, 7), (130, 64, 2), (3, 257, 8)]
SIGMAS = [dict(sigma_0=1.0, sigma_max=2.0), dict(sigma_0=0.0, sigma_max=1.0), dict(sigma_0=5.0, sigma_max=0.3, sigma_const=0.1)]
NAMES = ("weights", "indices", "imitation", "divergence", "prob_sum", "grad_residual", "grad_feature")


def _run(lr, lf, noise, k, backend, sig, seed=1):
    a, b = lr.detach().clone().requires_grad_(True), lf.detach().clone().requires_grad_(True)
    w, i, im, d, ps = mk.mars_routing(a, b, k, noise=noise, backend=backend, **sig)
    g = torch.Generator().manual_seed(seed)
    cw = torch.randn(w.shape, generator=g, dtype=w.dtype).to(w.device)
    cim = torch.randn(im.shape, generator=g, dtype=im.dtype).to(im.device)
    cps = torch.randn(ps.shape, generator=g, dtype=ps.dtype).to(ps.device)
    loss = (w * cw).sum() + (im * cim).sum() + (ps * cps).sum() + 0 * (a.sum() + b.sum())
    loss.backward()
    return w, i, im, d, ps, a.grad, b.grad


def _inputs(T, E, dtype, device, ties=False):
    lr = make_logits(T, E, dtype, device, seed=0, ties=ties)
    lf = make_logits(T, E, dtype, device, seed=1, ties=ties)
    noise = torch.randn(T, E, generator=torch.Generator().manual_seed(2)).to(device)
    if dtype == torch.float64:
        noise = noise.double()
    return lr, lf, noise


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("sig", SIGMAS, ids=["adaptive", "no-noise", "capped+const"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(device, backend, T, E, k, sig, dtype):
    lr, lf, noise = _inputs(T, E, dtype, device)
    got, want = _run(lr, lf, noise, k, backend, sig), _run(lr, lf, noise, k, "reference", sig)
    assert torch.equal(got[1], want[1])
    for name, a, r in zip(NAMES, got, want):
        if name == "indices":
            continue
        assert_close(a, r, dtype if name.startswith("grad") else torch.float32, name)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dtypes_and_ties(device, backend, dtype):
    lr, lf, noise = _inputs(40, 9, dtype, device, ties=True)
    sig = dict(sigma_0=0.0, sigma_max=1.0)  # no noise: the tied logits stay tied
    got, want = _run(lr, lf, noise, 3, backend, sig), _run(lr, lf, noise, 3, "reference", sig)
    assert torch.equal(got[1], want[1])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, r in zip(NAMES, got, want):
        if name != "indices":
            assert_close(a, r, dtype if name.startswith("grad") else acc, name)


def test_semantics_against_definitions():
    lr, lf, noise = _inputs(20, 6, torch.float64, "cpu")
    w, i, im, d, ps = mk.mars_routing(lr, lf, 2, sigma_0=0.5, sigma_max=0.8, noise=noise, backend="cpu")
    pr, pf = torch.softmax(lr, -1), torch.softmax(lf, -1)
    kl = (pr * (pr.log() - pf.log())).sum(-1)
    assert_close(d, kl, torch.float64, "divergence")
    assert_close(im, kl, torch.float64, "imitation")
    sigma = torch.clamp(0.5 * kl, max=0.8)
    noisy = lr + sigma[:, None] * noise
    w_ref, i_ref = ref.topk_gating(noisy, 2, mode="topk_softmax")
    assert torch.equal(i, i_ref)
    assert_close(w, w_ref, torch.float64, "weights")
    assert_close(ps, pr.sum(0), torch.float64, "prob_sum")


@pytest.mark.parametrize("backend", cpu_backends(reference=True))
def test_gradcheck_float64(backend):
    # sigma depends on both routers but is detached by definition; gradcheck the
    # differentiable paths with sigma held constant (sigma_0 = 0).
    lr, lf, noise = _inputs(6, 5, torch.float64, "cpu")
    lr.requires_grad_(True)
    lf.requires_grad_(True)
    kw = dict(sigma_0=0.0, sigma_const=0.4, sigma_max=1.0, noise=noise, backend=backend)
    assert torch.autograd.gradcheck(lambda a: tuple(mk.mars_routing(a, lf.detach(), 2, **kw)[j] for j in (0, 4)), (lr,))
    assert torch.autograd.gradcheck(lambda b: mk.mars_routing(lr.detach(), b, 2, **kw)[2], (lf,))


@pytest.mark.parametrize("device,backend", backend_params())
def test_generator_reproducible(device, backend):
    lr, lf, _ = _inputs(32, 8, torch.float32, device)

    def draw(b):
        g = torch.Generator(device=device).manual_seed(7)
        return mk.mars_routing(lr, lf, 2, sigma_0=1.0, sigma_max=2.0, generator=g, backend=b)

    a, b, r = draw(backend), draw(backend), draw("reference")
    for x, y, z in zip(a, b, r):
        assert torch.equal(x, y)
        assert_close(x.double(), z.double(), torch.float32)


def test_bad_input():
    lr = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"feature_logits must have shape \[T, E\] like residual_logits"):
        mk.mars_routing(lr, torch.randn(4, 6), 2, sigma_0=1.0, sigma_max=1.0)
    with pytest.raises(TypeError, match="feature_logits must have the dtype of residual_logits"):
        mk.mars_routing(lr, lr.double(), 2, sigma_0=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="sigma_0 must be a finite number >= 0"):
        mk.mars_routing(lr, lr, 2, sigma_0=-1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match=r"k must be in \[1, E=5\], got 6"):
        mk.mars_routing(lr, lr, 6, sigma_0=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match=r"noise must have shape \[T, E\]"):
        mk.mars_routing(lr, lr, 2, sigma_0=1.0, sigma_max=1.0, noise=torch.randn(3, 5))


def test_opcheck():
    ops = torch.ops.mars_kernels
    lr, lf, noise = _inputs(9, 7, torch.float32, "cpu")
    for rg in (False, True):
        a, b = lr.clone().requires_grad_(rg), lf.clone().requires_grad_(rg)
        torch.library.opcheck(ops.mars_routing_fwd.default, (a, b, noise, 2, 1.0, 0.1, 2.0))
    w, i, im, d, ps, sr, sf = ops.mars_routing_fwd(lr, lf, noise, 2, 1.0, 0.1, 2.0)
    args = (torch.randn_like(w), torch.randn_like(im), torch.randn_like(ps), lr, lf, w, i, sr, sf)
    torch.library.opcheck(ops.mars_routing_bwd.default, args)
