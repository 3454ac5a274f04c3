"""nn.Modules over the ops. Parameters never depend on the backend, so a
state_dict saved with one backend loads and runs with any other."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import _validate as check
from . import backend as _backend
from . import ops

__all__ = ["Routing", "TopKRouter", "NoisyTopKRouter"]


class Routing(NamedTuple):
    """A router's decision for N = prod(leading dims) tokens.

    weights [*, k] (float32, float64 for float64 input), indices [*, k] int64,
    aux: losses and statistics (see each router's docstring).
    """

    weights: torch.Tensor
    indices: torch.Tensor
    aux: dict[str, torch.Tensor]


def _flatten_tokens(x: torch.Tensor, d_model: int) -> torch.Tensor:
    check.tensor(x, "x")
    if x.dim() < 2 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape [..., d_model={d_model}] with at least 2 dims, got {tuple(x.shape)}")
    return x.reshape(-1, d_model)


def _check_backend(backend: str | None) -> str | None:
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS} or None, got {backend!r}")
    return backend


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
        self.backend = _check_backend(backend)
        self.proj = nn.Linear(d_model, num_experts, bias=bias)

    def forward(self, x: torch.Tensor) -> Routing:
        lead = x.shape[:-1]
        logits = self.proj(_flatten_tokens(x, self.d_model))
        w, i = ops.topk_gating(logits, self.k, mode=self.mode, renormalize=self.renormalize, backend=self.backend)
        aux = {
            "balance_loss": ops.switch_balance_loss(logits, i, backend=self.backend),
            "z_loss": ops.router_z_loss(logits, backend=self.backend),
            "expert_counts": ops.expert_counts(i, self.num_experts),
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
        self.backend = _check_backend(backend)
        self.w_gate = nn.Parameter(torch.zeros(d_model, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, num_experts))

    def forward(
        self, x: torch.Tensor, *, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> Routing:
        lead = x.shape[:-1]
        w, i, importance, load = ops.noisy_topk_gating(
            _flatten_tokens(x, self.d_model),
            self.w_gate,
            self.w_noise,
            self.k,
            training=self.training,
            noise=noise,
            generator=generator,
            noise_eps=self.noise_eps,
            backend=self.backend,
        )
        aux = {"balance_loss": ops.noisy_balance_loss(importance, load), "importance": importance, "load": load}
        return Routing(w.reshape(*lead, self.k), i.reshape(*lead, self.k), aux)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, backend={self.backend!r}"
