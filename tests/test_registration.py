"""torch.library.opcheck on every registered op, and torch.compile(fullgraph=True)
tracing a module built on the ops."""
import pytest
import torch

import mars_kernels as mk
from helpers import CUDA, INTERPRETING

ops = torch.ops.mars_kernels
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _sample(device, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    T, E, k = 9, 7, 2
    logits = torch.randn(T, E, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    raw = torch.randn(T, E, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    noise = torch.randn(T, E, generator=g).to(device)
    return logits, raw, noise, k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward_ops(device, dtype, requires_grad):
    logits, raw, noise, k = _sample(device, dtype, requires_grad)
    for softmax_first, renorm in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(ops.topk_gating_fwd.default, (logits, k, softmax_first, renorm))
    torch.library.opcheck(ops.noisy_topk_gating_fwd.default, (logits, raw, noise, k, 0.01))
    torch.library.opcheck(ops.router_stats_fwd.default, (logits,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_ops(device):
    logits, raw, noise, k = _sample(device, torch.float32, False)
    w, i, lse = ops.topk_gating_fwd(logits, k, True, False)
    torch.library.opcheck(ops.topk_gating_bwd.default, (torch.randn_like(w), logits, w, i, lse, True, False))
    nw, ni, nt, imp, load = ops.noisy_topk_gating_fwd(logits, raw, noise, k, 0.01)
    args = (torch.randn_like(nw), torch.randn_like(imp), torch.randn_like(load), logits, raw, noise, nw, ni, nt, 0.01)
    torch.library.opcheck(ops.noisy_topk_gating_bwd.default, args)
    lse2, ps = ops.router_stats_fwd(logits)
    torch.library.opcheck(ops.router_stats_bwd.default, (torch.randn_like(lse2), torch.randn_like(ps), logits, lse2))


class TinyRouter(torch.nn.Module):
    def __init__(self, d, e, k, backend):
        super().__init__()
        self.proj = torch.nn.Linear(d, e)
        self.w_gate = torch.nn.Parameter(torch.randn(d, e) * 0.1)
        self.w_noise = torch.nn.Parameter(torch.randn(d, e) * 0.1)
        self.k, self.backend = k, backend

    def forward(self, x, noise):
        logits = self.proj(x)
        w, i = mk.topk_gating(logits, self.k, backend=self.backend)
        nw, _, imp, load = mk.noisy_topk_gating(
            x, self.w_gate, self.w_noise, self.k, training=True, noise=noise, backend=self.backend
        )
        aux = mk.router_z_loss(logits, backend=self.backend) + mk.switch_balance_loss(logits, i, backend=self.backend)
        return (w * i.float()).sum() + nw.sum() + mk.noisy_balance_loss(imp, load) + aux


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch.manual_seed(0)
    model = TinyRouter(6, 8, 2, "cpu")
    x, noise = torch.randn(16, 6), torch.randn(16, 8)
    eager = model(x, noise)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    out = compiled(x, noise)
    out.backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_dispatch_ops(device, dtype):
    g = torch.Generator().manual_seed(0)
    T, D, H, E, k = 11, 6, 5, 4, 2
    _, idx = mk.topk_gating(torch.randn(T, E, generator=g), k)
    idx = idx.to(device)
    torch.library.opcheck(ops.moe_align.default, (idx, E, 4))
    counts, offsets, perm, inv, bexp, bstart = ops.moe_align(idx, E, 4)
    x = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    w = torch.rand(T, k, generator=g).to(device)
    ys = torch.randn(T * k, D, generator=g).to(device=device, dtype=dtype)
    torch.library.opcheck(ops.moe_permute.default, (x, perm, inv, k))
    torch.library.opcheck(ops.moe_unpermute.default, (ys, perm, inv, w, k))
    torch.library.opcheck(ops.moe_unpermute.default, (ys, perm, inv, None, k))
    torch.library.opcheck(ops.moe_unpermute_bwd.default, (x, ys, perm, inv, w))
    if device == "cuda":
        return  # the expert MLP runs on Triton on a GPU
    w1, w2 = torch.randn(E, D, 2 * H, dtype=dtype), torch.randn(E, H, D, dtype=dtype)
    b1, b2 = torch.randn(E, 2 * H, dtype=dtype), torch.randn(E, D, dtype=dtype)
    for act, W1, B1 in (("gelu", w1[..., :H].contiguous(), b1[:, :H].contiguous()), ("swiglu", w1, b1)):
        torch.library.opcheck(ops.grouped_mlp_fwd.default, (ys, offsets, W1, B1, w2, b2, act))
        torch.library.opcheck(ops.grouped_mlp_fwd.default, (ys, offsets, W1, None, w2, None, act))
        torch.library.opcheck(ops.grouped_mlp_fwd.default, (ys, offsets, W1, B1, w2, b2, act, False))
        _, h = ops.grouped_mlp_fwd(ys, offsets, W1, B1, w2, b2, act)
        torch.library.opcheck(ops.grouped_mlp_bwd.default, (torch.randn_like(ys), ys, h, offsets, W1, w2, act))
        meta = (perm, inv, offsets, bexp, bstart, k, 4)
        for save_h in (True, False):
            torch.library.opcheck(ops.moe_mlp_fwd.default, (x, w, *meta, W1, B1, w2, b2, act, save_h))
        _, h = ops.moe_mlp_fwd(x, w, *meta, W1, B1, w2, b2, act, True)
        torch.library.opcheck(ops.moe_mlp_bwd.default, (torch.randn_like(x), x, w, *meta, W1, w2, b2, h, act))


@pytest.mark.parametrize("router", ["topk", "noisy"])
def test_torch_compile_fullgraph_sparse_moe(router):
    torch.manual_seed(0)
    layer = mk.SparseMoE(8, 16, 6, 2, router=router, backend="cpu", capacity_factor=1.5)
    if router == "noisy":
        torch.nn.init.normal_(layer.router.w_gate)
    layer.eval()  # no noise: eager and compiled must agree exactly
    x = torch.randn(3, 10, 8)
    y, aux = layer(x)
    (y.sum() + aux["balance_loss"]).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in layer.parameters()]  # w_noise: unused in eval
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y2, aux2 = compiled(x)
    (y2.sum() + aux2["balance_loss"]).backward()
    torch.testing.assert_close(y2, y)
    for key in aux:
        torch.testing.assert_close(aux2[key], aux[key])
    for p, g in zip(layer.parameters(), grads):
        assert (p.grad is None) == (g is None)
        if g is not None:
            torch.testing.assert_close(p.grad, g)


# --------------------------------------------------------------------------- one registration path

triton_ops = getattr(torch.ops, mk.library.TRITON)
# The Triton twins run on CUDA tensors with a GPU (tier 3) and under the
# interpreter on CPU tensors without one.
TRITON_DEVICE = "cuda" if CUDA else "cpu"
on_triton_device = pytest.mark.gpu if CUDA else pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1")


def test_every_compiled_op_is_registered_in_one_place():
    """Every op of the namespace (each one the compiled extension has kernels
    for among them) is declared through mars_kernels.library.register, with its
    fake (and, where it has a launcher, its Triton twin with the same schema)."""
    names = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mars_kernels::"))
    registered = mk.library.registered()
    assert sorted(registered) == names
    for name in names:  # a kernel of _C without its Python schema would have none
        assert torch._C._dispatch_find_schema_or_throw(f"mars_kernels::{name}", "") is not None
        tensor_args = any("Tensor" in str(a.type) for a in getattr(ops, name).default._schema.arguments)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mars_kernels::{name}", "Meta") == tensor_args, name
    for name, spaces in registered.items():
        if mk.library.TRITON in spaces:
            a = str(getattr(ops, name).default._schema).split("(", 1)[1]
            b = str(getattr(triton_ops, name).default._schema).split("(", 1)[1]
            assert a == b, f"{name}: the Triton twin's schema differs"


def test_backend_table_is_explicit():
    table = mk.backend.TABLE
    assert all(set(row) == {"reference", "cpu", "cuda", "triton"} for row in table.values())
    assert table["moe_mlp"]["cuda"] == "triton"  # no hand-written CUDA kernel: stated, not hidden
    with pytest.raises(ValueError, match="no 'cpu' implementation of 'nonexistent'"):
        mk.backend.implementation("nonexistent", "cpu")


def _triton_samples():
    """(op name, args) for every Triton twin, tiny float32 shapes."""
    g = torch.Generator().manual_seed(0)
    T, E, k, D, H, M = 6, 5, 2, 8, 6, 3

    def r(*shape):
        return torch.randn(*shape, generator=g)

    logits, raw, noise = r(T, E), r(T, E), r(T, E)
    _, idx = mk.topk_gating(logits, k)
    counts, offsets, perm, inv, bexp, bstart = ops.moe_align(idx, E, 16)
    x, w = r(T, D), torch.rand(T, k, generator=g)
    w1, b1, w2, b2 = r(E, D, H) / 3, r(E, H), r(E, H, D) / 3, r(E, D)
    qkv, missing, observed = r(T, M, 3 * D), r(M, 3 * D), torch.rand(T, M, generator=g) > 0.3
    h, y = r(T, M, D), r(T, M, D)
    return [
        ("topk_gating_fwd", (logits, k, True, True)),
        ("router_stats_fwd", (logits,)),
        ("noisy_topk_gating_fwd", (logits, raw, noise, k, 0.01)),
        ("mars_routing_fwd", (logits, raw, noise, k, 1.0, 0.0, 1.0)),
        ("moe_mlp_fwd", (x, w, perm, inv, offsets, bexp, bstart, k, 16, w1, b1, w2, b2, "gelu", True)),
        ("grouped_mlp_fwd", (r(T * k, D), offsets, w1, b1, w2, b2, "silu", True)),
        ("modality_attention_fwd", (qkv, 2, None, missing, observed)),
        ("residual_norm_mean_fwd", (y, h, r(D), r(D), missing[:, :D].contiguous(), observed, 1e-5)),
    ]


@on_triton_device
@pytest.mark.parametrize("name,args", _triton_samples(), ids=[s[0] for s in _triton_samples()])
def test_opcheck_triton_ops(name, args):
    """The torch.ops.mars_triton twins (on CPU under TRITON_INTERPRET) pass opcheck
    forward and, through their autograd formulas, backward."""
    args = tuple(a.to(TRITON_DEVICE).requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                 for a in args)
    torch.library.opcheck(getattr(triton_ops, name).default, args)


@on_triton_device
def test_torch_compile_fullgraph_triton_backend():
    """torch.compile traces a SparseMoE on the Triton ops (custom ops + fakes)."""
    torch.manual_seed(0)
    layer = mk.SparseMoE(8, 12, 5, 2, backend="triton").eval().to(TRITON_DEVICE)
    x = torch.randn(2, 7, 8, device=TRITON_DEVICE)
    y, aux = layer(x)
    (y.sum() + aux["balance_loss"]).backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    y2, aux2 = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    (y2.sum() + aux2["balance_loss"]).backward()
    torch.testing.assert_close(y2, y)
    for p, g in zip(layer.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_torch_compile_dynamic_fullgraph_of_the_noisy_ops_and_layers():
    """dynamic=True passes float arguments as symbolic numbers and sizes as
    symbols: the argument checks (no math.isfinite on a SymFloat) and the
    random draws (randn/rand with symbolic sizes) must trace. (aot_eager:
    Dynamo's full-graph capture and the fake/autograd tracing are what is
    tested; inductor's code generation is tested elsewhere.)"""
    torch.manual_seed(0)
    x, wg, wn = torch.randn(16, 8), torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    noisy = torch.compile(lambda x, wg, wn, eps: mk.noisy_topk_gating(x, wg, wn, 2, training=True, noise_eps=eps),
                          dynamic=True, fullgraph=True, backend="aot_eager")
    w, idx, importance, load = noisy(x, wg, wn, 0.01)
    assert w.shape == (16, 2) and idx.shape == (16, 2) and importance.shape == (4,)
    (w.sum() + load.sum()).backward()
    assert wg.grad is not None
    routing = torch.compile(lambda a, b, s: mk.mars_routing(a, b, 2, sigma_0=s, sigma_max=1.0),
                            dynamic=True, fullgraph=True, backend="aot_eager")
    assert routing(torch.randn(16, 4), torch.randn(16, 4), 0.5)[0].shape == (16, 2)
    moe = torch.compile(mk.SparseMoE(8, 16, 4, 2, router="noisy").train(), dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (5, 7):  # a second size: the symbolic shape is reused
        y, aux = moe(torch.randn(3, n, 8))
        assert y.shape == (3, n, 8)
    mars = torch.compile(mk.MarsMoE(8, 16, 4, 2).train(), dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (5, 9):
        y, aux = mars(torch.randn(n, 8), torch.randn(n, 8))
        assert y.shape == (n, 8) and torch.isfinite(aux["loss"])
    with pytest.raises(ValueError, match="noise_eps must be a finite number > 0"):
        mk.noisy_topk_gating(x, wg, wn, 2, training=True, noise_eps=float("inf"))
