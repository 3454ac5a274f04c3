"""The MARS model layer's options: several masks per step for every method,
the fusion backbones and the backbone alone, the per-modality heads and their
vote, the method defaults, the synthetic-missing dataset, the comparison
statistics (paired intervals, specialisation NMI, heatmap order) and the CLI
around them."""
import json
import math

import pytest
import torch

from mars import cli
from mars.config import ConfigError, ModelConfig, TrainConfig
from mars.data import generate_missing, load_data, load_mfeat, make_missing, missing_shift
from mars.methods import build_model
from mars.model import BackboneModel, MarsModel, unimodal_loss, unimodal_vote
from mars.stats import paired_interval, specialisation_nmi, t_quantile, usage_order
from mars.train import train
from helpers import model_config


@pytest.fixture(scope="module")
def mfeat_small():
    train_set, val_set, test_set = load_mfeat(seed=0)
    return train_set.subset(torch.arange(96)), val_set.subset(torch.arange(40)), test_set.subset(torch.arange(40))


def _shapes(d):
    return {m: tuple(d.features[m].shape[1:]) for m in d.modalities}


def _cfg(method="mars", **kw):
    base = dict(d_model=16, d_hidden=16, num_experts=4, fusion_heads=2, backend="cpu", dropout=0.0)
    base.update(kw)
    return model_config(method, **base)


def _batch(data, n=6, P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {m: data.features[m][:n] for m in data.modalities}
    observed = torch.rand(P, n, data.num_modalities, generator=g) > 0.5
    observed[..., 0] = True
    return feats, observed, torch.ones(n, data.num_modalities, dtype=torch.bool)


# ------------------------------------------------------------------ several masks per step
@pytest.mark.parametrize("backbone", ["attention", "late", "mce"])
def test_a_stack_of_masks_is_each_mask_on_its_own(mfeat_small, backbone):
    """Vanilla-MoE and backbone models (deterministic gates, no dropout): the
    stacked forward gives, mask by mask, the logits of one-mask forwards."""
    data = mfeat_small[0]
    feats, observed, avail = _batch(data)
    for method in ("moe", "backbone"):
        torch.manual_seed(0)
        model = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                            _cfg(method=method, backbone=backbone)).train()
        out = model(feats, observed, avail, mode="train")
        assert out.logits.shape == (3 * 6, data.num_classes)
        for p in range(3):
            one = model(feats, observed[p], avail, mode="train").logits
            torch.testing.assert_close(out.logits[p * 6:(p + 1) * 6], one, atol=1e-5, rtol=1e-5)
        _, parts = model.loss(out, data.labels[:6])
        want = torch.nn.functional.cross_entropy(out.logits, data.labels[:6].repeat(3))
        assert parts["task"] == pytest.approx(float(want.detach()), rel=1e-6)


def test_mars_shares_one_complete_pass_across_the_masks(mfeat_small, monkeypatch):
    data = mfeat_small[0]
    feats, observed, avail = _batch(data)
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task, _cfg()).train()
    seen = []
    original = type(model.fuse).fuse_stack
    monkeypatch.setattr(type(model.fuse), "fuse_stack", lambda self, h, m, masks: seen.append(masks.shape) or original(self, h, m, masks))
    out = model(feats, observed, avail, mode="train")
    assert seen == [torch.Size([4, 6, data.num_modalities])]  # 3 incomplete + 1 complete, one call
    assert out.logits.shape == (18, data.num_classes) and out.aux["complete_logits"].shape == (6, data.num_classes)
    assert out.aux["indices"].shape == (3, 6, 1, 2)
    loss, parts = model.loss(out, data.labels[:6])
    assert {"task", "complete", "imitation", "balance"} <= parts.keys()
    loss.backward()


@pytest.mark.parametrize("method,stacked", [("mars", True), ("late_fusion", True), ("mce", False),
                                            ("moe_retriever", False), ("backbone", True)])
def test_masks_per_step_reach_every_method(tmp_path, mfeat_small, method, stacked, monkeypatch):
    """P masks per sample per step: a stack [P, b, M] for the models that take
    one, the batch repeated P times (one mask per copy) for the others."""
    seen = []
    from mars import train as train_module

    original = train_module._forward_train

    def spy(net, model, feats, observed, avail, idx):
        seen.append((tuple(observed.shape), idx.numel(), next(iter(feats.values())).shape[0]))
        return original(net, model, feats, observed, avail, idx)

    monkeypatch.setattr(train_module, "_forward_train", spy)
    cfg = TrainConfig(epochs=1, batch_size=32, masks_per_step=3, model=_cfg(method=method, mce_teacher_epochs=1))
    res = train(cfg, tmp_path / "run", data=mfeat_small, progress=False, log=lambda *a: None)
    assert res["summary"]["masks_per_step"] == 3
    M = mfeat_small[0].num_modalities
    if stacked:
        assert seen[0] == ((3, 32, M), 32, 32)
    else:
        assert seen[0] == ((96, M), 96, 96)
    assert math.isfinite(res["summary"]["test_mean"])


