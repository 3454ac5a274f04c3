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

Options that narrow the train-test router gap (all off by default; see
:class:`MarsRouter`): the feature router may also read the observed-modality
mask (known at test time), the residual router may read a low-dimensional
bottleneck of the residual, training may hand some tokens to the feature
router's choice (``mix``), and the imitation loss may be the cross-entropy on
the residual router's top-k. With ``residual_input="pattern"`` the residual
router reads the per-pattern mean of the residual, and the experts specialise
by missing pattern.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import backend as _backend
from .. import ops
from ..ops.common import compute_dtype, topk_order
from .routing import Routing

__all__ = ["MarsRouter", "mask_tokens", "pattern_mean"]

MODES = ("train", "eval", "oracle")
ROUTINGS = ("residual", "feature", "random")
NOISE_MODES = ("adaptive", "constant", "none")
RESIDUAL_INPUTS = ("concat", "diff", "bottleneck", "pattern")
MIX_MODES = ("none", "prob", "blend")
IMITATIONS = ("kl", "topk_ce")


def _router_net(d_in: int, num_experts: int, mlp: bool) -> nn.Module:
    """Logits of one router: Linear(d_in, E), or Linear -> GELU -> Linear."""
    if mlp:
        return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, num_experts))
    return nn.Linear(d_in, num_experts)


def _bottleneck_net(d_model: int, width: int, num_experts: int) -> nn.Module:
    """The residual router of ``residual_input="bottleneck"``: the residual
    through a ``width``-wide code, Linear(D, width) -> GELU -> Linear(width, E)."""
    return nn.Sequential(nn.Linear(d_model, width), nn.GELU(), nn.Linear(width, num_experts))


def mask_tokens(observed: torch.Tensor | None, z: torch.Tensor, width: int) -> torch.Tensor:
    """The observed-modality mask per token: observed [..., M] bool (M =
    ``width``), broadcast to the leading dims of the tokens z [..., D] ->
    [T, M] in z's dtype and device."""
    if observed is None:
        raise ValueError(f"this layer reads the observed-modality mask; pass observed [..., {width}] bool")
    if not isinstance(observed, torch.Tensor) or observed.dim() < 1 or observed.shape[-1] != width:
        got = tuple(observed.shape) if isinstance(observed, torch.Tensor) else type(observed).__name__
        raise ValueError(f"observed must be a [..., M={width}] tensor, got {got}")
    lead = z.shape[:-1]
    try:
        m = observed.to(device=z.device, dtype=z.dtype).expand(*lead, width)
    except RuntimeError:
        raise ValueError(f"observed {tuple(observed.shape)} does not broadcast to the tokens' leading dims "
                         f"{tuple(lead)}") from None
    return m.reshape(-1, width)


_CODE_BITS = 62  # masks up to this wide are grouped by an int64 code (2^62 fits, sign bit untouched)


