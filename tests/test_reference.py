"""Tier 1: the reference ops against deliberately naive per-token loops, and
gradcheck of the reference in float64."""
import math

import pytest
import torch

import mars_kernels as mk
from mars_kernels import reference as ref
from helpers import assert_close, make_logits


def loop_topk(row: list[float], k: int) -> list[int]:
    """Selection by hand: larger first, lower index on ties, NaN as +inf."""
    key = [math.inf if math.isnan(v) else v for v in row]
    chosen: list[int] = []
    for _ in range(k):
        best = None
        for e, v in enumerate(key):
            if e not in chosen and (best is None or v > key[best]):
                best = e
        chosen.append(best)
    return chosen


def loop_noisy_gating(clean, raw, noise, k, noise_eps, training):
    """Shazeer et al. (2017) eqs. by hand, one token at a time, in float64."""
    T, E = len(clean), len(clean[0])
    weights, indices = [], []
    importance, load = [0.0] * E, [0.0] * E
    for t in range(T):
        std = [math.log1p(math.exp(r)) + noise_eps for r in raw[t]] if training else [0.0] * E
        h = [clean[t][e] + noise[t][e] * std[e] for e in range(E)] if training else list(clean[t])
        order = loop_topk(h, min(k + 1, E))
        top = order[:k]
        z = sum(math.exp(h[e] - h[top[0]]) for e in top)
        w = [math.exp(h[e] - h[top[0]]) / z for e in top]
        weights.append(w)
        indices.append(top)
        for e, we in zip(top, w):
            importance[e] += we
        for e in range(E):
            if not training:
                load[e] += 1.0 if e in top else 0.0
            elif k == E:
                load[e] += 1.0
            else:
                kth_excluding = h[order[k]] if e in top else h[order[k - 1]]
                load[e] += 0.5 * math.erfc(-((clean[t][e] - kth_excluding) / std[e]) / math.sqrt(2))
    return weights, indices, importance, load


@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (9, 7, 2), (12, 5, 5), (20, 16, 1)])
def test_topk_gating_reference_vs_loop(T, E, k):
    logits = make_logits(T, E, torch.float64, ties=(E == 7))
    logits[0, 0] = float("nan") if T > 1 else logits[0, 0]
    for mode, renorm in [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", True)]:
        w, i = ref.topk_gating(logits, k, mode=mode, renormalize=renorm)
        for t in range(T):
            row = logits[t].tolist()
            idx = loop_topk(row, k)
            assert i[t].tolist() == idx
            if any(math.isnan(v) for v in row):
                assert bool(torch.isnan(w[t]).all())
                continue
            if mode == "topk_softmax" or renorm:
                den = sum(math.exp(row[e]) for e in idx)
            else:
                den = sum(math.exp(v) for v in row)
            assert w[t].tolist() == pytest.approx([math.exp(row[e]) / den for e in idx], rel=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("T,D,E,k", [(11, 5, 6, 2), (7, 3, 4, 4), (16, 8, 9, 1), (1, 2, 1, 1)])
def test_noisy_gating_reference_vs_loop(training, T, D, E, k):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    wg = torch.randn(D, E, generator=g, dtype=torch.float64)
    wn = torch.randn(D, E, generator=g, dtype=torch.float64)
    noise = torch.randn(T, E, generator=g, dtype=torch.float64)
    w, i, imp, load = ref.noisy_topk_gating(x, wg, wn, k, training=training, noise=noise, noise_eps=0.01)
    lw, li, limp, lload = loop_noisy_gating((x @ wg).tolist(), (x @ wn).tolist(), noise.tolist(), k, 0.01, training)
    assert i.tolist() == li
    assert w.tolist() == [pytest.approx(r, rel=1e-12) for r in lw]
    assert imp.tolist() == pytest.approx(limp, rel=1e-12)
    assert load.tolist() == pytest.approx(lload, rel=1e-12)


def test_aux_losses_reference_vs_loop():
    logits = make_logits(30, 5, torch.float64)
    _, idx = ref.topk_gating(logits, 2)
    p = torch.softmax(logits, -1)
    E = 5
    f = [sum(int(e == j) for row in idx.tolist() for j in row) / idx.numel() for e in range(E)]
    P = [float(p[:, e].mean()) for e in range(E)]
    assert float(ref.switch_balance_loss(logits, idx)) == pytest.approx(E * sum(a * b for a, b in zip(f, P)))
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert float(ref.router_z_loss(logits)) == pytest.approx(sum(v * v for v in lse) / len(lse))
    v = [3.0, 1.0, 2.0, 6.0]
    mean = sum(v) / 4
    var = sum((a - mean) ** 2 for a in v) / 3
    assert float(ref.cv_squared(torch.tensor(v))) == pytest.approx(var / (mean**2 + 1e-10), rel=1e-6)
    assert float(ref.cv_squared(torch.tensor([4.0]))) == 0.0
    assert float(ref.switch_balance_loss(logits[:0], idx[:0])) == 0.0
    assert float(ref.router_z_loss(logits[:0])) == 0.0


def test_uniform_routing_balance_loss_is_one():
    logits = torch.zeros(8, 4, dtype=torch.float64)
    idx = torch.arange(8).remainder(4).unsqueeze(1)
    assert float(ref.switch_balance_loss(logits, idx)) == pytest.approx(1.0)


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    wg = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    wn = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(6, 7, generator=g, dtype=torch.float64)

    def noisy(x, wg, wn):
        w, _, imp, load = ref.noisy_topk_gating(x, wg, wn, 2, training=True, noise=noise)
        return w, imp, load

    assert torch.autograd.gradcheck(noisy, (x, wg, wn))
    logits = make_logits(5, 6, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda l: ref.topk_gating(l, 2, renormalize=False)[0], (logits,))


def test_eval_mode_never_divides_by_zero():
    x = torch.zeros(4, 3)
    w = torch.zeros(3, 5)
    weights, idx, imp, load = mk.noisy_topk_gating(x, w, w, 2, training=False, backend="reference")
    assert bool(torch.isfinite(weights).all()) and bool(torch.isfinite(load).all())
    assert load.tolist() == [4.0, 4.0, 0.0, 0.0, 0.0]  # all ties -> the two lowest experts