def test_masks_per_step_draws_distinct_masks_and_one_mask_is_unchanged(tmp_path, mfeat_small):
    """P = 1 is the earlier training (same result as the default of a method
    whose default is one mask, MoE-Retriever's); P = 2 changes it."""
    runs = {}
    for P in (1, 2):
        cfg = TrainConfig(epochs=1, batch_size=32, masks_per_step=P, model=_cfg(method="moe_retriever"))
        runs[P] = train(cfg, tmp_path / f"p{P}", data=mfeat_small, progress=False)["summary"]
    cfg = TrainConfig(epochs=1, batch_size=32, model=_cfg(method="moe_retriever"))
    assert cfg.masks_per_step == 1
    default = train(cfg, tmp_path / "default", data=mfeat_small, progress=False)["summary"]
    assert runs[1]["val_mean"] == default["val_mean"]
    assert runs[2]["val_mean"] != runs[1]["val_mean"] or runs[2]["test_mean"] != runs[1]["test_mean"]


def test_cosine_lr_schedule_decays_per_step_to_zero(tmp_path, mfeat_small, monkeypatch):
    from mars.train import scheduled_lr

    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    for schedule in ("constant", "cosine"):
        seen.clear()
        cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, lr_schedule=schedule, model=_cfg(method="moe"))
        train(cfg, tmp_path / schedule, data=mfeat_small, progress=False, log=lambda *a: None)
        assert len(seen) == 6  # 96 samples, batches of 32, 2 epochs
        want = [1e-3] * 6 if schedule == "constant" else [1e-3 * 0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]
        assert seen == pytest.approx(want, rel=1e-12), schedule
    cfg = TrainConfig(lr=2.0, lr_schedule="cosine")
    assert [scheduled_lr(cfg, t, 4) for t in (0, 2, 4, 9)] == pytest.approx([2.0, 1.0, 0.0, 0.0], abs=1e-12)
    assert scheduled_lr(TrainConfig(lr=2.0), 3, 4) == 2.0
    with pytest.raises(ConfigError) as e:
        TrainConfig(lr_schedule="linear")
    assert e.value.field == "lr_schedule"
    assert TrainConfig.from_dict({"model": {"method": "mars"}}).lr_schedule == "constant"  # a version-1 config.json
    assert cli.config_from_args([]).lr_schedule == "constant"
    assert cli.config_from_args(["--lr-schedule", "cosine"]).lr_schedule == "cosine"


# ------------------------------------------------------------------ backbones
def test_late_backbone_is_a_mean_of_per_modality_towers(mfeat_small):
    data = mfeat_small[0]
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                        _cfg(method="backbone", backbone="late")).eval()
    feats, observed, _ = _batch(data)
    h = model.encode(feats)  # [B, 1, M, D]
    x = torch.where(observed[0][:, None, :, None], h, model.encode.missing)
    towers = model.fuse
    want = torch.stack([torch.nn.functional.gelu(x[:, :, m] @ towers.w1[m] + towers.b1[m]) @ towers.w2[m] + towers.b2[m]
                        for m in range(len(data.modalities))], dim=2).mean(dim=2)
    torch.testing.assert_close(model.head(want.mean(dim=1)), model(feats, observed[0]).logits)


@pytest.mark.parametrize("backbone", ["late", "mce"])
def test_mars_on_every_backbone_trains_and_has_its_oracle(mfeat_small, backbone):
    data = mfeat_small[0]
    feats, observed, avail = _batch(data)
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task, _cfg(backbone=backbone))
    out = model(feats, observed, avail, mode="train")
    loss, parts = model.loss(out, data.labels[:6])
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("moe.router.residual")), \
        [n for n, p in model.named_parameters() if p.grad is None]
    model.eval()
    assert model(feats, observed[0], avail, mode="oracle").logits.shape == (6, data.num_classes)
    assert isinstance(model, MarsModel)
    bb = build_model(data.modalities, _shapes(data), data.num_classes, data.task, _cfg(method="backbone",
                                                                                        backbone=backbone))
    assert isinstance(bb, BackboneModel)
    with pytest.raises(ValueError, match="oracle"):
        bb(feats, observed[0], avail, mode="oracle")


