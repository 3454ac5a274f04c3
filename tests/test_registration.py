"""torch.library.opcheck on every registered op, and torch.compile(fullgraph=True)
tracing a module built on the ops."""
import pytest
import torch

import mars_kernels as mk

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
