"""Configuration dataclasses: :class:`ModelConfig` (every method's options)
and :class:`TrainConfig` (a training run). Both round-trip through plain dicts
(``config.json`` of a run directory)."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields

from mars_kernels.layers.mars_router import IMITATIONS, MIX_MODES, NOISE_MODES, RESIDUAL_INPUTS, ROUTINGS

from . import methods
from .data import MissingnessProtocol

__all__ = ["ConfigError", "ModelConfig", "TrainConfig", "NOISE_MODES", "ROUTINGS", "RESIDUAL_INPUTS",
           "RETRIEVER_VARIANTS", "SHAPLEY_VARIANTS", "MAX_SEED", "PRECISIONS", "check_device_spec", "BACKBONES",
           "MIX_MODES", "IMITATIONS", "MAX_MASKS_PER_STEP", "CLI_DEFAULT_MIX"]

BACKBONES = ("attention", "late", "mce")
MAX_MASKS_PER_STEP = 64
CLI_DEFAULT_MIX = "prob"
RETRIEVER_VARIANTS = ("paper", "code")
SHAPLEY_VARIANTS = ("exact", "code")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
MAX_SEED = 2**62  # room for the per-rank offsets added to the seed under torchrun


class ConfigError(ValueError):
    """A configuration value of the wrong type or out of range; ``field`` names
    it (``model.<name>`` for a model option read through :class:`TrainConfig`)."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


def check_device_spec(spec) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N a non-negative integer),
    returned in its plain spelling (``cuda:01`` -> ``cuda:1``); anything else is a :class:`ConfigError` of ``device``.
    Whether this machine has the device is :func:`mars.devices.resolve_device`'s
    question."""
    if isinstance(spec, str):
        name, sep, index = spec.partition(":")
        if not sep and name in ("auto", "cpu", "cuda"):
            return spec
        if name == "cuda" and index.isascii() and index.isdigit():
            return f"cuda:{int(index)}"
    raise ConfigError("device", f"expected auto, cpu, cuda or cuda:N (N = 0, 1, ...), got {spec!r}")


def _check_types(cfg) -> None:
    """Every field holds a value of its annotated type (``float`` fields take
    any real number and store a float); raises :class:`ConfigError`."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if ok:
                setattr(cfg, f.name, int(value))
        elif kind == "float":
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if ok:
                setattr(cfg, f.name, float(value))
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind == "str | None":
            ok = value is None or isinstance(value, str)
        else:
            continue
        if not ok:
            raise ConfigError(f.name, f"expected {'a number' if kind == 'float' else kind}, got {value!r}")


def _at_least(cfg, names, low: int) -> None:
    for name in names:
        if getattr(cfg, name) < low:
            raise ConfigError(name, f"must be >= {low}, got {getattr(cfg, name)}")


def _finite_at_least_zero(cfg, names) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(name, f"must be a finite number >= 0, got {value}")