def test_marsmodel_is_one_marsmoe_and_loads_earlier_parameter_names(mfeat_small):
    data = mfeat_small[0]
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                        _cfg(feature_input="tokens+mask"))
    import mars_kernels as mk
    assert isinstance(model.moe, mk.MarsMoE) and model.moe.config == mk.MarsConfig()
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"encode", "fuse", "moe", "head", "unimodal_heads"}
    assert model.moe.router.feature_router.weight.shape[1] == 16 + data.num_modalities
    # a state dict of an earlier release: the MoE's submodules at the top (and earlier still, the routers)
    state = model.state_dict()
    for prefix in ("router.", "feature_router."):
        old = {(k.replace("moe.router.feature_router.", "feature_router.") if prefix == "feature_router."
                else k.replace("moe.", "", 1)) if k.startswith("moe.") else k: v for k, v in state.items()}
        old = {(k.replace("moe.", "", 1) if k.startswith("moe.") else k): v for k, v in old.items()}
        assert any(k.startswith(prefix) for k in old)
        fresh = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                            _cfg(feature_input="tokens+mask"))
        fresh.load_state_dict(old)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    # parameters in the order of the earlier models (the optimiser state of a checkpoint depends on it)
    order = [n for n, _ in model.named_parameters()]
    assert order.index("moe.router.feature_router.weight") < order.index("moe.router.residual_router.weight") \
        < order.index("moe.experts.w1") < order.index("head.weight")


@pytest.mark.parametrize("method", ["mars", "moe"])
def test_unimodal_heads_classify_each_available_modality_alone(mfeat_small, method):
    data = mfeat_small[0]
    feats, observed, avail = _batch(data)
    avail[1, 2] = avail[4, 0] = False  # pairs without the modality do not count
    observed &= avail
    observed[:, 1, 0] = observed[:, 4, 1] = True
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                        _cfg(method=method, lambda_unimodal=0.5))
    out = model(feats, observed, avail, mode="train")
    logits = out.aux["unimodal_logits"]
    M = data.num_modalities
    assert logits.shape == (6, M, data.num_classes)
    labels = data.labels[:6]
    # the head of modality m on the encoder of m alone: the other modalities' features do not enter
    h = model.encode(feats)  # [B, 1, M, D]
    for m in range(M):
        want = h[:, 0, m] @ model.unimodal_heads.weight[m].T + model.unimodal_heads.bias[m]
        torch.testing.assert_close(logits[:, m], want)
    ce = torch.stack([torch.nn.functional.cross_entropy(logits[b, m:m + 1], labels[b:b + 1])
                      for b in range(6) for m in range(M) if avail[b, m]])
    total, parts = model.loss(out, labels)
    assert parts["unimodal"] == pytest.approx(0.5 * float(ce.mean().detach()), rel=1e-5)
    total.backward()
    assert model.unimodal_heads.weight.grad.abs().sum() > 0
    # pixels labelled ignore_index leave the mean (maps): weight [B, M], labels [B, H, W]
    lg = torch.randn(2, 3, 4, 2, 2)
    lab = torch.randint(0, 4, (2, 2, 2))
    lab[0, 0, 0] = -1
    w = torch.tensor([[True, False, True], [True, True, True]])
    keep = [(b, m, i, j) for b in range(2) for m in range(3) for i in range(2) for j in range(2)
            if w[b, m] and lab[b, i, j] != -1]
    want = torch.stack([torch.nn.functional.cross_entropy(lg[b, m, :, i, j][None], lab[b, i, j][None])
                        for b, m, i, j in keep]).mean()
    torch.testing.assert_close(unimodal_loss(lg, w, lab, ignore_index=-1), want)
    # off: no heads, no part; inference needs no heads' output
    plain = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                        _cfg(method=method, lambda_unimodal=0.0))
    assert not hasattr(plain, "unimodal_heads")
    assert "unimodal" not in plain.loss(plain(feats, observed, avail, mode="train"), labels)[1]
    model.eval()
    assert "unimodal_logits" not in model(feats, observed[0]).aux


def test_new_options_are_validated():
    for kw, field in ((dict(backbone="cnn"), "model.backbone"), (dict(lambda_unimodal=float("nan")), "model.lambda_unimodal"),
                      (dict(lambda_unimodal=0.3, unimodal_vote=-1.0), "model.unimodal_vote"),
                      (dict(lambda_unimodal=0.3, unimodal_vote=float("inf")), "model.unimodal_vote"),
                      (dict(lambda_unimodal=0.3, unimodal_vote=1e300), "model.unimodal_vote"),  # bounded
                      (dict(lambda_unimodal=0.0, unimodal_vote=2.0), "model.unimodal_vote"),  # a vote without heads
                      (dict(mars={"mix": "x"}), "model.mars.mix"), (dict(mars={"mix_scale": float("inf")}), "model.mars.mix_scale"),
                      (dict(research={"residual_input": "bottleneck"}), "model.research.residual_input")):
        with pytest.raises(ConfigError) as e:
            ModelConfig(**kw)
        assert e.value.field == field
    for P in (0, 65):
        with pytest.raises(ConfigError) as e:
            TrainConfig(masks_per_step=P)
        assert e.value.field == "masks_per_step"


