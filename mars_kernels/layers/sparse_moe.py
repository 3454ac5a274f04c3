"""SparseMoE: a router and the experts behind it."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import backend as _backend
from .. import checks as check
from ..ops import apply_capacity, expert_counts
from .experts import Experts
from .routing import NoisyTopKRouter, TopKRouter, flatten_tokens

__all__ = ["SparseMoE"]


class SparseMoE(nn.Module):
    """Router + experts: the sparse mixture-of-experts layer.

    x [..., D] -> (y [..., D], aux). Dropless by default; with
    ``capacity_factor`` each expert takes at most ceil(capacity_factor * N * k / E)
    assignments (N tokens), first choices before second choices and earlier
    tokens first; dropped assignments contribute nothing and are counted.

    aux holds the router's entries (``balance_loss``, plus ``z_loss`` for
    ``router="topk"`` or ``importance``/``load`` for ``"noisy"``) and
    ``expert_counts`` [E] (assignments processed per expert), ``dropped`` (int64
    scalar) and ``capacity`` (int64 scalar, -1 when dropless). The backend
    (per module, per call with ``backend=``, or MARS_KERNELS_BACKEND) changes
    neither the parameters nor, beyond tolerance, the results.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: int,
        *,
        router: str = "topk",
        activation: str = "gelu",
        capacity_factor: float | None = None,
        bias: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        if router == "topk":
            self.router = TopKRouter(d_model, num_experts, k, backend=backend)
        elif router == "noisy":
            self.router = NoisyTopKRouter(d_model, num_experts, k, backend=backend)
        else:
            raise ValueError(f"router must be 'topk' or 'noisy', got {router!r}")
        if capacity_factor is not None:
            capacity_factor = check.positive_float(capacity_factor, "capacity_factor")
        self.capacity_factor = capacity_factor
        self.experts = Experts(d_model, d_hidden, num_experts, activation=activation, bias=bias, backend=backend)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k

    @property
    def backend(self) -> str | None:
        return self.experts.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.router.backend = self.experts.backend = _backend.check_name(value)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lead = x.shape[:-1]
        tokens = flatten_tokens(x, self.d_model, self.experts.w1)
        name = _backend.resolve(self.backend, tokens.device)  # once for the router and the experts
        routing = self.router(tokens, backend=name)
        weights, indices = routing.weights, routing.indices
        aux = dict(routing.aux)
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        capacity = -1
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * tokens.shape[0] * self.k / self.num_experts)
            indices, weights, dropped = apply_capacity(indices, weights, self.num_experts, capacity)
        y = self.experts(tokens, weights, indices, backend=name)
        if capacity >= 0 or "expert_counts" not in aux:  # the router's count is stale after drops
            aux["expert_counts"] = expert_counts(indices, self.num_experts + 1)[: self.num_experts]
        aux["dropped"] = dropped
        aux["capacity"] = torch.tensor(capacity, dtype=torch.int64, device=x.device)
        return y.reshape(*lead, self.d_model), aux
