"""Triton MARS routing launchers (mars_kernels.ops.triton.mars_routing) against
mars_kernels.reference.mars_routing (forward values, and gradients by torch
autograd through the reference with the same noise).

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
from mars_kernels.ops.triton import launch as L  # noqa: E402
from mars_kernels.ops.triton import mars_routing as M  # noqa: E402

# (sigma_0, sigma_const, sigma_max)
SIGMAS = {
    "scaled": (1.0, 0.1, 2.0),
    "no_noise": (0.0, 0.0, 1.0),
    "capped": (50.0, 0.5, 0.3),  # 50 * divergence + 0.5 > 0.3 on every row
}


def _shapes():
    """(T, E, k): T in {0,1,5,33}, E in {1,7,64,257}, k in {1,2,E}.

    Selecting more than L.SORT_ABOVE experts sorts the row with tl.sort, which
    the interpreter runs element by element in Python, so those cases, and
    E=257, keep T tiny.
    """
    out = []
    for E in (1, 7, 64, 257):
        for k in sorted({1, 2, E}):
            for T in (0, 1, 5, 33):
                if E == 257 and T != 1:
                    continue
                if k > E or (k > L.SORT_ABOVE and T > 5):
                    continue
                out.append((T, E, k))
    return out


SHAPES = _shapes()


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


def _cpu(*ts):
    return [t.cpu() for t in ts]


def _tol(dtype):
    """(rtol, atol) for values stored in dtype."""
    return {
        torch.float64: (1e-9, 1e-11),
        torch.float32: (1e-5, 1e-5),
        torch.float16: (2e-3, 1e-3),
        torch.bfloat16: (2e-2, 1e-2),  # the interpreter truncates fp32 -> bf16
    }[dtype]


def _inputs(T, E, dtype, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    lr = (scale * torch.randn(T, E, generator=g)).to(dtype)
    lf = (scale * torch.randn(T, E, generator=g)).to(dtype)
    noise = torch.randn(T, E, generator=g, dtype=R.compute_dtype(dtype))
    return lr, lf, noise


def _grads_out(T, E, k, cdt, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, k, generator=g, dtype=cdt),
        torch.randn(T, generator=g, dtype=cdt),
        torch.randn(E, generator=g, dtype=cdt),
    )


def _ref(lr, lf, noise, k, sigmas, grads=None):
    """Reference forward (weights, indices, imitation, divergence, prob_sum) and,
    given (grad_weights, grad_imitation, grad_prob_sum), the logits' gradients."""
    s0, sc, smax = sigmas
    lrr = lr.clone().requires_grad_(grads is not None)
    lfr = lf.clone().requires_grad_(grads is not None)
    w, i, im, dv, ps = R.mars_routing(
        lrr, lfr, k, sigma_0=s0, sigma_max=smax, sigma_const=sc, noise=noise
    )
    if grads is None:
        return (w, i, im, dv, ps), None
    gw, gi, gp = grads
    if lr.shape[0]:
        loss = (w * gw).sum() + (im * gi).sum() + (ps * gp).sum()
        gr, gf = torch.autograd.grad(loss, [lrr, lfr])
    else:
        gr, gf = torch.zeros_like(lr), torch.zeros_like(lf)
    return (w.detach(), i, im.detach(), dv, ps.detach()), (gr, gf)


# Exact index equality with the reference on CPU. On a GPU the divergence (hence
# sigma and the noisy logits) differs from the CPU reference in the last bits,
# which may reorder two noisy values closer than that: a row whose indices
# differ must then hold such a near tie, and is left out of the comparisons
# that depend on the selection. (Exact ties are tested with exact inputs.)
STRICT = DEVICE == "cpu"


def _near_tie_rows(noisy, k, rel=1e-5):
    """Rows whose ranked top min(k+1, E) values hold two within rel of each other."""
    m = min(k + 1, noisy.shape[1])
    top = noisy.gather(1, R.topk_order(noisy, m))
    gaps = (top[:, :-1] - top[:, 1:]).abs()
    return (gaps <= rel * top[:, :-1].abs().clamp(min=1.0)).any(1)