# ------------------------------------------------------------------ synthetic-missing data
def test_synthetic_missing_is_deterministic_balanced_and_complete():
    a, b = generate_missing(seed=3), generate_missing(seed=3)
    for m in a.modalities:
        assert torch.equal(a.features[m], b.features[m])
    assert not torch.equal(generate_missing(seed=4).features["m0"], a.features["m0"])
    assert a.modalities == ["m0", "m1", "m2", "m3"] and a.features["m0"].shape == (2400, 24)
    assert torch.bincount(a.labels).tolist() == [300] * 8
    tr, va, te = make_missing(seed=1)
    assert (len(tr), len(va), len(te)) == (1440, 480, 480)
    assert abs(float(tr.features["m2"].mean())) < 1e-4  # standardised on train
    tr0, _, _ = load_data("synthetic-missing", seed=1, test_split="per-seed")
    assert torch.equal(tr0.features["m1"], tr.features["m1"])
    shift = missing_shift(torch.tensor([[True, False, True, False]]))
    assert shift.tolist() == [[False] * 4 + [True] * 4 + [False] * 4 + [True] * 4]
    with pytest.raises(ValueError, match="strong > weak"):
        generate_missing(strong=0.1, weak=0.2)


def test_synthetic_missing_modalities_are_complementary():
    """Each modality holds its own latent block well and the others poorly:
    a least-squares read-out of each block from modality m's features
    explains its own block far better than the other blocks."""
    data, u = generate_missing(n=1200, seed=0, return_latent=True)
    r = 4
    for m in range(4):
        x = torch.cat([data.features[f"m{m}"].double(), torch.ones(1200, 1, dtype=torch.float64)], 1)
        fit = x @ torch.linalg.lstsq(x, u.double()).solution
        r2 = 1 - ((u - fit) ** 2).sum(0) / ((u - u.mean(0)) ** 2).sum(0)  # [L]
        own = r2[m * r:(m + 1) * r].mean()
        others = torch.cat([r2[:m * r], r2[(m + 1) * r:]]).mean()
        assert own > 0.75 and own - others > 0.25, (m, float(own), float(others))


# ------------------------------------------------------------------ statistics
def test_t_quantiles_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 29, 200):
        for p in (0.6, 0.95, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(float(scipy_stats.t.ppf(p, df)), rel=1e-8)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))


def test_paired_interval():
    d = [0.01, 0.02, 0.015, 0.005, 0.012]
    r = paired_interval(d)
    sd = torch.tensor(d, dtype=torch.float64).std().item()
    half = 2.7764451051977934 * sd / math.sqrt(5)
    assert r["mean"] == pytest.approx(0.0124) and r["low"] == pytest.approx(0.0124 - half)
    assert r["high"] == pytest.approx(0.0124 + half) and r["significant"]
    assert not paired_interval([0.01, -0.02, 0.015, -0.005, 0.0])["significant"]
    b = paired_interval(d, method="bootstrap")
    assert b["low"] <= 0.0124 <= b["high"] and b["significant"] and b == paired_interval(d, method="bootstrap")
    one = paired_interval([0.3])
    assert math.isnan(one["low"]) and not one["significant"]
    with pytest.raises(ValueError):
        paired_interval([])


def test_specialisation_nmi_and_heatmap_order():
    assert specialisation_nmi([[10, 0], [0, 10]]) == pytest.approx(1.0)
    assert specialisation_nmi([[5, 5], [5, 5]]) == pytest.approx(0.0)
    assert specialisation_nmi([[3, 0, 0]]) == 0.0
    assert math.isnan(specialisation_nmi([[0, 0], [0, 0]]))
    mid = specialisation_nmi([[8, 2], [3, 7]])
    assert 0.0 < mid < 1.0
    rows, cols = usage_order([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.0, 0.6, 0.4], [0.7, 0.1, 0.2]])
    assert cols == [1, 0, 2]  # by total share
    assert rows == [0, 2, 1, 3]  # grouped by top expert (1 first), then by its share


