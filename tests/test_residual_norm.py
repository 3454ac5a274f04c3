"""residual_norm_mean (residual + LayerNorm + mean over modalities, the end of
the MARS fusion) on every backend against the reference, forward and backward,
with and without missing rows and with several masks in one call."""
import pytest
import torch
from torch import nn

import mars_kernels as mk
from mars_kernels import reference as ref
from helpers import ALL_DTYPES, assert_close, backend_params, cpu_backends

# (T, M, D): T = 0 and 1, T not a multiple of any block, M = 1, M = 7 (prime),
# D = 3 (odd), D wider than one block of rows. D = 1 has its own test.
SHAPES = [(0, 3, 8), (1, 1, 4), (5, 3, 3), (37, 7, 30), (130, 3, 64), (9, 2, 300)]
NAMES = ("z", "grad_y", "grad_h", "grad_weight", "grad_bias", "grad_missing")


def _inputs(T, M, D, P=None, dtype=torch.float32, device="cpu", seed=0):
    """y, h, weight, bias, missing, observed; observed [T, M] (P None) or
    [P, T, M], with all-observed, none-observed and one-observed rows."""
    g = torch.Generator().manual_seed(seed)
    lead = (T,) if P is None else (P, T)
    observed = torch.rand(*lead, M, generator=g) < 0.6
    observed[..., 0::3, :] = True
    observed[..., 1::3, :] = False
    y = torch.randn(*lead, M, D, generator=g)
    h, missing = torch.randn(T, M, D, generator=g), torch.randn(M, D, generator=g)
    weight, bias = 1 + 0.3 * torch.randn(D, generator=g), 0.3 * torch.randn(D, generator=g)
    tensors = [t.to(dtype=dtype, device=device) for t in (y, h, weight, bias, missing)]
    return (*tensors, observed.to(device))


def _run(backend, y, h, weight, bias, missing=None, observed=None, seed=1):
    leaves = [t.detach().clone().requires_grad_(True) for t in (y, h, weight, bias)]
    m = None if missing is None else missing.detach().clone().requires_grad_(True)
    z = mk.residual_norm_mean(*leaves, missing=m, observed=observed, backend=backend)
    cot = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(dtype=z.dtype, device=z.device)
    (z.float() * cot.float()).sum().backward()
    return [z] + [t.grad for t in leaves] + ([] if m is None else [m.grad])


def _compare(got, want, dtype):
    for name, a, r in zip(NAMES, got, want):
        assert a.dtype == r.dtype, name
        # Parameter and missing-row gradients sum over positions: compare at the sum's scale.
        scale = max(1.0, float(r.float().abs().max())) if name in NAMES[3:] else 1.0
        assert_close(a / scale, r / scale, dtype, name)


