"""What protocol v2 of the MARS research needs from the package: one fixed
test split for every seed, incomplete training data (each training sample
keeps one fixed subset of its modalities), runs that never read the test
split, the synthetic-regimes benchmark (with its exact Bayes accuracy), the
label-free residual and late fusion over the observed modalities only."""
import itertools

import pytest
import torch

from helpers import model_config
from mars import cli
from mars.config import ConfigError, TrainConfig
from mars.data import all_subsets, load_data
from mars.data.splits import fixed_test_split, stratified_split
from mars.data.synthetic_regimes import RegimesSpec, bayes_accuracy, generate_regimes, make_regimes, regime_splits
from mars.methods import build_model
from mars.research.router_inputs import LabelFreeResidual, project_out
from mars.train import run_data, train


def _ids(split):
    """Rows of a split as hashable keys (the samples' features)."""
    x = torch.cat([split.features[m].reshape(len(split), -1) for m in split.modalities], 1)
    return {tuple(r.tolist()) for r in x}


# ------------------------------------------------------------------ the fixed test split
def test_fixed_test_split_is_the_same_for_every_seed_and_the_rest_is_drawn_by_the_seed():
    keys = torch.arange(200) % 7
    tests, vals = set(), []
    for seed in range(4):
        tr, va, te = fixed_test_split(keys, (0.6, 0.2, 0.2), seed, test_seed=0)
        assert (len(tr), len(va), len(te)) == (120, 40, 40)
        assert len(set(tr.tolist()) | set(va.tolist()) | set(te.tolist())) == 200
        tests.add(tuple(te.tolist()))
        vals.append(set(va.tolist()))
        assert torch.bincount(keys[te], minlength=7).min() >= 5  # stratified
    assert len(tests) == 1 and vals[0] != vals[1]
    # the split of earlier releases draws the test samples by the seed
    assert stratified_split(keys, seed=0)[2].tolist() != stratified_split(keys, seed=1)[2].tolist()


@pytest.mark.parametrize("source", ["mfeat", "synthetic-missing", "synthetic-regimes"])
def test_load_data_keeps_the_test_samples_fixed_across_seeds(source):
    a, b = load_data(source, seed=0), load_data(source, seed=3)
    # standardisation is fitted on each seed's train split: compare unstandardised samples
    a_raw, b_raw = load_data(source, seed=0, standardize=False), load_data(source, seed=3, standardize=False)
    assert _ids(a_raw[2]) == _ids(b_raw[2])
    assert _ids(a_raw[1]) != _ids(b_raw[1])
    assert not _ids(b_raw[1]) & _ids(a_raw[2])  # no seed validates on the test samples
    old0, old3 = load_data(source, seed=0, test_split="per-seed", standardize=False), \
        load_data(source, seed=3, test_split="per-seed", standardize=False)
    assert _ids(old0[2]) != _ids(old3[2])
    assert len(a[0]) == len(old0[0]) and len(a[2]) == len(old0[2])


def test_the_run_configuration_carries_the_split_and_an_earlier_run_keeps_its_own():
    assert TrainConfig().test_split == "fixed"
    assert TrainConfig.from_dict({"model": {"method": "mars"}}).test_split == "per-seed"
    cfg = cli.config_from_args(["--data", "synthetic-missing", "--seed", "2"])
    assert _ids(run_data(cfg)[2]) == _ids(load_data("synthetic-missing", seed=2)[2])


# ------------------------------------------------------------------ incomplete training data
def test_incomplete_training_data_keep_one_fixed_subset_per_sample():
    protocol = "independent:0.5,0.2,0.8,0.2"
    cfg = TrainConfig(data="synthetic-missing", train_missing=protocol, seed=1, model=model_config("mars"))
    train_set, val_set, test_set = run_data(cfg)
    avail = train_set.available
    assert avail.any(dim=1).all() and not avail.all()
    rates = 1 - avail.float().mean(dim=0)
    assert rates[2] > rates[1] and rates[0] > rates[1]  # the protocol's drop rates, roughly
    for j, m in enumerate(train_set.modalities):  # nothing of a dropped modality is left
        assert (train_set.features[m][~avail[:, j]] == 0).all()
    assert val_set.available.all() and test_set.available.all()
    again = run_data(cfg)[0]
    assert torch.equal(again.available, avail)  # drawn once: every method of the seed sees the same
    other = run_data(TrainConfig(data="synthetic-missing", train_missing=protocol, seed=1,
                                 model=model_config("late_fusion")))[0]
    assert torch.equal(other.available, avail)
    with pytest.raises(ConfigError) as e:
        run_data(TrainConfig(data="synthetic-missing", train_missing="independent:0.5,0.5", model=model_config()))
    assert e.value.field == "train_missing" and "modalities" in e.value.message