# ------------------------------------------------------------------ CLI
def test_compare_table_pairs_each_row_with_its_mars_row():
    def summ(seed, mean):
        return {"seed": seed, "test_mean": mean, "test_by_size": {"1": mean - 0.1, "2": mean}, "train_seconds": 10.0,
                "parameters": 100, "router_agreement": None, "specialisation_nmi": None}
    rows = {"mars@attention": [summ(s, 0.9 + 0.01 * s) for s in range(3)],
            "backbone@attention": [summ(s, 0.88 + 0.01 * s + 0.001 * s * s) for s in range(3)],
            "mars@late": [summ(s, 0.95) for s in range(3)],
            "mce": [summ(s, 0.91 + 0.01 * s) for s in range(3)]}
    table, lines = cli.compare_table(rows, epochs=10)
    assert table["mars@attention"]["reference"] is None
    assert table["backbone@attention"]["reference"] == "mars@attention"
    assert table["mce"]["reference"] == "mars@attention"
    assert table["mars@late"]["reference"] is None  # MARS on its own backbone is that backbone's reference
    p = table["backbone@attention"]["paired"]
    assert p["mean"] == pytest.approx(statistics_mean([-0.02, -0.019, -0.016]))
    assert table["mce"]["paired"]["mean"] == pytest.approx(0.01) and table["mce"]["paired"]["significant"]
    assert any(line.startswith("| backbone@attention |") and "[" in line for line in lines)


def statistics_mean(v):
    return sum(v) / len(v)


