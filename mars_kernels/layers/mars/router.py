"""MarsRouter: the routing of MARS (missingness-aware residual-guided
specialization) as a module, usable on any backbone.

Two routers score the E experts for each token. The *residual router* reads
the contrast between the complete tokens z_c (every modality the sample has)
and the incomplete tokens z_i (the modalities observed in this pass); the
*feature router* reads z_i only, so it is the one available at inference, and
it is trained to imitate the residual router (imitation loss
KL(stopgrad(p_r) || p_f)). In training the residual router gates the experts,
with noise scaled by how much the two routers disagree (discrepancy-aware
noise, :func:`mars_kernels.mars_routing`); at inference the feature router
gates them, without noise. The options are one :class:`MarsConfig`.
"""
from __future__ import annotations

import torch
from torch import nn

from ... import backend as _backend
from ... import ops
from ...ops.common import rand
from ..routing import Routing
from .config import MarsConfig
from .inputs import ConcatResidual, IncompleteTokens, RouterInput

__all__ = ["MarsRouter", "MODES"]

MODES = ("train", "eval", "oracle")


def _router_net(d_in: int, num_experts: int, mlp: bool) -> nn.Module:
    """Logits of one router: Linear(d_in, E), or Linear -> GELU -> Linear."""
    if mlp:
        return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, num_experts))
    return nn.Linear(d_in, num_experts)