@dataclass
class ModelConfig:
    """Every MARS choice of DESIGN 3 as an option, and the baselines' options;
    defaults are ours.

    method: any name or alias of :mod:`mars.methods` ("mars", "moe" = vanilla
        MoE, "late_fusion", "moe_retriever", "mce"); stored canonical.
    noise: "adaptive" (sigma = min(sigma_0 * KL, sigma_max)) | "constant"
        (sigma = sigma_const) | "none"; MARS only.
    routing: which router gates the experts in training — "residual" (MARS),
        "feature" or "random" (ablations; "moe" always uses "feature").
    residual_input: "concat" ([z_i, stopgrad(z_c)]), "diff" (stopgrad(z_c - z_i))
        or "bottleneck" (the difference through a ``residual_dim``-wide code).
    backbone: the fusion of the methods built on :class:`mars.model.MarsModel`
        (MARS, vanilla MoE, the backbone alone): "attention" (attention across
        modalities, mean), "late" (a per-modality MLP tower, mean over
        modalities) or "mce" (MCE's completion Transformer across the modality
        tokens, their concatenation projected to d_model); see mars/backbones.py.
    mask_router / mask_experts: the feature router / the experts also read the
        observed-modality mask (known at test time); MarsModel methods.
    mix, mix_scale, imitation: MARS's training gate and imitation loss
        (:class:`mars_kernels.MarsRouter`). The ``mars`` command's default
        mix is CLI_DEFAULT_MIX = "prob" (chosen on the validation split,
        docs/mars_research.md); the field's default stays "none", the value
        of a ``config.json`` written before the field existed.
    lambda_distill: weight of KL(sg(head(z_c)) || head(y)), the complete
        pass's prediction distilled into the MoE output (MARS).
    lambda_align: weight of KL(sg(p_f) || p_r), the residual router pulled
        towards routes the feature router can reproduce (MARS; 0: off).
    lambda_recon: weight of mean |y - sg(z_c)|, the experts completing the
        incomplete tokens towards the complete pass (MARS; 0: off).
    lambda_unimodal: weight of the cross-entropy of one linear head per
        modality on its encoder's tokens (MarsModel methods; 0: off, no heads).
    unimodal_vote: weight W of those heads in the prediction at inference
        (MarsModel methods; 0: off, the heads are a training signal only):
        log_softmax(head(y)) + W * the mean over the observed modalities of
        log_softmax(head_m(h_m)). Needs lambda_unimodal > 0.
    The defaults residual_input="concat", lambda_imit=5 were chosen on the
    validation split of the embedded data (the test split was not used): with
    the complete tokens themselves as input, rather than their difference to
    z_i, and a stronger imitation loss, the feature router, which sees only
    z_i, reproduces the residual router's routes far more often, and that is
    what inference depends on (README, "What we found about MARS").
    """

    method: str = methods.DEFAULT_METHOD
    d_model: int = 64
    d_hidden: int = 128
    num_experts: int = 8
    k: int = 2
    activation: str = "gelu"
    fusion_heads: int = 4
    dropout: float = 0.1
    router_mlp: bool = False
    residual_input: str = "concat"
    residual_dim: int = 8
    backbone: str = "attention"
    mask_router: bool = False
    mask_experts: bool = False
    mix: str = "none"
    mix_scale: float = 1.0
    imitation: str = "kl"
    noise: str = "adaptive"
    routing: str = "residual"
    sigma_0: float = 1.0
    sigma_max: float = 1.0
    sigma_const: float = 0.3
    lambda_complete: float = 1.0
    lambda_imit: float = 5.0
    lambda_balance: float = 0.01
    lambda_distill: float = 0.0
    lambda_align: float = 0.0
    lambda_recon: float = 0.0
    lambda_unimodal: float = 0.0
    unimodal_vote: float = 0.0
    backend: str | None = None
    # MoE-Retriever (mars.baselines.moe_retriever)
    retriever_variant: str = "paper"
    retriever_candidates: int = 8
    retriever_shared: int = 4
    retriever_k: int = 4
    retriever_alpha: float = 0.5
    retriever_warmup: int = 0
    lambda_gate: float = 0.01
    # MCE (mars.baselines.mce)
    mce_shapley: str = "exact"
    mce_teacher_epochs: int = 10
    mce_use_a: bool = True
    mce_use_b: bool = True
    lambda_sep: float = 1.0
    lambda_com: float = 1.0
    lambda_sub: float = 1.0

    def __post_init__(self):
        _check_types(self)
        try:
            self.method = methods.canonical(self.method)
        except ValueError as e:
            raise ConfigError("method", str(e)) from None
        for name, allowed in (("noise", NOISE_MODES), ("routing", ROUTINGS), ("residual_input", RESIDUAL_INPUTS),
                              ("retriever_variant", RETRIEVER_VARIANTS), ("mce_shapley", SHAPLEY_VARIANTS),
                              ("backbone", BACKBONES), ("mix", MIX_MODES), ("imitation", IMITATIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {allowed}, got {getattr(self, name)!r}")
        _at_least(self, ("d_model", "d_hidden", "num_experts", "fusion_heads", "residual_dim"), 1)
        if not 1 <= self.k <= self.num_experts:
            raise ConfigError("k", f"must be in [1, num_experts={self.num_experts}], got {self.k}")
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        _finite_at_least_zero(self, ("sigma_0", "sigma_max", "sigma_const", "lambda_complete", "lambda_imit",
                                     "lambda_balance", "lambda_align", "lambda_gate", "lambda_sep", "lambda_com", "lambda_sub",
                                     "mix_scale", "lambda_distill", "lambda_recon", "lambda_unimodal",
                                     "unimodal_vote"))
        if self.unimodal_vote > 0 and self.lambda_unimodal == 0:
            raise ConfigError("unimodal_vote", f"needs the per-modality heads (lambda_unimodal > 0), got "
                                               f"unimodal_vote={self.unimodal_vote} with lambda_unimodal=0")
        _at_least(self, ("retriever_candidates",), 1)
        _at_least(self, ("retriever_shared", "retriever_warmup", "mce_teacher_epochs"), 0)
        allowed = self.retriever_candidates + self.retriever_shared
        if not 1 <= self.retriever_k <= allowed:
            raise ConfigError("retriever_k", f"must be in [1, retriever_candidates + retriever_shared = {allowed}], "
                              f"got {self.retriever_k}")
        if not 0.0 <= self.retriever_alpha <= 1.0:
            raise ConfigError("retriever_alpha", f"must be in [0, 1], got {self.retriever_alpha}")
        if self.d_model % self.fusion_heads:
            raise ConfigError("d_model", f"must be divisible by fusion_heads={self.fusion_heads}, got {self.d_model}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """A training run: data, schedule, missingness protocol and the model.

    device: "auto" | "cpu" | "cuda" | "cuda:N" (:mod:`mars.devices`); a run
        stores the resolved one in ``config.json`` ("cpu", "cuda" or "cuda:N").
        The default, and the value of a ``config.json`` written before the
        field existed, is "cpu": every such run was trained on the CPU, so it
        resumes there, bit-identical, unless moved with ``--resume RUN
        --device ...``. (The ``mars`` command's default is "auto".)
    precision: "fp32" | "bf16" (autocast of the forward pass and the loss to
        bfloat16, float32 master weights); "fp32" for an older ``config.json``.
    masks_per_step: P incomplete masks drawn per sample per step, the same
        for every method (1: one, as before; 1 also for an older
        ``config.json``). Models that take a stack of masks get observed
        [P, B, M] (MARS and vanilla MoE fuse every mask, and MARS's one
        complete pass, in one call of each fusion op); the others see the
        batch repeated P times.
    lr_schedule: "constant" (``lr`` throughout; also an older
        ``config.json``'s) | "cosine" (per step, from ``lr`` down to 0 at the
        end of ``epochs``: lr * (1 + cos(pi * step / total steps)) / 2; a
        closed form of the step, so a resumed run continues it, and a resume
        that raises ``epochs`` stretches it from that step on).
    """

    data: str = "mfeat"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    protocol: str = "uniform"
    expert_parallel: bool = False
    device: str = "cpu"
    precision: str = "fp32"
    masks_per_step: int = 1
    lr_schedule: str = "constant"
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        if isinstance(self.model, dict):
            try:
                self.model = ModelConfig(**self.model)
            except ConfigError as e:
                raise ConfigError(f"model.{e.field}", e.message) from None
            except TypeError as e:  # an unknown or missing key
                raise ConfigError("model", str(e).replace("ModelConfig.__init__() ", "")) from None
        if not isinstance(self.model, ModelConfig):
            raise ConfigError("model", f"expected a ModelConfig or a dict of its fields, got {type(self.model).__name__}")
        _check_types(self)
        _at_least(self, ("epochs", "batch_size", "masks_per_step"), 1)
        if self.masks_per_step > MAX_MASKS_PER_STEP:
            raise ConfigError("masks_per_step", f"must be <= {MAX_MASKS_PER_STEP}, got {self.masks_per_step}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("lr", f"must be a finite number > 0, got {self.lr}")
        _finite_at_least_zero(self, ("weight_decay",))
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError("seed", f"must be an integer in [0, 2**62], got {self.seed}")
        if not self.data:
            raise ConfigError("data", "must name a data source, got ''")
        self.device = check_device_spec(self.device)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError("lr_schedule", f"must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        try:
            MissingnessProtocol.parse(self.protocol)
        except ValueError as e:
            raise ConfigError("protocol", str(e)) from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From ``to_dict``'s form (``config.json``); every key and value is
        checked (:class:`ConfigError`)."""
        if not isinstance(d, dict):
            raise ConfigError("config", f"expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError("config", f"unknown keys {sorted(unknown)}")
        if not isinstance(d.get("model", {}), dict):
            raise ConfigError("model", f"expected a JSON object, got {d['model']!r}")
        known_model = {f.name for f in fields(ModelConfig)}
        unknown = set(d.get("model", {})) - known_model
        if unknown:
            raise ConfigError("model", f"unknown keys {sorted(unknown)}")
        return cls(**d)
