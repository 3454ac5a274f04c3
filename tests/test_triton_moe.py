"""Triton fused expert MLP (mars_kernels.ops.triton.expert_mlp) against mars_kernels.reference.

The reference is ``unpermute(grouped_mlp(permute(x, meta), ...), meta, weights)``
differentiated by torch autograd (gate weights included). It runs in float32 on
the same inputs (float16 inputs are upcast), so float16 kernel results are
compared with the exact answer at a float16 tolerance.

Runs on CPU under TRITON_INTERPRET=1 (set by conftest.py before triton is
imported), or on a CUDA GPU when one is present. Shapes stay tiny: the
interpreter simulates every program sequentially with NumPy. The interpreter's
bf16 ``tl.dot`` is wrong (the launchers upcast bf16 off-GPU), so only float32 and
float16 are tested here.
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
from mars_kernels.backend import EXPERT_BLOCK_SIZE  # noqa: E402
from mars_kernels.ops.triton import expert_mlp as M  # noqa: E402

BLOCK_M = EXPERT_BLOCK_SIZE["triton"]


def _meta_args(meta):
    return (meta.permutation, meta.inverse, meta.offsets, meta.block_expert, meta.block_start, meta.top_k,
            meta.block_size)


def fwd(x, weights, meta, w1, b1, w2, b2, act):
    """The launcher with the metadata passed as a MoEMeta (the op schema takes its fields)."""
    return M.moe_mlp_fwd(x, weights, *_meta_args(meta), w1, b1, w2, b2, act, True)


def bwd(grad_y, x, weights, meta, w1, b1, w2, b2, h, act):
    return M.moe_mlp_bwd(grad_y, x, weights, *_meta_args(meta), w1, w2, b2, h, act)

ACTS = ("gelu", "silu", "swiglu")
GRAD_NAMES = ("x", "weights", "w1", "b1", "w2", "b2")


def _tol(dtype):
    """(atol, rtol): the interpreter's dot is exact, so fp32 is tight."""
    if dtype == torch.float32:
        # on a GPU the kernels still use full-precision fp32 dots (no TF32)
        return 1e-4, 1e-4
    return 2e-2, 2e-2


@pytest.fixture(autouse=True)
def _no_tf32():
    if DEVICE == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = old
    else:
        yield