def test_cli_masks_backbones_eval_split_and_compare(tmp_path, capsys, monkeypatch):
    small = ["--epochs", "1", "--batch-size", "64", "--d-model", "16", "--d-hidden", "16", "--experts", "4",
             "--quiet", "--data", "synthetic-missing"]
    assert cli.main(["train", *small, "--masks-per-step", "2", "--feature-input", "tokens+mask",
                     "--backbone", "late", "--out", str(tmp_path / "run")]) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["masks_per_step"] == 2 and cfg["model"]["research"]["feature_input"] == "tokens+mask"
    assert cfg["model"]["backbone"] == "late"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["specialisation_nmi"] <= 1.0
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--split", "val", "--oracle"]) == 0
    text = capsys.readouterr().out
    assert "val mean over subsets" in text and "oracle" in text and "agreement (val" in text
    assert cli.main(["compare", *small, "--seeds", "2", "--methods", "mars", "backbone", "--backbones", "attention",
                     "late", "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(result["table"]) == ["mars@attention", "mars@late", "backbone@attention", "backbone@late"]
    assert result["table"]["backbone@late"]["reference"] == "mars@late"
    assert result["table"]["backbone@late"]["paired"]["n"] == 2
    assert (tmp_path / "cmp" / "expert_usage_mars@late.png").exists()
    assert (tmp_path / "cmp" / "mars@late_seed1" / "summary.json").exists()
    assert "paired diff" in (tmp_path / "cmp" / "compare.md").read_text()


def test_masks_per_step_default_is_the_methods_own():
    for method, want in (("mars", 8), ("vanilla-moe", 8), ("late-fusion", 8), ("mce", 1), ("moe-retriever", 1)):
        assert cli.config_from_args(["--method", method]).masks_per_step == want, method
        assert cli.config_from_args(["--method", method, "--masks-per-step", "3"]).masks_per_step == 3
    assert TrainConfig().masks_per_step == 8  # the API's default is MARS's
    assert TrainConfig(model=ModelConfig(method="mce")).masks_per_step == 1  # and each method's its own
    assert TrainConfig.from_dict({"model": {"method": "mars"}}).masks_per_step == 1  # a version-1 config.json


def test_unimodal_heads_on_feature_maps_give_one_logit_map_per_modality():
    cfg = _cfg(lambda_unimodal=0.3, num_experts=2, k=1)
    shapes = {"a": (3, 4, 5), "b": (2, 4, 5)}
    model = build_model(["a", "b"], shapes, 3, "segmentation", cfg)
    g = torch.Generator().manual_seed(0)
    feats = {m: torch.randn(2, *shapes[m], generator=g) for m in shapes}
    observed = torch.tensor([[[True, False], [True, True]]] * 2)
    out = model(feats, observed, torch.ones(2, 2, dtype=torch.bool), mode="train")
    logits = out.aux["unimodal_logits"]
    assert logits.shape == (2, 2, 3, 4, 5)
    tokens = model.unimodal_heads(model.encode(feats))  # [B, H*W, M, K], row-major positions
    torch.testing.assert_close(logits[:, 1, :, 2, 3], tokens[:, 2 * 5 + 3, 1, :])
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    labels[0, 0, 0] = 255
    _, parts = model.loss(out, labels, ignore_index=255)
    assert parts["unimodal"] == pytest.approx(0.3 * float(unimodal_loss(logits, torch.ones(2, 2, dtype=torch.bool),
                                                                        labels, 255).detach()), rel=1e-6)


def test_lambda_unimodal_default_is_the_methods_own():
    for method, want in (("mars", 0.3), ("vanilla-moe", 0.3)):
        assert cli.config_from_args(["--method", method]).model.lambda_unimodal == want, method
        assert cli.config_from_args(["--method", method, "--lambda-unimodal", "0.7"]).model.lambda_unimodal == 0.7
    for method in ("late-fusion", "mce"):  # a method without the heads refuses the option by name
        with pytest.raises(ConfigError) as e:
            cli.config_from_args(["--method", method, "--lambda-unimodal", "0.7"])
        assert e.value.field == "model.lambda_unimodal" and "not used by" in e.value.message
    assert ModelConfig().lambda_unimodal == 0.3 and ModelConfig(method="moe").lambda_unimodal == 0.3
    assert TrainConfig.from_dict({"model": {"method": "mars"}}).model.lambda_unimodal == 0.0  # version 1


@pytest.mark.parametrize("method", ["mars", "moe"])
def test_unimodal_vote_adds_the_observed_modalities_heads_at_inference(mfeat_small, method):
    data = mfeat_small[0]
    feats, observed, avail = _batch(data)
    observed[1, 2] = False
    observed[1, 2, 3] = True  # a sample whose only observed modality is not the first
    cfg = _cfg(method=method, lambda_unimodal=0.3, unimodal_vote=1.5)
    torch.manual_seed(0)
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task, cfg)
    torch.manual_seed(0)
    plain = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                        _cfg(method=method, lambda_unimodal=0.3, unimodal_vote=0.0))
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    h = model.encode(feats)  # [B, 1, M, D]
    heads = torch.stack([h[:, 0, m] @ model.unimodal_heads.weight[m].T + model.unimodal_heads.bias[m]
                         for m in range(data.num_modalities)], dim=1).log_softmax(-1)  # [B, M, K]
    modes = ("eval", "oracle") if method == "mars" else ("eval",)
    for mode in modes:
        for obs in observed:  # each [B, M] mask: one pass
            got = model(feats, obs, avail, mode=mode).logits
            base = plain(feats, obs, avail, mode=mode).logits.log_softmax(-1)
            for b in range(6):
                want = base[b] + 1.5 * heads[b, obs[b]].mean(dim=0)  # the observed modalities' heads only
                torch.testing.assert_close(got[b], want)
        # a stack of masks: mask-major, each mask its own observed heads
        torch.testing.assert_close(model(feats, observed, avail, mode=mode).logits,
                                   torch.cat([model(feats, obs, avail, mode=mode).logits for obs in observed]))
    # training keeps the raw logits of the fused prediction (the vote is for inference only)
    model.train(), plain.train()
    torch.manual_seed(1)
    a = model(feats, observed, avail, mode="train").logits
    torch.manual_seed(1)
    torch.testing.assert_close(a, plain(feats, observed, avail, mode="train").logits)
    # nothing observed: the sample keeps its own log-probabilities; maps: per pixel
    lg, mods = torch.randn(2, 3, 4, 5), torch.randn(2, 2, 3, 4, 5)
    obs = torch.tensor([[False, False], [True, False]])
    out = unimodal_vote(lg, mods, obs, 2.0)
    torch.testing.assert_close(out[0], lg[0].log_softmax(0))
    torch.testing.assert_close(out[1], lg[1].log_softmax(0) + 2.0 * mods[1, 0].log_softmax(0))


def test_unimodal_vote_default_is_the_methods_own_when_its_heads_are_on():
    got = lambda *args: cli.config_from_args(list(args)).model.unimodal_vote  # noqa: E731
    assert got() == 2.0 and got("--method", "mars") == 2.0
    assert got("--method", "vanilla-moe") == 2.0
    assert got("--method", "vanilla-moe", "--lambda-unimodal", "0") == 0.0
    assert got("--lambda-unimodal", "0") == 0.0  # the default vote follows the heads
    assert got("--unimodal-vote", "0.5") == 0.5
    assert got("--method", "vanilla-moe", "--lambda-unimodal", "0.3", "--unimodal-vote", "1") == 1.0
    with pytest.raises(ConfigError) as e:
        cli.config_from_args(["--lambda-unimodal", "0", "--unimodal-vote", "1"])
    assert e.value.field == "model.unimodal_vote"
    with pytest.raises(ConfigError) as e:
        cli.config_from_args(["--method", "mce", "--unimodal-vote", "1"])
    assert e.value.field == "model.unimodal_vote"
    assert ModelConfig().unimodal_vote == 2.0 and ModelConfig(lambda_unimodal=0.0).unimodal_vote == 0.0
    v1 = {"model": {"method": "mars", "lambda_unimodal": 0.3}}
    assert TrainConfig.from_dict(v1).model.unimodal_vote == 0.0  # a version-1 config.json meant no vote