def test_every_method_trains_on_incomplete_data(tmp_path):
    for method in ("mars", "moe", "late_fusion", "mce", "moe_retriever", "backbone"):
        cfg = TrainConfig(data="synthetic-regimes", train_missing="independent:0.7,0.3,0.3", epochs=1, batch_size=128,
                          model=model_config(method, d_model=8, d_hidden=8, experts=2, k=1, fusion_heads=2,
                                             mce_teacher_epochs=1, retriever_candidates=2, retriever_shared=1,
                                             retriever_k=2))
        res = train(cfg, tmp_path / method, progress=False, log=lambda *a: None, evaluate="val")
        assert 0.0 <= res["summary"]["val_mean"] <= 1.0


# ------------------------------------------------------------------ runs that never read the test split
def test_evaluate_val_never_reads_the_test_split(tmp_path, monkeypatch):
    import mars.train as train_mod

    seen = []
    real = train_mod.evaluate_subsets
    monkeypatch.setattr(train_mod, "evaluate_subsets", lambda model, data, **kw: seen.append(data) or real(model, data, **kw))
    cfg = TrainConfig(data="synthetic-regimes", epochs=2, batch_size=128,
                      model=model_config(d_model=8, d_hidden=8, experts=2, k=1, fusion_heads=2))
    splits = run_data(cfg)
    res = train(cfg, tmp_path / "r", data=splits, progress=False, log=lambda *a: None, evaluate="val")
    assert seen and all(d is not splits[2] for d in seen)
    s = res["summary"]
    assert s["evaluated"] == "val" and "test_mean" not in s and "val_by_size" in s
    assert res["test"]["mean"] == pytest.approx(s["val_mean"])  # the best epoch, scored again on validation


# ------------------------------------------------------------------ synthetic regimes
def test_regimes_are_deterministic_balanced_and_independent_of_the_label():
    spec = RegimesSpec(n=640)
    a, info = generate_regimes(spec, return_info=True)
    b = generate_regimes(spec)
    assert all(torch.equal(a.features[m], b.features[m]) for m in a.modalities)
    pairs = torch.bincount(a.labels * spec.num_regimes + info["regime"], minlength=spec.num_classes * 2)
    assert pairs.min() == pairs.max() == 640 // 16
    g = torch.cat(regime_splits(seed=1, test_seed=0, spec=spec))
    assert g.numel() == 640 and sorted(g.tolist()) == sorted(info["regime"].tolist())
    assert [len(s) for s in make_regimes(seed=1, test_seed=0, spec=spec)] == [384, 128, 128]


def test_bayes_accuracy_is_the_posterior_argmax_and_the_regime_is_what_conflicts():
    spec = RegimesSpec(n=1600)
    data, info = generate_regimes(spec, return_info=True)
    M = spec.num_modalities
    every = {tuple(s.tolist()): bayes_accuracy(data.features, data.labels, s.expand(len(data), M), spec).float().mean()
             for s in all_subsets(M)}
    assert every[(True, True, True)] > 0.85 and every[(False, True, False)] < 0.6
    # a brute-force posterior on a few samples
    means, noise = info["means"], info["noise"]
    for i in range(5):
        ll = torch.full((spec.num_classes, spec.num_regimes), 0.0, dtype=torch.float64)
        for y, g in itertools.product(range(spec.num_classes), range(spec.num_regimes)):
            ll[y, g] = sum(-0.5 * ((data.features[m][i].double() - means[j, y, g]) ** 2).sum() / noise**2
                           for j, m in enumerate(data.modalities))
        post = (ll - ll.max()).exp().sum(dim=1)  # p(y | x) up to a constant
        want = bool(post.argmax() == data.labels[i])
        assert bool(bayes_accuracy({m: x[i:i + 1] for m, x in data.features.items()}, data.labels[i:i + 1],
                                   torch.ones(1, M, dtype=torch.bool), spec)) == want
    # without conflict, the regime no longer changes what the modalities mean
    calm = RegimesSpec(n=1600, conflict=0.0)
    d0 = generate_regimes(calm)
    one = bayes_accuracy(d0.features, d0.labels, torch.tensor([False, True, False]).expand(1600, M), calm).float().mean()
    assert one > every[(False, True, False)] + 0.1


