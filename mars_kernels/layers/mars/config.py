"""MarsConfig: every option of the MARS layer, with the defaults of the
published results (the MARS that ``mars train`` trains).

One frozen dataclass read by :class:`~mars_kernels.MarsRouter` and
:class:`~mars_kernels.MarsMoE`; the ``mars`` command nests it in its own
configuration (``model.mars`` of a run's ``config.json``) and builds its
command-line options from the field metadata (``help``), so a default lives
here and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

__all__ = ["MarsConfig", "ROUTINGS", "NOISE_MODES", "MIX_MODES"]

ROUTINGS = ("residual", "feature", "random")
NOISE_MODES = ("adaptive", "constant", "none")
MIX_MODES = ("none", "prob")


def _option(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class MarsConfig:
    """The options of the MARS layer (paper: the abstract's three components;
    ours: the concrete choices that make them a layer).

    Paper: ``routing="residual"`` (a residual router on the contrast of the
    complete and incomplete passes gates the experts in training),
    imitation (the feature router, the only one at inference, learns
    KL(sg(p_r) || p_f), weight ``lambda_imit``), discrepancy-aware noise
    (``noise="adaptive"``: sigma = min(sigma_0 * KL(p_r || p_f), sigma_max)).
    Ours: the weights, ``mix="prob"`` and the Switch balance loss.
    Ablations: ``routing`` "feature" | "random", ``noise`` "constant" | "none".
    """

    routing: str = _option("residual", "router that gates the experts in training: residual (MARS), feature "
                           "(the vanilla-MoE gate) or random (k experts drawn uniformly); ablations", ROUTINGS)
    noise: str = _option("adaptive", "noise on the residual router: adaptive (sigma = min(sigma_0 * KL(p_r||p_f), "
                         "sigma_max)), constant (sigma_const) or none", NOISE_MODES)
    sigma_0: float = _option(1.0, "adaptive noise: sigma per unit of KL(p_r || p_f)")
    sigma_max: float = _option(1.0, "noise: the largest sigma")
    sigma_const: float = _option(0.3, "noise constant: its sigma")
    mix: str = _option("prob", "training gate: prob (a token takes the feature router's route with probability "
                       "1 - exp(-mix_scale * KL(p_r || p_f)), so the experts also train on test-time routes) or none",
                       MIX_MODES)
    mix_scale: float = _option(1.0, "mix prob: the KL scale")
    router_mlp: bool = _option(False, "MLP routers (Linear-GELU-Linear) instead of linear ones")
    lambda_imit: float = _option(5.0, "weight of the imitation loss KL(sg(p_r) || p_f)")
    lambda_balance: float = _option(0.01, "weight of the Switch balance loss of the gating router")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            choices = f.metadata["choices"]
            if choices is not None:
                if value not in choices:
                    raise ValueError(f"MarsConfig.{f.name} must be one of {choices}, got {value!r}")
            elif f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise ValueError(f"MarsConfig.{f.name} must be True or False, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ValueError(f"MarsConfig.{f.name} must be a finite number >= 0, got {value!r}")
            else:
                object.__setattr__(self, f.name, float(value))

    def sigmas(self) -> tuple[float, float]:
        """(sigma_0, sigma_const) of :func:`mars_kernels.mars_routing` for the noise mode."""
        return {"adaptive": (self.sigma_0, 0.0), "constant": (0.0, self.sigma_const), "none": (0.0, 0.0)}[self.noise]
