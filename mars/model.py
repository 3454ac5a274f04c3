"""MARS (Missingness-Aware Residual-guided Specialization), as defined in
DESIGN section 3, and the vanilla-MoE baseline that shares its model.

Shapes: B samples, M modalities, N tokens per sample (1 for feature vectors,
H*W for feature maps), D model width, E experts, k experts per token.

* Encode: each modality to tokens h_m [B, N, D]; a missing modality is a
  learned per-modality embedding (:class:`mars.components.ModalityEncoders`).
* Fuse: attention across the modality axis at each token position, then the
  mean over modalities -> z [B, N, D]. Training fuses twice: the complete pass
  z_c = F(h | available) and the incomplete pass z_i = F(h | observed).
* Route: :class:`mars_kernels.MarsRouter` — in training the residual router
  (on the contrast of z_c and z_i) gates the experts with discrepancy-scaled
  noise and the feature router (on z_i) learns to imitate it; at inference
  the feature router gates, no noise. ``mode="oracle"`` gates with the
  residual router (needs complete data).
* Experts: y = z_i + sum_e w_e Expert_e(z_i).
* Readout: the task head on y (and, in training, on z_c).

This module also re-exports the names ``mars.model`` has always offered
(:class:`ModelConfig`, :class:`Output`, :func:`build_model`, the shared
pieces, :class:`LateFusion`, the option tuples).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

import mars_kernels as mk

from . import methods
from .baselines.late_fusion import LateFusion
from .components import (
    ModalityAttentionFusion,
    ModalityEncoders,
    call_in_dtype,
    cross_entropy,
    token_readout,
    total_and_parts,
)
from .config import NOISE_MODES, RETRIEVER_VARIANTS, ROUTINGS, SHAPLEY_VARIANTS, ModelConfig
from .interface import MethodModel, Output
from .methods import build_model, canonical

__all__ = ["MarsModel", "ModelConfig", "Output", "build_model", "ModalityEncoders", "ModalityAttentionFusion",
           "LateFusion", "canonical_method", "METHODS", "METHOD_ALIASES", "SPARSE_MOE_METHODS", "NOISE_MODES",
           "ROUTINGS", "RETRIEVER_VARIANTS", "SHAPLEY_VARIANTS"]

MODES = ("train", "eval", "oracle")

# Views of the method registry under their former names.
canonical_method = canonical
METHODS = methods.names()
METHOD_ALIASES = methods.aliases()
SPARSE_MOE_METHODS = tuple(m.name for m in methods.REGISTRY.values() if m.sparse_moe)

# State-dict prefixes of the routers before they moved into ``router``.
_OLD_ROUTER_PREFIXES = ("feature_router.", "residual_router.")


def _load_old_router_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs) -> None:
    """Checkpoints written before MarsRouter hold ``feature_router.*`` and
    ``residual_router.*`` at the top of MarsModel; they now live under
    ``router.``. Renames them in the copy that load_state_dict loads from."""
    for key in [k for k in state_dict if k.startswith(tuple(prefix + p for p in _OLD_ROUTER_PREFIXES))]:
        new = prefix + "router." + key[len(prefix):]
        if new not in state_dict:
            state_dict[new] = state_dict.pop(key)


class MarsModel(MethodModel):
    """MARS and the vanilla-MoE baseline (``config.method`` "mars" | "moe"):
    encode -> fuse -> route -> experts -> readout.

    forward(features {m: [B, d_m] or [B, C_m, H, W]}, observed [B, M] bool,
    available [B, M] bool = None, mode="train" | "eval" | "oracle") ->
    Output(logits [B, K] or [B, K, H, W], aux). The complete pass, and so
    ``available``, is needed in training when the model has the residual
    router (MARS) and for ``mode="oracle"``.

    aux: ``indices`` [B, N, k] (the experts each token went to); with the
    complete pass ``complete_logits`` (the head on z_c, shaped like the
    logits); in training ``balance`` (Switch balance loss of the gating
    router) and, with residual routing, ``imitation`` (KL(sg(p_r) || p_f),
    mean over tokens) and ``divergence`` (mean KL(p_r || p_f), detached).

    ``residual_router``: build MARS's residual router; by default the method's
    registry entry decides (MARS: yes, vanilla MoE: no). Without it the
    feature router always gates (``config.routing`` is taken as "feature").
    Parameters: ``encode``, ``fuse``, ``router`` (``router.feature_router``,
    ``router.residual_router``), ``experts``, ``head``; a state dict from before
    the routers moved into ``router`` loads as is.
    """

    def __init__(self, modalities: list[str], shapes: dict[str, tuple[int, ...]], num_classes: int,
                 task: str, config: ModelConfig, *, residual_router: bool | None = None):
        super().__init__()
        method = methods.get(config.method)
        if not method.sparse_moe:
            raise ValueError(f"MarsModel builds the methods {SPARSE_MOE_METHODS}, not {config.method!r}; "
                             "use mars.methods.build_model")
        if residual_router is None:
            residual_router = method.residual_router
        if not residual_router and config.routing != "feature":
            config = replace(config, routing="feature")
        self.config, self.task, self.num_classes = config, task, num_classes
        self.modalities = list(modalities)
        d = config.d_model
        self.encode = ModalityEncoders(modalities, shapes, d, config.dropout)
        self.fuse = ModalityAttentionFusion(d, config.fusion_heads, config.dropout, config.backend)
        self.router = mk.MarsRouter(
            d, config.num_experts, config.k, routing=config.routing, noise=config.noise, sigma_0=config.sigma_0,
            sigma_max=config.sigma_max, sigma_const=config.sigma_const, residual_input=config.residual_input,
            mlp=config.router_mlp, residual_router=residual_router, backend=config.backend,
        )
        self.experts = mk.Experts(d, config.d_hidden, config.num_experts, activation=config.activation,
                                  backend=config.backend)
        self.head = nn.Linear(d, num_classes)
        self.map_size = self.encode.map_size
        self.register_load_state_dict_pre_hook(_load_old_router_keys)

    @property
    def backend(self) -> str | None:
        """The kernels every op of the model runs on (None: auto)."""
        return self.config.backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self.config.backend = self.experts.backend = self.fuse.backend = self.router.backend = name

    @property
    def may_skip_parameters(self) -> bool:
        """Routing ablations leave router parameters without gradient (see
        :attr:`mars_kernels.MarsRouter.may_skip_parameters`)."""
        return self.router.may_skip_parameters

    # ---------------------------------------------------------------- pieces
    def encode_and_fuse(self, features, observed: torch.Tensor, available: torch.Tensor | None = None):
        """The incomplete pass z_i (observed modalities) and, when ``available``
        is given, the complete pass z_c, both [B, N, D] (z_c None otherwise),
        from one encoding and one in-projection of the tokens."""
        h = self.encode(features)
        masks = [observed] if available is None else [observed, available]
        z = self.fuse.fuse_masked(h, self.encode.missing, masks)
        return z[0], (z[1] if available is not None else None)

    def readout(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, N, D] -> logits [B, K] (mean over tokens) or [B, K, H, W]."""
        return token_readout(self.head, y, self.map_size)

    def moe(self, z: torch.Tensor, routing: mk.Routing) -> torch.Tensor:
        """y = z + sum_e w_e Expert_e(z): z [B, N, D], routing [B, N, k] -> y [B, N, D]."""
        B, N, D = z.shape
        k = routing.indices.shape[-1]
        y = call_in_dtype(self.experts, z.dtype, z.reshape(B * N, D), routing.weights.reshape(B * N, k),
                          routing.indices.reshape(B * N, k))  # float32 gate weights: the op computes in float32
        return z + y.reshape(B, N, D)

    # ---------------------------------------------------------------- forward
    def forward(self, features, observed, available=None, mode: str = "eval") -> Output:
        if mode not in MODES:
            raise ValueError(f"mode must be 'train', 'eval' or 'oracle', got {mode!r}")
        need_complete = mode == "oracle" or (mode == "train" and self.router.has_residual_router)
        if need_complete and available is None:
            raise ValueError(f"mode={mode!r} needs `available` (the complete modalities) for the complete pass")
        z_i, z_c = self.encode_and_fuse(features, observed, available if need_complete else None)
        aux: dict[str, torch.Tensor] = {}
        if need_complete:
            aux["complete_logits"] = self.readout(z_c)
        routing = self.router(z_i, z_c, mode=mode)
        for ours, theirs in (("imitation", "imitation_loss"), ("divergence", "divergence"),
                             ("balance", "balance_loss")):
            if theirs in routing.aux:
                aux[ours] = routing.aux[theirs]
        aux["indices"] = routing.indices
        return Output(self.readout(self.moe(z_i, routing)), aux)

    @torch.no_grad()
    def router_agreement(self, features, observed, available) -> float:
        """Mean overlap |top-k(feature router) ∩ top-k(residual router)| / k over
        tokens: how well the feature router imitates the residual router (MARS only)."""
        if not self.router.has_residual_router:
            raise ValueError(f"router agreement needs the residual router (method {self.config.method!r} has none)")
        z_i, z_c = self.encode_and_fuse(features, observed, available)
        return self.router.agreement(z_i, z_c)

    def loss(self, out: Output, labels: torch.Tensor, ignore_index: int | None = None) -> tuple[torch.Tensor, dict]:
        """The training loss of DESIGN 3 and its parts (floats, for logging):
        task CE + lambda_complete CE(complete pass) + lambda_imit imitation
        + lambda_balance balance, each part present when ``out`` has it."""
        cfg = self.config
        parts = {"task": cross_entropy(out.logits, labels, ignore_index)}
        if "complete_logits" in out.aux:
            parts["complete"] = cfg.lambda_complete * cross_entropy(out.aux["complete_logits"], labels, ignore_index)
        if "imitation" in out.aux:
            parts["imitation"] = cfg.lambda_imit * out.aux["imitation"]
        if "balance" in out.aux:
            parts["balance"] = cfg.lambda_balance * out.aux["balance"]
        return total_and_parts(parts)