def _noisy(lr, noise, divergence, sigmas):
    """l_r + sigma * noise for a given divergence, with torch's ops (as the reference)."""
    s0, sc, smax = sigmas
    cdt = R.compute_dtype(lr.dtype)
    sigma = torch.clamp(s0 * divergence + sc, max=smax)
    return lr.to(cdt) + sigma.unsqueeze(-1) * noise.to(cdt)


def _check_forward(out, ref, lr, lf, noise, k, sigmas, equal_nan=False, strict=None):
    """Checks the forward outputs; returns the rows whose selection matches the
    reference (all of them when strict)."""
    strict = STRICT if strict is None else strict
    w, i, im, dv, ps, lse_r, lse_f = _cpu(*out)
    rw, ri, rim, rdv, rps = ref
    T, E = lr.shape
    cdt = R.compute_dtype(lr.dtype)
    assert w.shape == (T, k) and w.dtype == cdt
    assert i.shape == (T, k) and i.dtype == torch.int64
    for t in (im, dv, lse_r, lse_f):
        assert t.shape == (T,) and t.dtype == cdt
    assert ps.shape == (E,) and ps.dtype == cdt
    # The selection is exactly that of the noisy logits the kernel formed.
    assert torch.equal(i, R.topk_order(_noisy(lr, noise, dv, sigmas), k))
    same = (i == ri).all(1)
    if strict:
        assert torch.equal(i, ri)
    else:
        assert _near_tie_rows(_noisy(lr, noise, rdv, sigmas), k)[~same].all()
    rtol, atol = _tol(cdt)
    close = dict(rtol=rtol, atol=atol, equal_nan=equal_nan)
    torch.testing.assert_close(w[same], rw[same], **close)
    torch.testing.assert_close(im, rim, **close)
    torch.testing.assert_close(dv, rdv, **close)
    torch.testing.assert_close(ps, rps, rtol=rtol, atol=10 * atol, equal_nan=equal_nan)
    if not equal_nan:
        torch.testing.assert_close(lse_r, torch.logsumexp(lr.to(cdt), -1), rtol=rtol, atol=atol)
        torch.testing.assert_close(lse_f, torch.logsumexp(lf.to(cdt), -1), rtol=rtol, atol=atol)
    return same


def _check_backward(grads, ref_grads, dtype, rows=None):
    """grad_residual on `rows` (default all; it depends on the selection),
    grad_feature everywhere."""
    gr, gf = _cpu(*grads)
    rgr, rgf = ref_grads
    assert gr.dtype == dtype and gf.dtype == dtype
    assert gr.shape == rgr.shape and gf.shape == rgf.shape
    if rows is None:
        rows = torch.ones(gr.shape[0], dtype=torch.bool)
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(gr[rows], rgr[rows], rtol=rtol, atol=atol)
    torch.testing.assert_close(gf, rgf, rtol=rtol, atol=atol)


def _run(lr, lf, noise, k, sigmas, grads):
    out = M.mars_routing_fwd(*_dev(lr, lf, noise), k, *sigmas)
    w, i, _im, _dv, _ps, lse_r, lse_f = out
    bwd = M.mars_routing_bwd(*_dev(*grads, lr, lf), w, i, lse_r, lse_f)
    return out, bwd


