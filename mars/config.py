"""Configuration dataclasses: :class:`ModelConfig` (every method's options)
and :class:`TrainConfig` (a training run). Both round-trip through plain dicts
(``config.json`` of a run directory)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from mars_kernels.layers.mars_router import NOISE_MODES, RESIDUAL_INPUTS, ROUTINGS

from . import methods
from .data import MissingnessProtocol

__all__ = ["ModelConfig", "TrainConfig", "NOISE_MODES", "ROUTINGS", "RESIDUAL_INPUTS", "RETRIEVER_VARIANTS",
           "SHAPLEY_VARIANTS"]

RETRIEVER_VARIANTS = ("paper", "code")
SHAPLEY_VARIANTS = ("exact", "code")


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
    residual_input: "concat" ([z_i, stopgrad(z_c)]) or "diff" (stopgrad(z_c - z_i)).
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
    noise: str = "adaptive"
    routing: str = "residual"
    sigma_0: float = 1.0
    sigma_max: float = 1.0
    sigma_const: float = 0.3
    lambda_complete: float = 1.0
    lambda_imit: float = 5.0
    lambda_balance: float = 0.01
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
        self.method = methods.canonical(self.method)
        for name, allowed in (("noise", NOISE_MODES), ("routing", ROUTINGS), ("residual_input", RESIDUAL_INPUTS),
                              ("retriever_variant", RETRIEVER_VARIANTS), ("mce_shapley", SHAPLEY_VARIANTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(f"k must be in [1, num_experts={self.num_experts}], got {self.k}")
        if self.retriever_candidates < 1 or self.retriever_shared < 0:
            raise ValueError("retriever_candidates must be >= 1 and retriever_shared >= 0, got "
                             f"{self.retriever_candidates} and {self.retriever_shared}")
        allowed = self.retriever_candidates + self.retriever_shared
        if not 1 <= self.retriever_k <= allowed:
            raise ValueError(f"retriever_k must be in [1, retriever_candidates + retriever_shared = {allowed}], "
                             f"got {self.retriever_k}")
        if not 0.0 <= self.retriever_alpha <= 1.0:
            raise ValueError(f"retriever_alpha must be in [0, 1], got {self.retriever_alpha}")
        for name in ("retriever_warmup", "mce_teacher_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.d_model % self.fusion_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by fusion_heads={self.fusion_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """A training run: data, schedule, missingness protocol and the model."""

    data: str = "mfeat"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    protocol: str = "uniform"
    expert_parallel: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        MissingnessProtocol.parse(self.protocol)  # validates

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)
