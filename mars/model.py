"""MARS (Missingness-Aware Residual-guided Specialization) on the project's
multimodal backbone, and the vanilla-MoE baseline that shares its model.

Shapes: B samples, M modalities, N tokens per sample (1 for feature vectors,
H*W for feature maps), D model width, E experts, k experts per token.

* Encode: each modality to tokens h_m [B, N, D]; a missing modality is a
  learned per-modality embedding (:class:`mars.components.ModalityEncoders`).
* Fuse: attention across the modality axis at each token position, then the
  mean over modalities -> z [B, N, D]. Training fuses twice: the complete pass
  z_c = F(h | available) and the incomplete pass z_i = F(h | observed).
  Other fusions (``config.backbone``): :mod:`mars.backbones`.
* Route and mix: :class:`mars_kernels.MarsMoE` with ``config.mars`` — in
  training the residual router (on the contrast of z_c and z_i) gates the
  experts with discrepancy-scaled noise and the feature router (on z_i)
  learns to imitate it; at inference the feature router gates, no noise.
  ``mode="oracle"`` gates with the residual router (needs complete data).
  y = z_i + sum_e w_e Expert_e(z_i). Router inputs under study
  (``config.research``): :mod:`mars.research`.
* Readout: the task head on y (and, in training, on z_c); with
  ``lambda_unimodal`` one head per modality on its encoder's tokens.
* Several masks per step: ``observed`` [P, B, M] in training fuses the P
  incomplete passes and the one complete pass in one call of each fusion op;
  the logits are then [P * B, K] (mask-major).

:class:`BackboneModel` (method "backbone") is the same encoders, fusion and
head without the MoE: the backbone alone.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

import mars_kernels as mk

from . import methods
from .backbones import make_fusion
from .components import ModalityEncoders, ModalityHeads, ce_sum_count, cross_entropy, token_readout, total_and_parts
from .config import ModelConfig
from .interface import MethodModel, Output
from .research.router_inputs import feature_input, residual_input
from .research.silent_missing import SilentNoise

__all__ = ["MarsModel", "BackboneModel", "unimodal_vote", "unimodal_loss"]

MODES = mk.layers.mars.MODES

# State-dict prefixes of the MoE's submodules in checkpoints written before
# the MoE became the submodule ``moe`` (and, earlier, before the routers moved
# into ``router``).
_OLD_MOE_PREFIXES = {"feature_router.": "moe.router.feature_router.",
                     "residual_router.": "moe.router.residual_router.",
                     "router.": "moe.router.", "experts.": "moe.experts."}


def _load_old_moe_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs) -> None:
    """Renames the MoE's keys of an older checkpoint in the copy that
    load_state_dict loads from (the parameters, and so the optimiser state's
    order, are the same)."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        for old, new in _OLD_MOE_PREFIXES.items():
            if rest.startswith(old) and prefix + new + rest[len(old):] not in state_dict:
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


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

    ``observed`` may be a stack [P, B, M] of P masks (training): the logits
    are then [P * B, K] (or [P * B, K, H, W]), mask-major, and ``loss``
    repeats the labels; the complete pass runs once.

    With ``config.lambda_unimodal`` > 0 the model has ``unimodal_heads`` (one
    linear head per modality on its encoder's tokens, before fusion) and in
    training aux ``unimodal_logits`` [B, M, K] (or [B, M, K, H, W]) and
    ``unimodal_weight`` [B, M] (the available modalities); the loss then has
    ``unimodal``, the cross-entropy of every available modality's head:
    each encoder learns to classify on its own, what a sample with one
    observed modality relies on. With ``config.unimodal_vote`` W > 0 they also
    vote at inference (modes "eval" and "oracle"): the logits are then
    log-probability scores, log_softmax(head(y)) + W * the mean over the
    observed modalities of log_softmax(head_m) (:func:`unimodal_vote`).

    The MoE is one :class:`mars_kernels.MarsMoE` (:attr:`moe`) built from
    ``config.mars`` and the router inputs of ``config.research``.
    ``residual_router``: build MARS's residual router; by default the method's
    registry entry decides (MARS: yes, vanilla MoE: no). Without it the
    feature router always gates (``config.mars.routing`` is taken as "feature").
    Parameters: ``encode``, ``fuse``, ``moe`` (``moe.router.feature_router``,
    ``moe.router.residual_router``, ``moe.experts``), ``head``; a state dict
    of an earlier release (``router.*``/``experts.*`` at the top) loads as is.
    """

    takes_mask_stack = True

    def __init__(self, modalities: list[str], shapes: dict[str, tuple[int, ...]], num_classes: int,
                 task: str, config: ModelConfig, *, residual_router: bool | None = None):
        super().__init__()
        method = methods.get(config.method)
        if not method.sparse_moe:
            raise ValueError(f"MarsModel builds the sparse-MoE methods (mars, moe), not {config.method!r}; "
                             "use mars.methods.build_model")
        if residual_router is None:
            residual_router = method.residual_router
        self.config, self.task, self.num_classes = config, task, num_classes
        self.modalities = list(modalities)
        d = config.d_model
        self.encode = ModalityEncoders(modalities, shapes, d, config.dropout)
        self.silent_noise = SilentNoise() if config.research.missing_signal == "silent" else None
        self.fuse = make_fusion(config.backbone, len(modalities), d, config.fusion_heads, config.d_hidden,
                                config.dropout, config.backend)
        M = len(modalities)
        research = config.research
        self.moe = mk.MarsMoE(
            d, config.d_hidden, config.num_experts, config.k,
            config.mars if residual_router else replace(config.mars, routing="feature"),
            residual_input=residual_input(research.residual_input, M, lambda: self.head) if residual_router else None,
            feature_input=feature_input(research.feature_input, M),
            residual_router=residual_router, activation=config.activation, backend=config.backend,
        )
        self.head = nn.Linear(d, num_classes)
        if config.lambda_unimodal > 0:
            self.unimodal_heads = ModalityHeads(len(modalities), d, num_classes)
        self.map_size = self.encode.map_size
        self.register_load_state_dict_pre_hook(_load_old_moe_keys)

    @property
    def backend(self) -> str | None:
        """The kernels every op of the model runs on (None: auto)."""
        return self.config.backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self.config.backend = self.fuse.backend = name
        self.moe.backend = name

    @property
    def may_skip_parameters(self) -> bool:
        """Routing ablations leave router parameters without gradient (see
        :attr:`mars_kernels.MarsRouter.may_skip_parameters`)."""
        return self.moe.may_skip_parameters

    # ---------------------------------------------------------------- pieces
    def encode_and_fuse(self, features, observed: torch.Tensor, available: torch.Tensor | None = None):
        """The incomplete pass z_i and, when ``available`` is given, the
        complete pass z_c [B, N, D] (None otherwise), from one encoding of the
        tokens and one call of each fusion op. ``observed`` [B, M] gives z_i
        [B, N, D]; a stack [P, B, M] gives z_i [P, B, N, D]."""
        return _encode_and_fuse(self, features, observed, available)

    def readout(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, N, D] -> logits [B, K] (mean over tokens) or [B, K, H, W]."""
        return token_readout(self.head, y, self.map_size)

    # ---------------------------------------------------------------- forward
    def forward(self, features, observed, available=None, mode: str = "eval") -> Output:
        if mode not in MODES:
            raise ValueError(f"mode must be 'train', 'eval' or 'oracle', got {mode!r}")
        need_complete = mode == "oracle" or (mode == "train" and self.moe.has_residual_router)
        if need_complete and available is None:
            raise ValueError(f"mode={mode!r} needs `available` (the complete modalities) for the complete pass")
        unimodal = mode == "train" and self.config.lambda_unimodal > 0
        vote = mode != "train" and self.config.unimodal_vote > 0
        z_i, z_c, h = _encode_and_fuse(self, features, observed, available if need_complete else None,
                                       return_tokens=True)
        aux: dict[str, torch.Tensor] = {}
        if unimodal or vote:
            modality_logits = _modality_logits(self.unimodal_heads, h, self.map_size)
        if unimodal:
            aux["unimodal_logits"] = modality_logits
            B, M = h.shape[0], h.shape[2]
            aux["unimodal_weight"] = (available.to(h.device) if available is not None
                                      else torch.ones(B, M, dtype=torch.bool, device=h.device))
        if need_complete:
            aux["complete_logits"] = self.readout(z_c)
        if self.silent_noise is not None:  # silent missingness: the model is not told the pattern
            observed = torch.ones_like(observed)
        token_mask = observed.unsqueeze(-2)  # [(P,) B, 1, M]: every token of a sample has its mask
        y, moe_aux = self.moe(z_i, z_c, token_mask, mode=mode)
        for ours, theirs in (("imitation", "imitation_loss"), ("divergence", "divergence"),
                             ("balance", "balance_loss"), ("feature_share", "feature_share")):
            if theirs in moe_aux:
                aux[ours] = moe_aux[theirs]
        aux["indices"] = moe_aux["indices"]
        logits = self.readout(y.flatten(0, 1) if observed.dim() == 3 else y)
        if vote:
            logits = unimodal_vote(logits, modality_logits, observed, self.config.unimodal_vote)
        return Output(logits, aux)

    @torch.no_grad()
    def router_agreement(self, features, observed, available) -> float:
        """Mean overlap |top-k(feature router) ∩ top-k(residual router)| / k over
        tokens: how well the feature router imitates the residual router (MARS only)."""
        if not self.moe.has_residual_router:
            raise ValueError(f"router agreement needs the residual router (method {self.config.method!r} has none)")
        z_i, z_c = self.encode_and_fuse(features, observed, available)
        return self.moe.agreement(z_i, z_c, observed.unsqueeze(-2))

    def loss(self, out: Output, labels: torch.Tensor, ignore_index: int | None = None) -> tuple[torch.Tensor, dict]:
        """The training loss and its parts (floats, for logging): task CE
        + lambda_complete CE(complete pass) + lambda_imit imitation
        + lambda_balance balance + lambda_unimodal per-modality CE, each part
        present when ``out`` has it."""
        cfg = self.config
        passes = out.logits.shape[0] // max(labels.shape[0], 1)
        parts = {"task": cross_entropy(out.logits, _repeat(labels, passes), ignore_index)}
        if "complete_logits" in out.aux:
            parts["complete"] = cfg.lambda_complete * cross_entropy(out.aux["complete_logits"], labels, ignore_index)
        if "imitation" in out.aux:
            parts["imitation"] = cfg.mars.lambda_imit * out.aux["imitation"]
        if "balance" in out.aux:
            parts["balance"] = cfg.mars.lambda_balance * out.aux["balance"]
        if "unimodal_logits" in out.aux:
            parts["unimodal"] = cfg.lambda_unimodal * unimodal_loss(
                out.aux["unimodal_logits"], out.aux["unimodal_weight"], labels, ignore_index)
        return total_and_parts(parts)


def _repeat(t: torch.Tensor, passes: int) -> torch.Tensor:
    """t [B, ...] -> [passes * B, ...] (mask-major, as the stacked logits)."""
    return t if passes == 1 else t.repeat(passes, *([1] * (t.dim() - 1)))


def _modality_logits(heads: ModalityHeads, h: torch.Tensor, map_size) -> torch.Tensor:
    """Per-modality heads on the encoder tokens h [B, N, M, D]: [B, M, K]
    (mean over the N tokens) for vectors, [B, M, K, H, W] for maps."""
    logits = heads(h)  # [B, N, M, K]
    if map_size is None:
        return logits.mean(dim=1)
    B, N, M, K = logits.shape
    return logits.permute(0, 2, 3, 1).reshape(B, M, K, *map_size)


def unimodal_vote(logits: torch.Tensor, modality_logits: torch.Tensor, observed: torch.Tensor,
                  weight: float) -> torch.Tensor:
    """The prediction with the per-modality heads' vote: log_softmax(logits)
    + weight * the mean over the observed modalities of log_softmax of their
    heads (a sample with none observed keeps its own log-probabilities).
    logits [B, K] (or [B, K, H, W]); modality_logits [B, M, K] (or [B, M, K,
    H, W]); observed [B, M] bool, or a stack [P, B, M] with logits [P * B, ...]
    mask-major. -> log-probability scores of the shape of ``logits``."""
    stack = observed if observed.dim() == 3 else observed.unsqueeze(0)
    P, B, M = stack.shape
    votes = modality_logits.float().log_softmax(dim=2)  # [B, M, K(, H, W)]
    w = stack.to(votes.dtype).reshape(P, B, M, *[1] * (votes.dim() - 2))
    mean = (votes.unsqueeze(0) * w).sum(dim=2) / w.sum(dim=2).clamp(min=1)  # [P, B, K(, H, W)]
    return logits.float().log_softmax(dim=1) + weight * mean.flatten(0, 1)


def unimodal_loss(logits: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  ignore_index: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the per-modality heads over the (sample,
    modality) pairs with ``weight`` true and the valid pixels: logits
    [B, M, K] or [B, M, K, H, W], weight [B, M] bool, labels [B] or [B, H, W]."""
    M = weight.shape[1]
    total, count = ce_sum_count(logits.flatten(0, 1).float(), labels.to(logits.device).repeat_interleave(M, dim=0),
                                ignore_index)  # [B*M] each
    w = weight.reshape(-1).to(total.dtype)
    return (total * w).sum() / (count * w).sum().clamp(min=1)


def _encode_and_fuse(model, features, observed: torch.Tensor, available: torch.Tensor | None,
                     return_tokens: bool = False):
    """z_i ([B, N, D] or, for observed [P, B, M], [P, B, N, D]) and z_c [B, N, D]
    (None without ``available``), from one encoding and one fusion call; with
    ``return_tokens`` also the encoder tokens h [B, N, M, D]."""
    h = model.encode(features)
    stack = observed if observed.dim() == 3 else observed.unsqueeze(0)
    P = stack.shape[0]
    masks = stack if available is None else torch.cat([stack, available.unsqueeze(0).to(stack.device)])
    if model.silent_noise is not None:
        # silent missingness (mars.research.silent_missing): every pass fuses its own corrupted tokens,
        # with every modality marked present
        hs = model.silent_noise(h, masks)  # [P(+1), B, N, M, D]
        Q, B = hs.shape[0], h.shape[0]
        z = model.fuse.fuse_stack(hs.flatten(0, 1), model.encode.missing,
                                  torch.ones(1, Q * B, masks.shape[-1], dtype=torch.bool, device=h.device))
        z = z[0].unflatten(0, (Q, B))
        if observed.dim() == 2:  # an inference pass: the heads' vote sees the corrupted tokens too
            h = hs[0]
    else:
        z = model.fuse.fuse_stack(h, model.encode.missing, masks)
    z_i = z[:P] if observed.dim() == 3 else z[0]
    z_c = z[P] if available is not None else None
    return (z_i, z_c, h) if return_tokens else (z_i, z_c)


class BackboneModel(MethodModel):
    """The fusion backbone alone (method "backbone"): MARS's encoders, the
    fusion ``config.backbone`` (:mod:`mars.backbones`) and a linear head on
    z_i; no MoE, no complete pass. Trained with the task cross-entropy on the
    incomplete passes (P masks per step like every method).

    forward(features, observed [B, M] or [P, B, M], available=None (unused),
    mode="train" | "eval") -> Output(logits [B or P * B, K] or [.., K, H, W], {}).
    """

    takes_mask_stack = True

    def __init__(self, modalities: list[str], shapes: dict[str, tuple[int, ...]], num_classes: int,
                 task: str, config: ModelConfig):
        super().__init__()
        self.config, self.task, self.num_classes = config, task, num_classes
        self.modalities = list(modalities)
        d = config.d_model
        self.encode = ModalityEncoders(modalities, shapes, d, config.dropout)
        self.silent_noise = SilentNoise() if config.research.missing_signal == "silent" else None
        self.fuse = make_fusion(config.backbone, len(modalities), d, config.fusion_heads, config.d_hidden,
                                config.dropout, config.backend)
        self.head = nn.Linear(d, num_classes)
        self.map_size = self.encode.map_size

    @property
    def backend(self) -> str | None:
        return self.config.backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self.config.backend = self.fuse.backend = name

    def forward(self, features, observed, available=None, mode: str = "eval") -> Output:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval' (the backbone has no residual router), got {mode!r}")
        z_i, _ = _encode_and_fuse(self, features, observed, None)
        return Output(token_readout(self.head, z_i.flatten(0, 1) if observed.dim() == 3 else z_i, self.map_size), {})

    def loss(self, out: Output, labels: torch.Tensor, ignore_index: int | None = None) -> tuple[torch.Tensor, dict]:
        """The task cross-entropy over every pass."""
        passes = out.logits.shape[0] // max(labels.shape[0], 1)
        return total_and_parts({"task": cross_entropy(out.logits, _repeat(labels, passes), ignore_index)})
