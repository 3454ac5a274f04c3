"""MarsRouter: the routing of MARS (missingness-aware residual-guided
specialization) as a module, usable on any backbone.

Two routers score the E experts for each token. The *residual router* sees
the contrast between the complete tokens z_c (every modality the sample has)
and the incomplete tokens z_i (the modalities observed in this pass); the
*feature router* sees z_i only, so it is the one available at inference, and
it is trained to imitate the residual router (imitation loss
KL(stopgrad(p_r) || p_f)). In training the residual router gates the experts,
with noise scaled by how much the two routers disagree (discrepancy-aware
noise, :func:`mars_kernels.mars_routing`); at inference the feature router
gates them, without noise.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import backend as _backend
from .. import ops
from .routing import Routing

__all__ = ["MarsRouter"]

MODES = ("train", "eval", "oracle")
ROUTINGS = ("residual", "feature", "random")
NOISE_MODES = ("adaptive", "constant", "none")
RESIDUAL_INPUTS = ("concat", "diff")


def _router_net(d_in: int, num_experts: int, mlp: bool) -> nn.Module:
    """Logits of one router: Linear(d_in, E), or Linear -> GELU -> Linear."""
    if mlp:
        return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, num_experts))
    return nn.Linear(d_in, num_experts)


def _tokens(x: torch.Tensor, d_model: int, name: str) -> torch.Tensor:
    """x [..., d_model] -> [T, d_model] (a view when possible)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != d_model or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor [..., d_model={d_model}], got {got}")
    return x.reshape(-1, d_model)


