"""The one declarative configuration of ``mars``.

:class:`TrainConfig` (a run: data, schedule, missingness protocol, device)
holds :class:`ModelConfig` (the method and the options every method shares),
which holds one section per method family:

* ``mars``: :class:`mars_kernels.MarsConfig`, the options of the MARS layer
  (defaults: the MARS of the results tables, the same object ``mk.MarsMoE()``
  uses); the vanilla MoE reads its ``router_mlp`` and ``lambda_balance``;
* ``research``: :class:`ResearchConfig`, variants under study (``mars.research``);
* ``retriever``: :class:`RetrieverConfig` (MoE-Retriever);
* ``mce``: :class:`MCEConfig` (MCE).

Every field carries its help text in its metadata; the ``mars`` command's
options are generated from them (:mod:`mars.options`). :data:`USED_BY` says
which methods read a field: an option a method does not read is refused by
name, never recorded. Fields whose default is the method's own are ``None``
in the dataclass and filled from :data:`METHOD_DEFAULTS`, the one table of
per-method defaults (chosen on validation, ``docs/mars_research.md``).

Versions: :meth:`TrainConfig.to_dict` writes ``{"version": 2, ...}`` with
the fields the method reads; :meth:`TrainConfig.from_dict` reads that and the
flat ``config.json`` of earlier releases (version 1), each missing key taking
the value it meant when that file was written (:data:`V1_DEFAULTS`), so an
old run loads and means what it meant. A version-1 run that used a variant
since removed (see :data:`REMOVED_V1`) is refused with the commit it lived in.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import MISSING, dataclass, field, fields

from mars_kernels.layers.mars import MIX_MODES, NOISE_MODES, ROUTINGS, MarsConfig
from mars_kernels.ops import ACTIVATIONS

from . import methods
from .data import MissingnessProtocol
from .data.sources import TEST_SPLITS
from .research.router_inputs import FEATURE_INPUTS, RESIDUAL_INPUTS
from .research.silent_missing import MISSING_SIGNALS

__all__ = [
    "ConfigError", "TrainConfig", "ModelConfig", "MarsConfig", "ResearchConfig", "RetrieverConfig", "MCEConfig",
    "LateFusionConfig",
    "SECTIONS", "USED_BY", "METHOD_DEFAULTS", "BASE_DEFAULTS", "method_default", "CONFIG_VERSION", "V1_DEFAULTS", "REMOVED_V1", "default_config",
    "used_by", "field_paths", "ADVANCED_MARS", "check_device_spec", "BACKBONES", "BACKENDS", "PRECISIONS", "LR_SCHEDULES",
    "RETRIEVER_VARIANTS", "SHAPLEY_VARIANTS", "MAX_SEED", "MAX_MASKS_PER_STEP", "MAX_UNIMODAL_VOTE",
    "NOISE_MODES", "ROUTINGS", "MIX_MODES",
]

CONFIG_VERSION = 2
BACKBONES = ("attention", "late", "mce")
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
RETRIEVER_VARIANTS = ("paper", "code")
SHAPLEY_VARIANTS = ("exact", "code")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
MAX_SEED = 2**62  # room for the per-rank offsets added to the seed under torchrun
MAX_MASKS_PER_STEP = 64
# Beyond this the heads' vote is the prediction and the fused head no longer
# counts; a larger weight is a typo, and 1e300 would overflow to a constant class.
MAX_UNIMODAL_VOTE = 100.0


class ConfigError(ValueError):
    """A configuration value of the wrong type or out of range; ``field`` names
    it by its path (``model.mars.sigma_0``, ``epochs``)."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


def opt(default, help: str, *, choices: tuple | None = None, low=None, high=None, above: float | None = None,
        below: float | None = None, flag: str | None = None, advanced: bool = False, metavar: str | None = None):
    """A configuration field: its default and the metadata the checks and the
    command line read. ``low``/``high``: inclusive bounds; ``above``/``below``:
    exclusive ones; ``flag``: the option's spelling when it is not
    ``--<name>``; ``advanced``: listed by ``--help-all`` only."""
    meta = dict(help=help, choices=choices, low=low, high=high, above=above, below=below, flag=flag,
                advanced=advanced, metavar=metavar)
    return field(default=default, metadata=meta)


