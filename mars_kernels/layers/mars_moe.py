"""MarsMoE: MARS (missingness-aware residual-guided specialization) as one
layer you put on your own fusion backbone.

Your backbone fuses the modalities of a sample into tokens. In training you
run it twice, on the incomplete input (the modalities you keep for this step)
and on the complete one, and hand both to the layer; at inference you run it
once, on what you observed, and the layer needs those tokens only::

    moe = mk.MarsMoE(d_model=64, d_hidden=128, num_experts=8, k=2)
    y, aux = moe(z_i, z_c)              # training: aux["loss"] goes into your loss
    y, _ = moe(z_i)                     # inference (moe.eval()): feature router only

Shapes: z_i [..., D] (T tokens = the product of the leading dims), z_c the
complete tokens, [..., D] shaped like z_i or like its trailing dims (one
complete pass shared by P incomplete passes: z_i [P, T, D], z_c [T, D]),
observed [..., M] bool (the modalities present in z_i, broadcast the same
way), y [..., D] like z_i.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import backend as _backend
from .experts import Experts
from .mars_router import MarsRouter, mask_tokens

__all__ = ["MarsMoE"]


def _call_in_dtype(module: nn.Module, dtype: torch.dtype, *args):
    """``module(*args)`` with its floating parameters cast to ``dtype`` for
    this call (under autocast the tokens are bfloat16 while the float32
    master weights get the gradients); a plain call when they already are."""
    params = dict(module.named_parameters())
    if all(not p.is_floating_point() or p.dtype == dtype for p in params.values()):
        return module(*args)
    cast = {n: p.to(dtype) if p.is_floating_point() else p for n, p in params.items()}
    return torch.func.functional_call(module, cast, args)


class MarsMoE(nn.Module):
    """A residual-guided mixture of experts: :class:`MarsRouter` + :class:`Experts`.

    ``forward(z_i, z_c=None, observed=None, *, mode=None, noise=None,
    generator=None) -> (y, aux)``, with y = z_i + sum_{e in top-k} w_e
    Expert_e(x) (x = z_i, or z_i + U·observed with ``mask_experts``; without
    the skip connection when ``residual=False``). ``mode`` as
    :class:`MarsRouter` ("train" by default in training mode, else "eval";
    "oracle" gates with the residual router and needs z_c). Training with the
    residual router needs ``z_c``; inference needs ``z_i`` (and ``observed``
    when the layer reads the mask) only.

    aux: ``loss`` (lambda_imit * imitation + lambda_balance * balance
    + lambda_align * alignment in training, a 0 scalar otherwise: add it to
    your task loss), ``alignment_loss`` (with ``lambda_align`` > 0, see
    :class:`MarsRouter`'s ``alignment``), ``reconstruction_loss`` (with
    ``lambda_recon`` > 0 and z_c, in training: mean |y - sg(z_c)|, the
    experts completing the incomplete tokens towards the complete ones),
    ``imitation_loss``, ``balance_loss``, ``divergence`` (in training, as
    :class:`MarsRouter`), ``feature_share`` (with ``mix``), ``expert_counts``
    [E], ``indices`` [..., k] and ``weights`` [..., k] (the gate).

    Options: every :class:`MarsRouter` option (``routing``, ``noise``,
    ``sigma_0``, ``sigma_max``, ``sigma_const``, ``residual_input``,
    ``residual_dim``, ``router_mlp``, ``mix``, ``mix_scale``, ``imitation``,
    ``residual_router``); ``num_modalities`` M (the width of ``observed``,
    0: the layer never reads it) with ``mask_router`` (the feature router reads
    [z_i, observed]) and ``mask_experts`` (the experts read z_i plus a learned
    per-modality vector for each observed modality, U [M, D], initialised to
    zero); ``activation`` of the experts; ``lambda_imit``, ``lambda_balance``,
    ``lambda_align`` (0: no alignment loss), ``lambda_recon`` (0: no
    reconstruction loss).

    Parameters: ``router`` (``router.feature_router``,
    ``router.residual_router``), ``experts`` and, with ``mask_experts``,
    ``mask_embed``; the same whatever the backend.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: int,
        *,
        routing: str = "residual",
        noise: str = "adaptive",
        sigma_0: float = 1.0,
        sigma_max: float = 1.0,
        sigma_const: float = 0.3,
        residual_input: str = "concat",
        residual_dim: int = 8,
        router_mlp: bool = False,
        mix: str = "none",
        mix_scale: float = 1.0,
        imitation: str = "kl",
        residual_router: bool = True,
        num_modalities: int = 0,
        mask_router: bool = False,
        mask_experts: bool = False,
        activation: str = "gelu",
        residual: bool = True,
        lambda_imit: float = 5.0,
        lambda_balance: float = 0.01,
        lambda_align: float = 0.0,
        lambda_recon: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__()
        if isinstance(num_modalities, bool) or not isinstance(num_modalities, int) or num_modalities < 0:
            raise ValueError(f"num_modalities must be an int >= 0, got {num_modalities!r}")
        if (mask_router or mask_experts) and num_modalities == 0:
            raise ValueError("mask_router and mask_experts read the observed-modality mask; give num_modalities "
                             "(its width M)")
        for name, v in (("lambda_imit", lambda_imit), ("lambda_balance", lambda_balance),
                        ("lambda_align", lambda_align), ("lambda_recon", lambda_recon)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.num_modalities = num_modalities
        self.mask_router, self.mask_experts, self.residual = bool(mask_router), bool(mask_experts), bool(residual)
        self.lambda_imit, self.lambda_balance = float(lambda_imit), float(lambda_balance)
        self.lambda_align = float(lambda_align)
        self.lambda_recon = float(lambda_recon)
        self.router = MarsRouter(
            d_model, num_experts, k, routing=routing, noise=noise, sigma_0=sigma_0, sigma_max=sigma_max,
            sigma_const=sigma_const, residual_input=residual_input, mlp=router_mlp, residual_router=residual_router,
            backend=backend, mask_dim=num_modalities if mask_router else 0, residual_dim=residual_dim, mix=mix,
            mix_scale=mix_scale, imitation=imitation, alignment=self.lambda_align > 0,
        )
        self.experts = Experts(d_model, d_hidden, num_experts, activation=activation, backend=backend)
        self.mask_embed = nn.Linear(num_modalities, d_model, bias=False) if mask_experts else None
        if self.mask_embed is not None:
            nn.init.zeros_(self.mask_embed.weight)

    # ------------------------------------------------------------ properties
    @property
    def backend(self) -> str | None:
        return self.experts.backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self.router.backend = self.experts.backend = _backend.check_name(name)

    @property
    def has_residual_router(self) -> bool:
        return self.router.has_residual_router

    @property
    def routes_on_mask(self) -> bool:
        """Whether a router reads ``observed`` (the feature router with
        ``mask_router``; the residual router with ``residual_input="pattern"``)."""
        return self.mask_router or self.router.residual_input == "pattern"

    @property
    def reads_mask(self) -> bool:
        """Whether the layer needs ``observed`` (at inference too)."""
        return self.mask_router or self.mask_experts

    @property
    def may_skip_parameters(self) -> bool:
        """See :attr:`MarsRouter.may_skip_parameters`."""
        return self.router.may_skip_parameters

    # --------------------------------------------------------------- forward
    def expert_input(self, z_i: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
        """What the experts read: z_i, plus U·observed with ``mask_experts``."""
        if self.mask_embed is None:
            return z_i
        m = mask_tokens(observed, z_i, self.num_modalities)
        shift = _call_in_dtype(self.mask_embed, z_i.dtype, m)
        return z_i + shift.reshape(z_i.shape)

    def forward(
        self,
        z_i: torch.Tensor,
        z_c: torch.Tensor | None = None,
        observed: torch.Tensor | None = None,
        *,
        mode: str | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if mode is None:
            mode = "train" if self.training else "eval"
        routing = self.router(z_i, z_c, observed=observed if self.routes_on_mask else None, mode=mode,
                              noise=noise, generator=generator)
        x = self.expert_input(z_i, observed)
        lead, D, k = z_i.shape[:-1], z_i.shape[-1], self.k
        tokens = x.reshape(-1, D)
        out = _call_in_dtype(self.experts, tokens.dtype, tokens, routing.weights.reshape(-1, k),
                             routing.indices.reshape(-1, k)).reshape(*lead, D)
        y = z_i + out if self.residual else out
        aux = dict(routing.aux)
        loss = torch.zeros((), dtype=torch.float32, device=z_i.device)
        if "imitation_loss" in aux:
            loss = loss + self.lambda_imit * aux["imitation_loss"]
        if "balance_loss" in aux:
            loss = loss + self.lambda_balance * aux["balance_loss"]
        if "alignment_loss" in aux:
            loss = loss + self.lambda_align * aux["alignment_loss"]
        if self.lambda_recon > 0 and z_c is not None and mode == "train":
            # The experts complete the incomplete tokens: y approaches the
            # complete pass (the teacher, detached), i.e. the experts' output
            # approaches the residual z_c - z_i the residual router routes on.
            aux["reconstruction_loss"] = (y.float() - z_c.detach().float()).abs().mean()
            loss = loss + self.lambda_recon * aux["reconstruction_loss"]
        aux.update(loss=loss, indices=routing.indices, weights=routing.weights)
        return y, aux

    @torch.no_grad()
    def agreement(self, z_i: torch.Tensor, z_c: torch.Tensor, observed: torch.Tensor | None = None) -> float:
        """Top-k overlap of the feature and residual routers (see :meth:`MarsRouter.agreement`)."""
        return self.router.agreement(z_i, z_c, observed if self.routes_on_mask else None)

    def extra_repr(self) -> str:
        return (f"num_modalities={self.num_modalities}, mask_router={self.mask_router}, "
                f"mask_experts={self.mask_experts}, residual={self.residual}, lambda_imit={self.lambda_imit}, "
                f"lambda_balance={self.lambda_balance}" + (f", lambda_align={self.lambda_align}" if self.lambda_align else ""))