def _positive_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class MarsRouter(nn.Module):
    """MARS routing: a residual router and a feature router over E experts.

    Shapes: z_i, z_c [..., D] (any leading dims; T = their product tokens),
    D = ``d_model``, E = ``num_experts``, k experts per token; ``observed``
    [..., M] bool where a router input reads the mask.

    ``forward(z_i, z_c=None, *, observed=None, mode=None, noise=None,
    generator=None)`` -> :class:`Routing` (weights [..., k], indices [..., k]
    int64, aux). ``mode``:

    * ``"train"`` (default in training mode): the router of
      ``config.routing`` gates — ``"residual"`` (MARS: top-k of
      softmax(l_r + sigma * eps), sigma per token from ``config.noise``;
      needs ``z_c``; with ``config.mix="prob"`` a token takes the feature
      router's top-k instead with probability 1 - exp(-mix_scale *
      KL(p_r || p_f))), ``"feature"`` (top-k of the feature router, the
      vanilla-MoE gate) or ``"random"`` (k distinct experts drawn uniformly
      per token, weights 1/k).
    * ``"eval"`` (default in eval mode): top-k of softmax(l_f), no noise;
      needs ``z_i`` only.
    * ``"oracle"``: top-k of softmax(l_r), no noise; needs ``z_c`` (an upper
      bound on what the feature router can reach).

    ``z_c`` (the complete tokens, shaped like ``z_i`` or like its trailing
    dims) is read only where the residual router runs; it never gets a
    gradient. ``noise`` ([T, E] standard normals) or ``generator`` makes the
    training draws reproducible.

    aux, every mode: ``expert_counts`` [E] (assignments per expert, no
    gradient). In ``"train"`` mode also ``balance_loss`` (the Switch balance
    loss of the gating router: 1 when uniform; a constant 0 for random
    routing); with residual routing also ``imitation_loss`` (mean over tokens
    of KL(stopgrad(p_r) || p_f), its gradient reaches the feature router only),
    ``divergence`` (mean per-token KL(p_r || p_f), detached) and, with
    ``mix="prob"``, ``feature_share`` (the share of tokens that took the
    feature router's route).

    ``residual_input`` / ``feature_input``: what the routers read
    (:class:`~mars_kernels.layers.mars.inputs.RouterInput`; defaults
    [z_i, stopgrad(z_c)] and z_i). ``residual_router=False`` builds the
    feature router only (vanilla MoE gating: ``config.routing`` must be
    "feature", no oracle mode).

    Parameters: ``feature_router`` and ``residual_router`` (None without one),
    whatever the backend.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        config: MarsConfig | None = None,
        *,
        residual_input: RouterInput | None = None,
        feature_input: RouterInput | None = None,
        residual_router: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        _positive_int(d_model, "d_model")
        _positive_int(num_experts, "num_experts")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")
        config = MarsConfig() if config is None else config
        if not isinstance(config, MarsConfig):
            raise TypeError(f"config must be a MarsConfig, got {type(config).__name__}")
        if not residual_router and config.routing != "feature":
            raise ValueError(f"routing={config.routing!r} needs the residual router; without one "
                             "(residual_router=False) config.routing must be 'feature'")
        for name, value in (("residual_input", residual_input), ("feature_input", feature_input)):
            if value is not None and not isinstance(value, RouterInput):
                raise TypeError(f"{name} must be a mars_kernels RouterInput, got {type(value).__name__}")
        self.d_model, self.num_experts, self.k, self.config = d_model, num_experts, k, config
        self.backend = _backend.check_name(backend)
        feature_input = IncompleteTokens() if feature_input is None else feature_input
        residual_input = (ConcatResidual() if residual_input is None else residual_input) if residual_router else None
        # Registration order (feature, then residual) fixes the parameter order,
        # hence the optimiser state's layout in checkpoints.
        self.feature_router = _router_net(feature_input.width(d_model), num_experts, config.router_mlp)
        self.residual_router = (_router_net(residual_input.width(d_model), num_experts, config.router_mlp)
                                if residual_router else None)
        self.feature_input, self.residual_input = feature_input, residual_input

    # ------------------------------------------------------------ properties
    @property
    def has_residual_router(self) -> bool:
        return self.residual_router is not None

    @property
    def needs_complete(self) -> bool:
        """Whether a ``"train"`` step reads z_c (residual routing)."""
        return self.config.routing == "residual"

    @property
    def reads_mask(self) -> bool:
        """Whether some router input reads ``observed`` (then pass it)."""
        return self.feature_input.reads_mask or (self.residual_input is not None and self.residual_input.reads_mask)

    @property
    def may_skip_parameters(self) -> bool:
        """Whether a ``"train"`` step can leave some of the parameters without
        a gradient (the residual router under feature routing, both routers
        under random routing): data-parallel training must then be told
        (DistributedDataParallel's ``find_unused_parameters``)."""
        routing = self.config.routing
        return routing == "random" or (routing == "feature" and self.has_residual_router)

    # ---------------------------------------------------------------- pieces
    def feature_logits(self, z_i: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """z_i [..., D] (and observed where the feature input reads it) -> l_f [T, E]."""
        _check_tokens(z_i, self.d_model, "z_i")
        x = self.feature_input(z_i, None, observed)
        return self.feature_router(x.reshape(-1, x.shape[-1]))

    def residual_logits(self, z_i: torch.Tensor, z_c: torch.Tensor,
                        observed: torch.Tensor | None = None) -> torch.Tensor:
        """z_i, z_c [..., D] (and observed where the residual input reads it) -> l_r [T, E]."""
        if self.residual_router is None:
            raise ValueError("this MarsRouter has no residual router (residual_router=False)")
        r = self.residual_input(z_i, z_c, observed)
        return self.residual_router(r.reshape(-1, r.shape[-1]))

    def _check_complete(self, z_i: torch.Tensor, z_c: torch.Tensor | None, why: str) -> None:
        if z_c is None:
            raise ValueError(f"{why} needs z_c, the complete tokens [..., D] shaped like z_i")
        ok = isinstance(z_c, torch.Tensor) and z_c.dim() <= z_i.dim() and z_c.shape[-1] == z_i.shape[-1]
        if ok:
            ok = tuple(z_i.shape[z_i.dim() - z_c.dim():]) == tuple(z_c.shape)
        if not ok:
            raise ValueError(f"z_c must be a tensor shaped like z_i {tuple(z_i.shape)} (or like its trailing "
                             f"dimensions: one complete pass for several incomplete ones), "
                             f"got {tuple(getattr(z_c, 'shape', ())) or type(z_c).__name__}")

    def _random(self, T: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None):
        """k distinct experts per token, uniformly (the top k of T x E uniform
        scores), weights 1/k: -> weights [T, k], indices [T, k]."""
        scores = rand(T, self.num_experts, generator=generator, device=device)
        indices = scores.topk(self.k, dim=1).indices
        return torch.full((T, self.k), 1.0 / self.k, dtype=dtype, device=device), indices

    # --------------------------------------------------------------- forward
    def forward(
        self,
        z_i: torch.Tensor,
        z_c: torch.Tensor | None = None,
        *,
        observed: torch.Tensor | None = None,
        mode: str | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Routing:
        if mode is None:
            mode = "train" if self.training else "eval"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
        cfg, lead = self.config, z_i.shape[:-1]
        l_f = self.feature_logits(z_i, observed)
        T, E, k = l_f.shape[0], self.num_experts, self.k
        aux: dict[str, torch.Tensor] = {}
        if mode == "train" and cfg.routing == "residual":
            self._check_complete(z_i, z_c, "residual routing")
            l_r = self.residual_logits(z_i, z_c, observed)
            if l_r.dtype != l_f.dtype:  # e.g. routers of different precision under autocast
                l_r = l_r.to(l_f.dtype)
            sigma_0, sigma_const = cfg.sigmas()
            w, idx, imitation, divergence, prob_sum = ops.mars_routing(
                l_r, l_f, k, sigma_0=sigma_0, sigma_const=sigma_const, sigma_max=cfg.sigma_max,
                noise=noise, generator=generator, backend=self.backend,
            )
            if cfg.mix == "prob":
                w, idx, aux["feature_share"] = self._mix(l_f, w, idx, divergence, generator)
            counts = ops.expert_counts(idx, E, prob_sum.dtype)
            aux["imitation_loss"] = imitation.mean()
            aux["divergence"] = divergence.mean()
            aux["balance_loss"] = ops.switch_balance_from_stats(prob_sum, counts, T, k)
        elif mode == "train" and cfg.routing == "random":
            dtype = torch.float64 if l_f.dtype == torch.float64 else torch.float32
            w, idx = self._random(T, dtype, l_f.device, generator)
            counts = ops.expert_counts(idx, E)
            aux["balance_loss"] = torch.zeros((), dtype=dtype, device=l_f.device)
        else:
            if mode == "oracle":
                self._check_complete(z_i, z_c, "mode='oracle'")
                gate_logits = self.residual_logits(z_i, z_c, observed)
            else:
                gate_logits = l_f
            w, idx = ops.topk_gating(gate_logits, k, backend=self.backend)
            if mode == "train":
                _, prob_sum = ops.router_stats(gate_logits, backend=self.backend)
                counts = ops.expert_counts(idx, E, prob_sum.dtype)
                aux["balance_loss"] = ops.switch_balance_from_stats(prob_sum, counts, T, k)
            else:
                counts = ops.expert_counts(idx, E)
        aux["expert_counts"] = counts.detach()
        return Routing(w.reshape(*lead, k), idx.reshape(*lead, k), aux)

    def _mix(self, l_f, w_r, idx_r, divergence, generator):
        """``mix="prob"``: each token takes the feature router's top-k (its gate
        weights, with their gradient) instead of the residual gate (w_r, idx_r
        [T, k]) with probability q = 1 - exp(-mix_scale * KL(p_r || p_f)), so
        the experts also train on the routes they get at test time where the
        routers disagree. -> (weights [T, k], indices [T, k], share of tokens)."""
        share = 1.0 - torch.exp(-self.config.mix_scale * divergence.detach())  # [T]
        w_f, idx_f = ops.topk_gating(l_f, self.k, backend=self.backend)
        use_f = rand(share.shape, generator=generator, device=share.device, dtype=share.dtype) < share
        w = torch.where(use_f[:, None], w_f.to(w_r.dtype), w_r)
        return w, torch.where(use_f[:, None], idx_f.to(idx_r.dtype), idx_r), use_f.to(share.dtype).mean()

    @torch.no_grad()
    def agreement(self, z_i: torch.Tensor, z_c: torch.Tensor, observed: torch.Tensor | None = None) -> float:
        """Mean over tokens of |top-k(feature router) ∩ top-k(residual router)| / k:
        how well the feature router imitates the residual router (NaN without
        tokens). z_i, z_c [..., D] (z_c may be broadcast); observed [..., M]
        where a router input reads it."""
        self._check_complete(z_i, z_c, "router agreement")
        _, f_idx = ops.topk_gating(self.feature_logits(z_i, observed), self.k, backend=self.backend)
        _, r_idx = ops.topk_gating(self.residual_logits(z_i, z_c, observed), self.k, backend=self.backend)
        overlap = (f_idx.unsqueeze(2) == r_idx.unsqueeze(1)).any(dim=2).float().sum(dim=1) / self.k
        return float(overlap.mean()) if overlap.numel() else float("nan")

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, config={self.config}, "
                f"backend={self.backend!r}")


def _check_tokens(x: torch.Tensor, d_model: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != d_model or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor [..., d_model={d_model}], got {got}")
