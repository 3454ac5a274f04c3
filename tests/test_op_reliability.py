"""The ops under bad input: mixed devices (meta included), forged dispatch
metadata, argument gaps, NaN rows; and a bounded fuzz test over every public
op asserting "a clear ValueError/TypeError, or the reference's result"."""
from __future__ import annotations

import pytest
import torch

import mars_kernels as mk
from helpers import TOLERANCES, cpu_backends

BACKENDS = cpu_backends(reference=True)


# --------------------------------------------------------------------------- devices


def test_meta_experts_next_to_cpu_input_raise():
    """The realistic trigger: a layer built on the meta device, only the router
    materialised. Before: the CPU kernels read meta weights and returned garbage."""
    with torch.device("meta"):
        moe = mk.SparseMoE(8, 16, 4, k=2)
    moe.router.to_empty(device="cpu")
    with pytest.raises(ValueError, match="meta"):
        moe(torch.randn(3, 8))


def test_meta_layer_on_meta_input_propagates_shapes():
    """All on meta: the ops' fake implementations give the shapes, no kernel runs."""
    with torch.device("meta"):
        moe = mk.SparseMoE(8, 16, 4, k=2, capacity_factor=1.5)
        y, aux = moe(torch.randn(2, 5, 8))
    assert y.device.type == "meta" and y.shape == (2, 5, 8)
    assert aux["expert_counts"].shape == (4,)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_every_tensor_argument_on_one_device(backend):
    g = torch.Generator().manual_seed(0)
    T, D, H, E, k = 6, 4, 5, 3, 2
    x = torch.randn(T, D, generator=g)
    _, idx = mk.topk_gating(torch.randn(T, E, generator=g), k)
    w = torch.rand(T, k, generator=g)
    w1, w2 = torch.randn(E, D, H, generator=g), torch.randn(E, H, D, generator=g)
    meta = mk.moe_align(idx, E)
    meta_dev = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    calls = {
        "moe_mlp w1": lambda: mk.moe_mlp(x, w, meta, meta_dev(w1), None, w2, None, backend=backend),
        "moe_mlp b2": lambda: mk.moe_mlp(x, w, meta, w1, None, w2, torch.zeros(E, D, device="meta"), backend=backend),
        "moe_mlp weights": lambda: mk.moe_mlp(x, meta_dev(w), meta, w1, None, w2, None, backend=backend),
        "moe_mlp meta": lambda: mk.moe_mlp(x, w, meta._replace(offsets=meta_dev(meta.offsets)), w1, None, w2, None,
                                           backend=backend),
        "permute": lambda: mk.permute(x, meta._replace(permutation=meta_dev(meta.permutation)), backend=backend),
        "unpermute": lambda: mk.unpermute(mk.permute(x, meta), meta._replace(inverse=meta_dev(meta.inverse)), w,
                                          backend=backend),
        "unpermute weights": lambda: mk.unpermute(mk.permute(x, meta), meta, meta_dev(w), backend=backend),
        "grouped_mlp": lambda: mk.grouped_mlp(mk.permute(x, meta), w1, None, meta_dev(w2), None, meta,
                                              backend=backend),
        "apply_capacity": lambda: mk.apply_capacity(idx, meta_dev(w), E, 2),
        "switch_balance_loss": lambda: mk.switch_balance_loss(torch.randn(T, E), meta_dev(idx), backend=backend),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match="one device"):
            call()
            pytest.fail(f"{what}: no error")


# --------------------------------------------------------------------------- forged metadata