@pytest.mark.parametrize("sigma", list(SIGMAS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_mars_routing(T, E, k, dtype, sigma):
    """All forward outputs and both gradients vs autograd through the reference."""
    sigmas = SIGMAS[sigma]
    lr, lf, noise = _inputs(T, E, dtype, 1000 * E + 10 * T + k)
    grads = _grads_out(T, E, k, torch.float32, 7 * T + E)
    out, bwd = _run(lr, lf, noise, k, sigmas, grads)
    ref, ref_grads = _ref(lr, lf, noise, k, sigmas, grads)
    same = _check_forward(out, ref, lr, lf, noise, k, sigmas)
    _check_backward(bwd, ref_grads, dtype, same)


def test_sigma_settings_matter():
    """The three sigma settings give different routings of the same logits
    (so the tests above exercise the noise), and the cap is reached."""
    lr, lf, noise = _inputs(33, 64, torch.float32, 3)
    idx = {name: M.mars_routing_fwd(*_dev(lr, lf, noise), 2, *s)[1].cpu() for name, s in SIGMAS.items()}
    assert not torch.equal(idx["scaled"], idx["no_noise"])
    assert not torch.equal(idx["capped"], idx["no_noise"])
    assert torch.equal(idx["no_noise"], R.topk_order(lr, 2))
    _w, _i, _im, dv, *_ = M.mars_routing_fwd(*_dev(lr, lf, noise), 2, *SIGMAS["capped"])
    s0, sc, smax = SIGMAS["capped"]
    assert (s0 * dv.cpu() + sc > smax).all()
    # sigma = smax exactly: same routing as a constant sigma of smax
    ref = M.mars_routing_fwd(*_dev(lr, lf, noise), 2, 0.0, smax, 10.0)
    assert torch.equal(idx["capped"], ref[1].cpu())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("E,k", [(7, 1), (7, 3), (7, 7), (64, 2), (64, 9), (64, 64)])
def test_mars_routing_ties_exact(E, k, dtype):
    """Integer-valued logits and noise: many exact ties in the noisy logits,
    which must break to the lower expert index exactly as the reference."""
    use_sort = k > L.SORT_ABOVE
    T = 6 if use_sort else 33
    g = torch.Generator().manual_seed(E + k)
    lr = torch.randint(-3, 4, (T, E), generator=g).to(dtype)
    lr[0] = 0.0
    lr[1, ::2] = -0.0  # -0.0 ties with +0.0
    lr[1, 1::2] = 0.0
    lf = torch.randint(-3, 4, (T, E), generator=g).to(dtype)
    int_noise = torch.randint(-2, 3, (T, E), generator=g).float()
    cases = [
        (torch.randn(T, E, generator=g), (0.0, 0.0, 1.0)),  # no noise: noisy == l_r
        (int_noise, (0.0, 0.5, 1.0)),  # constant sigma, exact noisy values
        (int_noise, (0.0, 2.0, 0.5)),  # sigma capped at 0.5
    ]
    for noise, sigmas in cases:
        out = M.mars_routing_fwd(*_dev(lr, lf, noise), k, *sigmas)
        ref, _ = _ref(lr, lf, noise, k, sigmas)
        _check_forward(out, ref, lr, lf, noise, k, sigmas, strict=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_mars_routing_nonfinite_rows(dtype):
    """NaN / +-inf logits: NaN divergence (and sigma) make the noisy row NaN,
    which ranks as +inf: indices 0..k-1, NaN weights, as the reference."""
    lr, lf, noise = _inputs(6, 7, dtype, 11)
    lr[0, 3] = float("nan")
    lf[1, 2] = float("nan")
    lr[2, 4] = float("inf")
    lr[3, 1] = float("-inf")
    lf[4, 0] = float("-inf")  # divergence +inf, sigma capped
    lr[5] = float("-inf")
    out = M.mars_routing_fwd(*_dev(lr, lf, noise), 3, *SIGMAS["scaled"])
    ref, _ = _ref(lr, lf, noise, 3, SIGMAS["scaled"])
    _check_forward(out, ref, lr, lf, noise, 3, SIGMAS["scaled"], equal_nan=True)
    assert torch.equal(out[1][0].cpu(), torch.arange(3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("E,k", [(7, 2), (64, 9), (64, 64)])
def test_mars_routing_float64_and_bfloat16(E, k, dtype):
    lr, lf, noise = _inputs(5, E, dtype, E + k)
    cdt = R.compute_dtype(dtype)
    grads = _grads_out(5, E, k, cdt, k)
    for sigmas in SIGMAS.values():
        out, bwd = _run(lr, lf, noise, k, sigmas, grads)
        ref, ref_grads = _ref(lr, lf, noise, k, sigmas, grads)
        same = _check_forward(out, ref, lr, lf, noise, k, sigmas)
        _check_backward(bwd, ref_grads, dtype, same)


@pytest.mark.parametrize("T,E,k", [(33, 7, 2), (33, 64, 3), (5, 10, 10)])
def test_mars_routing_many_programs_deterministic(T, E, k, monkeypatch):
    """A tiny tile (many programs, a partly masked last block) gives the same
    results; prob_sum is bitwise reproducible run to run."""
    lr, lf, noise = _inputs(T, E, torch.float32, T + E)
    grads = _grads_out(T, E, k, torch.float32, 1)
    sigmas = SIGMAS["scaled"]
    big = _run(lr, lf, noise, k, sigmas, grads)
    monkeypatch.setattr(L, "INTERPRETER_ROW_TILE", 32)
    monkeypatch.setattr(M, "_GPU_TILE", 32)
    small = _run(lr, lf, noise, k, sigmas, grads)
    again = _run(lr, lf, noise, k, sigmas, grads)
    for a, b in zip(small[0] + small[1], again[0] + again[1]):
        assert torch.equal(a, b)
    assert torch.equal(small[0][1], big[0][1])
    for a, b in zip(small[0] + small[1], big[0] + big[1]):
        torch.testing.assert_close(a, b)
    ref, ref_grads = _ref(lr, lf, noise, k, sigmas, grads)
    same = _check_forward(small[0], ref, lr, lf, noise, k, sigmas)
    _check_backward(small[1], ref_grads, torch.float32, same)


def test_mars_routing_strided_gradients():
    """Expanded / non-contiguous incoming gradients (as autograd hands over)."""
    T, E, k = 5, 7, 2
    lr, lf, noise = _inputs(T, E, torch.float32, 2)
    gw = torch.randn(k, T).t()  # non-contiguous
    gi = torch.ones(1).expand(T)  # stride 0
    gp = torch.randn(2 * E)[::2]  # stride 2
    grads = (gw, gi, gp)
    out, bwd = _run(lr, lf, noise, k, SIGMAS["scaled"], grads)
    ref, ref_grads = _ref(lr, lf, noise, k, SIGMAS["scaled"], tuple(g.contiguous() for g in grads))
    same = _check_forward(out, ref, lr, lf, noise, k, SIGMAS["scaled"])
    _check_backward(bwd, ref_grads, torch.float32, same)


def test_mars_routing_empty():
    lr, lf, noise = _inputs(0, 7, torch.float16, 0)
    w, i, im, dv, ps, lse_r, lse_f = M.mars_routing_fwd(*_dev(lr, lf, noise), 3, 1.0, 0.1, 2.0)
    assert w.shape == (0, 3) and i.shape == (0, 3) and w.dtype == torch.float32
    assert im.shape == dv.shape == lse_r.shape == lse_f.shape == (0,)
    assert torch.equal(ps.cpu(), torch.zeros(7))
    gr, gf = M.mars_routing_bwd(
        *_dev(torch.zeros(0, 3), torch.zeros(0), torch.zeros(7), lr, lf), w, i, lse_r, lse_f
    )
    assert gr.shape == gf.shape == (0, 7) and gr.dtype == gf.dtype == torch.float16


def test_mars_routing_bad_arguments():
    x = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(TypeError, match="residual_logits"):
        M.mars_routing_fwd(x.long(), x, x, 1, 1.0, 0.0, 1.0)
    with pytest.raises(TypeError, match="feature_logits"):
        M.mars_routing_fwd(x, x.double(), x, 1, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="feature_logits"):
        M.mars_routing_fwd(x, x[:1], x, 1, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="noise"):
        M.mars_routing_fwd(x, x, x[:, :2], 1, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="k must be"):
        M.mars_routing_fwd(x, x, x, 4, 1.0, 0.0, 1.0)