def test_reference_is_layer_norm_of_filled_tokens():
    T, M, D = 6, 3, 10
    y, h, weight, bias, missing, observed = _inputs(T, M, D, dtype=torch.float64)
    norm = nn.LayerNorm(D, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(weight), norm.bias.copy_(bias)
    filled = h.clone()
    for t in range(T):
        for m in range(M):
            if not observed[t, m]:
                filled[t, m] = missing[m]
    want = norm(y + filled).mean(dim=1)
    assert_close(ref.residual_norm_mean(y, h, weight, bias, missing, observed), want, torch.float64, "z")
    assert_close(ref.residual_norm_mean(y, h, weight, bias), norm(y + h).mean(dim=1), torch.float64, "no missing")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("T,M,D", SHAPES)
@pytest.mark.parametrize("P", [None, 1, 3], ids=["mask", "1-mask", "3-masks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(device, backend, T, M, D, P, dtype):
    y, h, weight, bias, missing, observed = _inputs(T, M, D, P, dtype, device)
    got = _run(backend, y, h, weight, bias, missing, observed)
    want = _run("reference", y, h, weight, bias, missing, observed)
    assert got[0].shape == (*observed.shape[:-1], D)
    _compare(got, want, dtype)
    seen_by_any = observed if P is None else observed.any(0)
    assert not got[2][~seen_by_any].any(), "rows no mask observes get no gradient"


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("T,M,D", SHAPES)
def test_without_missing_rows(device, backend, T, M, D):
    y, h, weight, bias, _, _ = _inputs(T, M, D, device=device)
    _compare(_run(backend, y, h, weight, bias), _run("reference", y, h, weight, bias), torch.float32)


@pytest.mark.parametrize("device,backend", backend_params())
def test_single_feature_normalises_to_bias(device, backend):
    # D = 1: every row's xhat is exactly 0, so z = bias and no gradient reaches
    # y, h or missing (the reference's rounding leaves ~1e-5 there; rstd = 1/sqrt(eps)).
    y, h, weight, bias, missing, observed = _inputs(11, 3, 1, 2, device=device)
    got = _run(backend, y, h, weight, bias, missing, observed)
    assert_close(got[0], bias.expand_as(got[0]), torch.float32, "z")
    for name, g in zip(NAMES[1:], got[1:]):
        if name not in ("grad_weight", "grad_bias"):
            assert float(g.abs().max()) < 1e-3, name


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dtypes(device, backend, dtype):
    y, h, weight, bias, missing, observed = _inputs(19, 3, 24, 2, dtype, device)
    _compare(_run(backend, y, h, weight, bias, missing, observed),
             _run("reference", y, h, weight, bias, missing, observed), dtype)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("P", [None, 2])
def test_gradcheck_float64(backend, P):
    y, h, weight, bias, missing, observed = _inputs(5, 3, 6, P, torch.float64)
    leaves = tuple(t.requires_grad_(True) for t in (y, h, weight, bias, missing))
    assert torch.autograd.gradcheck(
        lambda y, h, w, b, m: mk.residual_norm_mean(y, h, w, b, missing=m, observed=observed, backend=backend),
        leaves,
    )


@pytest.mark.parametrize("device,backend", backend_params())
def test_deterministic(device, backend):
    inputs = _inputs(300, 3, 40, 2, device=device)
    a, b = (_run(backend, *inputs) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_masks_equal_one_call_per_mask():
    y, h, weight, bias, missing, observed = _inputs(23, 4, 12, 3)
    for backend in cpu_backends(reference=True):
        z = mk.residual_norm_mean(y, h, weight, bias, missing=missing, observed=observed, backend=backend)
        for p in range(3):
            one = mk.residual_norm_mean(y[p], h, weight, bias, missing=missing, observed=observed[p], backend=backend)
            assert_close(z[p], one, torch.float32, f"{backend} mask {p}")


def test_bad_input():
    y, h, weight, bias, missing, observed = _inputs(4, 3, 8)
    with pytest.raises(ValueError, match=r"h must be 3-D \[T, M, D\] with M, D >= 1"):
        mk.residual_norm_mean(y, h[:, :0], weight, bias)
    with pytest.raises(TypeError, match="h must be float16, bfloat16, float32 or float64"):
        mk.residual_norm_mean(y, h.long(), weight, bias)
    with pytest.raises(ValueError, match=r"y must have shape \[T, M, D\] = \(4, 3, 8\)"):
        mk.residual_norm_mean(y[:3], h, weight, bias)
    with pytest.raises(ValueError, match=r"weight must have shape \[D\] = \(8,\)"):
        mk.residual_norm_mean(y, h, weight[:7], bias)
    with pytest.raises(TypeError, match="bias must have h's dtype"):
        mk.residual_norm_mean(y, h, weight, bias.double())
    with pytest.raises(ValueError, match="missing and observed must be given together"):
        mk.residual_norm_mean(y, h, weight, bias, missing=missing)
    with pytest.raises(ValueError, match=r"missing must have shape \[M, D\] = \(3, 8\)"):
        mk.residual_norm_mean(y, h, weight, bias, missing=missing[:2], observed=observed)
    with pytest.raises(TypeError, match="observed must be a bool tensor"):
        mk.residual_norm_mean(y, h, weight, bias, missing=missing, observed=observed.float())
    with pytest.raises(ValueError, match=r"observed must have shape \[T, M\] or \[P, T, M\] = \(4, 3\)"):
        mk.residual_norm_mean(y, h, weight, bias, missing=missing, observed=observed[:3])
    with pytest.raises(ValueError, match=r"y must have shape \[P, T, M, D\] = \(2, 4, 3, 8\)"):
        mk.residual_norm_mean(y, h, weight, bias, missing=missing, observed=torch.stack([observed, observed]))
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        mk.residual_norm_mean(y, h, weight, bias, eps=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.residual_norm_mean(y, h, weight, bias, backend="gpu")


def test_opcheck():
    ops = torch.ops.mars_kernels
    for P in (None, 2):
        y, h, weight, bias, missing, observed = _inputs(7, 3, 8, P)
        for miss, obs in ((None, None), (missing, observed)):
            if obs is None and P is not None:
                continue
            args = [t.clone().requires_grad_(True) for t in (y, h, weight, bias)]
            m = None if miss is None else miss.clone().requires_grad_(True)
            torch.library.opcheck(ops.residual_norm_mean_fwd.default, (*args, m, obs, 1e-5))
            z, mean, rstd = ops.residual_norm_mean_fwd(y, h, weight, bias, miss, obs, 1e-5)
            torch.library.opcheck(ops.residual_norm_mean_bwd.default,
                                  (torch.randn_like(z), y, h, weight, miss, obs, mean, rstd))


def test_compile_fullgraph():
    y, h, weight, bias, missing, observed = _inputs(6, 3, 8, 2)
    leaves = [t.clone().requires_grad_(True) for t in (y, h)]
    fn = torch.compile(
        lambda y, h: mk.residual_norm_mean(y, h, weight, bias, missing=missing, observed=observed,
                                           backend="cpu").square().sum(),
        fullgraph=True,
    )
    fn(*leaves).backward()
    want = [t.clone().requires_grad_(True) for t in (y, h)]
    ref.residual_norm_mean(*want, weight, bias, missing, observed).square().sum().backward()
    for a, r, name in zip(leaves, want, ("grad_y", "grad_h")):
        assert_close(a.grad, r.grad, torch.float32, name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_int64_offsets_gpu(backend):
    # T * M * D passes 2^31 elements: row offsets must be 64-bit.
    T, M, D = 2**31 // (2 * 256) + 5, 2, 256
    h = torch.randn(T, M, D, device="cuda", dtype=torch.float16)
    y, weight, bias = torch.randn_like(h), torch.ones(D, device="cuda", dtype=torch.float16), torch.zeros_like(h[0, 0])
    z = mk.residual_norm_mean(y, h, weight, bias, backend=backend)
    tail = slice(T - 3, T)
    assert_close(z[tail], ref.residual_norm_mean(y[tail], h[tail], weight, bias), torch.float16, "last rows")
