"""Modality attention (the MARS fusion) on every backend: the reference against
nn.MultiheadAttention and a hand loop, the compiled kernels against the
reference, forward and backward, with and without a dropout mask."""
import math

import pytest
import torch
from torch import nn

import mars_kernels as mk
from mars_kernels import reference as ref
from helpers import ALL_DTYPES, assert_close, backend_params, cpu_backends

# (T, M, D, H): T = 0 and 1, T not a multiple of the block, M = 1 (attention is the
# identity on v), M = 7 (prime, not a power of two), odd head width, one head.
SHAPES = [(0, 3, 8, 2), (1, 1, 4, 1), (5, 3, 12, 4), (37, 7, 30, 2), (70, 2, 16, 1), (130, 6, 64, 4)]


def _qkv(T, M, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, M, 3 * D, generator=g).to(dtype=dtype, device=device)


def _keep(T, H, M, device="cpu", p=0.3):
    return mk.attention_keep_mask(T, H, M, p, device=device, generator=torch.Generator(device=device).manual_seed(3))


def _missing(T, M, D, dtype=torch.float32, device="cpu"):
    """Missing rows [M, 3D] and an observed mask [T, M] with every pattern: all
    observed, none observed, one observed."""
    g = torch.Generator().manual_seed(5)
    missing = torch.randn(M, 3 * D, generator=g).to(dtype=dtype, device=device)
    observed = torch.rand(T, M, generator=g) < 0.5
    observed[0::3] = True
    observed[1::3] = False
    if T > 2 and M > 1:
        observed[2] = False
        observed[2, M - 1] = True
    return missing, observed.to(device)


def _run(qkv, H, keep, backend, seed=1, missing=None, observed=None):
    x = qkv.detach().clone().requires_grad_(True)
    m = None if missing is None else missing.detach().clone().requires_grad_(True)
    out = mk.modality_attention(x, H, keep=keep, missing=m, observed=observed, backend=backend)
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=g).to(dtype=out.dtype, device=out.device)
    (out.float() * cot.float()).sum().backward()
    return (out, x.grad) if m is None else (out, x.grad, m.grad)


def test_reference_is_multihead_attention():
    torch.manual_seed(0)
    T, M, D, H = 11, 4, 24, 3
    mha = nn.MultiheadAttention(D, H, batch_first=True).double()
    x = torch.randn(T, M, D, dtype=torch.float64)
    qkv = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    got = mha.out_proj(ref.modality_attention(qkv, H))
    want = mha(x, x, x, need_weights=False)[0]
    assert_close(got, want, torch.float64, "out")


def test_reference_against_loop():
    T, M, D, H = 4, 3, 6, 2
    qkv, keep = _qkv(T, M, D, torch.float64), _keep(T, H, M).double()
    dh = D // H
    want = torch.zeros(T, M, D, dtype=torch.float64)
    for t in range(T):
        for h in range(H):
            q, k, v = (qkv[t, :, part * D + h * dh: part * D + (h + 1) * dh] for part in range(3))
            for i in range(M):
                s = torch.tensor([float(q[i] @ k[j]) / math.sqrt(dh) for j in range(M)], dtype=torch.float64)
                p = torch.softmax(s, 0) * keep[t, h, i]
                want[t, i, h * dh: (h + 1) * dh] = sum(p[j] * v[j] for j in range(M))
    assert_close(ref.modality_attention(qkv, H, keep), want, torch.float64, "out")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("T,M,D,H", SHAPES)
