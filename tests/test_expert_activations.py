"""The expert MLP's activations (mars_kernels.ops.Activation) on every backend:
plain, gated with [gate | up] halves or interleaved columns, and the clamped
SwiGLU of GPT-OSS-style experts; HF-style strided weight views; parsing."""
from __future__ import annotations

import pytest
import torch

import mars_kernels as mk
from helpers import TOLERANCES, cpu_backends

SPECS = [
    "gelu", "gelu_tanh", "silu", "relu", "relu2", "swiglu", "geglu", "geglu_tanh", "reglu",
    "swiglu:interleaved", "geglu_tanh:interleaved",
    "swiglu_clamp:alpha=1.702:limit=0.7:up_offset=1",
    "swiglu_clamp:interleaved:alpha=1.702:limit=0.7:up_offset=1",
    "swiglu_clamp:limit=0.5",
]


def _problem(spec, dtype=torch.float32, T=19, D=12, H=10, E=5, k=2, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    gated = mk.ops.parse_activation(spec).gated
    H1 = 2 * H if gated else H
    _, idx = mk.topk_gating(torch.randn(T, E, generator=g), k)
    idx[0] = torch.arange(k)  # expert 0 used; with E > T*k/... some experts may be empty
    tensors = dict(
        x=torch.randn(T, D, generator=g), w=torch.rand(T, k, generator=g),
        w1=torch.randn(E, D, H1, generator=g) / D**0.5, b1=torch.randn(E, H1, generator=g) if bias else None,
        w2=torch.randn(E, H, D, generator=g) / H**0.5, b2=torch.randn(E, D, generator=g) if bias else None,
    )
    tensors = {n: (t.to(dtype) if t is not None and n != "w" else t) for n, t in tensors.items()}
    return tensors, idx, torch.randn(T, D, generator=g).to(dtype)


def _run(tensors, idx, gy, spec, backend):
    leaves = {n: t.clone().requires_grad_(True) for n, t in tensors.items() if t is not None}
    args = {n: leaves.get(n) for n in tensors}
    meta = mk.moe_align(idx, tensors["w1"].shape[0], mk.backend.EXPERT_BLOCK_SIZE[backend], backend=backend)
    y = mk.moe_mlp(args["x"], args["w"], meta, args["w1"], args["b1"], args["w2"], args["b2"], spec, backend=backend)
    (y.float() * gy.float()).sum().backward()
    return y.detach(), {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("spec", SPECS)
def test_activation_matches_reference(spec, backend):
    tensors, idx, gy = _problem(spec)
    y, grads = _run(tensors, idx, gy, spec, backend)
    ry, rgrads = _run({n: (t.double() if t is not None else None) for n, t in tensors.items()}, idx, gy, spec,
                      "reference")
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y, ry.float(), atol=atol * 5, rtol=rtol * 5)
    for name, g in grads.items():
        torch.testing.assert_close(g, rgrads[name].to(g.dtype), atol=atol * 5, rtol=rtol * 5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("spec", ["swiglu", "swiglu_clamp:interleaved:alpha=1.702:limit=0.7:up_offset=1", "gelu_tanh"])
def test_activation_bf16_cpu(spec):
    tensors, idx, gy = _problem(spec, torch.bfloat16)
    y, grads = _run(tensors, idx, gy, spec, "cpu")
    ry, rgrads = _run({n: (t.double() if t is not None else None) for n, t in tensors.items()}, idx, gy, spec,
                      "reference")
    torch.testing.assert_close(y.double(), ry, atol=5e-2, rtol=5e-2)
    for name, g in grads.items():
        torch.testing.assert_close(g.double(), rgrads[name], atol=8e-2, rtol=8e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", cpu_backends(reference=True))
def test_strided_weight_views_get_gradients_in_their_own_layout(backend):
    """HF stores gate_up_proj [E, 2I, D] and down_proj [E, D, I] and applies them
    as x @ W^T: the kernels take the transposed views, and the gradients reach
    the parameters in the parameters' layout (no copy on the way back)."""
    tensors, idx, gy = _problem("swiglu", bias=False)
    gate_up = tensors["w1"].transpose(1, 2).contiguous().requires_grad_(True)  # [E, 2I, D]
    down = tensors["w2"].transpose(1, 2).contiguous().requires_grad_(True)     # [E, D, I]
    meta = mk.moe_align(idx, 5, mk.backend.EXPERT_BLOCK_SIZE[backend], backend=backend)
    y = mk.moe_mlp(tensors["x"], tensors["w"], meta, gate_up.transpose(1, 2), None, down.transpose(1, 2), None,
                   "swiglu", backend=backend)
    (y * gy).sum().backward()
    _, ref = _run(tensors, idx, gy, "swiglu", "reference")
    torch.testing.assert_close(gate_up.grad, ref["w1"].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(down.grad, ref["w2"].transpose(1, 2), atol=1e-5, rtol=1e-5)
    if backend != "reference":
        assert gate_up.grad.is_contiguous() and down.grad.is_contiguous()


def test_grouped_mlp_activations():
    tensors, idx, _ = _problem("swiglu:interleaved")
    meta = mk.moe_align(idx, 5)
    xs = mk.permute(tensors["x"], meta)
    outs = [mk.grouped_mlp(xs, tensors["w1"], tensors["b1"], tensors["w2"], tensors["b2"], meta,
                           "swiglu:interleaved", backend=b) for b in cpu_backends(reference=True)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    ("tanh", "activation must be one of"),
    ("gelu:interleaved", "unknown option 'interleaved'"),
    ("swiglu:alpha=2", "unknown option 'alpha=2'"),
    ("swiglu_clamp:limit=x", "is not a number"),
    ("swiglu_clamp:limit=-1", "out of range"),
    ("swiglu_clamp:alpha=nan", "out of range"),
])
def test_activation_spec_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        mk.ops.parse_activation(bad)
    tensors, idx, _ = _problem("silu")
    meta = mk.moe_align(idx, 5)
    for backend in ("reference", "cpu"):
        with pytest.raises(ValueError, match=match):
            mk.moe_mlp(tensors["x"], tensors["w"], meta, tensors["w1"], None, tensors["w2"], None, bad,
                       backend=backend)


def test_raw_op_parses_the_spec_in_cpp():
    tensors, idx, _ = _problem("silu")
    c, off, perm, inv, be, bs = torch.ops.mars_kernels.moe_align(idx, 5, 64)
    with pytest.raises(ValueError, match="unknown option"):
        torch.ops.mars_kernels.moe_mlp_fwd(tensors["x"], tensors["w"], perm, inv, off, be, bs, 2, 64, tensors["w1"],
                                           None, tensors["w2"], None, "silu:interleaved", False)


def test_spec_round_trip():
    act = mk.ops.parse_activation("swiglu_clamp:interleaved:alpha=1.702:limit=7.0:up_offset=1")
    assert act.gated and act.interleaved and act.clamp and act.alpha == 1.702 and act.limit == 7.0
    assert mk.ops.parse_activation(act.spec) == act
