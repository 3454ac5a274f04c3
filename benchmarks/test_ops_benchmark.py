"""pytest-benchmark suite of the ops, for tracking regressions over time.

    pytest benchmarks/ --benchmark-only                         # run and print the table
    pytest benchmarks/ --benchmark-only --benchmark-autosave    # save .benchmarks/<machine>/NNNN_*.json
    pytest benchmarks/ --benchmark-only --benchmark-compare     # compare against the last saved run
    pytest benchmarks/ --benchmark-disable -q                   # each case once: a smoke test (CI)

Each op runs on the compiled backend of the device (``cpu`` here) and on the
``reference`` twin, in one benchmark group per op and shape, so the table
shows both next to each other. The shapes are small enough that the suite
takes about a minute on 2 cores; the ratio scripts beside this file
(``bench_gating.py``, ``bench_moe.py``, ``bench_mars.py``) measure the
headline shapes against external peers with interleaved rounds.
"""
from __future__ import annotations

import pytest
import torch

import mars_kernels as mk

BACKENDS = ["cpu", "reference"] if mk.extension_available() else ["reference"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _threads():
    torch.manual_seed(0)
    yield


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,k", [(16384, 64, 2), (4096, 160, 8)], ids=["T16k-E64-k2", "T4k-E160-k8"])
def test_topk_gating_fwd_bwd(benchmark, backend, T, E, k):
    benchmark.group = f"topk_gating fwd+bwd {T}x{E} k={k}"
    logits = torch.randn(T, E, generator=_gen()).requires_grad_(True)

    def step():
        w, _ = mk.topk_gating(logits, k, backend=backend)
        w.sum().backward()
        logits.grad = None

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_losses(benchmark, backend):
    benchmark.group = "switch balance + z loss 16384x64"
    logits = torch.randn(16384, 64, generator=_gen()).requires_grad_(True)
    _, idx = mk.topk_gating(logits.detach(), 2)

    def step():
        loss = mk.switch_balance_loss(logits, idx, backend=backend) + mk.router_z_loss(logits, backend=backend)
        loss.backward()
        logits.grad = None

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noisy_topk_gating(benchmark, backend):
    benchmark.group = "noisy_topk_gating fwd+bwd 8192x64x32 k=2"
    g = _gen()
    x = torch.randn(8192, 64, generator=g).requires_grad_(True)
    wg = (torch.randn(64, 32, generator=g) * 0.1).requires_grad_(True)
    wn = (torch.randn(64, 32, generator=g) * 0.1).requires_grad_(True)
    noise = torch.randn(8192, 32, generator=g)

    def step():
        w, _, imp, load = mk.noisy_topk_gating(x, wg, wn, 2, training=True, noise=noise, backend=backend)
        (w.sum() + mk.noisy_balance_loss(imp, load)).backward()
        x.grad = wg.grad = wn.grad = None

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mars_routing(benchmark, backend):
    benchmark.group = "mars_routing fwd+bwd 16384x8 k=2"
    g = _gen()
    lr = torch.randn(16384, 8, generator=g).requires_grad_(True)
    lf = torch.randn(16384, 8, generator=g).requires_grad_(True)
    noise = torch.randn(16384, 8, generator=g)

    def step():
        w, _, imitation, _, prob_sum = mk.mars_routing(lr, lf, 2, sigma_0=1.0, sigma_max=1.0, noise=noise,
                                                      backend=backend)
        (w.sum() + imitation.mean() + prob_sum.square().sum()).backward()
        lr.grad = lf.grad = None

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_align_permute_unpermute(benchmark, backend):
    benchmark.group = "moe_align + permute + unpermute 16384x128 E=64 k=2"
    g = _gen()
    _, idx = mk.topk_gating(torch.randn(16384, 64, generator=g), 2)
    w = torch.rand(16384, 2, generator=g)
    x = torch.randn(16384, 128, generator=g)

    def step():
        meta = mk.moe_align(idx, 64, backend=backend)
        return mk.unpermute(mk.permute(x, meta, backend=backend), meta, w, backend=backend)

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4096, 128, 64, 32, 4), (8192, 128, 256, 8, 2)], ids=["fine", "coarse"])
def test_sparse_moe_fwd_bwd(benchmark, backend, shape):
    T, D, H, E, k = shape
    benchmark.group = f"SparseMoE fwd+bwd T={T} D={D} H={H} E={E} k={k}"
    layer = mk.SparseMoE(D, H, E, k, backend=backend)
    x = torch.randn(T, D, generator=_gen()).requires_grad_(True)

    def step():
        y, aux = layer(x)
        (y.square().mean() + 0.01 * aux["balance_loss"]).backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fusion_ops(benchmark, backend):
    """The MARS fusion: modality attention + residual LayerNorm mean, two masks per call."""
    benchmark.group = "modality_attention + residual_norm_mean fwd+bwd T=4096 M=3 D=64 P=2"
    g = _gen()
    T, M, D, P = 4096, 3, 64, 2
    qkv = torch.randn(T, M, 3 * D, generator=g).requires_grad_(True)
    missing = torch.randn(M, 3 * D, generator=g).requires_grad_(True)
    h = torch.randn(T, M, D, generator=g).requires_grad_(True)
    miss_h = torch.randn(M, D, generator=g).requires_grad_(True)
    weight, bias = torch.ones(D, requires_grad=True), torch.zeros(D, requires_grad=True)
    observed = torch.rand(P, T, M, generator=g) > 0.4

    def step():
        o = mk.modality_attention(qkv, 4, missing=missing, observed=observed, backend=backend)
        z = mk.residual_norm_mean(o, h, weight, bias, missing=miss_h, observed=observed, backend=backend)
        z.square().mean().backward()
        for t in (qkv, missing, h, miss_h, weight, bias):
            t.grad = None

    benchmark(step)
