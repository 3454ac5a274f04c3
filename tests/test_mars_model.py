"""The MARS model layer, training loop and CLI (tier 1, small budgets)."""
import json

import pytest
import torch

from mars import cli
from mars.data import load_mfeat, make_segmentation
from mars.config import ModelConfig
from mars.methods import build_model
from mars.train import TrainConfig, TrainingDiverged, train

from helpers import cpu_backends, train_interrupted, model_config


@pytest.fixture(scope="module")
def mfeat_small():
    train_set, val_set, test_set = load_mfeat(seed=0)
    return train_set.subset(torch.arange(200)), val_set.subset(torch.arange(80)), test_set.subset(torch.arange(80))


@pytest.fixture(scope="module")
def seg_small():
    return make_segmentation(n=60, size=8, num_modalities=3, num_classes=4, seed=0)


def _shapes(d):
    return {m: tuple(d.features[m].shape[1:]) for m in d.modalities}


@pytest.mark.parametrize("method", ["mars", "moe", "late_fusion"])
@pytest.mark.parametrize("dataset", ["vectors", "maps"])
def test_modes_and_shapes(method, dataset, mfeat_small, seg_small):
    data = (mfeat_small if dataset == "vectors" else seg_small)[0]
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                        model_config(method=method, d_model=16, d_hidden=16, num_experts=4, fusion_heads=2, backend="cpu"))
    idx = torch.arange(6)
    feats = {m: data.features[m][idx] for m in data.modalities}
    M = data.num_modalities
    one = torch.zeros(6, M, dtype=torch.bool)
    one[:, 0] = True
    full = torch.ones(6, M, dtype=torch.bool)
    want = (6, data.num_classes) if dataset == "vectors" else (6, data.num_classes, 8, 8)
    for observed in (one, full):
        out = model(feats, observed, full, mode="train")
        assert out.logits.shape == want
        loss, parts = model.loss(out, data.labels[idx])
        loss.backward()
        assert torch.isfinite(loss)
        if method == "mars":
            assert {"task", "complete", "imitation", "balance"} <= parts.keys()
        model.eval()
        assert model(feats, observed).logits.shape == want
        if method == "mars":
            assert model(feats, observed, full, mode="oracle").logits.shape == want
        model.train()


def test_eval_uses_only_observed_modalities(mfeat_small):
    data = mfeat_small[0]
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                        model_config(d_model=16, d_hidden=16, num_experts=4, fusion_heads=2)).eval()
    idx = torch.arange(5)
    feats = {m: data.features[m][idx] for m in data.modalities}
    observed = torch.zeros(5, 6, dtype=torch.bool)
    observed[:, 2] = True
    changed = {m: (v if m == data.modalities[2] else torch.randn_like(v) * 100) for m, v in feats.items()}
    torch.testing.assert_close(model(feats, observed).logits, model(changed, observed).logits)


def test_oracle_needs_complete_modalities(mfeat_small):
    data = mfeat_small[0]
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task, model_config(d_model=16, fusion_heads=2))
    feats = {m: data.features[m][:3] for m in data.modalities}
    with pytest.raises(ValueError, match="needs `available`"):
        model(feats, torch.ones(3, 6, dtype=torch.bool), mode="oracle")


def _tiny(epochs, method="mars"):
    return TrainConfig(epochs=epochs, batch_size=32, model=model_config(method=method, d_model=16, d_hidden=16,
                                                                        num_experts=4, fusion_heads=2, backend="cpu"))


