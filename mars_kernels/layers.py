"""nn.Modules over the ops. Parameters never depend on the backend, so a
state_dict saved with one backend loads and runs with any other."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import math

from . import _validate as check
from . import backend as _backend
from . import dispatch, ops

__all__ = ["Routing", "TopKRouter", "NoisyTopKRouter", "Experts", "SparseMoE"]


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


class Experts(nn.Module):
    """E independent MLPs D -> H -> D behind the dispatch kernels.

    forward(x [T, D], weights [T, k], indices [T, k] with values in [0, E],
    E meaning dropped) -> y [T, D], y[t] = sum_j weights[t, j] *
    Expert_{indices[t, j]}(x[t]). Parameters: w1 [E, D, H1], b1 [E, H1],
    w2 [E, H, D], b2 [E, D] (H1 = 2H for swiglu), initialised like nn.Linear.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        *,
        activation: str = "gelu",
        bias: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        if activation not in dispatch.ACTIVATIONS:
            raise ValueError(f"activation must be one of {dispatch.ACTIVATIONS}, got {activation!r}")
        for name, v in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.d_model, self.d_hidden, self.num_experts = d_model, d_hidden, num_experts
        self.activation, self.backend = activation, _check_backend(backend)
        h1 = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, h1))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.b1 = nn.Parameter(torch.empty(num_experts, h1)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b, fan_in in ((self.w1, self.b1, self.d_model), (self.w2, self.b2, self.d_hidden)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def block_size(self, backend: str) -> int:
        if backend in ("triton", "cuda"):
            from .triton import moe as triton_moe

            return triton_moe.BLOCK_M
        return dispatch.DEFAULT_BLOCK_SIZE

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        name = _backend.resolve(self.backend, x.device)
        meta = dispatch.moe_align(indices, self.num_experts, self.block_size(name), backend=name)
        return dispatch.moe_mlp(x, weights, meta, self.w1, self.b1, self.w2, self.b2, self.activation, backend=name)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, bias={self.b1 is not None}"
        )


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
        self.router.backend = self.experts.backend = _check_backend(value)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lead = x.shape[:-1]
        tokens = _flatten_tokens(x, self.d_model)
        routing = self.router(tokens)
        weights, indices = routing.weights, routing.indices
        aux = dict(routing.aux)
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        capacity = -1
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * tokens.shape[0] * self.k / self.num_experts)
            indices, weights, dropped = dispatch.apply_capacity(indices, weights, self.num_experts, capacity)
        y = self.experts(tokens, weights, indices)
        aux["expert_counts"] = ops.expert_counts(indices, self.num_experts + 1)[: self.num_experts]
        aux["dropped"] = dropped
        aux["capacity"] = torch.tensor(capacity, dtype=torch.int64, device=x.device)
        return y.reshape(*lead, self.d_model), aux
