"""topk_gating and router_stats on every compiled backend against the reference."""
import pytest
import torch

import mars_kernels as mk
from helpers import ALL_DTYPES, assert_close, backend_params, make_logits, cpu_backends

# (T, E, k): the edge shapes of docs/design.md section 5: T = 0 and 1, T off the block size, E = 1,
# prime E, E = 160 and 257, k = 1 and k = E.
SHAPES = [
    (0, 8, 2),
    (1, 1, 1),
    (5, 7, 3),
    (33, 7, 7),
    (130, 64, 2),
    (3, 160, 8),
    (3, 257, 1),
    (2, 257, 257),
]
MODES = [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", True)]


def _run(logits, k, mode, renorm, backend):
    x = logits.detach().clone().requires_grad_(True)
    w, i = mk.topk_gating(x, k, mode=mode, renormalize=renorm, backend=backend)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype).to(w.device)
    (w * g).sum().backward()
    return w, i, x.grad


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("mode,renorm", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(device, backend, T, E, k, mode, renorm, dtype):
    logits = make_logits(T, E, dtype, device)
    w, i, g = _run(logits, k, mode, renorm, backend)
    w_ref, i_ref, g_ref = _run(logits, k, mode, renorm, "reference")
    assert i.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(i, i_ref)
    assert_close(w, w_ref, torch.float32, "weights")
    if T > 0:
        assert_close(g, g_ref, dtype, "grad_logits")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_ties_break_to_lower_index(device, backend, dtype):
    logits = make_logits(64, 12, dtype, device, ties=True)
    for k in (1, 3, 12):
        w, i = mk.topk_gating(logits, k, backend=backend)
        w_ref, i_ref = mk.topk_gating(logits, k, backend="reference")
        assert torch.equal(i, i_ref), f"k={k}"
        assert_close(w, w_ref, w_ref.dtype, "weights")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_all_dtypes(device, backend, dtype):
    logits = make_logits(40, 10, dtype, device)
    w, i, g = _run(logits, 3, "softmax_topk", False, backend)
    w_ref, i_ref, g_ref = _run(logits, 3, "softmax_topk", False, "reference")
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert g.dtype == dtype
    assert torch.equal(i, i_ref)
    assert_close(w, w_ref, w_ref.dtype, "weights")
    assert_close(g, g_ref, dtype, "grad_logits")


@pytest.mark.parametrize("device,backend", backend_params())
def test_all_tokens_to_one_expert(device, backend):
    logits = make_logits(50, 9, torch.float32, device)
    logits[:, 4] += 100.0
    w, i = mk.topk_gating(logits, 2, backend=backend)
    assert bool((i[:, 0] == 4).all())
    w_ref, i_ref = mk.topk_gating(logits, 2, backend="reference")
    assert torch.equal(i, i_ref)
    assert_close(w, w_ref, torch.float32, "weights")


@pytest.mark.parametrize("device,backend", backend_params())
def test_non_contiguous_logits(device, backend):
    transposed = make_logits(40, 24, torch.float32, device).t()
    column_strided = make_logits(24, 120, torch.float32, device)[:, ::3]
    row_strided = make_logits(48, 40, torch.float32, device)[::2]
    for logits in (transposed, column_strided, row_strided):
        assert not logits.is_contiguous()
        w, i, g = _run(logits, 2, "softmax_topk", False, backend)
        w_ref, i_ref, g_ref = _run(logits, 2, "softmax_topk", False, "reference")
        assert torch.equal(i, i_ref)
        assert_close(w, w_ref, torch.float32, "weights")
        assert_close(g, g_ref, torch.float32, "grad_logits")


@pytest.mark.parametrize("device,backend", backend_params())
def test_non_finite_logits(device, backend):
    logits = make_logits(6, 8, torch.float32, device)
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    logits[3, :6] = float("-inf")  # fewer finite experts than k=3 -> masked ones get weight 0
    for mode, renorm in MODES:
        w, i = mk.topk_gating(logits, 3, mode=mode, renormalize=renorm, backend=backend)
        w_ref, i_ref = mk.topk_gating(logits, 3, mode=mode, renormalize=renorm, backend="reference")
        assert torch.equal(i, i_ref)
        assert int(i[1, 0]) == 3 and int(i[2, 0]) == 5
        assert bool(torch.isnan(w[1]).all()) and bool(torch.isnan(w[2]).all())
        assert bool((w[3, 2] == 0).all())
        keep = torch.tensor([0, 3, 4, 5])
        assert_close(w[keep], w_ref[keep], torch.float32, "finite rows")
    with pytest.raises(ValueError, match="logits holds NaN or \\+inf \\(first in row 1\\)"):
        mk.topk_gating(logits, 3, backend=backend, check_values=True)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("T,E", [(0, 5), (1, 1), (37, 7), (300, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_router_stats_and_losses(device, backend, T, E, dtype):
    logits = make_logits(T, E, dtype, device)

    def run(b):
        x = logits.detach().clone().requires_grad_(True)
        lse, ps = mk.router_stats(x, backend=b)
        _, idx = mk.topk_gating(x.detach(), min(2, E), backend=b)
        z = mk.router_z_loss(x, backend=b)
        sw = mk.switch_balance_loss(x, idx, backend=b)
        gl = torch.linspace(-1, 1, T, device=device)
        gp = torch.linspace(1, -2, E, device=device)
        ((lse * gl).sum() + (ps * gp).sum() + z + 3 * sw).backward()
        return lse, ps, z, sw, x.grad

    for name, a, r in zip(("lse", "prob_sum", "z_loss", "switch", "grad"), run(backend), run("reference")):
        assert_close(a, r, dtype if name == "grad" else torch.float32, name)
    sw_ref = mk.reference.switch_balance_loss(logits, mk.topk_gating(logits, min(2, E))[1])
    assert_close(run(backend)[3], sw_ref, torch.float32, "switch vs reference.switch_balance_loss")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,renorm", MODES)
def test_gradcheck_float64(backend, mode, renorm):
    logits = make_logits(5, 6, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: mk.topk_gating(x, 3, mode=mode, renormalize=renorm, backend=backend)[0], (logits,)
    )
    assert torch.autograd.gradcheck(lambda x: mk.router_stats(x, backend=backend), (logits,))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_large_shapes(backend, dtype):
    logits = make_logits(65537, 160, dtype, "cuda")
    w, i, g = _run(logits, 8, "softmax_topk", False, backend)
    w_ref, i_ref, g_ref = _run(logits, 8, "softmax_topk", False, "reference")
    assert torch.equal(i, i_ref)
    assert_close(w, w_ref, torch.float32, "weights")
    assert_close(g, g_ref, dtype, "grad_logits")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_int64_offsets(backend):
    # T * E > 2^31: row offsets must be computed in 64 bits.
    T, E = (1 << 31) // 64 + 3, 64
    logits = torch.zeros(T, E, dtype=torch.bfloat16, device="cuda")
    logits[-1, 17] = 5.0
    logits[-2, 63] = 5.0
    w, i = mk.topk_gating(logits, 1, backend=backend)
    assert int(i[-1, 0]) == 17 and int(i[-2, 0]) == 63 and int(i[0, 0]) == 0


@pytest.mark.parametrize("device,backend", backend_params())
def test_router_stats_non_finite_rows_follow_torch(device, backend):
    logits = make_logits(5, 6, torch.float32, device)
    logits[1, 2] = float("inf")
    logits[2, 0] = float("nan")
    logits[3, :] = float("-inf")
    for rows in ([0], [0, 1], [0, 2], [0, 3], [0, 1, 2, 3, 4]):
        part = logits[rows]
        lse, ps = mk.router_stats(part, backend=backend)
        lse_ref, ps_ref = mk.router_stats(part, backend="reference")
        torch.testing.assert_close(lse, lse_ref, equal_nan=True, msg=f"lse rows {rows}")
        torch.testing.assert_close(ps, ps_ref, equal_nan=True, msg=f"prob_sum rows {rows}")