def _non_negative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class MarsRouter(nn.Module):
    """MARS routing: a residual router and a feature router over E experts.

    Shapes: z_i, z_c [..., D] (any leading dims; T = their product tokens),
    D = ``d_model``, E = ``num_experts``, k experts per token.

    ``forward(z_i, z_c=None, *, mode=None, noise=None, generator=None)`` ->
    :class:`Routing` (weights [..., k], indices [..., k] int64, aux). ``mode``:

    * ``"train"`` (default in training mode): the router chosen by ``routing``
      gates — ``"residual"`` (MARS: top-k of softmax(l_r + sigma * eps), sigma
      per token from ``noise``; needs ``z_c``), ``"feature"`` (top-k of the
      feature router, the vanilla-MoE gating) or ``"random"`` (k distinct
      experts drawn uniformly per token, weights 1/k).
    * ``"eval"`` (default in eval mode): top-k of softmax(l_f), no noise;
      needs ``z_i`` only.
    * ``"oracle"``: top-k of softmax(l_r), no noise; needs ``z_c`` (an upper
      bound on what the feature router can reach).

    ``z_c`` (the complete tokens, same shape as ``z_i``) is read only where
    the residual router runs; it never gets a gradient. ``noise`` ([T, E]
    standard normals) or ``generator`` makes the training draws reproducible
    (residual routing: the routing noise; random routing: the experts).

    aux, every mode: ``expert_counts`` [E] (assignments per expert, no
    gradient). In ``"train"`` mode also ``balance_loss`` (the Switch balance
    loss of the gating router: 1 when uniform; a constant 0 for random
    routing); with residual routing also ``imitation_loss`` (mean over tokens
    of KL(stopgrad(p_r) || p_f), its gradient reaches the feature router only)
    and ``divergence`` (mean per-token KL(p_r || p_f), detached: what scales
    the adaptive noise).

    Options: ``noise`` "adaptive" (sigma = min(sigma_0 * KL(p_r || p_f),
    sigma_max)), "constant" (sigma = min(sigma_const, sigma_max)) or "none";
    ``residual_input`` "concat" (the residual router reads [z_i,
    stopgrad(z_c)], width 2D) or "diff" (stopgrad(z_c - z_i), width D);
    ``mlp``: both routers are Linear -> GELU -> Linear instead of Linear;
    ``residual_router=False`` builds the feature router only (vanilla MoE
    gating: ``routing`` must be "feature", no oracle mode).

    Parameters: ``feature_router`` and ``residual_router`` (None without one),
    whatever the backend.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        *,
        routing: str = "residual",
        noise: str = "adaptive",
        sigma_0: float = 1.0,
        sigma_max: float = 1.0,
        sigma_const: float = 0.3,
        residual_input: str = "concat",
        mlp: bool = False,
        residual_router: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")
        for name, value, allowed in (("routing", routing, ROUTINGS), ("noise", noise, NOISE_MODES),
                                     ("residual_input", residual_input, RESIDUAL_INPUTS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not residual_router and routing != "feature":
            raise ValueError(f"routing={routing!r} needs the residual router; without one (residual_router=False) "
                             "routing must be 'feature'")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.routing, self.noise, self.residual_input, self.mlp = routing, noise, residual_input, bool(mlp)
        self.sigma_0 = _non_negative(sigma_0, "sigma_0")
        self.sigma_max = _non_negative(sigma_max, "sigma_max")
        self.sigma_const = _non_negative(sigma_const, "sigma_const")
        self.backend = _backend.check_name(backend)
        # Registration order (feature, then residual) fixes the parameter order,
        # hence the optimiser state's layout in checkpoints.
        self.feature_router = _router_net(d_model, num_experts, mlp)
        self.residual_router = None
        if residual_router:
            d_res = 2 * d_model if residual_input == "concat" else d_model
            self.residual_router = _router_net(d_res, num_experts, mlp)

    # ------------------------------------------------------------ properties
    @property
    def has_residual_router(self) -> bool:
        return self.residual_router is not None

    @property
    def needs_complete(self) -> bool:
        """Whether a ``"train"`` step reads z_c (residual routing)."""
        return self.routing == "residual"

    @property
    def may_skip_parameters(self) -> bool:
        """Whether a ``"train"`` step can leave some of the parameters without
        a gradient (the residual router under feature routing, both routers
        under random routing): data-parallel training must then be told
        (DistributedDataParallel's ``find_unused_parameters``)."""
        return self.routing == "random" or (self.routing == "feature" and self.has_residual_router)

    def sigmas(self) -> tuple[float, float]:
        """(sigma_0, sigma_const) of :func:`mars_kernels.mars_routing` for the noise mode."""
        return {"adaptive": (self.sigma_0, 0.0), "constant": (0.0, self.sigma_const), "none": (0.0, 0.0)}[self.noise]

    # ---------------------------------------------------------------- pieces
    def residual(self, z_i: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        """The residual router's input: [z_i, stopgrad(z_c)] [..., 2D] ("concat")
        or stopgrad(z_c - z_i) [..., D] ("diff")."""
        if self.residual_input == "concat":
            return torch.cat([z_i, z_c.detach()], dim=-1)
        return (z_c - z_i).detach()

    def feature_logits(self, z_i: torch.Tensor) -> torch.Tensor:
        """z_i [..., D] -> l_f [T, E]."""
        return self.feature_router(_tokens(z_i, self.d_model, "z_i"))

    def residual_logits(self, z_i: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        """z_i, z_c [..., D] -> l_r [T, E]."""
        if self.residual_router is None:
            raise ValueError("this MarsRouter has no residual router (residual_router=False)")
        r = self.residual(z_i, z_c)
        return self.residual_router(r.reshape(-1, r.shape[-1]))

    def _check_complete(self, z_i: torch.Tensor, z_c: torch.Tensor | None, why: str) -> None:
        if z_c is None:
            raise ValueError(f"{why} needs z_c, the complete tokens [..., D] shaped like z_i")
        if not isinstance(z_c, torch.Tensor) or z_c.shape != z_i.shape:
            raise ValueError(f"z_c must be a tensor shaped like z_i {tuple(z_i.shape)}, "
                             f"got {tuple(getattr(z_c, 'shape', ())) or type(z_c).__name__}")

    def _random(self, T: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None):
        """k distinct experts per token, uniformly (the top k of T x E uniform
        scores), weights 1/k: -> weights [T, k], indices [T, k]."""
        scores = torch.rand(T, self.num_experts, generator=generator, device=device)
        indices = scores.topk(self.k, dim=1).indices
        return torch.full((T, self.k), 1.0 / self.k, dtype=dtype, device=device), indices

    # --------------------------------------------------------------- forward
    def forward(
        self,
        z_i: torch.Tensor,
        z_c: torch.Tensor | None = None,
        *,
        mode: str | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Routing:
        if mode is None:
            mode = "train" if self.training else "eval"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
        lead = z_i.shape[:-1]
        l_f = self.feature_logits(z_i)
        T, E, k = l_f.shape[0], self.num_experts, self.k
        aux: dict[str, torch.Tensor] = {}
        if mode == "train" and self.routing == "residual":
            self._check_complete(z_i, z_c, "residual routing")
            l_r = self.residual_logits(z_i, z_c)
            sigma_0, sigma_const = self.sigmas()
            w, idx, imitation, divergence, prob_sum = ops.mars_routing(
                l_r, l_f, k, sigma_0=sigma_0, sigma_const=sigma_const, sigma_max=self.sigma_max,
                noise=noise, generator=generator, backend=self.backend,
            )
            counts = ops.expert_counts(idx, E, prob_sum.dtype)
            aux["imitation_loss"] = imitation.mean()
            aux["divergence"] = divergence.mean()
            aux["balance_loss"] = ops.switch_balance_from_stats(prob_sum, counts, T, k)
        elif mode == "train" and self.routing == "random":
            dtype = torch.float64 if l_f.dtype == torch.float64 else torch.float32
            w, idx = self._random(T, dtype, l_f.device, generator)
            counts = ops.expert_counts(idx, E)
            aux["balance_loss"] = torch.zeros((), dtype=dtype, device=l_f.device)
        else:
            if mode == "oracle":
                self._check_complete(z_i, z_c, "mode='oracle'")
                gate_logits = self.residual_logits(z_i, z_c)
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

    @torch.no_grad()
    def agreement(self, z_i: torch.Tensor, z_c: torch.Tensor) -> float:
        """Mean over tokens of |top-k(feature router) ∩ top-k(residual router)| / k:
        how well the feature router imitates the residual router (NaN without
        tokens). z_i, z_c [..., D]."""
        self._check_complete(z_i, z_c, "router agreement")
        _, f_idx = ops.topk_gating(self.feature_logits(z_i), self.k, backend=self.backend)
        _, r_idx = ops.topk_gating(self.residual_logits(z_i, z_c), self.k, backend=self.backend)
        overlap = (f_idx.unsqueeze(2) == r_idx.unsqueeze(1)).any(dim=2).float().sum(dim=1) / self.k
        return float(overlap.mean()) if overlap.numel() else float("nan")

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, routing={self.routing!r}, "
                f"noise={self.noise!r}, residual_input={self.residual_input!r}, backend={self.backend!r}")