def pattern_mean(r: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
    """r [..., D] -> [..., D]: each token's row replaced by the mean of r over
    the tokens with the same missing pattern (``observed`` [..., M] bool,
    broadcast to r's leading dims). What is left of the residual is what the
    pattern does to the representation on average, not what the sample is."""
    if observed is None:
        raise ValueError("residual_input='pattern' needs observed [..., M] bool, the missing pattern of each token")
    width = observed.shape[-1] if isinstance(observed, torch.Tensor) and observed.dim() else 0
    m = mask_tokens(observed, r, width).bool()  # [T, M]
    if width <= _CODE_BITS:
        # one int64 code per pattern: a flat unique is a plain sort, far cheaper than unique(dim=0)'s row sort
        codes = (m.long() << torch.arange(width, device=m.device)).sum(dim=1)
        _, group, counts = torch.unique(codes, return_inverse=True, return_counts=True)
    else:
        _, group, counts = torch.unique(m, dim=0, return_inverse=True, return_counts=True)
    flat = r.reshape(-1, r.shape[-1])
    sums = flat.new_zeros(counts.numel(), flat.shape[1]).index_add_(0, group, flat)
    return (sums / counts.to(flat.dtype).unsqueeze(1))[group].reshape(r.shape)


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
    or "bottleneck" (stopgrad(z_c - z_i) through a ``residual_dim``-wide
    code: Linear(D, residual_dim) -> GELU -> Linear(residual_dim, E), a coarse
    residual that the feature router can predict more easily) or "pattern"
    (the mean of stopgrad(z_c - z_i) over the call's tokens with the same
    missing pattern, :func:`pattern_mean`: what the pattern does to the
    representation, free of the sample's identity, so the residual router
    cannot route on the label that z_c carries; training, ``mode="oracle"``
    and :meth:`agreement` then need ``observed``);
    ``mlp``: both routers are Linear -> GELU -> Linear instead of Linear;
    ``residual_router=False`` builds the feature router only (vanilla MoE
    gating: ``routing`` must be "feature", no oracle mode).

    ``mask_dim`` M > 0: the feature router reads [z_i, observed] (observed
    [..., M] bool, the modalities present in z_i, known at test time); every
    call that runs the feature router then needs ``observed``.

    ``mix`` (residual routing in training only): "none"; "prob": each token
    takes the feature router's top-k (its gate weights, with their gradient)
    instead of the residual router's with probability
    q = 1 - exp(-mix_scale * KL(p_r || p_f)), so the experts train on the
    routes they get at test time where the routers disagree; "blend": the
    gate is the top-k of p~ = (1 - a) softmax(l_r + sigma * eps) + a p_f with
    a = 1 - exp(-mix_scale * KL) (the [RECON] mixing reading), weights
    p~ renormalised over the k chosen. Both add ``feature_share`` to aux (the
    mean of q or a).

    ``imitation``: "kl" (KL(sg(p_r) || p_f), the fused op's) or "topk_ce"
    (-1/k sum over the clean residual top-k of log p_f: the feature router
    is asked for the residual router's choices only).

    ``alignment``: with residual routing in training, also ``alignment_loss``
    in aux, the mean over tokens of KL(stopgrad(p_f) || p_r): its gradient
    reaches the residual router only, which then pays for routes the feature
    router cannot reproduce from the incomplete input (the train-test router
    gap closed from the residual side; imitation closes it from the feature
    side).

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
        mask_dim: int = 0,
        residual_dim: int = 8,
        mix: str = "none",
        mix_scale: float = 1.0,
        imitation: str = "kl",
        alignment: bool = False,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")
        for name, v in (("mask_dim", mask_dim), ("residual_dim", residual_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "mask_dim" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'mask_dim' else 1}, got {v!r}")
        for name, value, allowed in (("routing", routing, ROUTINGS), ("noise", noise, NOISE_MODES),
                                     ("residual_input", residual_input, RESIDUAL_INPUTS), ("mix", mix, MIX_MODES),
                                     ("imitation", imitation, IMITATIONS)):
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
        self.mix_scale = _non_negative(mix_scale, "mix_scale")
        self.mask_dim, self.residual_dim, self.mix, self.imitation = mask_dim, residual_dim, mix, imitation
        self.alignment = bool(alignment)
        self.backend = _backend.check_name(backend)
        # Registration order (feature, then residual) fixes the parameter order,
        # hence the optimiser state's layout in checkpoints.
        self.feature_router = _router_net(d_model + mask_dim, num_experts, mlp)
        self.residual_router = None
        if residual_router:
            if residual_input == "bottleneck":
                self.residual_router = _bottleneck_net(d_model, residual_dim, num_experts)
            else:
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
    def residual(self, z_i: torch.Tensor, z_c: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """The residual router's input: [z_i, stopgrad(z_c)] [..., 2D] ("concat"),
        stopgrad(z_c - z_i) [..., D] ("diff", "bottleneck"), or for "pattern"
        the mean of stopgrad(z_c - z_i) over the tokens of the call that share
        the token's missing pattern (``observed`` [..., M] bool, broadcast to
        the tokens) [..., D]. ``z_c`` may have fewer leading dimensions than
        ``z_i`` (one complete pass for P incomplete ones): it is broadcast."""
        z_c = z_c.expand_as(z_i)
        if self.residual_input == "concat":
            return torch.cat([z_i, z_c.detach()], dim=-1)
        r = (z_c - z_i).detach()
        if self.residual_input != "pattern":
            return r
        return pattern_mean(r, observed)

    def mask_features(self, observed: torch.Tensor | None, z_i: torch.Tensor) -> torch.Tensor:
        """The observed mask as router input (see :func:`mask_tokens`)."""
        return mask_tokens(observed, z_i, self.mask_dim)

    def feature_logits(self, z_i: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """z_i [..., D] (and, with ``mask_dim``, observed [..., M]) -> l_f [T, E]."""
        x = _tokens(z_i, self.d_model, "z_i")
        if self.mask_dim:
            x = torch.cat([x, self.mask_features(observed, z_i)], dim=-1)
        return self.feature_router(x)

    def residual_logits(self, z_i: torch.Tensor, z_c: torch.Tensor,
                        observed: torch.Tensor | None = None) -> torch.Tensor:
        """z_i, z_c [..., D] (and for ``residual_input="pattern"`` observed
        [..., M]) -> l_r [T, E]."""
        if self.residual_router is None:
            raise ValueError("this MarsRouter has no residual router (residual_router=False)")
        r = self.residual(z_i, z_c, observed)
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
        scores = torch.rand(T, self.num_experts, generator=generator, device=device)
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
        lead = z_i.shape[:-1]
        l_f = self.feature_logits(z_i, observed)
        T, E, k = l_f.shape[0], self.num_experts, self.k
        aux: dict[str, torch.Tensor] = {}
        if mode == "train" and self.routing == "residual":
            self._check_complete(z_i, z_c, "residual routing")
            l_r = self.residual_logits(z_i, z_c, observed)
            if l_r.dtype != l_f.dtype:  # e.g. a float32 bottleneck code under autocast
                l_r = l_r.to(l_f.dtype)
            sigma_0, sigma_const = self.sigmas()
            if noise is None and self.mix == "blend":  # the op's noise, drawn here to use it twice
                noise = torch.randn(T, E, generator=generator, device=l_r.device, dtype=compute_dtype(l_r.dtype))
            w, idx, imitation, divergence, prob_sum = ops.mars_routing(
                l_r, l_f, k, sigma_0=sigma_0, sigma_const=sigma_const, sigma_max=self.sigma_max,
                noise=noise, generator=generator, backend=self.backend,
            )
            if self.imitation == "topk_ce":
                imitation = self._topk_ce(l_r, l_f)
            if self.alignment:
                aux["alignment_loss"] = self._alignment(l_r, l_f).mean()
            if self.mix != "none":
                w, idx, share = self._mix(l_r, l_f, w, idx, divergence, noise, generator)
                aux["feature_share"] = share
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

    def _topk_ce(self, l_r: torch.Tensor, l_f: torch.Tensor) -> torch.Tensor:
        """-1/k sum over the clean top-k of l_r of log softmax(l_f): [T]; gradient to l_f only."""
        ct = compute_dtype(l_f.dtype)
        top = topk_order(l_r.detach().to(ct), self.k)
        return -torch.log_softmax(l_f.to(ct), dim=-1).gather(1, top).mean(dim=1)

    def _alignment(self, l_r: torch.Tensor, l_f: torch.Tensor) -> torch.Tensor:
        """KL(sg(p_f) || p_r) per token [T]; gradient to l_r only."""
        ct = compute_dtype(l_r.dtype)
        log_f = torch.log_softmax(l_f.detach().to(ct), dim=-1)
        return (log_f.exp() * (log_f - torch.log_softmax(l_r.to(ct), dim=-1))).sum(dim=-1)

    def _mix(self, l_r, l_f, w_r, idx_r, divergence, noise, generator):
        """The ``mix`` gate from the residual gate (w_r, idx_r [T, k]):
        -> (weights [T, k], indices [T, k], mean feature share)."""
        ct = compute_dtype(l_r.dtype)
        share = 1.0 - torch.exp(-self.mix_scale * divergence.detach().to(ct))  # [T]
        if self.mix == "prob":
            w_f, idx_f = ops.topk_gating(l_f, self.k, backend=self.backend)
            use_f = torch.rand(share.shape, generator=generator, device=share.device, dtype=ct) < share
            w = torch.where(use_f[:, None], w_f.to(w_r.dtype), w_r)
            return w, torch.where(use_f[:, None], idx_f.to(idx_r.dtype), idx_r), use_f.to(ct).mean()
        sigma_0, sigma_const = self.sigmas()
        sigma = torch.clamp(sigma_0 * divergence.detach().to(ct) + sigma_const, max=self.sigma_max)
        noisy = l_r.to(ct) + sigma[:, None] * noise.to(ct)
        p = (1.0 - share[:, None]) * torch.softmax(noisy, dim=-1) + share[:, None] * torch.softmax(l_f.to(ct), dim=-1)
        idx = topk_order(p.detach(), self.k)
        chosen = p.gather(1, idx)
        return (chosen / chosen.sum(dim=1, keepdim=True)).to(w_r.dtype), idx.to(idx_r.dtype), share.mean()

    @torch.no_grad()
    def agreement(self, z_i: torch.Tensor, z_c: torch.Tensor, observed: torch.Tensor | None = None) -> float:
        """Mean over tokens of |top-k(feature router) ∩ top-k(residual router)| / k:
        how well the feature router imitates the residual router (NaN without
        tokens). z_i, z_c [..., D] (z_c may be broadcast, see :meth:`residual`);
        observed [..., M] with ``mask_dim``."""
        self._check_complete(z_i, z_c, "router agreement")
        _, f_idx = ops.topk_gating(self.feature_logits(z_i, observed), self.k, backend=self.backend)
        _, r_idx = ops.topk_gating(self.residual_logits(z_i, z_c, observed), self.k, backend=self.backend)
        overlap = (f_idx.unsqueeze(2) == r_idx.unsqueeze(1)).any(dim=2).float().sum(dim=1) / self.k
        return float(overlap.mean()) if overlap.numel() else float("nan")

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)!r}" for name, default in
                        (("mask_dim", 0), ("mix", "none"), ("imitation", "kl"), ("alignment", False)) if getattr(self, name) != default)
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, routing={self.routing!r}, "
                f"noise={self.noise!r}, residual_input={self.residual_input!r}{extra}, backend={self.backend!r}")