def _routed(T=7, E=4, k=2, D=6, H=5):
    g = torch.Generator().manual_seed(1)
    _, idx = mk.topk_gating(torch.randn(T, E, generator=g), k)
    return (torch.randn(T, D, generator=g), torch.rand(T, k, generator=g), idx,
            torch.randn(E, D, H, generator=g), torch.randn(E, H, D, generator=g))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_forged_meta_raises_naming_the_field(backend):
    """Before: out-of-range slots crashed the process (SIGSEGV) on cpu."""
    x, w, idx, w1, w2 = _routed()
    meta = mk.moe_align(idx, 4)
    ys = mk.permute(x, meta)
    with pytest.raises(ValueError, match="permutation"):
        mk.permute(x, meta._replace(permutation=meta.permutation + 10**6), backend=backend)
    with pytest.raises(ValueError, match="inverse"):
        mk.unpermute(ys, meta._replace(inverse=meta.inverse - 10**6), w, backend=backend)
    bad_offsets = meta.offsets.clone()
    bad_offsets[-1] = 10**6
    with pytest.raises(ValueError, match="offsets"):
        mk.moe_mlp(x, w, meta._replace(offsets=bad_offsets), w1, None, w2, None, backend=backend)
    with pytest.raises(ValueError, match="permutation"):
        mk.moe_mlp(x, w, meta._replace(permutation=-meta.permutation - 1), w1, None, w2, None, backend=backend)
    with pytest.raises(TypeError, match="meta.offsets"):
        mk.moe_mlp(x, w, meta._replace(offsets=meta.offsets.float()), w1, None, w2, None, backend=backend)


def test_forged_meta_in_the_raw_compiled_ops():
    """The C++ kernels check the slots themselves (the raw torch.ops entry points)."""
    x, w, idx, w1, w2 = _routed()
    c, off, perm, inv, be, bs = torch.ops.mars_kernels.moe_align(idx, 4, 64)
    with pytest.raises(ValueError, match="permutation"):
        torch.ops.mars_kernels.moe_permute(x, perm + 10**6, inv, 2)
    with pytest.raises(ValueError, match="inverse"):
        torch.ops.mars_kernels.moe_unpermute(torch.randn(14, 6), perm, inv + 10**6, None, 2)
    bad = off.clone()
    bad[-1] = 10**6
    with pytest.raises(ValueError, match="offsets"):
        torch.ops.mars_kernels.moe_mlp_fwd(x, w, perm, inv, bad, be, bs, 2, 64, w1, None, w2, None, "gelu", False)
    with pytest.raises(ValueError, match="offsets"):
        torch.ops.mars_kernels.grouped_mlp_fwd(torch.randn(14, 6), bad, w1, None, w2, None, "gelu")


# --------------------------------------------------------------------------- argument gaps


def test_expert_counts_arguments():
    with pytest.raises(TypeError, match="indices must be an int32 or int64"):
        mk.expert_counts(torch.tensor([[0.7, 1.2]]), 3)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, num_experts=3\)"):
        mk.expert_counts(torch.tensor([[0, -1]]), 3)
    with pytest.raises(ValueError, match=r"indices must lie in"):
        mk.expert_counts(torch.tensor([[0, 3]]), 3)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="num_experts must be an int >= 1"):
            mk.expert_counts(torch.tensor([[0]]), bad)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_switch_balance_loss_out_of_range_indices(backend):
    logits = torch.randn(4, 3)
    for bad in ([[0, 3]] * 4, [[0, -1]] * 4):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, E=3\)"):
            mk.switch_balance_loss(logits, torch.tensor(bad), backend=backend)


def test_moe_mlp_weights_for_another_expert_count():
    x, w, idx, w1, w2 = _routed(E=4)
    meta = mk.moe_align(idx, 4)
    with pytest.raises(ValueError, match="E = 4 experts for this meta"):
        mk.moe_mlp(x, w, meta, w1[:3], None, w2[:3], None, backend="cpu")


def test_apply_capacity_needs_float_weights():
    _, _, idx, _, _ = _routed()
    with pytest.raises(TypeError, match="weights must be a floating tensor"):
        mk.apply_capacity(idx, torch.ones_like(idx), 4, 2)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_sparse_moe_input_dtype(dtype):
    moe = mk.SparseMoE(8, 16, 4, k=2)
    with pytest.raises(TypeError, match="x must have the layer's dtype torch.float32"):
        moe(torch.ones(3, 8, dtype=dtype))


