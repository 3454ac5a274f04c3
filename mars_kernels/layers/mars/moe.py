"""MarsMoE: MARS (missingness-aware residual-guided specialization) as one
layer you put on your own fusion backbone.

Your backbone fuses the modalities of a sample into tokens. In training you
run it twice, on the incomplete input (the modalities you keep for this step)
and on the complete one, and hand both to the layer; at inference you run it
once, on what you observed, and the layer needs those tokens only::

    moe = mk.MarsMoE(d_model=64, d_hidden=128, num_experts=8, k=2)
    y, aux = moe(z_i, z_c)              # training: aux["loss"] goes into your loss
    y, _ = moe(z_i)                     # inference (moe.eval()): feature router only

With no options this is the MARS of the project's results (:class:`MarsConfig`'s
defaults, the ones ``mars train`` uses).

Shapes: z_i [..., D] (T tokens = the product of the leading dims), z_c the
complete tokens, [..., D] shaped like z_i or like its trailing dims (one
complete pass shared by P incomplete passes: z_i [P, T, D], z_c [T, D]),
observed [..., M] bool (the modalities present in z_i, broadcast the same
way; only read where a router input reads the mask), y [..., D] like z_i.
"""
from __future__ import annotations

import torch
from torch import nn

from ... import backend as _backend
from ..experts import Experts
from .config import MarsConfig
from .inputs import RouterInput
from .router import MarsRouter

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

    ``MarsMoE(d_model, d_hidden, num_experts, k, config=None, *,
    residual_input=None, feature_input=None, residual_router=True,
    activation="gelu", backend=None)``: ``config`` is a :class:`MarsConfig`
    (None: its defaults, the MARS of the results tables); the rest as
    :class:`MarsRouter` and :class:`Experts`.

    ``forward(z_i, z_c=None, observed=None, *, mode=None, noise=None,
    generator=None) -> (y, aux)``, with y = z_i + sum_{e in top-k} w_e
    Expert_e(z_i). ``mode`` as :class:`MarsRouter` ("train" by default in
    training mode, else "eval"; "oracle" gates with the residual router and
    needs z_c). Training with the residual router needs ``z_c``; inference
    needs ``z_i`` only (and ``observed`` where a router input reads it).

    aux: ``loss`` (lambda_imit * imitation + lambda_balance * balance in
    training, a 0 scalar otherwise: add it to your task loss),
    ``imitation_loss``, ``balance_loss``, ``divergence``, ``feature_share``
    (in training, as :class:`MarsRouter`), ``expert_counts`` [E], ``indices``
    [..., k] and ``weights`` [..., k] (the gate).

    Parameters: ``router`` (``router.feature_router``,
    ``router.residual_router``) and ``experts``; the same whatever the backend.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: int,
        config: MarsConfig | None = None,
        *,
        residual_input: RouterInput | None = None,
        feature_input: RouterInput | None = None,
        residual_router: bool = True,
        activation: str = "gelu",
        backend: str | None = None,
    ):
        super().__init__()
        self.router = MarsRouter(d_model, num_experts, k, config, residual_input=residual_input,
                                 feature_input=feature_input, residual_router=residual_router, backend=backend)
        self.experts = Experts(d_model, d_hidden, num_experts, activation=activation, backend=backend)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k

    # ------------------------------------------------------------ properties
    @property
    def config(self) -> MarsConfig:
        return self.router.config

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
    def reads_mask(self) -> bool:
        """Whether a call needs ``observed`` (a router input reads the mask)."""
        return self.router.reads_mask

    @property
    def may_skip_parameters(self) -> bool:
        """See :attr:`MarsRouter.may_skip_parameters`."""
        return self.router.may_skip_parameters

    # --------------------------------------------------------------- forward
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
        routing = self.router(z_i, z_c, observed=observed, mode=mode, noise=noise, generator=generator)
        lead, D, k = z_i.shape[:-1], z_i.shape[-1], self.k
        tokens = z_i.reshape(-1, D)
        out = _call_in_dtype(self.experts, tokens.dtype, tokens, routing.weights.reshape(-1, k),
                             routing.indices.reshape(-1, k)).reshape(*lead, D)
        aux = dict(routing.aux)
        cfg = self.config
        loss = torch.zeros((), dtype=torch.float32, device=z_i.device)
        if "imitation_loss" in aux:
            loss = loss + cfg.lambda_imit * aux["imitation_loss"]
        if "balance_loss" in aux:
            loss = loss + cfg.lambda_balance * aux["balance_loss"]
        aux.update(loss=loss, indices=routing.indices, weights=routing.weights)
        return z_i + out, aux

    @torch.no_grad()
    def agreement(self, z_i: torch.Tensor, z_c: torch.Tensor, observed: torch.Tensor | None = None) -> float:
        """Top-k overlap of the feature and residual routers (see :meth:`MarsRouter.agreement`)."""
        return self.router.agreement(z_i, z_c, observed)
