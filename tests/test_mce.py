"""MCE (mars.baselines.mce): Shapley matrices, the batched subset pass against a
per-sample loop, the LCE gradient gate, frozen teachers, training and resume."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mars.baselines import mce as mce_mod
from mars.baselines.shapley import batch_factors, shapley_matrix
from mars.baselines.subsets import proper_subset_pairs, subset_table
from mars.data import MissingnessProtocol, all_subsets, load_mfeat, make_segmentation
from mars.config import ModelConfig
from mars.methods import build_model
from mars.train import TrainConfig

from helpers import train_interrupted, model_config


def _subsets(M):
    return [frozenset(i for i in range(M) if mask[i]) for mask in all_subsets(M)]


# ---------------------------------------------------------------- Shapley
@pytest.mark.parametrize("M", [2, 3, 4])
def test_exact_shapley_efficiency_symmetry_dummy(M):
    g = torch.Generator().manual_seed(M)
    W = shapley_matrix(M, "exact")
    subsets = _subsets(M)
    assert W.shape == (M, 2**M - 1)
    for _ in range(5):
        v = torch.randn(len(subsets), generator=g, dtype=torch.float64)
        torch.testing.assert_close((W @ v).sum(), v[subsets.index(frozenset(range(M)))])
    # players 0 and 1 interchangeable: v(S) = f(S) + f(S with 0 and 1 swapped)
    f = torch.randn(len(subsets), generator=g, dtype=torch.float64)
    swap = {0: 1, 1: 0}
    v = torch.stack([f[i] + f[subsets.index(frozenset(swap.get(m, m) for m in S))] for i, S in enumerate(subsets)])
    phi = W @ v
    torch.testing.assert_close(phi[0], phi[1])
    # player M-1 a dummy: v(S) = f(S without M-1), with v(empty) = 0
    dummy = M - 1
    v = torch.stack([f[subsets.index(S - {dummy})] if S - {dummy} else torch.tensor(0.0, dtype=torch.float64)
                     for S in subsets])
    phi = W @ v
    assert abs(float(phi[dummy])) < 1e-12
    assert phi[:dummy].abs().sum() > 0  # the others still get credit


def test_code_shapley_matches_the_note():
    v1, v2, v12 = 3.0, 5.0, 11.0
    v = torch.tensor([v1, v2, v12], dtype=torch.float64)  # all_subsets order: {0}, {1}, {0,1}
    torch.testing.assert_close(shapley_matrix(2, "code") @ v, torch.tensor([v12 / 2, v12 / 2], dtype=torch.float64))
    torch.testing.assert_close(shapley_matrix(2, "code", players=3) @ v,
                               torch.tensor([(v1 + v12) / 6, (v2 + v12) / 6], dtype=torch.float64))


def test_shapley_matrix_rejects_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        shapley_matrix(3, "approx")
    with pytest.raises(ValueError, match="players"):
        shapley_matrix(3, "exact", players=7)
    with pytest.raises(ValueError, match="players"):
        shapley_matrix(3, "code", players=2)


def test_batch_factor_is_zero_without_observations_and_clips_at_zero():
    W = shapley_matrix(2, "exact")
    observed = torch.tensor([[True, False], [True, False]])
    correct = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    out = batch_factors(correct, observed, torch.tensor([[0.0, 1.0], [1.0, 1.0]]), W)
    # phi = W v with v = (2, 0, 0): phi_0 = 1, phi_1 = -1; u = (1, 0); n = (2, 0)
    torch.testing.assert_close(out["phi"], torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(out["b"], torch.tensor([0.0, 0.0]))


# ---------------------------------------------------------------- subset pass vs a loop
def _tiny_vectors(seed=0, B=7):
    g = torch.Generator().manual_seed(seed)
    mods, shapes = ["a", "b", "c"], {"a": (5,), "b": (4,), "c": (3,)}
    feats = {m: torch.randn(B, *shapes[m], generator=g) for m in mods}
    observed = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)[:B]
    return mods, shapes, feats, observed, torch.randint(0, 4, (B,), generator=g), None


def _tiny_maps(seed=0, B=5):
    g = torch.Generator().manual_seed(seed)
    mods, shapes = ["a", "b", "c"], {"a": (2, 3, 3), "b": (3, 3, 3), "c": (1, 3, 3)}
    feats = {m: torch.randn(B, *shapes[m], generator=g) for m in mods}
    observed = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)[:B]
    labels = torch.randint(0, 4, (B, 3, 3), generator=g)
    labels[0, 0, :] = 255  # unlabelled pixels
    labels[2] = 255
    return mods, shapes, feats, observed, labels, 255


def _model(mods, shapes, task, **kw):
    torch.manual_seed(0)
    cfg = model_config(**{"method": "mce", "d_model": 8, "d_hidden": 16, "fusion_heads": 2, "dropout": 0.0, **kw})
    return build_model(mods, shapes, 4, task, cfg)


def _looped_reference(model, feats, observed, labels, ignore_index, variant):
    """Per sample, per subset: one forward call each; Shapley by its formula."""
    B, M = observed.shape
    maps = labels.dim() == 3
    h = model.encode(feats)
    ii = ignore_index if ignore_index is not None else -100

    def readout(hc):
        if maps:
            return model.decoder(hc.flatten(2)).transpose(1, 2).reshape(1, 4, 3, 3)
        return model.decoder(hc.mean(dim=1).flatten(1))

    def run(b, keep):
        x = h[b : b + 1] * torch.tensor(keep, dtype=h.dtype)[None, None, :, None] + model.position
        hc = model.complete(x)
        return hc, readout(hc)

    def ce_sum_count(logit, y):
        return F.cross_entropy(logit, y, ignore_index=ii, reduction="sum"), float((y != ii).sum())

    def score(logit, y):
        valid = y != ii
        return float(((logit.argmax(dim=1) == y) & valid).sum()) / max(float(valid.sum()), 1.0)

    v = {S: 0.0 for S in _subsets(M)}
    sub_logits, sub, com = {}, 0.0, [0.0] * M
    sep_sum, sep_count, u, n = [0.0] * M, [0.0] * M, [0.0] * M, [0.0] * M
    for b in range(B):
        y = labels[b : b + 1]
        O = [m for m in range(M) if observed[b, m]]
        K_b = 2 ** len(O) - 1
        full_hc, full_logit = run(b, [m in O for m in range(M)])
        v[frozenset(O)] += score(full_logit, y)
        for r in range(1, len(O)):
            for S in itertools.combinations(O, r):
                hs, logit = run(b, [m in S for m in range(M)])
                sub_logits[(b, frozenset(S))] = logit
                total, count = ce_sum_count(logit, y)
                sub = sub + total / max(count, 1.0) / K_b
                for m in set(O) - set(S):
                    com[m] = com[m] + (full_hc[0, :, m] - hs[0, :, m]).abs().mean() / K_b
                v[frozenset(S)] += score(logit, y)
        for m in O:
            hm = full_hc[0, :, m]  # [N, D]
            if maps:
                lm = (hm @ model.modality_heads.weight[m].T + model.modality_heads.bias[m]).T.reshape(1, 4, 3, 3)
            else:
                lm = (hm.mean(dim=0) @ model.modality_heads.weight[m].T + model.modality_heads.bias[m])[None]
            total, count = ce_sum_count(lm, y)
            sep_sum[m] = sep_sum[m] + total
            sep_count[m] += count
            with torch.no_grad():
                u[m] += score(model.teachers[m](feats[model.modalities[m]][b : b + 1]), y)
            n[m] += 1
    active = sum(1 for b in range(B) if observed[b].any())
    sub = sub / active
    com = torch.stack([torch.as_tensor(c) / active for c in com])
    sep = torch.stack([torch.as_tensor(s) / max(c, 1.0) for s, c in zip(sep_sum, sep_count)])

    players = set(range(M))
    val = lambda S: v[frozenset(S)] if S else 0.0  # noqa: E731
    phi = []
    for m in range(M):
        if variant == "exact":
            total = 0.0
            for r in range(M):
                for S in itertools.combinations(sorted(players - {m}), r):
                    weight = math.factorial(r) * math.factorial(M - r - 1) / math.factorial(M)
                    total += weight * (val(set(S) | {m}) - val(S))
        else:
            total = val({m}) / M
            for S in v:
                if m in S and len(S) >= 2:
                    total += math.factorial(len(S) - 1) * math.factorial(M - len(S)) / math.factorial(M) * (v[S] - val({m}))
        phi.append(total)
    b_factor = [max(u[m] - phi[m], 0.0) / n[m] if n[m] else 0.0 for m in range(M)]
    task = F.cross_entropy(readout_batch(model, h, observed, maps), labels, ignore_index=ii)
    w = torch.tensor([a * bm for a, bm in zip(model.dataset_factor.tolist(), b_factor)])
    cfg = model.config
    parts = {"task": task, "sub": cfg.mce.lambda_sub * sub, "sep": cfg.mce.lambda_sep * (w * sep).mean(),
             "com": cfg.mce.lambda_com * (w * com).sum()}
    return sub_logits, parts, torch.tensor(b_factor), torch.tensor(phi)


def readout_batch(model, h, observed, maps):
    hc = model.complete(h * observed[:, None, :, None].float() + model.position)
    if maps:
        return model.decoder(hc.flatten(2)).transpose(1, 2).reshape(h.shape[0], 4, 3, 3)
    return model.decoder(hc.mean(dim=1).flatten(1))


@pytest.mark.parametrize("variant", ["exact", "code"])
@pytest.mark.parametrize("case", ["vectors", "maps"])
def test_batched_subset_pass_matches_per_sample_loop(variant, case):
    mods, shapes, feats, observed, labels, ignore = (_tiny_vectors if case == "vectors" else _tiny_maps)()
    task = "classification" if case == "vectors" else "segmentation"
    model = _model(mods, shapes, task, mce_shapley=variant, lambda_sub=2.0, lambda_com=0.5)
    model.dataset_factor.copy_(torch.tensor([1.25, 2.0, 5.0]))
    out = model(feats, observed, mode="train")
    sample, column = out.aux["sub_sample"], out.aux["sub_column"]
    masks = model.subset_masks
    ref_logits, ref_parts, ref_b, ref_phi = _looped_reference(model, feats, observed, labels, ignore, variant)
    assert sample.numel() == len(ref_logits) == sum(2 ** int(o.sum()) - 2 for o in observed)
    for p in range(sample.numel()):
        S = frozenset(masks[column[p]].nonzero().flatten().tolist())
        torch.testing.assert_close(out.aux["sub_logits"][p : p + 1], ref_logits[(int(sample[p]), S)])
    terms = model.loss_terms(out, labels, ignore)
    torch.testing.assert_close(terms["b"], ref_b.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["phi"], ref_phi.float(), atol=1e-5, rtol=1e-5)
    assert (terms["b"] > 0).any()  # the weighted parts below are not trivially zero
    total, parts = model.loss(out, labels, ignore)
    for name, ref in ref_parts.items():
        assert parts[name] == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6), name
    assert float(total.detach()) == pytest.approx(sum(float(r.detach()) for r in ref_parts.values()), rel=1e-5)


def test_subset_pairs_enumerate_every_proper_subset():
    masks, _ = subset_table(4)
    observed = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    sample, column = proper_subset_pairs(observed, masks)
    assert torch.bincount(sample, minlength=3).tolist() == [14, 0, 2]
    chosen = masks[column]
    assert bool((chosen & ~observed[sample]).any(dim=1).logical_not().all())
    assert bool((chosen.sum(dim=1) < observed[sample].sum(dim=1)).all())


# ---------------------------------------------------------------- gradients
def test_zero_batch_factor_blocks_modality_specific_gradients(monkeypatch):
    mods, shapes, feats, observed, labels, _ = _tiny_vectors()
    model = _model(mods, shapes, "classification")
    real = mce_mod.batch_factors
    off = 1

    def gated(*args):
        out = real(*args)
        out["b"] = torch.ones_like(out["b"]).index_fill(0, torch.tensor([off]), 0.0)
        return out

    monkeypatch.setattr(mce_mod, "batch_factors", gated)
    out = model(feats, observed, mode="train")
    terms = model.loss_terms(out, labels)
    total = sum(model.combine(terms).values())
    d_sep, d_com = torch.autograd.grad(total, [terms["sep"], terms["com"]], retain_graph=True)
    assert float(d_sep[off]) == 0.0 and float(d_com[off]) == 0.0
    assert bool((d_sep[[0, 2]] > 0).all()) and bool((d_com[[0, 2]] > 0).all())
    total.backward()
    heads = model.modality_heads
    assert float(heads.weight.grad[off].abs().sum()) == 0.0 and float(heads.bias.grad[off].abs().sum()) == 0.0
    assert float(heads.weight.grad[0].abs().sum()) > 0 and float(heads.weight.grad[2].abs().sum()) > 0


def test_training_step_reaches_every_trainable_part_and_not_the_teachers():
    mods, shapes, feats, observed, labels, _ = _tiny_vectors()
    model = _model(mods, shapes, "classification", dropout=0.1)
    model.train()
    out = model(feats, observed, mode="train")
    loss, parts = model.loss(out, labels)
    assert torch.isfinite(loss)
    assert {"task", "sub", "sep", "com", "b/a", "b/b", "b/c"} <= parts.keys()
    assert float(loss.detach()) == pytest.approx(sum(parts[k] for k in ("task", "sub", "sep", "com")), rel=1e-5)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("teachers.") or name == "encode.missing":
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert not any(t.training for t in model.teachers)


@pytest.mark.parametrize("case", ["vectors", "maps"])
def test_batch_without_subset_passes(case):
    mods, shapes, feats, observed, labels, ignore = (_tiny_vectors if case == "vectors" else _tiny_maps)()
    model = _model(mods, shapes, "classification" if case == "vectors" else "segmentation")
    single = torch.zeros_like(observed)
    single[torch.arange(observed.shape[0]), torch.arange(observed.shape[0]) % 3] = True
    out = model(feats, single, mode="train")
    assert out.aux["sub_logits"].shape[0] == 0
    loss, parts = model.loss(out, labels, ignore)
    assert parts["sub"] == 0.0 and parts["com"] == 0.0 and math.isfinite(float(loss.detach()))
    loss.backward()


# ---------------------------------------------------------------- modes and inputs
def test_eval_uses_only_observed_modalities_and_rejects_bad_input():
    mods, shapes, feats, observed, labels, _ = _tiny_vectors()
    model = _model(mods, shapes, "classification").eval()
    changed = {m: torch.where(observed[:, i, None], feats[m], torch.randn_like(feats[m]) * 100) for i, m in enumerate(mods)}
    torch.testing.assert_close(model(feats, observed).logits, model(changed, observed).logits)
    assert model(feats, observed).logits.shape == (7, 4)
    with pytest.raises(ValueError, match="not supported by mce"):
        model(feats, observed, observed, mode="oracle")
    with pytest.raises(ValueError, match="mode"):
        model(feats, observed, mode="test")
    with pytest.raises(ValueError, match="observed"):
        model(feats, observed.float())
    with pytest.raises(ValueError, match="features"):
        model({"a": feats["a"]}, observed)
    with pytest.raises(RuntimeError, match="prepare"):
        model(feats, observed, mode="train", sample_index=torch.arange(7))


@pytest.fixture(scope="module")
def mfeat_small():
    train_set, val_set, test_set = load_mfeat(seed=0)
    return train_set.subset(torch.arange(200)), val_set.subset(torch.arange(80)), test_set.subset(torch.arange(80))


def test_prepare_trains_teachers_caches_scores_and_keeps_the_global_rng(mfeat_small):
    data = mfeat_small[0]
    shapes = {m: tuple(data.features[m].shape[1:]) for m in data.modalities}
    torch.manual_seed(0)
    model = build_model(data.modalities, shapes, data.num_classes, data.task,
                        model_config(method="mce", d_model=16, d_hidden=16, fusion_heads=2, mce_teacher_epochs=2))
    before = [t.head.weight.clone() for t in model.teachers]
    rng = torch.get_rng_state()
    protocol = MissingnessProtocol.parse("rates:0.1,0.2,0.3,0.4,0.5,0.6")
    model.prepare(data, protocol=protocol, seed=3, resume=False, log=lambda *a: None)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not torch.equal(t.head.weight, w) for t, w in zip(model.teachers, before))
    assert "teacher_correct" not in model.state_dict() and "teachers.0.head.weight" in model.state_dict()
    assert model.teacher_correct.shape == (200, 6) and float(model.teacher_correct.mean()) > 0.3
    rates = torch.tensor(protocol.expected_missing_rates(6))
    torch.testing.assert_close(model.dataset_factor, (1 / (1 - rates)).float())
    # cached scores (sample_index) and teachers run on the fly give the same loss
    model.eval()
    idx = torch.arange(50, 114)
    feats = {m: data.features[m][idx] for m in data.modalities}
    observed = protocol.sample(torch.ones(64, 6, dtype=torch.bool), torch.Generator().manual_seed(1))
    cached = model.loss(model(feats, observed, mode="train", sample_index=idx), data.labels[idx])[1]
    fly = model.loss(model(feats, observed, mode="train"), data.labels[idx])[1]
    assert cached == fly
    # resume: only the cache is rebuilt, a_m off when mce_use_a is False
    model.config.mce.use_a = False
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.prepare(data, protocol=protocol, seed=3, resume=True, log=lambda *a: None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items() if k != "dataset_factor")
    assert torch.equal(model.dataset_factor, torch.ones(6))


def _tiny_run(epochs):
    return TrainConfig(epochs=epochs, batch_size=32, model=model_config(method="mce", d_model=16, d_hidden=16,
                                                                        fusion_heads=2, mce_teacher_epochs=1))


def test_train_and_resume_match_an_uninterrupted_run(tmp_path, mfeat_small):
    full, resumed, part = train_interrupted(_tiny_run, 2, 1, tmp_path, mfeat_small)
    assert math.isfinite(full["summary"]["test_mean"])
    record = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"task", "sub", "sep", "com"} <= record["loss"].keys() and "b/pixel" in record["loss"]
    assert resumed["summary"]["test_mean"] == full["summary"]["test_mean"]
    assert resumed["test"]["subsets"] == full["test"]["subsets"]
    # The logged losses agree to float32 rounding, not always bitwise: under CPU load one step's
    # task loss occasionally rounds differently in its last bit (a fresh-venv run saw 1e-8 on
    # the epoch mean; the source, inside torch's CPU ops, is not identified).
    resumed_losses = [json.loads(line)["loss"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    full_losses = [json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in resumed_losses] == [sorted(f) for f in full_losses]
    for r, f in zip(resumed_losses, full_losses):
        assert r == pytest.approx(f, rel=1e-6, abs=1e-7)


def test_segmentation_feature_maps_train_step():
    train_set = make_segmentation(n=30, size=8, num_modalities=3, num_classes=4, seed=0)[0]
    shapes = {m: tuple(train_set.features[m].shape[1:]) for m in train_set.modalities}
    torch.manual_seed(0)
    model = build_model(train_set.modalities, shapes, 4, "segmentation",
                        model_config(method="mce", d_model=8, d_hidden=16, fusion_heads=2, mce_teacher_epochs=1))
    model.prepare(train_set, protocol=MissingnessProtocol.parse("uniform"), seed=0, resume=False, log=lambda *a: None)
    idx = torch.arange(6)
    feats = {m: train_set.features[m][idx] for m in train_set.modalities}
    observed = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    out = model(feats, observed, mode="train", sample_index=idx)
    assert out.logits.shape == (6, 4, 8, 8) and out.aux["modality_logits"].shape == (6, 3, 4, 8, 8)
    loss, parts = model.loss(out, train_set.labels[idx])
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    opt.step()
    model.eval()
    assert model(feats, observed).logits.shape == (6, 4, 8, 8)
    with pytest.raises(ValueError, match="segmentation"):
        build_model(["a"], {"a": (5,)}, 4, "segmentation", model_config(method="mce", d_model=8, fusion_heads=2))