@pytest.mark.parametrize("with_keep", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(device, backend, T, M, D, H, with_keep, dtype):
    qkv = _qkv(T, M, D, dtype, device)
    keep = _keep(T, H, M, device) if with_keep else None
    got, want = _run(qkv, H, keep, backend), _run(qkv, H, keep, "reference")
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close(got[0], want[0], dtype, "out")
    assert_close(got[1], want[1], dtype, "grad_qkv")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("T,M,D,H", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_missing_rows_match_reference(device, backend, T, M, D, H, dtype):
    qkv, keep = _qkv(T, M, D, dtype, device), _keep(T, H, M, device)
    missing, observed = _missing(T, M, D, dtype, device)
    got = _run(qkv, H, keep, backend, missing=missing, observed=observed)
    want = _run(qkv, H, keep, "reference", missing=missing, observed=observed)
    for name, a, r in zip(("out", "grad_qkv", "grad_missing"), got, want):
        assert a.dtype == dtype
        # grad_missing sums over up to T positions: compare at the sum's scale.
        scale = max(1.0, float(r.float().abs().max())) if name == "grad_missing" else 1.0
        assert_close(a / scale, r / scale, dtype, name)
    assert not got[1][~observed].any(), "unobserved rows of qkv get no gradient"


def test_missing_rows_equal_substituted_input():
    T, M, D, H = 23, 4, 8, 2
    qkv, (missing, observed) = _qkv(T, M, D), _missing(T, M, D)
    filled = torch.where(observed[..., None], qkv, missing)
    for backend in cpu_backends():
        got = mk.modality_attention(qkv, H, missing=missing, observed=observed, backend=backend)
        assert_close(got, mk.modality_attention(filled, H, backend=backend), torch.float32, backend)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dtypes(device, backend, dtype):
    qkv, keep = _qkv(19, 3, 16, dtype, device), _keep(19, 2, 3, device)
    got, want = _run(qkv, 2, keep, backend), _run(qkv, 2, keep, "reference")
    assert_close(got[0], want[0], dtype, "out")
    assert_close(got[1], want[1], dtype, "grad_qkv")


# The Triton backward is checked against the reference's autograd above (float64
# included); gradcheck's thousands of interpreter launches would take minutes.
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    qkv = _qkv(5, 3, 8, torch.float64).requires_grad_(True)
    keep = _keep(5, 2, 3).double()
    assert torch.autograd.gradcheck(lambda x: mk.modality_attention(x, 2, keep=keep, backend=backend), (qkv,))
    assert torch.autograd.gradcheck(lambda x: mk.modality_attention(x, 2, backend=backend), (qkv,))
    missing, observed = _missing(5, 3, 8, torch.float64)
    missing.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, m: mk.modality_attention(x, 2, keep=keep, missing=m, observed=observed, backend=backend),
        (qkv, missing),
    )


@pytest.mark.parametrize("device,backend", backend_params())
def test_deterministic(device, backend):
    qkv, keep = _qkv(65, 5, 32, torch.float32, device), _keep(65, 4, 5, device)
    missing, observed = _missing(65, 5, 32, torch.float32, device)
    a, b = (_run(qkv, 4, keep, backend, missing=missing, observed=observed) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _masks(T, M, D, P, dtype=torch.float32, device="cpu"):
    """Missing rows and P different observed masks [P, T, M] (the first as in
    _missing, then random ones)."""
    missing, first = _missing(T, M, D, dtype, device)
    g = torch.Generator().manual_seed(7)
    rest = [torch.rand(T, M, generator=g) < 0.6 for _ in range(P - 1)]
    return missing, torch.stack([first, *[r.to(device) for r in rest]])


def test_reference_masks_equal_one_call_per_mask():
    T, M, D, H, P = 9, 4, 8, 2, 3
    qkv, (missing, observed) = _qkv(T, M, D, torch.float64), _masks(T, M, D, P, torch.float64)
    keep = _keep(P * T, H, M).double().view(P, T, H, M, M)
    got = ref.modality_attention(qkv, H, keep, missing, observed)
    assert got.shape == (P, T, M, D)
    for p in range(P):
        assert_close(got[p], ref.modality_attention(qkv, H, keep[p], missing, observed[p]), torch.float64, f"mask {p}")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("T,M,D,H", [(0, 3, 8, 2), (1, 1, 4, 1), (37, 7, 30, 2), (130, 3, 64, 4)])
@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize("with_keep", [False, True], ids=["no-dropout", "dropout"])
def test_masks_match_reference(device, backend, T, M, D, H, P, with_keep):
    # One call with P masks: out [P, T, M, D], and qkv's gradient summed over the masks.
    qkv, (missing, observed) = _qkv(T, M, D, torch.float32, device), _masks(T, M, D, P, device=device)
    keep = _keep(P * T, H, M, device).view(P, T, H, M, M) if with_keep else None
    got = _run(qkv, H, keep, backend, missing=missing, observed=observed)
    want = _run(qkv, H, keep, "reference", missing=missing, observed=observed)
    assert got[0].shape == (P, T, M, D)
    for name, a, r in zip(("out", "grad_qkv", "grad_missing"), got, want):
        scale = max(1.0, float(r.abs().max())) if name == "grad_missing" else 1.0
        assert_close(a / scale, r / scale, torch.float32, name)
    assert not got[1][~observed.any(0)].any(), "rows no mask observes get no gradient"


def test_masks_gradcheck_float64():
    T, M, D, H, P = 4, 3, 8, 2, 2
    qkv = _qkv(T, M, D, torch.float64).requires_grad_(True)
    missing, observed = _masks(T, M, D, P, torch.float64)
    missing.requires_grad_(True)
    keep = _keep(P * T, H, M).double().view(P, T, H, M, M)
    assert torch.autograd.gradcheck(
        lambda x, m: mk.modality_attention(x, H, keep=keep, missing=m, observed=observed, backend="cpu"),
        (qkv, missing),
    )


def test_single_modality_returns_v():
    qkv = _qkv(9, 1, 8)
    for backend in cpu_backends(reference=True):
        assert_close(mk.modality_attention(qkv, 2, backend=backend), qkv[:, :, 16:], torch.float32, backend)


def test_keep_mask():
    assert mk.attention_keep_mask(4, 2, 3, 0.0) is None
    keep = mk.attention_keep_mask(1000, 2, 3, 0.25, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (1000, 2, 3, 3)
    assert set(keep.unique().tolist()) == {0.0, torch.tensor(4 / 3).item()}
    assert abs(float((keep == 0).float().mean()) - 0.25) < 0.02
    with pytest.raises(ValueError, match=r"p must be a dropout probability in \[0, 1\)"):
        mk.attention_keep_mask(4, 2, 3, 1.0)


def test_bad_input():
    qkv = _qkv(4, 3, 8)
    with pytest.raises(ValueError, match=r"qkv must be 3-D \[T, M, 3\*D\]"):
        mk.modality_attention(qkv.reshape(12, 24), 2)
    with pytest.raises(ValueError, match="last dimension must be 3\\*D with D divisible by num_heads=3"):
        mk.modality_attention(qkv, 3)
    with pytest.raises(ValueError, match="last dimension must be 3\\*D"):
        mk.modality_attention(torch.randn(4, 3, 10), 1)
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        mk.modality_attention(qkv, 0)
    with pytest.raises(TypeError, match="qkv must be float16, bfloat16, float32 or float64"):
        mk.modality_attention(qkv.long(), 2)
    with pytest.raises(ValueError, match=r"keep must have shape \[T, H, M, M\] = \(4, 2, 3, 3\)"):
        mk.modality_attention(qkv, 2, keep=torch.ones(4, 2, 3, 2))
    with pytest.raises(TypeError, match="keep must be a floating tensor"):
        mk.modality_attention(qkv, 2, keep=torch.ones(4, 2, 3, 3, dtype=torch.bool))
    missing, observed = _missing(4, 3, 8)
    with pytest.raises(ValueError, match="missing and observed must be given together"):
        mk.modality_attention(qkv, 2, missing=missing)
    with pytest.raises(ValueError, match=r"missing must have shape \[M, 3D\] = \(3, 24\)"):
        mk.modality_attention(qkv, 2, missing=missing[:2], observed=observed)
    with pytest.raises(TypeError, match="missing must have qkv's dtype"):
        mk.modality_attention(qkv, 2, missing=missing.double(), observed=observed)
    with pytest.raises(ValueError, match=r"observed must have shape \[T, M\] or \[P, T, M\] = \(4, 3\)"):
        mk.modality_attention(qkv, 2, missing=missing, observed=observed[:3])
    with pytest.raises(ValueError, match=r"observed must have shape \[P, T, M\] = \(2, 4, 3\)"):
        mk.modality_attention(qkv, 2, missing=missing, observed=torch.stack([observed, observed])[:, :3])
    with pytest.raises(ValueError, match=r"keep must have shape \[P, T, H, M, M\] = \(2, 4, 2, 3, 3\)"):
        mk.modality_attention(qkv, 2, keep=torch.ones(4, 2, 3, 3), missing=missing,
                              observed=torch.stack([observed, observed]))
    with pytest.raises(TypeError, match="observed must be a bool tensor"):
        mk.modality_attention(qkv, 2, missing=missing, observed=observed.float())
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.modality_attention(qkv, 2, backend="gpu")


def test_opcheck():
    ops = torch.ops.mars_kernels
    qkv, keep = _qkv(7, 3, 8), _keep(7, 2, 3)
    missing, observed = _missing(7, 3, 8)
    for rg in (False, True):
        for kp in (None, keep):
            for miss, obs in ((None, None), (missing, observed)):
                x = qkv.clone().requires_grad_(rg)
                m = None if miss is None else miss.clone().requires_grad_(rg)
                torch.library.opcheck(ops.modality_attention_fwd.default, (x, 2, kp, m, obs))
    masks = torch.stack([observed, ~observed])
    keeps = _keep(14, 2, 3).view(2, 7, 2, 3, 3)
    torch.library.opcheck(ops.modality_attention_fwd.default, (qkv.clone().requires_grad_(True), 2, keeps,
                                                               missing.clone().requires_grad_(True), masks))
    for kp, miss, obs in ((keep, None, None), (keep, missing, observed), (keeps, missing, masks)):
        out, probs = ops.modality_attention_fwd(qkv, 2, kp, miss, obs)
        args = (torch.randn_like(out), qkv, probs, kp, miss, obs, 2)
        torch.library.opcheck(ops.modality_attention_bwd.default, args)


def test_compile_fullgraph():
    qkv = _qkv(6, 3, 8).requires_grad_(True)
    fn = torch.compile(lambda x: mk.modality_attention(x, 2, backend="cpu").square().sum(), fullgraph=True)
    fn(qkv).backward()
    ref_x = qkv.detach().clone().requires_grad_(True)
    ref.modality_attention(ref_x, 2).square().sum().backward()
    assert_close(qkv.grad, ref_x.grad, torch.float32, "grad vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_int64_offsets_gpu(backend):
    # T * M * 3D passes 2^31 elements: row offsets must be 64-bit.
    T, M, D, H = 2**31 // (2 * 3 * 64) + 5, 2, 64, 1
    qkv = torch.randn(T, M, 3 * D, device="cuda", dtype=torch.float16)
    out = mk.modality_attention(qkv, H, backend=backend)
    tail = slice(T - 3, T)
    assert_close(out[tail], ref.modality_attention(qkv[tail], H), torch.float16, "last rows")