# --------------------------------------------------------------------------
# problem construction
# --------------------------------------------------------------------------
def _routing(T, k, E, g, kind="random", capacity=None):
    """(weights [T, k] f32, indices [T, k] int64) for a routing pattern."""
    logits = torch.randn(T, E, generator=g)
    if kind == "one_expert":  # every token's first choice is expert E // 2
        logits[:, E // 2] += 100.0
    elif kind == "sparse":  # experts outside {0, E//2, E-1} stay empty
        live = sorted({0, E // 2, E - 1})
        assert k <= len(live)
        mask = torch.full((E,), float("-inf"))
        mask[live] = 0.0
        logits = logits + mask
    probs = torch.softmax(logits, dim=-1)
    weights, indices = probs.topk(k, dim=-1)
    if capacity is not None:
        indices, weights, dropped = R.apply_capacity(indices, weights, E, capacity)
        assert int(dropped) > 0, "the capacity case must drop something"
    return weights.contiguous(), indices.contiguous()


def _problem(T, k, E, D, H, act, bias, dtype, *, kind="random", capacity=None, seed=0, block_m=None):
    g = torch.Generator().manual_seed(seed)
    H1 = 2 * H if act == "swiglu" else H
    weights, indices = _routing(T, k, E, g, kind, capacity)
    p = dict(
        x=torch.randn(T, D, generator=g),
        weights=weights,
        w1=torch.randn(E, D, H1, generator=g) / D**0.5,
        b1=0.5 * torch.randn(E, H1, generator=g) if bias else None,
        w2=torch.randn(E, H, D, generator=g) / H**0.5,
        b2=0.5 * torch.randn(E, D, generator=g) if bias else None,
        grad_y=torch.randn(T, D, generator=g),
    )
    for name in ("x", "w1", "b1", "w2", "b2", "grad_y"):
        if p[name] is not None:
            p[name] = p[name].to(dtype)
    p = {n: (t.to(DEVICE) if t is not None else None) for n, t in p.items()}
    p["meta"] = R.moe_align(indices.to(DEVICE), E, block_m or BLOCK_M)
    p["act"] = act
    return p


def _run(p):
    """(y, grads) from the Triton launchers."""
    y, h = fwd(p["x"], p["weights"], p["meta"], p["w1"], p["b1"], p["w2"], p["b2"], p["act"])
    grads = bwd(
        p["grad_y"], p["x"], p["weights"], p["meta"], p["w1"], p["b1"], p["w2"], p["b2"], h, p["act"]
    )
    return y, h, grads


def _reference(p):
    """(y, grads) from the reference with autograd, in float32."""
    leaves = {}
    for name in ("x", "weights", "w1", "b1", "w2", "b2"):
        t = p[name]
        leaves[name] = None if t is None else t.detach().float().clone().requires_grad_(True)
    meta = p["meta"]
    y = R.unpermute(
        R.grouped_mlp(
            R.permute(leaves["x"], meta), leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"], meta, p["act"]
        ),
        meta,
        leaves["weights"],
    )
    y.backward(p["grad_y"].float())
    grads = []
    for name in GRAD_NAMES:
        leaf = leaves[name]
        if leaf is None:
            grads.append(None)
        else:
            grads.append(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
    return y.detach(), grads


def _reference_bias_grads(p):
    """grad_b1 / grad_b2 expected when the biases are None (sums of dh / w*grad_y per expert)."""
    q = dict(p)
    E, H1 = p["w1"].shape[0], p["w1"].shape[2]
    D = p["w2"].shape[2]
    q["b1"] = torch.zeros(E, H1, dtype=p["w1"].dtype, device=DEVICE)
    q["b2"] = torch.zeros(E, D, dtype=p["w2"].dtype, device=DEVICE)
    _, grads = _reference(q)
    return grads[3], grads[5]


def _check(p, what=""):
    dtype = p["x"].dtype
    atol, rtol = _tol(dtype)
    y, h, grads = _run(p)
    y_ref, grads_ref = _reference(p)
    assert y.dtype == dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y.float(), y_ref, atol=atol, rtol=rtol, msg=lambda m: f"{what} y: {m}")
    if p["b1"] is None:
        grads_ref[3], grads_ref[5] = _reference_bias_grads(p)
    inputs = dict(x=p["x"], weights=p["weights"], w1=p["w1"], b1=p["b1"], w2=p["w2"], b2=p["b2"])
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        ref_input = inputs[name]
        want_dtype = ref_input.dtype if ref_input is not None else (p["w1"].dtype)
        assert got.dtype == want_dtype, f"{what} grad_{name} dtype {got.dtype} != {want_dtype}"
        assert got.shape == want.shape, f"{what} grad_{name} shape {tuple(got.shape)} != {tuple(want.shape)}"
        torch.testing.assert_close(
            got.float(), want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{what} grad_{n}: {m}"
        )
    return y, h, grads


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", ACTS)
def test_moe_mlp_basic(act, bias, dtype):
    """T=13 (not a multiple of BLOCK_M), k=2, E=5, odd D=24 / H=40: masked row, K and N tails."""
    p = _problem(13, 2, 5, 24, 40, act, bias, dtype, seed=1)
    _check(p, f"basic {act} bias={bias} {dtype}")


# (T, k, E, D, H, routing kind, capacity): the edge shapes
EDGE_CASES = {
    "T1": (1, 2, 4, 24, 40, "random", None),
    "E1": (9, 1, 1, 16, 24, "random", None),
    "E7_k1": (23, 1, 7, 24, 20, "random", None),
    "E7_kE": (5, 7, 7, 24, 20, "random", None),
    "one_expert": (40, 1, 4, 24, 40, "one_expert", None),
    "empty_experts": (17, 2, 8, 40, 24, "sparse", None),
    "dropped": (19, 2, 5, 24, 40, "random", 4),
}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_moe_mlp_edges(case, act):
    T, k, E, D, H, kind, capacity = EDGE_CASES[case]
    bias = (list(EDGE_CASES).index(case) + ACTS.index(act)) % 2 == 0  # both, per case
    p = _problem(T, k, E, D, H, act, bias, torch.float32, kind=kind, capacity=capacity, seed=len(case))
    if case == "empty_experts":
        counts = p["meta"].counts
        assert (counts == 0).any()
    if case == "one_expert":
        assert int(p["meta"].counts.max()) == T
    _check(p, f"{case} {act}")


@pytest.mark.parametrize("case", ["one_expert", "dropped", "E7_kE"])
def test_moe_mlp_edges_fp16(case):
    T, k, E, D, H, kind, capacity = EDGE_CASES[case]
    p = _problem(T, k, E, D, H, "swiglu", True, torch.float16, kind=kind, capacity=capacity, seed=3)
    _check(p, f"{case} fp16")


@pytest.mark.parametrize("act", ACTS)
def test_moe_mlp_small_blocks(act):
    """BLOCK_M = 16: experts spanning several row blocks, partial last blocks."""
    p = _problem(40, 2, 3, 24, 40, act, True, torch.float32, kind="one_expert", seed=5, block_m=16)
    assert int(p["meta"].counts.max()) > 2 * 16
    _check(p, f"block16 {act}")


def test_moe_mlp_dropped_rows_never_read():
    """Dropped slots: h rows poisoned with NaN must not reach any output; their
    gate-weight gradient is 0."""
    p = _problem(19, 2, 5, 24, 40, "swiglu", True, torch.float32, capacity=4, seed=7)
    meta = p["meta"]
    n_kept = int(meta.offsets[-1])
    assert n_kept < meta.permutation.numel()
    y, h, grads = _check(p, "dropped")
    h = h.clone()
    h[n_kept:] = float("nan")
    grads2 = bwd(
        p["grad_y"], p["x"], p["weights"], meta, p["w1"], p["b1"], p["w2"], p["b2"], h, p["act"]
    )
    for name, a, b in zip(GRAD_NAMES, grads, grads2):
        assert torch.equal(a, b), f"grad_{name} changed when dropped h rows are NaN"
    dropped_flat = meta.permutation[n_kept:]
    assert torch.all(grads[1].reshape(-1)[dropped_flat] == 0)


def test_combine_skips_dropped_rows():
    """The top-k sum never reads the rows of dropped assignments (NaN there is ignored)."""
    g = torch.Generator().manual_seed(11)
    T, k, E, D = 9, 2, 3, 40
    _, indices = _routing(T, k, E, g, capacity=3)
    meta = R.moe_align(indices.to(DEVICE), E, BLOCK_M)
    buf = torch.randn(T * k, D, generator=g).to(DEVICE)
    keep = (indices.reshape(-1) < E).to(DEVICE)
    buf[~keep] = float("nan")
    out = M._combine(buf, meta, T, D, torch.float32)
    want = torch.where(keep[:, None], buf, torch.zeros_like(buf)).view(T, k, D).sum(1)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


def test_moe_mlp_strided_inputs():
    """Non-contiguous x, weights stored transposed, grad_y broadcast (stride 0)."""
    p = _problem(11, 3, 4, 24, 40, "gelu", True, torch.float32, seed=9)
    p["x"] = torch.cat([p["x"], p["x"]], dim=1)[:, ::2]
    assert not p["x"].is_contiguous()
    p["w1"] = p["w1"].transpose(1, 2).contiguous().transpose(1, 2)
    p["w2"] = p["w2"].transpose(1, 2).contiguous().transpose(1, 2)
    p["grad_y"] = p["grad_y"][:1].expand_as(p["grad_y"])
    _check(p, "strided")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_moe_mlp_deterministic(dtype):
    p = _problem(29, 3, 7, 24, 40, "swiglu", True, dtype, seed=13)
    y1, h1, g1 = _run(p)
    y2, h2, g2 = _run(p)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)
    for name, a, b in zip(GRAD_NAMES, g1, g2):
        assert torch.equal(a, b), f"grad_{name} differs between two runs"


def test_moe_mlp_zero_tokens():
    p = _problem(0, 2, 4, 24, 40, "silu", True, torch.float32, seed=0)
    y, h, grads = _run(p)
    assert y.shape == (0, 24) and h.shape == (0, 40)
    assert grads[0].shape == (0, 24) and grads[1].shape == (0, 2)
    for t in grads[2:]:
        assert torch.all(t == 0)


def test_moe_mlp_validation():
    p = _problem(5, 2, 4, 24, 40, "silu", True, torch.float32)
    args = (p["x"], p["weights"], p["meta"], p["w1"], p["b1"], p["w2"], p["b2"])
    with pytest.raises(ValueError, match="activation"):
        fwd(*args, "tanh")
    with pytest.raises(ValueError, match="block_size"):
        bad = R.moe_align(p["meta"].permutation.new_zeros(5, 2), 4, 24)  # not a power of two
        fwd(p["x"], p["weights"], bad, *args[3:], "silu")
    with pytest.raises(ValueError, match="shape"):
        fwd(*args, "swiglu")  # w1 has H, not 2H, columns
    with pytest.raises(TypeError, match="dtype"):
        fwd(p["x"], p["weights"], p["meta"], p["w1"].half(), p["b1"], p["w2"], p["b2"], "silu")
