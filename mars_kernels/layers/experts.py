"""The expert MLPs of a mixture-of-experts layer."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import backend as _backend
from .. import checks as check
from ..ops import moe_align, moe_mlp, parse_activation

__all__ = ["Experts"]


class Experts(nn.Module):
    """E independent MLPs D -> H -> D behind the dispatch kernels.

    forward(x [T, D], weights [T, k], indices [T, k] with values in [0, E],
    E meaning dropped) -> y [T, D], y[t] = sum_j weights[t, j] *
    Expert_{indices[t, j]}(x[t]). Parameters: w1 [E, D, H1], b1 [E, H1],
    w2 [E, H, D], b2 [E, D] (H1 = 2H for a gated activation, see mars_kernels.ops.Activation), initialised like nn.Linear.
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
        gated = parse_activation(activation).gated  # validates
        for name, v in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            check.positive_int(v, name)
        self.d_model, self.d_hidden, self.num_experts = d_model, d_hidden, num_experts
        self.activation, self.backend = activation, _backend.check_name(backend)
        h1 = 2 * d_hidden if gated else d_hidden
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

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, *, backend: str | None = None
    ) -> torch.Tensor:
        """``backend`` overrides the module's for this call (a containing
        layer passes the one it resolved)."""
        name = _backend.resolve(backend or self.backend, x.device)
        meta = moe_align(indices, self.num_experts, _backend.EXPERT_BLOCK_SIZE[name], backend=name)
        return moe_mlp(x, weights, meta, self.w1, self.b1, self.w2, self.b2, self.activation, backend=name)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, bias={self.b1 is not None}"
        )