def test_the_backbone_example_runs():
    """examples/mars_on_your_backbone.py: its model trains and scores (1 epoch on a slice)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "mars_on_your_backbone.py"
    spec = importlib.util.spec_from_file_location("mars_on_your_backbone", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    tr, va, te = make_missing(n=400, seed=0)
    for use_mars in (False, True):
        score = example.train_and_score(use_mars, (tr, va, te), epochs=1)
        assert 0.0 <= score <= 1.0


def test_merge_compare_pairs_rows_from_several_directories(tmp_path):
    """experiments/merge_compare.py: baselines and MARS from two compare runs -> one paired table."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "merge_compare.py"
    spec = importlib.util.spec_from_file_location("merge_compare", path)
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)

    def summary(seed, mean, method, P=1):
        return {"seed": seed, "test_mean": mean, "test_by_size": {"1": mean - 0.1, "2": mean + 0.01},
                "train_seconds": 4.0, "parameters": 10, "method": method, "masks_per_step": P}

    head = {"data": "mfeat", "protocol": "uniform", "epochs": 2, "masks_per_step": 1, "seeds": 3}
    for name, rows in (("a", {"mce": [summary(s, 0.80 + 0.01 * s, "mce") for s in range(3)]}),
                       ("b", {"mars": [summary(s, 0.82 + 0.01 * s, "mars", 8) for s in range(3)]}),
                       ("c", {"mce": [summary(s, 0.83, "mce", 8) for s in range(3)]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "compare.json").write_text(json.dumps({**head, "rows": rows, "command": f"mars {name}"}))
    assert merge.main([str(tmp_path / "out.json"), *(str(tmp_path / n) for n in "abc")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    # the same method at another budget than its default gets its own row, named by its P
    assert list(out["table"]) == ["mars", "mce", "mce (P=8)"] and out["table"]["mce"]["reference"] == "mars"
    assert out["masks_per_step"] == {"mars": 8, "mce": 1, "mce (P=8)": 8}
    assert abs(out["table"]["mce"]["paired"]["mean"] + 0.02) < 1e-12
    assert out["table"]["mce (P=8)"]["reference"] == "mars" and out["table"]["mce (P=8)"]["masks_per_step"] == 8
    # DIR=LABEL: another configuration of MARS gets its own row, paired with the first MARS row
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "compare.json").write_text(json.dumps(
        {**head, "rows": {"mars": [summary(s, 0.81 + 0.01 * s, "mars", 8) for s in range(3)]}, "command": "mars d"}))
    assert merge.main([str(tmp_path / "out3.json"), str(tmp_path / "b"), f"{tmp_path / 'd'}=(pattern)"]) == 0
    out = json.loads((tmp_path / "out3.json").read_text())
    assert list(out["table"]) == ["mars", "mars (pattern)"]
    assert abs(out["table"]["mars (pattern)"]["paired"]["mean"] + 0.01) < 1e-12
    # another protocol in one of the directories is refused
    (tmp_path / "b" / "compare.json").write_text(json.dumps({**head, "protocol": "fixed:0.5", "rows": {}, "command": ""}))
    with pytest.raises(SystemExit):
        merge.main([str(tmp_path / "out2.json"), str(tmp_path / "a"), str(tmp_path / "b")])


def _research_script(name: str):
    """A research script by file name (benchmarks/ now, experiments/ once they move)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = next(p for p in (root / d / f"{name}.py" for d in ("benchmarks", "experiments")) if p.exists())
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mars_screen_never_deletes_what_it_did_not_create(tmp_path):
    """mars_screen.py NAME used to rmtree runs/screen/NAME/seedS unchecked: an absolute NAME or one with ..
    deleted any folder named seed0. Names are one path component; an earlier run is replaced like --overwrite."""
    from mars.data import write_feature_dir
    from mars.rundir import RunFileError

    screen = _research_script("mars_screen")
    victim = tmp_path / "elsewhere" / "seed0"
    victim.mkdir(parents=True)
    (victim / "thesis.tex").write_text("keep")
    for name in (str(tmp_path / "elsewhere"), "../../elsewhere", "a/b", ".hidden", "..", ""):
        with pytest.raises(SystemExit, match="not a screen name"):
            screen.main([name, "--seeds", "0", "--", "--epochs", "1"])
    assert (victim / "thesis.tex").read_text() == "keep"
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 3
    data = write_feature_dir(tmp_path / "d", {"features": {m: torch.randn(24, 4, generator=g) for m in "ab"},
                                              "labels": labels, "num_classes": 3})
    args = ["--data", str(data), "--epochs", "1", "--d-model", "8", "--d-hidden", "8", "--experts", "2",
            "--batch-size", "16"]
    with pytest.raises(RunFileError, match="not a mars run directory"):
        screen.screen_seed(args, 0, victim)
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]
    run = tmp_path / "runs" / "screen" / "x" / "seed0"
    first = screen.screen_seed(args, 0, run)
    again = screen.screen_seed(args, 0, run)  # an earlier screen's run: replaced
    assert first["val_mean"] == again["val_mean"] and sorted(p.name for p in run.parent.iterdir()) == ["seed0"]


def test_merge_compare_replaces_only_its_own_output(tmp_path):
    merge = _research_script("merge_compare")
    summary = {"seed": 0, "test_mean": 0.8, "test_by_size": {"1": 0.7, "2": 0.9}, "train_seconds": 1.0,
               "parameters": 10, "method": "mars", "masks_per_step": 8}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "compare.json").write_text(json.dumps(
        {"data": "mfeat", "protocol": "uniform", "epochs": 1, "rows": {"mars": [summary]}, "command": "mars a"}))
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    with pytest.raises(SystemExit):
        merge.main([str(notes), str(tmp_path / "a")])
    assert notes.read_text() == '{"mine": 1}'
    out = tmp_path / "out.json"
    assert merge.main([str(out), str(tmp_path / "a")]) == 0
    assert merge.main([str(out), str(tmp_path / "a")]) == 0  # its own earlier table: replaced


# ------------------------------------------------------------------ silent missingness (research)
def test_silent_noise_keeps_observed_tokens_and_draws_from_the_running_statistics():
    from mars.research.silent_missing import SilentNoise

    torch.manual_seed(0)
    noise = SilentNoise(momentum=1.0).train()
    h = 3.0 + 2.0 * torch.randn(4096, 1, 2, 4)  # [B, N, M, D]
    masks = torch.ones(2, 4096, 2, dtype=torch.bool)
    masks[0, :, 1] = False
    out = noise(h, masks)
    assert out.shape == (2, 4096, 1, 2, 4)
    assert torch.equal(out[1], h) and torch.equal(out[0, :, :, 0], h[:, :, 0])
    fake = out[0, :, :, 1]
    assert not torch.allclose(fake, h[:, :, 1])
    assert float((fake.mean(0) - 3.0).abs().max()) < 0.15 and float((fake.std(0) - 2.0).abs().max()) < 0.15
    noise.eval()
    assert torch.equal(noise(h, masks), noise(h, masks))  # evaluation: the same draw on every call
    with pytest.raises(ValueError, match=r"h \[B, N, M, D\] and masks \[P, B, M\]"):
        noise(h, masks[:, :10])
    with pytest.raises(RuntimeError, match="train the model first"):
        SilentNoise().eval()(h, masks)


@pytest.mark.parametrize("method", ["mars", "moe"])
def test_silent_missingness_hides_the_pattern_and_the_missing_values(mfeat_small, method):
    """Under ``missing_signal=silent`` an evaluation pass sees neither the
    missing modality's values (changing them changes nothing) nor the mask:
    the missing embeddings are never used and the result differs from the
    flagged model's with the same parameters. The token statistics are saved
    and restored with the parameters."""
    data = mfeat_small[0]
    feats, observed, avail = _batch(data, n=8)
    torch.manual_seed(0)
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                        _cfg(method=method, missing_signal="silent")).train()
    model(feats, observed, avail, mode="train").logits.sum().backward()  # sets the token statistics
    assert model.encode.missing.grad is None or not model.encode.missing.grad.any()
    model.eval()
    one = torch.ones(8, data.num_modalities, dtype=torch.bool)
    one[:, 2] = False
    other = dict(feats)
    other[data.modalities[2]] = torch.randn_like(feats[data.modalities[2]]) * 10
    with torch.no_grad():
        got = model(feats, one).logits
        assert torch.equal(got, model(other, one).logits)
        assert not torch.allclose(got, model(feats, torch.ones_like(one)).logits)
        flagged = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                              _cfg(method=method)).eval()
        flagged.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("silent_noise")})
        assert not torch.allclose(got, flagged(feats, one).logits)
        again = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                            _cfg(method=method, missing_signal="silent")).eval()
        again.load_state_dict(model.state_dict())
        assert torch.equal(got, again(feats, one).logits)
