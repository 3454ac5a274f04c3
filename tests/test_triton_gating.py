"""Triton gating launchers (mars_kernels.ops.triton) against mars_kernels.reference.

Runs on CPU under TRITON_INTERPRET=1 (set by conftest.py before triton is
imported), or on a CUDA GPU when one is present. Shapes stay tiny because the
interpreter simulates every program sequentially with NumPy.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET != 1", allow_module_level=True)
# With a GPU these run compiled on it: the GPU tier (`pytest -m gpu` selects them).
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []

from mars_kernels import reference as R  # noqa: E402
from mars_kernels.ops.triton import gating as G  # noqa: E402
from mars_kernels.ops.triton import launch as L  # noqa: E402
from mars_kernels.ops.triton import noisy_gating as N  # noqa: E402

MODES = [(True, False), (True, True), (False, False)]  # (softmax_first, renormalize)


def _shapes():
    """(T, E, k): T in {0,1,5,33}, E in {1,2,7,64,257}, k in {1,2,E}.

    Selecting more than L.SORT_ABOVE experts sorts the row with tl.sort, whose
    combine step the interpreter runs element by element in Python, so those
    cases, and E=257, keep T tiny.
    """
    out = []
    for E in (1, 2, 7, 64, 257):
        for k in sorted({1, 2, E}):
            for T in (0, 1, 5, 33):
                if E == 257 and T != 1:
                    continue
                if k > E or (k + 1 > L.SORT_ABOVE and T > 5):
                    continue
                out.append((T, E, k))
    return out


SHAPES = _shapes()


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


def _cpu(*ts):
    return [t.cpu() for t in ts]


def _mode(softmax_first):
    return "softmax_topk" if softmax_first else "topk_softmax"


def _ref_lse(x, indices, softmax_first, renormalize):
    xc = x.to(R.compute_dtype(x.dtype))
    if softmax_first and not renormalize:
        return torch.logsumexp(xc, dim=-1)
    return torch.logsumexp(xc.gather(1, indices), dim=-1)


def _tol(dtype):
    """(rtol, atol) for outputs stored in dtype."""
    return {
        torch.float64: (1e-10, 1e-12),
        torch.float32: (1e-5, 1e-6),
        torch.float16: (2e-3, 1e-3),
        torch.bfloat16: (2e-2, 1e-3),  # the interpreter truncates fp32 -> bf16
    }[dtype]


@pytest.fixture(params=["big_tile", "small_tile"])
def tile(request, monkeypatch):
    """Also run with a tiny interpreter tile: many programs, masked tail blocks."""
    if request.param == "small_tile":
        monkeypatch.setattr(L, "INTERPRETER_ROW_TILE", 64)  # the tiles of G and N
        monkeypatch.setattr(L, "ROW_GPU_TILE", 64)
    return request.param


# --------------------------------------------------------------------------
# top-k gating
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("E,k", [(7, 1), (7, 3), (7, 7), (64, 2), (64, 8), (64, 9), (64, 64)])
def test_topk_gating_ties_exact(E, k, dtype):
    """Integer-valued logits: many ties, which must break to the lower expert index."""
    use_sort = k > L.SORT_ABOVE
    g = torch.Generator().manual_seed(E + k)
    x = torch.randint(-3, 4, (6 if use_sort else 33, E), generator=g).to(dtype)
    x[0] = 0.0
    x[1, ::2] = -0.0  # -0.0 ties with +0.0
    x[1, 1::2] = 0.0
    x[2] = float("-inf")
    x[2, E // 2] = 1.0
    for softmax_first, renormalize in MODES[:1] if use_sort else MODES:
        w, i, _ = _cpu(*G.topk_gating_fwd(*_dev(x), k, softmax_first, renormalize))
        rw, ri = R.topk_gating(x, k, mode=_mode(softmax_first), renormalize=renormalize)
        assert torch.equal(i, ri)
        # rows 2: the -inf entries selected beyond the first get weight exp(-inf) = 0
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_topk_gating_nan_ranks_first(dtype):
    x = torch.randn(5, 7).to(dtype)
    x[1, 4] = float("nan")
    x[3, 0] = float("nan")
    x[3, 6] = float("nan")
    x[4, 2] = float("inf")
    for softmax_first, renormalize in MODES:
        w, i, _ = _cpu(*G.topk_gating_fwd(*_dev(x), 3, softmax_first, renormalize))
        rw, ri = R.topk_gating(x, 3, mode=_mode(softmax_first), renormalize=renormalize)
        assert torch.equal(i, ri)
        assert i[1, 0] == 4 and i[3, 0] == 0 and i[3, 1] == 6
        torch.testing.assert_close(w, rw, equal_nan=True)
        assert torch.isnan(w[[1, 3, 4]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("softmax_first,renormalize", MODES)
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_topk_gating(T, E, k, softmax_first, renormalize, dtype):
    """Forward (indices exact, weights, lse) and backward vs autograd through the reference."""
    if E == 257 and k == E and (softmax_first, renormalize) != (True, False):
        pytest.skip("the sort path at E=257 is slow in the interpreter: one mode is enough")
    g = torch.Generator().manual_seed(1000 * E + 10 * T + k)
    x = (3 * torch.randn(T, E, generator=g)).to(dtype)
    gw = torch.randn(T, k, generator=g)

    w, i, lse = G.topk_gating_fwd(*_dev(x), k, softmax_first, renormalize)
    xr = x.clone().requires_grad_(True)
    rw, ri = R.topk_gating(xr, k, mode=_mode(softmax_first), renormalize=renormalize)
    assert w.shape == (T, k) and w.dtype == torch.float32
    assert i.shape == (T, k) and i.dtype == torch.int64
    assert lse.shape == (T,) and lse.dtype == torch.float32
    assert torch.equal(i.cpu(), ri)
    torch.testing.assert_close(w.cpu(), rw.detach(), rtol=1e-5, atol=1e-6)
    ref_lse = _ref_lse(x, ri, softmax_first, renormalize)
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=1e-5, atol=1e-6)

    grad = G.topk_gating_bwd(*_dev(gw, x), w, i, lse, softmax_first, renormalize).cpu()
    (rgrad,) = torch.autograd.grad((rw * gw).sum(), xr) if T else (torch.zeros_like(x),)
    assert grad.shape == (T, E) and grad.dtype == dtype
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(grad, rgrad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("E,k", [(7, 3), (64, 2), (10, 10)])
def test_topk_gating_many_programs(E, k, monkeypatch):
    """A tiny tile: many programs per launch and a partly masked last block."""
    monkeypatch.setattr(L, "INTERPRETER_ROW_TILE", 32)
    g = torch.Generator().manual_seed(E)
    T = 7 if k > L.SORT_ABOVE else 33
    x = torch.randint(-2, 3, (T, E), generator=g).float()
    gw = torch.randn(T, k, generator=g)
    for softmax_first, renormalize in MODES:
        w, i, lse = G.topk_gating_fwd(*_dev(x), k, softmax_first, renormalize)
        rw, ri = R.topk_gating(x, k, mode=_mode(softmax_first), renormalize=renormalize)
        assert torch.equal(i.cpu(), ri)
        torch.testing.assert_close(w.cpu(), rw)
        grad = G.topk_gating_bwd(*_dev(gw, x), w, i, lse, softmax_first, renormalize).cpu()
        xr = x.clone().requires_grad_(True)
        rw2, _ = R.topk_gating(xr, k, mode=_mode(softmax_first), renormalize=renormalize)
        (rgrad,) = torch.autograd.grad((rw2 * gw).sum(), xr)
        torch.testing.assert_close(grad, rgrad)


def test_topk_gating_float64_and_bfloat16():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float64, torch.bfloat16):
        for E, k in ((7, 2), (64, 64), (64, 5)):
            x = torch.randn(9, E, generator=g, dtype=torch.float64).to(dtype)
            gw = torch.randn(9, k, generator=g, dtype=torch.float64)
            cdt = R.compute_dtype(dtype)
            for softmax_first, renormalize in MODES:
                w, i, lse = G.topk_gating_fwd(*_dev(x), k, softmax_first, renormalize)
                rw, ri = R.topk_gating(x, k, mode=_mode(softmax_first), renormalize=renormalize)
                assert w.dtype == cdt and lse.dtype == cdt
                assert torch.equal(i.cpu(), ri)
                rtol, atol = _tol(cdt)
                torch.testing.assert_close(w.cpu(), rw, rtol=rtol, atol=atol)
                grad = G.topk_gating_bwd(
                    *_dev(gw.to(cdt)), *_dev(x), w, i, lse, softmax_first, renormalize
                ).cpu()
                xr = x.clone().requires_grad_(True)
                rw2, _ = R.topk_gating(xr, k, mode=_mode(softmax_first), renormalize=renormalize)
                (rgrad,) = torch.autograd.grad((rw2 * gw.to(cdt)).sum(), xr)
                rtol, atol = _tol(dtype)
                torch.testing.assert_close(grad, rgrad, rtol=rtol, atol=atol)


def test_topk_gating_empty():
    x = torch.randn(0, 7)
    w, i, lse = G.topk_gating_fwd(*_dev(x), 3, True, True)
    assert w.shape == (0, 3) and i.shape == (0, 3) and lse.shape == (0,)
    grad = G.topk_gating_bwd(*_dev(torch.zeros(0, 3)), *_dev(x), w, i, lse, True, False)
    assert grad.shape == (0, 7) and grad.dtype == torch.float32


# --------------------------------------------------------------------------
# noisy top-k gating
# --------------------------------------------------------------------------
def _ref_noisy(clean, noise_logits, noise, k, eps, gw=None, gi=None, gl=None):
    """reference.noisy_topk_gating driven from clean / noise logits directly.

    x = [clean | noise_logits], w_gate = [I; 0], w_noise = [0; I], so x @ w_gate
    and x @ w_noise reproduce the logits exactly. Returns the forward outputs and,
    given the output gradients, (grad_clean, grad_noise_logits) by autograd.
    """
    T, E = clean.shape
    eye = torch.eye(E, dtype=clean.dtype)
    zero = torch.zeros(E, E, dtype=clean.dtype)
    x = torch.cat([clean, noise_logits], dim=1).requires_grad_(gw is not None)
    w, i, imp, load = R.noisy_topk_gating(
        x, torch.cat([eye, zero]), torch.cat([zero, eye]), k,
        training=True, noise=noise, noise_eps=eps,
    )
    if gw is None:
        return w, i, imp, load, None, None
    loss = (w * gw).sum() + (imp * gi).sum()
    if load.requires_grad:
        loss = loss + (load * gl).sum()
    (gx,) = torch.autograd.grad(loss, x) if T else (torch.zeros_like(x),)
    return w.detach(), i, imp.detach(), load.detach(), gx[:, :E], gx[:, E:]


def _noisy_inputs(T, E, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(T, E, generator=g).to(dtype)
    nl = torch.randn(T, E, generator=g).to(dtype)
    noise = torch.randn(T, E, generator=g, dtype=R.compute_dtype(dtype))
    return clean, nl, noise


NOISY_SHAPES = [s for s in SHAPES if s[1] <= 64] + [(1, 257, 2), (1, 257, 16), (5, 7, 6), (5, 9, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,E,k", NOISY_SHAPES)
def test_noisy_topk_gating(T, E, k, dtype, tile):
    eps = 1e-2
    clean, nl, noise = _noisy_inputs(T, E, dtype, 31 * E + T + k)
    g = torch.Generator().manual_seed(5)
    gw = torch.randn(T, k, generator=g)
    gi = torch.randn(E, generator=g)
    gl = torch.randn(E, generator=g)

    w, i, thr, imp, load = N.noisy_topk_gating_fwd(*_dev(clean, nl, noise), k, eps)
    rw, ri, rimp, rload, rgc, rgn = _ref_noisy(clean, nl, noise, k, eps, gw, gi, gl)
    assert torch.equal(i.cpu(), ri)
    assert thr.shape == (T,) and thr.dtype == torch.int64
    if k == E:
        assert (thr == -1).all()
    elif T:
        std = torch.nn.functional.softplus(nl.float()) + eps
        noisy = clean.float() + noise * std
        assert torch.equal(thr.cpu(), R.topk_order(noisy, k + 1)[:, k])
    torch.testing.assert_close(w.cpu(), rw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(imp.cpu(), rimp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load.cpu(), rload, rtol=1e-5, atol=1e-5)
    assert imp.shape == (E,) and load.shape == (E,)

    gc, gn = _cpu(*N.noisy_topk_gating_bwd(*_dev(gw, gi, gl, clean, nl, noise), w, i, thr, eps))
    assert gc.dtype == dtype and gn.dtype == dtype and gc.shape == (T, E)
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(gc, rgc, rtol=rtol, atol=atol)
    torch.testing.assert_close(gn, rgn, rtol=rtol, atol=atol)


@pytest.mark.parametrize("E,k", [(7, 2), (7, 7), (64, 9)])
def test_noisy_topk_gating_float64(E, k):
    eps = 1e-2
    clean, nl, noise = _noisy_inputs(5, E, torch.float64, E + k)
    g = torch.Generator().manual_seed(6)
    gw, gi, gl = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, k), (E,), (E,)))
    w, i, thr, imp, load = N.noisy_topk_gating_fwd(*_dev(clean, nl, noise), k, eps)
    rw, ri, rimp, rload, rgc, rgn = _ref_noisy(clean, nl, noise, k, eps, gw, gi, gl)
    assert w.dtype == imp.dtype == load.dtype == torch.float64
    assert torch.equal(i.cpu(), ri)
    for a, b in ((w, rw), (imp, rimp), (load, rload)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-11)
    gc, gn = _cpu(*N.noisy_topk_gating_bwd(*_dev(gw, gi, gl, clean, nl, noise), w, i, thr, eps))
    torch.testing.assert_close(gc, rgc, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gn, rgn, rtol=1e-9, atol=1e-11)


def test_noisy_topk_gating_ties_and_determinism(monkeypatch):
    """Tied noisy values (zero noise, integer logits) break to the lower index;
    the token sums are bitwise reproducible."""
    monkeypatch.setattr(L, "INTERPRETER_ROW_TILE", 64)
    T, E, k = 33, 7, 2
    g = torch.Generator().manual_seed(9)
    clean = torch.randint(-2, 3, (T, E), generator=g).float()
    nl = torch.randn(T, E, generator=g)
    noise = torch.zeros(T, E)
    out1 = N.noisy_topk_gating_fwd(*_dev(clean, nl, noise), k, 1e-2)
    out2 = N.noisy_topk_gating_fwd(*_dev(clean, nl, noise), k, 1e-2)
    for a, b in zip(out1, out2):
        assert torch.equal(a, b)
    rw, ri, rimp, rload, _, _ = _ref_noisy(clean, nl, noise, k, 1e-2)
    assert torch.equal(out1[1].cpu(), ri)
    assert torch.equal(out1[2].cpu(), R.topk_order(clean, k + 1)[:, k])
    torch.testing.assert_close(out1[3].cpu(), rimp)
    torch.testing.assert_close(out1[4].cpu(), rload)


def test_noisy_topk_gating_empty():
    clean, nl, noise = _noisy_inputs(0, 7, torch.float32, 0)
    w, i, thr, imp, load = N.noisy_topk_gating_fwd(*_dev(clean, nl, noise), 2, 1e-2)
    assert w.shape == (0, 2) and i.shape == (0, 2) and thr.shape == (0,)
    assert torch.equal(imp.cpu(), torch.zeros(7)) and torch.equal(load.cpu(), torch.zeros(7))
    gc, gn = N.noisy_topk_gating_bwd(
        *_dev(torch.zeros(0, 2), torch.zeros(7), torch.zeros(7), clean, nl, noise),
        w, i, thr, 1e-2,
    )
    assert gc.shape == (0, 7) and gn.shape == (0, 7)


# --------------------------------------------------------------------------
# router statistics
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("T,E", [(0, 7), (1, 1), (5, 2), (33, 7), (33, 64), (5, 257)])
def test_router_stats(T, E, dtype, tile):
    g = torch.Generator().manual_seed(T * 1000 + E)
    x = (3 * torch.randn(T, E, generator=g)).to(dtype)
    cdt = R.compute_dtype(dtype)
    glse = torch.randn(T, generator=g, dtype=cdt)
    gps = torch.randn(E, generator=g, dtype=cdt)

    lse, ps = G.router_stats_fwd(*_dev(x))
    lse2, ps2 = G.router_stats_fwd(*_dev(x))
    assert torch.equal(lse, lse2) and torch.equal(ps, ps2)  # deterministic
    assert lse.shape == (T,) and ps.shape == (E,) and lse.dtype == ps.dtype == cdt

    xr = x.clone().requires_grad_(True)
    rlse = torch.logsumexp(xr.to(cdt), dim=-1)
    rps = torch.softmax(xr.to(cdt), dim=-1).sum(0)
    rtol, atol = _tol(cdt)
    torch.testing.assert_close(lse.cpu(), rlse.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(ps.cpu(), rps.detach(), rtol=rtol, atol=10 * atol)

    grad = G.router_stats_bwd(*_dev(glse, gps, x), lse).cpu()
    assert grad.shape == (T, E) and grad.dtype == dtype
    if T:
        (rgrad,) = torch.autograd.grad((rlse * glse).sum() + (rps * gps).sum(), xr)
        rtol, atol = _tol(dtype)
        torch.testing.assert_close(grad, rgrad, rtol=rtol, atol=atol)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_router_stats_infinite_rows():
    x = torch.randn(3, 5)
    x[0] = float("-inf")
    x[1, 2] = float("inf")
    lse, _ = G.router_stats_fwd(*_dev(x))
    torch.testing.assert_close(lse.cpu(), torch.logsumexp(x, dim=-1))


def test_unsupported_dtype_raises():
    with pytest.raises(TypeError, match="logits"):
        G.topk_gating_fwd(torch.zeros(2, 3, dtype=torch.int32, device=DEVICE), 1, True, True)
    with pytest.raises(TypeError, match="logits"):
        G.router_stats_fwd(torch.zeros(2, 3, dtype=torch.int64, device=DEVICE))