def test_resume_matches_uninterrupted_run(tmp_path, mfeat_small):
    full, resumed, part = train_interrupted(_tiny, 4, 2, tmp_path, mfeat_small)
    assert resumed["summary"]["test_mean"] == full["summary"]["test_mean"]
    assert resumed["test"]["subsets"] == full["test"]["subsets"]
    lines = (part / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3, 4]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, mfeat_small, monkeypatch):
    from mars import model as model_mod

    real_loss = model_mod.MarsModel.loss
    calls = {"n": 0}

    def poisoned(self, out, labels, ignore_index=None):
        calls["n"] += 1
        total, parts = real_loss(self, out, labels, ignore_index)
        return (total * float("nan") if calls["n"] > 8 else total), parts  # 7 steps per epoch

    monkeypatch.setattr(model_mod.MarsModel, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2"):
        train(_tiny(3), tmp_path / "run", data=mfeat_small, progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_cli_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--epochs", "1", "--quiet", "--d-model", "16", "--d-hidden", "16", "--experts", "4", "--backend", "cpu"]
    assert cli.main(["train", *common, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "mean over all 63 modality subsets" in out
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "results.csv", "summary.json",
                 "score_by_observed.png", "expert_usage.png"):
        assert (run / name).exists(), name
    assert len((run / "results.csv").read_text().splitlines()) == 64
    assert cli.main(["eval", str(run)]) == 0
    assert cli.main(["eval", str(run), "--oracle"]) == 0
    cmp_dir = tmp_path / "cmp"
    # commas or spaces, aliases, repeats dropped
    assert cli.main(["compare", *common, "--seeds", "2", "--methods", "mars,late-fusion", "mars",
                     "--out", str(cmp_dir)]) == 0
    table = (cmp_dir / "compare.md").read_text()
    assert "| mars |" in table and "| late_fusion |" in table and len(table.splitlines()) == 4
    assert (cmp_dir / "compare_by_observed.png").exists()


def test_method_lists_accept_commas_and_aliases():
    assert cli.method_list("mars,moe-retriever, mce,vanilla-moe,late-fusion") == [
        "mars", "moe_retriever", "mce", "moe", "late_fusion"]
    with pytest.raises(Exception, match="unknown method 'foo'"):
        cli.method_list("mars,foo")


def test_cli_reports_bad_data_clearly(tmp_path, capsys):
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "meta.json").write_text("{not json")
    assert cli.main(["train", "--data", str(bad), "--epochs", "1", "--quiet", "--out", str(tmp_path / "r")]) == 2
    assert "meta.json" in capsys.readouterr().err


def test_fusion_is_multihead_attention_on_every_backend():
    """The fusion op path equals nn.MultiheadAttention across the modality axis
    (then LayerNorm and the mean) on the masked tokens, whatever the backend."""
    from mars.components import ModalityAttentionFusion

    from helpers import assert_close

    torch.manual_seed(0)
    fuse = ModalityAttentionFusion(16, 2, dropout=0.0)
    h, missing = torch.randn(3, 5, 4, 16), torch.randn(4, 16)
    masks = [torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)]

    def by_mha(x):
        B, N, M, D = x.shape
        y = x.reshape(B * N, M, D)
        return fuse.norm(y + fuse.attn(y, y, y, need_weights=False)[0]).mean(1).reshape(B, N, D)

    for backend in cpu_backends(reference=True):
        fuse.backend = backend
        for z, mask in zip(fuse.fuse_masked(h, missing, masks), masks):
            assert_close(z, by_mha(torch.where(mask[:, None, :, None], h, missing)), torch.float32, backend)


def test_backends_agree_on_a_training_step(seg_small):
    data = seg_small[0]
    cfg = model_config(d_model=16, d_hidden=16, num_experts=4, fusion_heads=2, dropout=0.0)
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task, cfg)
    idx = torch.arange(8)
    feats = {m: data.features[m][idx] for m in data.modalities}
    full = torch.ones(8, data.num_modalities, dtype=torch.bool)
    observed = full.clone()
    observed[::2, 0] = False
    observed[1::2, 1:] = False

    def step(backend):
        model.backend = backend
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = model(feats, observed, full, mode="train")
        loss, _ = model.loss(out, data.labels[idx])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = step("reference")
    for backend in cpu_backends():
        loss, grads = step(backend)
        torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
        assert grads.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(grads[name], want[name], atol=1e-4, rtol=1e-4, msg=f"{backend}: {name}")