def test_generator_argument():
    x = torch.randn(5, 4)
    w = torch.zeros(4, 3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        mk.noisy_topk_gating(x, w, w, 2, training=True, generator=123)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        mk.mars_routing(torch.randn(5, 3), torch.randn(5, 3), 2, sigma_0=1.0, sigma_max=1.0, generator=123)
    router = mk.NoisyTopKRouter(4, 3, 2)
    with pytest.raises(TypeError, match="generator"):
        router(x, generator="seed")


# --------------------------------------------------------------------------- NaN rows


@pytest.mark.parametrize("mode,renormalize", [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", True)])
def test_nan_row_gradient_is_the_same_on_every_backend(mode, renormalize):
    """One rule, documented in the README: a NaN row's gradient is NaN where its
    weights depend on the logits (the k chosen experts; the whole row for
    softmax_topk without renormalisation) and 0 elsewhere; other rows are unaffected."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    x[1, 3] = float("nan")
    patterns = {}
    for backend in BACKENDS:
        logits = x.clone().requires_grad_(True)
        w, _ = mk.topk_gating(logits, 2, mode=mode, renormalize=renormalize, backend=backend)
        (w * torch.tensor([1.0, 2.0])).sum().backward()
        patterns[backend] = logits.grad.isnan()
        assert not patterns[backend][[0, 2, 3]].any()
    for backend in BACKENDS:
        assert torch.equal(patterns[backend], patterns["reference"]), backend
    expected = 8 if (mode, renormalize) == ("softmax_topk", False) else 2
    assert int(patterns["reference"][1].sum()) == expected


# --------------------------------------------------------------------------- fuzz

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]


def _tensor(draw, shape, dtype=None, allow_bad=True):
    """A tensor of ``shape`` (sometimes of a wrong dtype, a strided view, on meta
    or holding NaN), from a seed drawn by hypothesis."""
    dtype = dtype or draw(st.sampled_from(DTYPES if allow_bad else DTYPES[:4]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    base = torch.randn(*shape, 2, generator=g)[..., 0] if draw(st.booleans()) else torch.randn(*shape, generator=g)
    if allow_bad and draw(st.integers(0, 9)) == 0 and base.numel():
        base.view(-1)[0] = float("nan")
    t = base.to(dtype) if dtype.is_floating_point else (base * 3).abs().to(dtype)
    if allow_bad and draw(st.integers(0, 14)) == 0:
        t = torch.empty_like(t, device="meta")
    return t


def _agree(ours, theirs):
    for a, b in zip(ours, theirs):
        if a.dtype.is_floating_point:
            atol, rtol = TOLERANCES.get(a.dtype, TOLERANCES[torch.float32])
            torch.testing.assert_close(a, b.to(a.dtype), atol=atol * 10, rtol=rtol * 10, equal_nan=True)
        else:
            assert torch.equal(a, b)


def _check(call):
    """call(backend) -> tuple of tensors. Ours must raise ValueError/TypeError
    exactly when the reference does, and otherwise agree with it."""
    try:
        theirs = call("reference")
    except (ValueError, TypeError):
        with pytest.raises((ValueError, TypeError)):
            call("cpu")
        return
    ours = call("cpu")
    if any(t.device.type == "meta" for t in ours):
        return
    _agree(ours, theirs)


@FUZZ
@given(st.data())
def test_fuzz_routing_ops(data):
    draw = data.draw
    T, E = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    k = draw(st.integers(-1, 10))
    logits = _tensor(draw, (T, E))
    mode = draw(st.sampled_from(["softmax_topk", "topk_softmax", "nope"]))
    _check(lambda b: mk.topk_gating(logits, k, mode=mode, backend=b))
    _check(lambda b: mk.router_stats(logits, backend=b))
    other = _tensor(draw, (T, E), allow_bad=draw(st.booleans()))
    noise = _tensor(draw, (T, E), dtype=torch.float32, allow_bad=False)
    sigma = draw(st.sampled_from([0.0, 1.0, -1.0, float("inf"), float("nan")]))
    _check(lambda b: mk.mars_routing(logits, other, k, sigma_0=sigma, sigma_max=1.0, noise=noise, backend=b))
    idx = _tensor(draw, (T, max(k, 0)), dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.float32])))
    _check(lambda b: (mk.switch_balance_loss(logits, idx, backend=b),))


@FUZZ
@given(st.data())
def test_fuzz_noisy_gating(data):
    draw = data.draw
    T, D, E = draw(st.integers(0, 7)), draw(st.integers(1, 5)), draw(st.integers(1, 7))
    x = _tensor(draw, (T, D))
    wg, wn = _tensor(draw, (D, E), allow_bad=draw(st.booleans())), _tensor(draw, (D, E), allow_bad=False)
    noise = _tensor(draw, (T, E), dtype=torch.float32, allow_bad=False)
    k, training = draw(st.integers(0, 8)), draw(st.booleans())
    eps = draw(st.sampled_from([1e-2, 0.0, -1.0]))
    _check(lambda b: mk.noisy_topk_gating(x, wg, wn, k, training=training, noise=noise, noise_eps=eps, backend=b))


@FUZZ
@given(st.data())
def test_fuzz_dispatch_and_experts(data):
    draw = data.draw
    T, D, H, E, k = (draw(st.integers(0, 9)), draw(st.integers(1, 6)), draw(st.integers(1, 6)),
                     draw(st.integers(1, 6)), draw(st.integers(1, 3)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    idx = torch.randint(0, E, (T, k), generator=g)
    if draw(st.integers(0, 5)) == 0 and idx.numel():
        idx.view(-1)[0] = draw(st.sampled_from([-1, E, E + 1]))
    meta_or_error = None
    try:
        meta = mk.moe_align(idx, E, backend="cpu")
    except ValueError:
        meta_or_error = "error"
        meta = mk.moe_align(idx.clamp(0, E), E)
    if meta_or_error:
        with pytest.raises(ValueError):
            mk.moe_align(idx, E, backend="reference")
    if draw(st.integers(0, 5)) == 0:  # forge one field
        field = draw(st.sampled_from(["permutation", "inverse", "offsets"]))
        meta = meta._replace(**{field: getattr(meta, field) + draw(st.sampled_from([-5, 3, 10**6]))})
    x = _tensor(draw, (T, D))
    w = _tensor(draw, (T, k), allow_bad=draw(st.booleans()))
    act = draw(st.sampled_from(["gelu", "silu", "swiglu", "relu", "tanh", "swiglu:interleaved"]))
    h1 = 2 * H if act == "swiglu" else H
    w1, w2 = _tensor(draw, (E, D, h1), dtype=x.dtype), _tensor(draw, (E, H, D), dtype=x.dtype)
    b1 = _tensor(draw, (E, h1), dtype=x.dtype) if draw(st.booleans()) else None
    _check(lambda b: (mk.permute(x, meta, backend=b),))
    ys = _tensor(draw, (T * k, D))
    _check(lambda b: (mk.unpermute(ys, meta, w, backend=b),))
    _check(lambda b: (mk.moe_mlp(x, w, meta, w1, b1, w2, None, act, backend=b),))
    _check(lambda b: (mk.grouped_mlp(ys, w1, b1, w2, None, meta, act, backend=b),))
    cap = draw(st.integers(-1, 4))
    _check(lambda b: mk.apply_capacity(idx, w, E, cap))


@FUZZ
@given(st.data())
def test_fuzz_fusion_ops(data):
    draw = data.draw
    T, M, heads = draw(st.integers(0, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    D = heads * draw(st.integers(1, 3)) + draw(st.sampled_from([0, 0, 1]))
    qkv = _tensor(draw, (T, M, 3 * D))
    masked = draw(st.booleans())
    observed = (torch.rand(T, M, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) > 0.5
                if masked else None)
    missing = _tensor(draw, (M, 3 * D), dtype=qkv.dtype, allow_bad=False) if masked else None
    _check(lambda b: (mk.modality_attention(qkv, heads, missing=missing, observed=observed, backend=b),))
    h = _tensor(draw, (T, M, D))
    y = _tensor(draw, (T, M, D), dtype=h.dtype, allow_bad=draw(st.booleans()))
    weight, bias = torch.ones(D, dtype=h.dtype), torch.zeros(D, dtype=h.dtype)
    miss = _tensor(draw, (M, D), dtype=h.dtype, allow_bad=False) if masked else None
    eps = draw(st.sampled_from([1e-5, 0.0, -1.0]))
    _check(lambda b: (mk.residual_norm_mean(y, h, weight, bias, missing=miss, observed=observed, eps=eps,
                                            backend=b),))