def check_device_spec(spec) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N a non-negative integer),
    returned in its plain spelling (``cuda:01`` -> ``cuda:1``); anything else
    is a :class:`ConfigError` of ``device``. Whether this machine has the
    device is :func:`mars.devices.resolve_device`'s question."""
    if isinstance(spec, str):
        name, sep, index = spec.partition(":")
        if not sep and name in ("auto", "cpu", "cuda"):
            return spec
        if name == "cuda" and index.isascii() and index.isdigit():
            return f"cuda:{int(index)}"
    raise ConfigError("device", f"expected auto, cpu, cuda or cuda:N (N = 0, 1, ...), got {spec!r}")


def _kind(f) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _check_field(obj, f, path: str):
    """The value of field ``f`` of ``obj``, type- and range-checked (``float``
    fields take any real number and store a float); raises ConfigError."""
    value, kind, meta = getattr(obj, f.name), _kind(f), f.metadata
    if value is None and "None" in kind:
        return None
    base = kind.replace(" | None", "")
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        value = int(value) if ok else value
    elif base == "float":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:
                value = math.inf
            if not math.isfinite(value):
                raise ConfigError(path, f"must be {_range_text(meta, 'a finite number')}, got {value}")
    elif base == "str":
        ok = isinstance(value, str)
    else:
        return value
    if not ok:
        raise ConfigError(path, f"expected {'a number' if base == 'float' else base}"
                                f"{' or null' if 'None' in kind else ''}, got {value!r}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(path, f"must be one of {meta['choices']}, got {value!r}")
    low, high, above, below = meta.get("low"), meta.get("high"), meta.get("above"), meta.get("below")
    if ((low is not None and value < low) or (high is not None and value > high)
            or (above is not None and not value > above) or (below is not None and not value < below)):
        raise ConfigError(path, f"must be {_range_text(meta, 'an integer' if base == 'int' else 'a finite number')}, "
                                f"got {value}")
    return value


def _number_text(x) -> str:
    if isinstance(x, int) and x >= 2**20 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(meta, what: str) -> str:
    """"a finite number > 0", "an integer in [0, 2**62]", "in [0, 1)"..."""
    low, high, above, below = meta.get("low"), meta.get("high"), meta.get("above"), meta.get("below")
    if (low is not None or above is not None) and (high is not None or below is not None):
        left = f"[{_number_text(low)}" if low is not None else f"({_number_text(above)}"
        right = f"{_number_text(high)}]" if high is not None else f"{_number_text(below)})"
        return f"{what} in {left}, {right}" if what == "an integer" else f"in {left}, {right}"
    if above is not None:
        return f"{what} > {_number_text(above)}"
    if low is not None:
        return f">= {_number_text(low)}" if what == "an integer" else f"{what} >= {_number_text(low)}"
    return what


def _check_fields(obj, prefix: str = "") -> None:
    for f in fields(obj):
        if f.name in SECTIONS or f.name == "model":
            continue
        object.__setattr__(obj, f.name, _check_field(obj, f, prefix + f.name))


# ------------------------------------------------------------------- sections


@dataclass
class ResearchConfig:
    """Variants of MARS still under study (:mod:`mars.research`)."""

    residual_input: str = opt("concat", "the residual router reads [z_i, sg(z_c)] (concat), sg(z_c - z_i) (diff), "
                              "its mean over the batch's tokens with the same missing pattern (pattern), or diff / "
                              "concat with the task head's row space projected out (diff-label-free, "
                              "concat-label-free)",
                              choices=tuple(RESIDUAL_INPUTS), advanced=True)
    feature_input: str = opt("tokens", "the feature router reads z_i (tokens), z_i and the observed mask "
                             "(tokens+mask) or the mask only (mask: a router by missing pattern)",
                             choices=tuple(FEATURE_INPUTS), advanced=True)
    missing_signal: str = opt("flag", "how a missing modality reaches the model: flagged (flag: missing embeddings, "
                              "masked attention), or silent (research: its tokens replaced by noise of their own "
                              "statistics and no mask given, mars.research.silent_missing)",
                              choices=MISSING_SIGNALS, advanced=True)

    def __post_init__(self):
        _check_fields(self, "model.research.")


@dataclass
class RetrieverConfig:
    """MoE-Retriever (:mod:`mars.baselines.moe_retriever`)."""

    variant: str = opt("paper", "paper: attention + restricted noisy top-k MoE retrieval; code: the official code's "
                       "0.5/0.5 mean imputation", choices=RETRIEVER_VARIANTS)
    candidates: int = opt(8, "modality-specific experts per modality", low=1, advanced=True)
    shared: int = opt(4, "shared experts", low=0, advanced=True)
    k: int = opt(4, "experts per token", low=1)
    alpha: float = opt(0.5, "weight of the inter-modal context", low=0.0, high=1.0, advanced=True)
    warmup: int = opt(0, "epochs before retrieval starts", low=0)
    lambda_gate: float = opt(0.01, "weight of the retriever's balance loss", low=0.0, flag="--lambda-gate")

    def __post_init__(self):
        _check_fields(self, "model.retriever.")
        if self.k > self.candidates + self.shared:
            raise ConfigError("model.retriever.k", f"must be in [1, candidates + shared = "
                                                   f"{self.candidates + self.shared}], got {self.k}")


@dataclass
class MCEConfig:
    """MCE (:mod:`mars.baselines.mce`)."""

    shapley: str = opt("exact", "exact Shapley values, or the official code's formula", choices=SHAPLEY_VARIANTS)
    teacher_epochs: int = opt(10, "epochs of the frozen unimodal models", low=0)
    use_a: bool = opt(True, "the dataset-level factor 1/(1 - r_m)", advanced=True)
    use_b: bool = opt(True, "the Shapley batch-level factor", advanced=True)
    lambda_sep: float = opt(1.0, "weight of the separation loss", low=0.0, flag="--lambda-sep", advanced=True)
    lambda_com: float = opt(1.0, "weight of the completion loss", low=0.0, flag="--lambda-com", advanced=True)
    lambda_sub: float = opt(1.0, "weight of the subset loss", low=0.0, flag="--lambda-sub", advanced=True)

    def __post_init__(self):
        _check_fields(self, "model.mce.")


@dataclass
class LateFusionConfig:
    """Late fusion (:mod:`mars.baselines.late_fusion`)."""

    average: str = opt("all", "average the per-modality logits over all modalities (missing ones through their "
                       "learned embedding) or over the observed ones only", choices=("all", "observed"))

    def __post_init__(self):
        _check_fields(self, "model.late_fusion.")


#: ModelConfig's sections: name -> (dataclass, prefix of its command-line options).
SECTIONS = {"mars": (MarsConfig, ""), "research": (ResearchConfig, ""), "retriever": (RetrieverConfig, "retriever-"),
            "mce": (MCEConfig, "mce-"), "late_fusion": (LateFusionConfig, "late-fusion-")}


# ---------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """The model: the method, the options every method shares, and one
    section per method family (see the module docstring). ``method``: any
    name or alias of :mod:`mars.methods`; stored canonical."""

    method: str = opt(methods.DEFAULT_METHOD, "the method: " + ", ".join(methods.cli_names()))
    d_model: int = opt(64, "model width D", low=1)
    d_hidden: int = opt(128, "hidden width of the experts and MLPs", low=1)
    num_experts: int = opt(8, "experts E", low=1, flag="--experts")
    k: int = opt(2, "experts per token", low=1)
    activation: str = opt("gelu", "the experts' activation", choices=tuple(ACTIVATIONS), advanced=True)
    fusion_heads: int = opt(4, "attention heads of the fusion", low=1, advanced=True)
    dropout: float | None = opt(None, "dropout probability; default: the method's own", low=0.0, below=1.0)
    backbone: str = opt("attention", "fusion backbone: attention across modalities, late (per-modality towers, "
                        "mean) or mce (MCE's completion Transformer)", choices=BACKBONES)
    backend: str | None = opt(None, "the kernels: auto (default), reference, cpu, triton or cuda", choices=BACKENDS)
    lambda_complete: float = opt(1.0, "weight of the complete pass's cross-entropy", low=0.0, advanced=True)
    lambda_unimodal: float | None = opt(None, "weight of the cross-entropy of one linear head per modality on its "
                                        "encoder's tokens (0: no heads); default: the method's own", low=0.0)
    unimodal_vote: float | None = opt(None, "weight W of those heads in the prediction: log_softmax(head(y)) + W * "
                                      "mean over observed m of log_softmax(head_m); default: the method's own "
                                      "when the heads are on, else 0", low=0.0, high=MAX_UNIMODAL_VOTE, metavar="W")
    mars: MarsConfig = field(default_factory=MarsConfig)
    research: ResearchConfig = field(default_factory=ResearchConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    mce: MCEConfig = field(default_factory=MCEConfig)
    late_fusion: LateFusionConfig = field(default_factory=LateFusionConfig)

    def __post_init__(self):
        _check_fields(self, "model.")
        if self.backend == "auto":
            self.backend = None
        try:
            self.method = methods.canonical(self.method)
        except ValueError as e:
            raise ConfigError("model.method", str(e)) from None
        for name, (kind, _) in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                value = _section_from_dict(kind, value, f"model.{name}")
            if not isinstance(value, kind):
                raise ConfigError(f"model.{name}", f"expected a {kind.__name__} or a dict of its fields, "
                                                   f"got {type(value).__name__}")
            setattr(self, name, value)
        if not self.k <= self.num_experts:
            raise ConfigError("model.k", f"must be in [1, num_experts={self.num_experts}], got {self.k}")
        if self.d_model % self.fusion_heads:
            raise ConfigError("model.d_model", f"must be divisible by fusion_heads={self.fusion_heads}, "
                                               f"got {self.d_model}")
        if self.dropout is None:
            self.dropout = method_default(self.method, "model.dropout")
        if self.lambda_unimodal is None:
            self.lambda_unimodal = method_default(self.method, "model.lambda_unimodal")
        if self.unimodal_vote is None:
            self.unimodal_vote = method_default(self.method, "model.unimodal_vote") if self.lambda_unimodal > 0 else 0.0
        if self.unimodal_vote > 0 and self.lambda_unimodal == 0:
            raise ConfigError("model.unimodal_vote", f"needs the per-modality heads (lambda_unimodal > 0), got "
                                                     f"unimodal_vote={self.unimodal_vote} with lambda_unimodal=0")
        _check_unused(self, "model.", self.method)

    def to_dict(self) -> dict:
        """The fields (and sections) ``method`` reads, as plain JSON values."""
        out = {}
        for f in fields(self):
            if f.name in SECTIONS:
                section = {s.name: getattr(getattr(self, f.name), s.name) for s in fields(getattr(self, f.name))
                           if self.method in used_by(f"model.{f.name}.{s.name}")}
                if section:
                    out[f.name] = section
            elif self.method in used_by(f"model.{f.name}"):
                out[f.name] = getattr(self, f.name)
        return out


# ---------------------------------------------------------------------- a run


@dataclass
class TrainConfig:
    """A training run: data, schedule, missingness protocol and the model.

    device: "auto" | "cpu" | "cuda" | "cuda:N" (:mod:`mars.devices`); a run
        stores the resolved one ("cpu", "cuda" or "cuda:N"); a version-1
        ``config.json`` without it means "cpu".
    precision: "fp32" | "bf16" (autocast of the forward pass and the loss to
        bfloat16, float32 master weights).
    masks_per_step: P incomplete masks drawn per sample per step (None: the
        method's own). Models that take a stack of masks get observed
        [P, B, M] (MARS and vanilla MoE fuse every mask, and MARS's one
        complete pass, in one call of each fusion op); the others see the
        batch repeated P times.
    lr_schedule: "constant" | "cosine" (per step, from ``lr`` down to 0 at the
        end of ``epochs``, a closed form of the step, so a resumed run
        continues it).
    """

    data: str = opt("mfeat", "'mfeat' (embedded), 'synthetic-missing', 'synthetic-seg', a feature directory, or "
                    "BENCHMARK:DIR (crema-d, food-101, casia-surf, mcubes)")
    protocol: str = opt("uniform", "training missingness: uniform | independent:0.2,0.5,0.8 (one rate per modality) "
                        "| fixed:0.5")
    train_missing: str = opt("none", "training data: none (complete, as the data has it), or a protocol: each "
                             "training sample keeps one fixed subset of its modalities, drawn once, and no method "
                             "sees the rest")
    test_split: str = opt("fixed", "fixed: the same test samples for every seed (the seed draws train/val); "
                          "per-seed: all three drawn by the seed (earlier releases)", choices=TEST_SPLITS,
                          advanced=True)
    epochs: int = opt(40, "epochs to train (with --resume: the total)", low=1)
    batch_size: int = opt(64, "samples per step", low=1)
    lr: float | None = opt(None, "learning rate (AdamW); default: the method's own", above=0.0)
    weight_decay: float = opt(1e-4, "AdamW weight decay", low=0.0, advanced=True)
    lr_schedule: str = opt("constant", "constant, or cosine: per step from --lr down to 0 at the last epoch",
                           choices=LR_SCHEDULES, advanced=True)
    masks_per_step: int | None = opt(None, "incomplete masks drawn per sample per step (MARS shares one complete "
                                     "pass across them); default: the method's own", low=1, high=MAX_MASKS_PER_STEP,
                                     metavar="P")
    seed: int = opt(0, "seed of initialisation, masks and the train/val split", low=0, high=MAX_SEED)
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N",
                      metavar="auto|cpu|cuda|cuda:N")
    precision: str = opt("fp32", "fp32, or bf16: the forward pass and the loss under autocast to bfloat16, float32 "
                         "weights", choices=PRECISIONS)
    expert_parallel: bool = opt(False, "under torchrun: shard the experts over the processes", advanced=True)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = _model_from_dict(self.model)
        if not isinstance(self.model, ModelConfig):
            raise ConfigError("model", f"expected a ModelConfig or a dict of its fields, got {type(self.model).__name__}")
        _check_fields(self)
        for name in ("masks_per_step", "lr"):
            if getattr(self, name) is None:
                setattr(self, name, method_default(self.model.method, name))
        if not self.data:
            raise ConfigError("data", "must name a data source, got ''")
        self.device = check_device_spec(self.device)
        for name in ("protocol", "train_missing"):
            if name == "train_missing" and self.train_missing == "none":
                continue
            try:
                MissingnessProtocol.parse(getattr(self, name))
            except ValueError as e:
                raise ConfigError(name, str(e)) from None
        if self.expert_parallel and not methods.get(self.model.method).sparse_moe:
            raise ConfigError("expert_parallel", f"shards the experts of {_methods_of('expert_parallel')}, "
                                                 f"not of {self.model.method}")

    def to_dict(self) -> dict:
        """``config.json``'s form: the version and the fields the method reads."""
        out = {"version": CONFIG_VERSION}
        for f in fields(self):
            out[f.name] = self.model.to_dict() if f.name == "model" else getattr(self, f.name)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From ``to_dict``'s form, of this version or an earlier one (a
        missing key takes the value it meant in that version); every key and
        value is checked (:class:`ConfigError`)."""
        if not isinstance(d, dict):
            raise ConfigError("config", f"expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", 1)
        if version == 1:
            d = _from_v1(d)
        elif version != CONFIG_VERSION:
            raise ConfigError("version", f"this mars reads configuration versions 1 to {CONFIG_VERSION}, got {version!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError("config", f"unknown keys {sorted(unknown)}")
        if "model" in d and not isinstance(d["model"], dict):
            raise ConfigError("model", f"expected a JSON object, got {d['model']!r}")
        return cls(**d)


def _section_from_dict(kind, d: dict, path: str):
    known = {f.name for f in fields(kind)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(path, f"unknown keys {sorted(unknown)}")
    try:
        return kind(**d)
    except ConfigError:
        raise
    except ValueError as e:  # MarsConfig's own checks: "MarsConfig.<field> <message>"
        where = re.match(r"\w+\.(\w+) (.*)", str(e), re.S)
        if where is None:
            raise ConfigError(path, str(e)) from None
        raise ConfigError(f"{path}.{where.group(1)}", where.group(2)) from None


def _model_from_dict(d: dict) -> ModelConfig:
    if not isinstance(d, dict):
        raise ConfigError("model", f"expected a JSON object, got {d!r}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError("model", f"unknown keys {sorted(unknown)}")
    for name in SECTIONS:
        if name in d and not isinstance(d[name], dict):
            raise ConfigError(f"model.{name}", f"expected a JSON object, got {d[name]!r}")
    return ModelConfig(**d)


# ------------------------------------------------- which methods read a field

_ALL = tuple(methods.names())
#: Field path -> the methods that read it; a path not listed here is read by
#: every method, a section's fields by the section's own methods
#: (:data:`_SECTION_USERS`) unless listed.
USED_BY: dict[str, tuple[str, ...]] = {
    "model.num_experts": ("mars", "moe"),
    "model.k": ("mars", "moe"),
    "model.activation": ("mars", "moe", "moe_retriever"),
    "model.fusion_heads": ("mars", "moe", "backbone", "moe_retriever", "mce"),
    "model.backbone": ("mars", "moe", "backbone"),
    "model.backend": ("mars", "moe", "backbone", "moe_retriever"),
    "model.lambda_complete": ("mars",),
    "model.lambda_unimodal": ("mars", "moe"),
    "model.unimodal_vote": ("mars", "moe"),
    "model.mars.router_mlp": ("mars", "moe"),
    "model.mars.lambda_balance": ("mars", "moe"),
    "model.research.feature_input": ("mars", "moe"),
    "model.research.missing_signal": ("mars", "moe"),
    "expert_parallel": tuple(m.name for m in methods.REGISTRY.values() if m.sparse_moe),
}
#: Options of the kernel package's MarsConfig (which has no say in the
#: command line) listed by ``--help-all`` only.
ADVANCED_MARS = {"model.mars.sigma_const", "model.mars.mix_scale", "model.mars.router_mlp",
                 "model.mars.lambda_balance"}
_SECTION_USERS = {"mars": ("mars",), "research": ("mars",), "retriever": ("moe_retriever",), "mce": ("mce",),
                  "late_fusion": ("late_fusion",)}


def used_by(path: str) -> tuple[str, ...]:
    """The methods that read the field at ``path`` (``model.mars.sigma_0``)."""
    if path in USED_BY:
        return USED_BY[path]
    parts = path.split(".")
    if len(parts) == 3 and parts[0] == "model" and parts[1] in _SECTION_USERS:
        return _SECTION_USERS[parts[1]]
    return _ALL


def _methods_of(path: str) -> str:
    return ", ".join(methods.get(m).cli_name for m in used_by(path))


def _check_unused(model: ModelConfig, prefix: str, method: str) -> None:
    """Every field ``method`` does not read holds its default (a value there
    would be recorded and do nothing)."""
    for f in fields(model):
        if f.name in SECTIONS:
            section, default = getattr(model, f.name), SECTIONS[f.name][0]()
            for s in fields(section):
                path = f"{prefix}{f.name}.{s.name}"
                if method not in used_by(path) and getattr(section, s.name) != getattr(default, s.name):
                    raise ConfigError(path, f"is not used by {methods.get(method).cli_name} (only by "
                                            f"{_methods_of(path)}); leave it out")
        elif f.name != "method":
            path = prefix + f.name
            default = f.default if f.default is not MISSING else None
            value = getattr(model, f.name)
            if method not in used_by(path) and value != default and not (
                    f.name in ("lambda_unimodal", "unimodal_vote") and value == 0.0):
                raise ConfigError(path, f"is not used by {methods.get(method).cli_name} (only by "
                                        f"{_methods_of(path)}); leave it out")


def field_paths(cls=None, prefix: str = ""):
    """(path, dataclass field, section dataclass or None) of every option of
    the configuration, in declaration order: the run's, the model's, then
    each section's."""
    cls = TrainConfig if cls is None else cls
    for f in fields(cls):
        if f.name == "model":
            yield from field_paths(ModelConfig, "model.")
        elif cls is ModelConfig and f.name in SECTIONS:
            for s in fields(SECTIONS[f.name][0]):
                yield f"model.{f.name}.{s.name}", s, f.name
        else:
            yield prefix + f.name, f, None


# ----------------------------------------------------------- per-method defaults

#: The defaults of the fields whose default is the method's own (None in the
#: dataclass): the base values, and each method's own where validation chose
#: another (docs/mars_research.md, docs/preregistration.md). Every other
#: default is the field's.
BASE_DEFAULTS = {"lr": 2e-3, "masks_per_step": 1, "model.dropout": 0.1, "model.lambda_unimodal": 0.0,
                 "model.unimodal_vote": 0.0}
METHOD_DEFAULTS: dict[str, dict] = {name: {} for name in methods.names()}
# Protocol v2's validation screens (experiments/results/v2/selection.json):
# each method's best of six configurations on validation, regime (a) cells.
METHOD_DEFAULTS["mars"].update({"masks_per_step": 8, "model.lambda_unimodal": 0.3, "model.unimodal_vote": 2.0,
                                "model.dropout": 0.2})
METHOD_DEFAULTS["moe"].update({"masks_per_step": 8, "model.lambda_unimodal": 0.3, "model.unimodal_vote": 2.0})
METHOD_DEFAULTS["late_fusion"].update({"masks_per_step": 8})
METHOD_DEFAULTS["mce"].update({"model.dropout": 0.2})
METHOD_DEFAULTS["moe_retriever"].update({"model.dropout": 0.2})


def method_default(method: str, path: str):
    """The default of the per-method field ``path`` for ``method``."""
    return METHOD_DEFAULTS[method].get(path, BASE_DEFAULTS[path])


def default_config(method: str = methods.DEFAULT_METHOD, **train_fields) -> TrainConfig:
    """The configuration ``mars train --method METHOD`` runs with no other
    option (``train_fields`` set TrainConfig fields, e.g. ``data``)."""
    return TrainConfig(model=ModelConfig(method=method), **train_fields)


# ------------------------------------------------------------- version 1

#: What each key of a version-1 ``config.json`` meant when it was absent (the
#: field defaults of the release that wrote it; later keys were added with the
#: value that kept older runs unchanged).
V1_DEFAULTS = {
    "data": "mfeat", "epochs": 40, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "seed": 0,
    "protocol": "uniform", "expert_parallel": False, "device": "cpu", "precision": "fp32", "masks_per_step": 1,
    "lr_schedule": "constant",
    "model": {
        "method": "mars", "d_model": 64, "d_hidden": 128, "num_experts": 8, "k": 2, "activation": "gelu",
        "fusion_heads": 4, "dropout": 0.1, "router_mlp": False, "residual_input": "concat", "residual_dim": 8,
        "backbone": "attention", "mask_router": False, "mask_experts": False, "mix": "none", "mix_scale": 1.0,
        "imitation": "kl", "noise": "adaptive", "routing": "residual", "sigma_0": 1.0, "sigma_max": 1.0,
        "sigma_const": 0.3, "lambda_complete": 1.0, "lambda_imit": 5.0, "lambda_balance": 0.01,
        "lambda_distill": 0.0, "lambda_align": 0.0, "lambda_recon": 0.0, "lambda_unimodal": 0.0,
        "unimodal_vote": 0.0, "backend": None, "retriever_variant": "paper", "retriever_candidates": 8,
        "retriever_shared": 4, "retriever_k": 4, "retriever_alpha": 0.5, "retriever_warmup": 0, "lambda_gate": 0.01,
        "mce_shapley": "exact", "mce_teacher_epochs": 10, "mce_use_a": True, "mce_use_b": True, "lambda_sep": 1.0,
        "lambda_com": 1.0, "lambda_sub": 1.0,
    },
}
#: Version-2 options a version-1 run had implicitly: its test split was drawn
#: by its seed, and its training data were complete (as the data had them).
V1_IMPLIED = {"test_split": "per-seed", "train_missing": "none"}
#: ... and its late fusion averaged the logits of all modalities.
V1_IMPLIED_MODEL = {"late_fusion": {"average": "all"}}
#: Version-1 options removed in version 2 (rejected by the research log) and
#: the value under which a version-1 run did not use them.
REMOVED_V1 = {"imitation": "kl", "lambda_distill": 0.0, "lambda_align": 0.0, "lambda_recon": 0.0,
              "mask_experts": False}
REMOVED_IN = "0af3990"  # the last commit with the removed options
_V1_MOVES = {
    **{k: ("mars", k) for k in ("noise", "routing", "sigma_0", "sigma_max", "sigma_const", "mix", "mix_scale",
                                "router_mlp", "lambda_imit", "lambda_balance")},
    "residual_input": ("research", "residual_input"),
    **{f"retriever_{k}": ("retriever", k) for k in ("variant", "candidates", "shared", "k", "alpha", "warmup")},
    "lambda_gate": ("retriever", "lambda_gate"),
    **{f"mce_{k}": ("mce", k) for k in ("shapley", "teacher_epochs", "use_a", "use_b")},
    **{k: ("mce", k) for k in ("lambda_sep", "lambda_com", "lambda_sub")},
}


def _from_v1(d: dict) -> dict:
    """A version-1 (flat) configuration -> version 2's nested form, each
    missing key taking its version-1 meaning."""
    model = d.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError("model", f"expected a JSON object, got {model!r}")
    unknown = set(d) - set(V1_DEFAULTS)
    if unknown:
        raise ConfigError("config", f"unknown keys {sorted(unknown)}")
    unknown = set(model) - set(V1_DEFAULTS["model"])
    if unknown:
        raise ConfigError("model", f"unknown keys {sorted(unknown)}")
    old = {**V1_DEFAULTS["model"], **model}
    for key, unused in REMOVED_V1.items():
        if old[key] != unused:
            raise ConfigError(f"model.{key}", f"this run used {key}={old[key]!r}, a variant removed after commit "
                                              f"{REMOVED_IN} (docs/mars_research.md); evaluate it with that commit")
    if old["residual_input"] == "bottleneck" or old["mix"] == "blend":
        key = "residual_input" if old["residual_input"] == "bottleneck" else "mix"
        raise ConfigError(f"model.{key}", f"this run used {key}={old[key]!r}, a variant removed after commit "
                                          f"{REMOVED_IN} (docs/mars_research.md); evaluate it with that commit")
    try:
        method = methods.canonical(old["method"])
    except ValueError as e:
        raise ConfigError("model.method", str(e)) from None
    new: dict = {"research": {}, "mars": {}, "retriever": {}, "mce": {}}
    for key, value in old.items():
        if key in REMOVED_V1 or key == "residual_dim":
            continue
        if key == "mask_router":
            if method in used_by("model.research.feature_input"):
                new["research"]["feature_input"] = "tokens+mask" if value else "tokens"
            continue
        section, name = _V1_MOVES.get(key, (None, key))
        path = f"model.{section}.{name}" if section else f"model.{name}"
        if key != "method" and method not in used_by(path):
            continue  # recorded by version 1 for every method; read by others only
        (new[section] if section else new)[name] = value
    run = {**{k: v for k, v in V1_DEFAULTS.items() if k != "model"}, **{k: v for k, v in d.items() if k != "model"},
           **V1_IMPLIED}
    for section, values in V1_IMPLIED_MODEL.items():
        new[section] = {k: v for k, v in values.items() if method in used_by(f"model.{section}.{k}")}
    return {**run, "model": {k: v for k, v in new.items() if v != {}}}