def test_state_dict_from_before_the_router_module_loads(mfeat_small):
    """Checkpoints written before MarsRouter have feature_router.* and
    residual_router.* at the top of the model, and before the MoE became
    one submodule router.* and experts.*; both load into moe.*, and the
    parameter order (the optimiser state's layout) is unchanged."""
    data = mfeat_small[0]
    cfg = model_config(d_model=16, d_hidden=16, num_experts=4, fusion_heads=2, router_mlp=True)
    torch.manual_seed(0)
    source = build_model(data.modalities, _shapes(data), data.num_classes, data.task, cfg).eval()
    oldest = {k.removeprefix("moe.").removeprefix("router."): v for k, v in source.state_dict().items()}
    older = {k.removeprefix("moe."): v for k, v in source.state_dict().items()}
    assert any(k.startswith("feature_router.") for k in oldest) and any(k.startswith("residual_router.") for k in oldest)
    blocks = [n.removeprefix("moe.").removeprefix("router.").split(".")[0] for n, _ in source.named_parameters()]
    assert list(dict.fromkeys(blocks)) == ["encode", "fuse", "feature_router", "residual_router", "experts", "head",
                                           "unimodal_heads"]
    for old_style in (oldest, older):
        torch.manual_seed(1)
        target = build_model(data.modalities, _shapes(data), data.num_classes, data.task, cfg).eval()
        target.load_state_dict(old_style)  # strict
        for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
            assert torch.equal(a, b), name
        feats = {m: data.features[m][:5] for m in data.modalities}
        observed = torch.ones(5, 6, dtype=torch.bool)
        torch.testing.assert_close(target(feats, observed).logits, source(feats, observed).logits, rtol=0, atol=0)


def test_method_registry_builds_every_method(mfeat_small):
    from mars import methods
    from mars.interface import TrainableModel

    data = mfeat_small[0]
    skips = {}
    for method in methods.REGISTRY.values():
        for spelling in method.spellings:
            assert methods.canonical(spelling) == method.name
        model = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                            model_config(method=method.cli_name, d_model=16, d_hidden=16, num_experts=4, fusion_heads=2))
        assert isinstance(model, TrainableModel)
        assert model.config.method == method.name
        skips[method.name] = model.may_skip_parameters
    assert skips == {"mars": False, "moe": False, "late_fusion": False, "moe_retriever": True, "mce": False,
                     "backbone": False}
    assert cli.METHOD_CHOICES == methods.cli_names()
    with pytest.raises(ValueError, match="method must be one of"):
        model_config(method="foo")


@pytest.mark.parametrize("routing,skips", [("residual", False), ("feature", True), ("random", True)])
def test_routing_ablations_declare_unused_parameters(routing, skips, mfeat_small):
    """A step's parameters without gradient are exactly what may_skip_parameters announces."""
    data = mfeat_small[0]
    model = build_model(data.modalities, _shapes(data), data.num_classes, data.task,
                        model_config(routing=routing, d_model=16, d_hidden=16, num_experts=4, fusion_heads=2))
    assert model.may_skip_parameters == skips
    idx = torch.arange(8)
    feats = {m: data.features[m][idx] for m in data.modalities}
    full = torch.ones(8, 6, dtype=torch.bool)
    loss, _ = model.loss(model(feats, full & (torch.arange(6) < 3), full, mode="train"), data.labels[idx])
    loss.backward()
    unused = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert bool(unused) == skips
    assert all(n.startswith("moe.router.") for n in unused)


def _ddp_random_routing(rank, world, root):
    from mars.data import load_mfeat
    from mars.distributed import DistContext

    train_set, val_set, test_set = load_mfeat(seed=0)
    data = (train_set.subset(torch.arange(64)), val_set.subset(torch.arange(16)), test_set.subset(torch.arange(16)))
    cfg = TrainConfig(epochs=1, batch_size=16, model=model_config(routing="random", d_model=16, d_hidden=16,
                                                                  num_experts=4, fusion_heads=2, backend="cpu"))
    return train(cfg, root, data=data, progress=False, ctx=DistContext(rank=rank, world=world))["summary"]["best_epoch"]


def test_data_parallel_training_with_a_routing_ablation(tmp_path):
    """Random routing leaves the routers without gradient; the trainer tells
    DistributedDataParallel (find_unused_parameters), so training runs."""
    from dist_utils import run_distributed

    assert run_distributed(_ddp_random_routing, 2, args=(str(tmp_path / "run"),), timeout_s=120) == [1, 1]
