"""The one declarative configuration (mars/config.py) and the command line
generated from it (mars/options.py): one set of MARS defaults, per-method
options refused where a method does not read them, versioned loading of
every earlier config.json, --config FILE, and the size of --help."""
import json
import shutil
from pathlib import Path

import pytest

import mars_kernels as mk
from mars import cli, methods
from mars.config import (
    CONFIG_VERSION,
    METHOD_DEFAULTS,
    V1_DEFAULTS,
    ConfigError,
    ModelConfig,
    TrainConfig,
    default_config,
    field_paths,
    used_by,
)

V1_RUNS = Path(__file__).parent / "data" / "v1_runs"  # written by the release before the nested configuration


def mars(*args) -> int:
    return cli.main([str(a) for a in args])


# ----------------------------------------------------------- one set of defaults
def test_mars_defaults_live_in_one_place():
    """The layer's defaults, the configuration's and the command's are one object."""
    assert mk.MarsMoE(8, 16, 4, 2).config == mk.MarsConfig() == ModelConfig().mars == default_config().model.mars
    assert cli.config_from_args([]) == default_config("mars")
    cfg = default_config("mars")
    assert (cfg.masks_per_step, cfg.model.lambda_unimodal, cfg.model.unimodal_vote) == (8, 0.3, 2.0)
    assert cfg.model.mars.mix == "prob" and cfg.model.research.residual_input == "concat"
    for name in methods.names():  # every method's defaults come from the same table
        got = default_config(name)
        assert got.masks_per_step == METHOD_DEFAULTS[name].get("masks_per_step", 1), name
        assert cli.config_from_args(["--method", methods.get(name).cli_name]) == got, name


def test_every_field_has_help_and_a_command_line_option():
    text = " ".join(cli_help("--help-all").split())
    for path, f, section in field_paths():
        assert f.metadata.get("help"), path
        flag = cli_flag(path)
        assert flag in text, (path, flag)


def cli_help(*args) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["train", *args])
    return out.getvalue()


def cli_flag(path: str) -> str:
    from mars.options import flag_paths

    return "--" + {v: k for k, v in flag_paths().items()}[path].replace("_", "-")


def test_help_fits_a_page_and_help_all_lists_the_rest():
    short, full = cli_help("--help"), cli_help("--help-all")
    assert len(short.splitlines()) <= 120, len(short.splitlines())
    assert "--residual-input" not in short and "--residual-input" in full
    assert "--help-all" in short and "--config FILE" in short


# ----------------------------------------------------------- options a method does not read
@pytest.mark.parametrize("method, args, path", [
    ("late-fusion", ["--lambda-unimodal", "0.3"], "model.lambda_unimodal"),
    ("late-fusion", ["--unimodal-vote", "2"], "model.unimodal_vote"),
    ("mce", ["--experts", "4"], "model.num_experts"),
    ("moe-retriever", ["--sigma-0", "2"], "model.mars.sigma_0"),
    ("vanilla-moe", ["--noise", "none"], "model.mars.noise"),  # MARS-only on the vanilla MoE
    ("vanilla-moe", ["--residual-input", "diff"], "model.research.residual_input"),
    ("mars", ["--retriever-k", "2"], "model.retriever.k"),
    ("mars", ["--lambda-sep", "2"], "model.mce.lambda_sep"),
    ("late-fusion", ["--backend", "cpu"], "model.backend"),
])
def test_an_option_the_method_does_not_read_is_refused_by_name(method, args, path, tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        cli.config_from_args(["--method", method, *args])
    assert e.value.field == path and "is not used by" in e.value.message
    assert mars("train", "--method", method, *args, "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mars: error: {args[0]}: is not used by") and not (tmp_path / "r").exists()


def test_the_same_option_at_its_default_value_is_refused_too():
    with pytest.raises(ConfigError, match="not used by late-fusion"):
        cli.config_from_args(["--method", "late-fusion", "--experts", "8"])


def test_compare_gives_each_method_the_options_it_reads():
    configs = cli.compare_configs_from_args(["--methods", "mars", "late-fusion", "--seeds", "2", "--experts", "4",
                                             "--sigma-0", "2", "--epochs", "3"])
    assert list(configs) == ["mars", "late_fusion"] and [c.seed for c in configs["mars"]] == [0, 1]
    assert configs["mars"][0].model.num_experts == 4 and configs["mars"][0].model.mars.sigma_0 == 2.0
    assert configs["late_fusion"][0].epochs == 3 and "num_experts" not in configs["late_fusion"][0].model.to_dict()
    assert configs["late_fusion"][0] == default_config("late_fusion", epochs=3)
    # an option no compared method reads is refused
    with pytest.raises(ConfigError, match="not used by any compared method"):
        cli.compare_configs_from_args(["--methods", "late-fusion", "mce", "--experts", "4"])


def test_unused_sections_are_not_recorded():
    for name in methods.names():
        d = default_config(name).to_dict()
        assert d["version"] == CONFIG_VERSION
        for section in ("mars", "research", "retriever", "mce", "late_fusion"):
            readers = {m for path, _, s in field_paths() if s == section for m in used_by(path)}
            assert (section in d["model"]) == (name in readers), (name, section)
        assert TrainConfig.from_dict(json.loads(json.dumps(d))) == default_config(name)


def test_a_non_default_value_in_a_section_the_method_does_not_read_is_refused():
    with pytest.raises(ConfigError) as e:
        ModelConfig(method="mce", mars=mk.MarsConfig(sigma_0=2.0))
    assert e.value.field == "model.mars.sigma_0"
    with pytest.raises(ConfigError) as e:
        TrainConfig(expert_parallel=True, model=ModelConfig(method="late_fusion"))
    assert e.value.field == "expert_parallel"


# ----------------------------------------------------------- versions
def _copy(name: str, tmp_path: Path) -> Path:
    run = tmp_path / name
    shutil.copytree(V1_RUNS / name, run)
    return run


@pytest.mark.parametrize("name", ["mars_v1", "moe_v1", "mce_v1"])
def test_a_run_of_the_earlier_release_evaluates_as_it_did(name, tmp_path, capsys):
    """config.json and checkpoint.pt as the release before the nested
    configuration wrote them: `mars eval` scores the run as that release did."""
    run = _copy(name, tmp_path)
    recorded = json.loads((run / "summary.json").read_text())["test_mean"]
    assert mars("eval", run) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "mean over subsets" in x)
    got = float(line.split("mean over subsets ")[1].split()[0])
    assert got == pytest.approx(recorded, abs=0.005), (line, recorded)