# ------------------------------------------------------------------ research inputs and late fusion
def test_label_free_residual_has_no_component_the_head_reads():
    head = torch.nn.Linear(6, 3)
    r = LabelFreeResidual(lambda: head)
    z_i, z_c = torch.randn(4, 5, 6), torch.randn(5, 6)
    out = r(z_i, z_c)
    assert out.shape == (4, 5, 6) and r.width(6) == 6
    torch.testing.assert_close(out @ head.weight.detach().T, torch.zeros(4, 5, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, project_out(z_c - z_i, head.weight))
    both = LabelFreeResidual(lambda: head, concat=True)
    assert both(z_i, z_c).shape == (4, 5, 12) and both.width(6) == 12
    out.sum().backward() if out.requires_grad else None
    assert head.weight.grad is None and [p for p in r.parameters()] == []


def test_late_fusion_can_average_the_observed_modalities_only():
    torch.manual_seed(0)
    shapes = {"a": (5,), "b": (4,), "c": (3,)}
    feats = {m: torch.randn(6, *s) for m, s in shapes.items()}
    observed = torch.tensor([[1, 0, 1]] * 3 + [[0, 1, 0]] * 3, dtype=torch.bool)
    model = build_model(list(shapes), shapes, 4, "classification",
                        model_config("late_fusion", d_model=8, d_hidden=8, late_fusion_average="observed")).eval()
    h = model.encode.with_missing(model.encode(feats), observed)  # [B, 1, M, D]
    per = torch.stack([head(h[:, 0, m]) for m, head in enumerate(model.heads)], 1)  # [B, M, K]
    want = (per * observed[..., None]).sum(1) / observed.sum(1, keepdim=True)
    torch.testing.assert_close(model(feats, observed).logits, want)


def _protocol_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "protocol_v2.py"
    spec = importlib.util.spec_from_file_location("protocol_v2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_preregistered_decision_rule_and_holm_families():
    """experiments/protocol_v2.py decide: both criteria, eta, Holm over the run tests, missing tests listed."""
    p = _protocol_script()
    rows = lambda base, step=0.0: [{"seed": s, "test_mean": base + step * (s % 3)} for s in range(10)]  # noqa: E731
    cell = {"mars": rows(0.75, 0.01), "moe:mask-router": rows(0.70, 0.012), "mars:routing=random": rows(0.70),
            "oracle:g+pattern": rows(0.78), "mars:routing=feature": [{"seed": r["seed"], "test_mean": r["test_mean"] + (0.01 if r["seed"] % 2 else -0.01)}
                                     for r in rows(0.75, 0.01)], "vanilla-moe": rows(0.72)}
    a = p.decide({p.PRIMARY_CELL: cell}, "final")
    prim = a["primary"]
    assert prim["criterion_1"] and prim["complete"]
    assert abs(prim["eta"] - (0.759 - 0.70) / (0.78 - 0.70)) < 1e-9 and prim["criterion_2"] and prim["routing_helps"]
    fam = a["family_R"]
    assert fam["planned"] == 24 and len(fam["tests"]) == 3 and len(fam["missing"]) == 21
    by_arm = {t["arm"]: t for t in fam["tests"]}
    assert by_arm["mars:routing=random"]["rejected"] and not by_arm["mars:routing=feature"]["rejected"]
    assert all(t["adjusted"] >= t["p"] for t in fam["tests"])
    # the oracle no better than random: eta undefined, routing does not help
    cell["oracle:g+pattern"] = rows(0.70)
    assert p.decide({p.PRIMARY_CELL: cell}, "final")["primary"]["routing_helps"] is False
    # MARS below the mask router: criterion 1 fails whatever eta says
    cell["oracle:g+pattern"], cell["moe:mask-router"] = rows(0.78), rows(0.80, 0.01)
    assert not p.decide({p.PRIMARY_CELL: cell}, "final")["primary"]["criterion_1"]


def test_the_report_gives_each_regime_cell_its_bayes_accuracy():
    p = _protocol_script()
    assert p.bayes_of_cell("mfeat/a") is None
    full, blind = p.bayes_of_cell("synthetic-regimes/a"), p.bayes_of_cell("synthetic-regimes-kappa0/a")
    assert 0.5 < blind < full < 1.0  # without a modality that reveals the regime, less can be known
