"""MoE-Retriever (mars.baselines.moe_retriever): supporting groups, the
restricted router, the batched retriever against a per-pair loop, the code
variant, training, resume and the segmentation path."""
import json

import pytest
import torch

from mars.baselines.moe_retriever import MoERetrieverModel, RestrictedSMoE, allowed_experts
from mars.baselines.supporting import ELIGIBLE, NONE, TARGET_ONLY, sample_supporting
from mars.data import MultimodalDataset, load_mfeat, make_segmentation
from mars.config import ModelConfig
from mars.methods import build_model
from mars.train import TrainConfig

from helpers import train_interrupted, model_config


# ---------------------------------------------------------------- helpers
def _config(**kw):
    base = dict(method="moe_retriever", d_model=16, d_hidden=32, fusion_heads=2, dropout=0.0, backend="cpu",
                retriever_candidates=3, retriever_shared=2, retriever_k=2)
    base.update(kw)
    return model_config(**base)


def _incomplete_data(n=60, M=5, maps=False, seed=0):
    """Vectors (or 2x2 maps) with an incomplete `available`: only sample 0 has
    modality 3, nobody has modality 4."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 2, 2) if maps else (5,)
    feats = {f"m{i}": torch.randn(n, *shape, generator=g) for i in range(M)}
    avail = torch.rand(n, M, generator=g) < 0.7
    avail[:, 3] = False
    avail[0, 3] = True  # only sample 0 has modality 3
    avail[:, 4] = False
    avail[~avail.any(1), 0] = True
    labels = torch.randint(0, 3, (n,) + ((2, 2) if maps else ()), generator=g)
    return MultimodalDataset([f"m{i}" for i in range(M)], feats, labels, 3,
                             task="segmentation" if maps else "classification", available=avail)


def _model(data, **kw):
    torch.manual_seed(0)
    model = build_model(data.modalities, data.feature_shapes, data.num_classes, data.task, _config(**kw))
    assert isinstance(model, MoERetrieverModel)
    model.prepare(data, seed=0, log=lambda *a: None)
    return model


def _batch(data, idx):
    return {m: data.features[m][idx] for m in data.modalities}


def _observed(avail, seed=1):
    g = torch.Generator().manual_seed(seed)
    obs = avail & (torch.rand(avail.shape, generator=g) < 0.5)
    empty = ~obs.any(1)
    first = avail.float().argmax(1)
    obs[empty, first[empty]] = True
    return obs


# ---------------------------------------------------------------- supporting groups
def _eligible(pool, observed, target):
    need = observed.clone()
    need[torch.arange(len(target)), target] = True
    return (pool[None] | ~need[:, None]).all(-1)  # [Q, P]


def test_supporting_groups_eligible_sized_and_without_replacement():
    g = torch.Generator().manual_seed(0)
    P, M, Q = 12, 4, 400
    pool = torch.rand(P, M, generator=g) < 0.5
    observed = torch.rand(Q, M, generator=g) < 0.5
    target = torch.randint(0, M, (Q,), generator=g)
    observed[torch.arange(Q), target] = False
    observed[~observed.any(1), (target[~observed.any(1)] + 1) % M] = True
    exclude = torch.randint(-1, P, (Q,), generator=g)
    groups = sample_supporting(pool, observed, target, generator=g, exclude=exclude)
    size = observed.sum(1)
    elig = _eligible(pool, observed, target)
    elig[torch.arange(Q)[exclude >= 0], exclude[exclude >= 0]] = False
    count = elig.sum(1)
    assert bool((groups.source == ELIGIBLE).eq(count > 0).all())
    for q in torch.nonzero(groups.source == ELIGIBLE).flatten().tolist():
        rows = groups.index[q][groups.valid[q]]
        assert rows.numel() == size[q]
        assert bool(elig[q, rows].all()), "a supporting sample lacks the target or an observed modality"
        if count[q] >= size[q]:
            assert rows.unique().numel() == rows.numel(), "drawn with replacement although the pool allowed not to"
            assert not groups.replacement[q]
        else:
            assert groups.replacement[q]
    assert int((groups.replacement).sum()) > 0 and int((~groups.replacement).sum()) > 0


def test_supporting_draws_are_uniform():
    P, Q = 10, 20000
    pool = torch.ones(P, 3, dtype=torch.bool)
    observed = torch.tensor([[True, True, False]]).expand(Q, 3).contiguous()
    target = torch.full((Q,), 2)
    groups = sample_supporting(pool, observed, target, generator=torch.Generator().manual_seed(0),
                               exclude=torch.full((Q,), 4))
    assert not bool((groups.index == 4).any())
    assert bool((groups.index[:, 0] != groups.index[:, 1]).all())
    freq = torch.bincount(groups.index.flatten(), minlength=P).float() / (2 * Q)
    expected = torch.full((P,), 1 / 9)
    expected[4] = 0
    assert torch.allclose(freq, expected, atol=0.01)


def test_supporting_fallbacks():
    #              m0     m1     m2     m3
    pool = torch.tensor([[True, False, True, False],   # has m2 but not m1
                         [False, True, True, False],
                         [True, True, False, False],
                         [True, True, True, False]])  # the only row with {m0, m1, m2}
    observed = torch.tensor([[True, True, False, False],   # t=m2: one eligible row, |G| = 2 -> with replacement
                             [True, True, False, False],   # t=m3: nobody has m3 -> NONE
                             [True, False, False, False],  # t=m1: rows 2, 3 eligible, |G| = 1
                             [True, True, False, False]])  # t=m2 with row 3 excluded -> target-only rows 0, 1
    target = torch.tensor([2, 3, 1, 2])
    exclude = torch.tensor([-1, -1, -1, 3])
    groups = sample_supporting(pool, observed, target, generator=torch.Generator().manual_seed(0), exclude=exclude)
    assert groups.source.tolist() == [ELIGIBLE, NONE, ELIGIBLE, TARGET_ONLY]
    assert groups.replacement.tolist() == [True, False, False, False]
    assert groups.index[0].tolist() == [3, 3]
    assert not bool(groups.valid[1].any())
    assert groups.valid[2].tolist() == [True, False] and int(groups.index[2, 0]) in (2, 3)
    assert sorted(groups.index[3].tolist()) == [0, 1]


def test_supporting_rejects_bad_input():
    pool = torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not observe"):
        sample_supporting(pool, torch.tensor([[True, False]]), torch.tensor([0]))
    with pytest.raises(TypeError, match="target must be"):
        sample_supporting(pool, torch.tensor([[True, False]]), torch.tensor([1.0]))


# ---------------------------------------------------------------- router
def _smoe(k, seed=0):
    torch.manual_seed(seed)
    smoe = RestrictedSMoE(8, 16, 3, 3, 2, k, backend="cpu")
    with torch.no_grad():
        smoe.w_gate.normal_()
        smoe.w_noise.normal_()
    return smoe


def test_router_stays_inside_the_allowed_set_and_gates_sum_to_one():
    smoe = _smoe(k=2)
    x, target = torch.randn(300, 8), torch.randint(0, 3, (300,))
    allowed = allowed_experts(3, 3, 2)
    assert allowed.tolist() == [[0, 1, 2, 9, 10], [3, 4, 5, 9, 10], [6, 7, 8, 9, 10]]
    for training in (True, False):
        weights, indices, balance = smoe.route(x, target, training)
        assert bool((indices[:, :, None] == allowed[target][:, None, :]).any(-1).all())
        assert bool((indices[:, 0] != indices[:, 1]).all())
        torch.testing.assert_close(weights.sum(1), torch.ones(300))
        assert torch.isfinite(balance) and balance >= 0
    assert set(indices.flatten().tolist()) == set(range(11))


def test_full_k_without_noise_is_the_dense_softmax_mixture():
    smoe = _smoe(k=5)
    x, target = torch.randn(40, 8), torch.randint(0, 3, (40,))
    y, _, _, _ = smoe(x, target, True, noise=torch.zeros(40, 5))
    allowed = allowed_experts(3, 3, 2)[target]  # [T, A]
    probs = torch.softmax(torch.einsum("td,dta->ta", x, smoe.w_gate[:, allowed]), dim=1)
    ones = torch.ones(40, 1)
    dense = sum(probs[:, j : j + 1] * smoe.experts(x, ones, allowed[:, j : j + 1]) for j in range(5))
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- retriever vs a per-pair loop
def _looped_logits(model, feats, observed, groups):
    """The paper variant one (sample, target) pair at a time, eval mode."""
    cfg, r = model.config, model.retriever
    alpha = cfg.retriever.alpha
    h = model.encode.with_missing(model.encode(feats), observed)  # [B, N, M, D]
    b_all, t_all = model.missing_pairs(observed)
    allowed = r.smoe.allowed
    for q, (b, t) in enumerate(zip(b_all.tolist(), t_all.tolist())):
        if int(groups.source[q]) == NONE:
            continue
        rows = groups.index[q][groups.valid[q]]
        intra = model._encode_modality(t, model.pool_features[model.modalities[t]][rows])  # [G, N, D]
        obs = observed[b].nonzero().flatten().tolist()
        inter = torch.cat([model._encode_modality(m, feats[model.modalities[m]][b : b + 1]) for m in obs])
        x = torch.cat([intra, inter])  # [S, N, D]
        out = []
        for n in range(x.shape[1]):
            seq = x[:, n][None]  # [1, S, D]
            normed = r.norm(seq)
            z = (seq + r.attn(normed, normed, normed, need_weights=False)[0])[0]  # [S, D]
            top = (z @ r.smoe.w_gate[:, allowed[t]]).topk(cfg.retriever.k, dim=1)
            gates = torch.softmax(top.values, dim=1)  # [S, k]
            ones = torch.ones(len(z), 1)
            dense = torch.stack([r.smoe.experts(z, ones, e.expand(len(z), 1)) for e in allowed[t]], 1)  # [S, A, D]
            tokens = (gates[:, :, None] * dense.gather(1, top.indices[:, :, None].expand(-1, -1, z.shape[1]))).sum(1)
            out.append((1 - alpha) * tokens[: len(rows)].mean(0) + alpha * tokens[len(rows):].mean(0))
        h[b, :, t] = torch.stack(out)
    return model.readout(model.fuse(h))


@pytest.mark.parametrize("maps", [False, True], ids=["vectors", "maps"])
def test_batched_retriever_equals_per_pair_loop(maps):
    data = _incomplete_data(maps=maps)
    model = _model(data, retriever_alpha=0.3).eval()
    with torch.no_grad():
        model.retriever.smoe.w_gate.normal_()  # no ties in the top-k
    idx = torch.arange(24)
    feats, observed = _batch(data, idx), _observed(data.available[idx])
    with torch.no_grad():
        groups = model.draw_supporting(observed, "eval")
        assert int((groups.source == NONE).sum()) > 0 and int(groups.replacement.sum()) > 0  # fallbacks exercised
        batched = model(feats, observed, mode="eval", supporting=groups).logits
        looped = _looped_logits(model, feats, observed, groups)
        assert torch.equal(model(feats, observed, mode="eval").logits, batched)  # same seeded draw
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)


def test_code_variant_is_the_weighted_mean_of_raw_embeddings():
    data = _incomplete_data()
    model = _model(data, retriever_variant="code", retriever_alpha=0.3).eval()
    assert model.retriever is None
    idx = torch.arange(20)
    feats, observed = _batch(data, idx), _observed(data.available[idx])
    with torch.no_grad():
        groups = model.draw_supporting(observed, "eval")
        filled, _ = model.complete_tokens(feats, observed, "eval", supporting=groups)
        h = model.encode(feats)
        b_all, t_all = model.missing_pairs(observed)
        for q, (b, t) in enumerate(zip(b_all.tolist(), t_all.tolist())):
            if int(groups.source[q]) == NONE:
                torch.testing.assert_close(filled[b, :, t], model.encode.missing[t].expand_as(filled[b, :, t]))
                continue
            rows = groups.index[q][groups.valid[q]]
            intra = model._encode_modality(t, data.features[model.modalities[t]][rows]).mean(0)
            inter = h[b][:, observed[b]].mean(1)
            torch.testing.assert_close(filled[b, :, t], 0.7 * intra + 0.3 * inter, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(filled.transpose(1, 2)[observed], h.transpose(1, 2)[observed])


# ---------------------------------------------------------------- modes, warm-up, caches
def test_modes_warmup_and_eval_cache():
    data = _incomplete_data()
    model = _model(data, retriever_warmup=2)
    idx = torch.arange(16)
    feats, observed = _batch(data, idx), _observed(data.available[idx])
    with pytest.raises(ValueError, match="not supported by moe_retriever"):
        model(feats, observed, mode="oracle")
    model.set_epoch(1)  # warm-up: the missing embedding stays
    filled, aux = model.complete_tokens(feats, observed, "train")
    torch.testing.assert_close(filled, model.encode.with_missing(model.encode(feats), observed))
    assert aux == {}
    model.set_epoch(2)
    model.eval()
    with torch.no_grad():
        first = model(feats, observed, mode="eval").logits
        assert torch.equal(model(feats, observed, mode="eval").logits, first)
        model.encode.encoders["m1"][0].weight.mul_(2.0)  # the cached pool encodings are now stale
        assert not torch.equal(model(feats, observed, mode="eval").logits, first)
    fresh = build_model(data.modalities, data.feature_shapes, 3, data.task, _config(retriever_warmup=2))
    state = model.state_dict()
    assert not any("pool" in key for key in state)
    fresh.load_state_dict(state)
    assert int(fresh.epoch) == 2
    with pytest.raises(ValueError, match="no supporting pool"):
        fresh(feats, observed, mode="eval")


def test_training_step_reaches_every_retriever_part():
    data = _incomplete_data()
    model = _model(data).train()
    idx = torch.arange(40)
    feats, observed = _batch(data, idx), _observed(data.available[idx])
    out = model(feats, observed, data.available[idx], mode="train", sample_index=idx)
    loss, parts = model.loss(out, data.labels[idx])
    assert set(parts) == {"task", "balance"} and parts["balance"] > 0
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("encode.encoders.m0.0.weight", "encode.encoders.m3.0.weight", "retriever.attn.in_proj_weight",
                 "retriever.norm.weight", "retriever.smoe.w_gate", "retriever.smoe.w_noise",
                 "retriever.smoe.experts.w1", "retriever.smoe.experts.w2", "fuse.attn.in_proj_weight", "head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert out.aux["expert_load"].shape == (3 * 5 + 2,)


def test_segmentation_training_step():
    train_set, _, _ = make_segmentation(n=40, size=4, num_modalities=3, num_classes=3, seed=0)
    model = _model(train_set)
    idx = torch.arange(8)
    out = model(_batch(train_set, idx), _observed(train_set.available[idx]), mode="train", sample_index=idx)
    assert out.logits.shape == (8, 3, 4, 4)
    loss, _ = model.loss(out, train_set.labels[idx], train_set.ignore_index)
    loss.backward()
    assert torch.isfinite(loss) and model.retriever.smoe.w_gate.grad.abs().sum() > 0


# ---------------------------------------------------------------- training loop
@pytest.fixture(scope="module")
def mfeat_small():
    train_set, val_set, test_set = load_mfeat(seed=0)
    return train_set.subset(torch.arange(160)), val_set.subset(torch.arange(40)), test_set.subset(torch.arange(40))


def _tiny(epochs):
    return TrainConfig(epochs=epochs, batch_size=32, model=_config(retriever_warmup=1, dropout=0.1))


def test_train_and_resume_match(tmp_path, mfeat_small):
    full, resumed, _ = train_interrupted(_tiny, 2, 1, tmp_path, mfeat_small)
    lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert "balance" not in lines[0]["loss"] and "balance" in lines[1]["loss"]  # warm-up epoch, then retrieval
    drop = lambda s: {k: v for k, v in s.items() if k != "train_seconds"}  # noqa: E731
    assert drop(resumed["summary"]) == drop(full["summary"])
    assert resumed["test"]["subsets"] == full["test"]["subsets"]