def test_a_run_of_the_earlier_release_resumes(tmp_path, capsys):
    run = _copy("mars_v1", tmp_path)
    assert mars("train", "--resume", run, "--epochs", "3", "--quiet") == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    saved = json.loads((run / "config.json").read_text())
    assert saved["version"] == CONFIG_VERSION and saved["epochs"] == 3  # rewritten in this version's form
    cfg = TrainConfig.from_dict(saved)
    # it still means what it meant: the earlier release's mars command defaults of that run
    v1 = json.loads((V1_RUNS / "mars_v1" / "config.json").read_text())
    assert cfg.masks_per_step == v1["masks_per_step"] and cfg.model.mars.mix == v1["model"]["mix"]
    assert cfg.model.unimodal_vote == v1["model"]["unimodal_vote"]


def test_version_1_keys_that_are_missing_mean_what_they_meant():
    """A version-1 config.json written before an option existed has the value
    that kept older runs unchanged, not today's default."""
    cfg = TrainConfig.from_dict({"model": {"method": "mars"}})
    assert (cfg.masks_per_step, cfg.model.lambda_unimodal, cfg.model.unimodal_vote) == (1, 0.0, 0.0)
    assert (cfg.model.mars.mix, cfg.device, cfg.precision, cfg.lr_schedule) == ("none", "cpu", "fp32", "constant")
    moe = TrainConfig.from_dict({"model": {"method": "moe", "mask_router": True, "routing": "residual"}})
    assert moe.model.research.feature_input == "tokens+mask"
    assert moe.model.mars == mk.MarsConfig()  # MARS-only version-1 keys of a vanilla-MoE run are dropped
    late = TrainConfig.from_dict({"model": {**V1_DEFAULTS["model"], "method": "late_fusion"}})
    assert late.model.to_dict() == {"method": "late_fusion", "d_model": 64, "d_hidden": 128, "dropout": 0.1,
                                    "late_fusion": {"average": "all"}}  # version 1 averaged over all modalities
    assert (late.test_split, late.train_missing) == ("per-seed", "none")


@pytest.mark.parametrize("key, value", [("lambda_recon", 0.3), ("lambda_align", 1.0), ("lambda_distill", 1.0),
                                        ("imitation", "topk_ce"), ("mask_experts", True),
                                        ("residual_input", "bottleneck"), ("mix", "blend")])
def test_a_version_1_run_of_a_removed_variant_is_refused_with_its_commit(key, value):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"model": {"method": "mars", key: value}})
    assert e.value.field == f"model.{key}" and "0af3990" in e.value.message
    # at the value under which version 1 did not use it, the key loads (and is dropped)
    off = {"lambda_recon": 0.0, "lambda_align": 0.0, "lambda_distill": 0.0, "imitation": "kl", "mask_experts": False,
           "residual_input": "concat", "mix": "none"}[key]
    TrainConfig.from_dict({"model": {"method": "mars", key: off}})


def test_unknown_versions_and_keys_are_refused():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"version": 99})
    assert e.value.field == "version"
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainConfig.from_dict({"version": 2, "model": {"mars": {"colour": 1}}})
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainConfig.from_dict({"model": {"colour": 1}})  # version 1


# ----------------------------------------------------------- --config FILE
def test_config_file_sets_options_and_the_command_line_wins(tmp_path):
    f = tmp_path / "opts.json"
    f.write_text(json.dumps({"epochs": 7, "model": {"d_model": 32, "mars": {"sigma_0": 2.5},
                                                    "research": {"residual_input": "diff"}}}))
    cfg = cli.config_from_args(["--config", str(f), "--epochs", "9"])
    assert (cfg.epochs, cfg.model.d_model, cfg.model.mars.sigma_0) == (9, 32, 2.5)
    assert cfg.model.research.residual_input == "diff"
    # a whole config.json of a run, of this version or the earlier one, reproduces it
    run_cfg = default_config("moe", epochs=5).to_dict()
    (tmp_path / "run.json").write_text(json.dumps(run_cfg))
    assert cli.config_from_args(["--config", str(tmp_path / "run.json")]) == default_config("moe", epochs=5)
    v1 = V1_RUNS / "moe_v1" / "config.json"
    assert cli.config_from_args(["--config", str(v1)]) == TrainConfig.from_dict(json.loads(v1.read_text()))


def test_config_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    for text, want in (('{"epochs": 1,', "invalid JSON"), ('{"colour": 1}', "unknown keys ['colour']"),
                       ('[1]', "expected a JSON object"), ('{"model": {"mce": {"lambda_sep": 2}}}', "bad.json")):
        bad.write_text(text)
        assert mars("train", "--config", bad, "--out", tmp_path / "r") == 2
        err = capsys.readouterr().err
        assert err.startswith("mars: error: ") and want in err, err
        assert not (tmp_path / "r").exists()
    assert mars("train", "--config", tmp_path / "missing.json", "--out", tmp_path / "r") == 2
    assert "missing.json" in capsys.readouterr().err
