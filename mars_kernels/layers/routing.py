"""Routers: a linear top-k router and noisy top-k gating. Each returns a
:class:`Routing` for the experts to consume."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .. import backend as _backend
from .. import checks as check
from .. import ops

__all__ = ["Routing", "flatten_tokens", "TopKRouter", "NoisyTopKRouter"]


class Routing(NamedTuple):
    """A router's decision for N = prod(leading dims) tokens.

    weights [*, k] (float32, float64 for float64 input), indices [*, k] int64,
    aux: losses and statistics (see each router's docstring).
    """

    weights: torch.Tensor
    indices: torch.Tensor
    aux: dict[str, torch.Tensor]


def flatten_tokens(x: torch.Tensor, d_model: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., d_model] -> tokens [N, d_model] (a view when possible). With
    ``like`` (a parameter of the layer), x must have its dtype and device."""
    check.tensor(x, "x")
    if x.dim() < 2 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape [..., d_model={d_model}] with at least 2 dims, got {tuple(x.shape)}")
    if like is not None:
        if x.dtype != like.dtype:
            raise TypeError(f"x must have the layer's dtype {like.dtype}, got {x.dtype} "
                            "(convert the input, or the layer with .to(dtype))")
        if x.device != like.device:
            raise ValueError(f"x must be on the layer's device {like.device}, got {x.device} "
                             "(move the input, or the layer with .to(device))")
    return x.reshape(-1, d_model)


class TopKRouter(nn.Module):
    """Linear router with top-k gating.

    x [..., D] -> Routing(weights [..., k], indices [..., k], aux) with aux:
    ``balance_loss`` (Switch, 1 when uniform), ``z_loss`` (router z-loss),
    ``expert_counts`` [E] (assignments per expert, no gradient).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        *,
        mode: str = "softmax_topk",
        renormalize: bool = True,
        bias: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        check.top_k(k, num_experts)
        if mode not in ops.MODES:
            raise ValueError(f"mode must be one of {ops.MODES}, got {mode!r}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.mode, self.renormalize = mode, renormalize
        self.backend = _backend.check_name(backend)
        self.proj = nn.Linear(d_model, num_experts, bias=bias)

    def forward(self, x: torch.Tensor, *, backend: str | None = None) -> Routing:
        """``backend`` overrides the module's for this call."""
        lead = x.shape[:-1]
        logits = self.proj(flatten_tokens(x, self.d_model, self.proj.weight))
        name = _backend.resolve(backend or self.backend, logits.device)
        w, i = ops.topk_gating(logits, self.k, mode=self.mode, renormalize=self.renormalize, backend=name)
        # One pass of router statistics and one count serve both losses and the report.
        lse, prob_sum = ops.router_stats(logits, backend=name)
        counts = ops.expert_counts(i, self.num_experts)
        aux = {
            "balance_loss": ops.switch_balance_from_stats(prob_sum, counts, logits.shape[0], self.k),
            "z_loss": ops.z_loss_from_lse(lse),
            "expert_counts": counts,
        }
        return Routing(w.reshape(*lead, self.k), i.reshape(*lead, self.k), aux)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, mode={self.mode!r}, backend={self.backend!r}"


class NoisyTopKRouter(nn.Module):
    """Noisy top-k gating of Shazeer et al. (2017); noise only in training mode.

    x [..., D] -> Routing(weights [..., k], indices [..., k], aux) with aux:
    ``balance_loss`` = CV^2(importance) + CV^2(load), ``importance`` [E],
    ``load`` [E]. ``w_gate`` and ``w_noise`` start at zero, as in the paper.
    """

    def __init__(
        self, d_model: int, num_experts: int, k: int, *, noise_eps: float = 1e-2, backend: str | None = None
    ):
        super().__init__()
        check.top_k(k, num_experts)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.noise_eps = check.positive_float(noise_eps, "noise_eps")
        self.backend = _backend.check_name(backend)
        self.w_gate = nn.Parameter(torch.zeros(d_model, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, num_experts))

    def forward(
        self,
        x: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        backend: str | None = None,
    ) -> Routing:
        """``backend`` overrides the module's for this call."""
        lead = x.shape[:-1]
        w, i, importance, load = ops.noisy_topk_gating(
            flatten_tokens(x, self.d_model, self.w_gate),
            self.w_gate,
            self.w_noise,
            self.k,
            training=self.training,
            noise=noise,
            generator=generator,
            noise_eps=self.noise_eps,
            backend=backend or self.backend,
        )
        aux = {"balance_loss": ops.noisy_balance_loss(importance, load), "importance": importance, "load": load}
        return Routing(w.reshape(*lead, self.k), i.reshape(*lead, self.k), aux)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, backend={self.backend!r}"
