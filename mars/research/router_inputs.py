"""Router inputs under study: what MARS's routers read besides the layer's
defaults ([z_i, stopgrad(z_c)] for the residual router, z_i for the feature
router). Each is a :class:`mars_kernels.layers.mars.RouterInput` handed to
:class:`mars_kernels.MarsMoE`; the configuration names them
(``model.research`` of a run, :data:`RESIDUAL_INPUTS`, :data:`FEATURE_INPUTS`).

Shapes: z_i, z_c [..., D] (z_c may have fewer leading dims: one complete pass
for P incomplete ones), observed [..., M] bool broadcast to the tokens.
"""
from __future__ import annotations

import torch

from mars_kernels.layers.mars import ConcatResidual, IncompleteTokens, RouterInput, mask_tokens

__all__ = ["DiffResidual", "PatternResidual", "LabelFreeResidual", "TokensAndMask", "MaskOnly", "pattern_mean",
           "project_out", "RESIDUAL_INPUTS", "FEATURE_INPUTS", "residual_input", "feature_input"]

_CODE_BITS = 62  # masks up to this wide are grouped by an int64 code (2^62 fits, sign bit untouched)


def pattern_mean(r: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
    """r [..., D] -> [..., D]: each token's row replaced by the mean of r over
    the tokens with the same missing pattern (``observed`` [..., M] bool,
    broadcast to r's leading dims). What is left of the residual is what the
    pattern does to the representation on average, not what the sample is."""
    if observed is None:
        raise ValueError("the pattern residual needs observed [..., M] bool, the missing pattern of each token")
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


class DiffResidual(RouterInput):
    """stopgrad(z_c - z_i) [..., D]: the literal residual."""

    reads_complete = True

    def width(self, d_model: int) -> int:
        return d_model

    def forward(self, z_i, z_c=None, observed=None):
        return (z_c.expand_as(z_i) - z_i).detach()


class PatternResidual(RouterInput):
    """The mean of stopgrad(z_c - z_i) over the call's tokens with the same
    missing pattern (:func:`pattern_mean`): what the pattern does to the
    representation, free of the sample's identity, so the residual router
    cannot route on the label that z_c carries."""

    reads_complete = True
    reads_mask = True

    def width(self, d_model: int) -> int:
        return d_model

    def forward(self, z_i, z_c=None, observed=None):
        return pattern_mean((z_c.expand_as(z_i) - z_i).detach(), observed)


def project_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., D] with its component in the row space of ``weight`` [K, D]
    removed: x - P x, P the orthogonal projector onto span(weight's rows)."""
    q = torch.linalg.qr(weight.detach().to(torch.float32).T).Q.to(x.dtype)  # [D, K], orthonormal columns
    return x - (x @ q) @ q.T


class LabelFreeResidual(RouterInput):
    """stopgrad(z_c - z_i) (``concat=False``) or [z_i, stopgrad(z_c)]
    (``concat=True``) with the directions the task head reads projected out
    (:func:`project_out` with the head's weight, current at each call), so
    the residual router cannot route on the class that z_c carries and has
    to route on how the incomplete pass deviates. ``head`` returns the
    model's readout (an ``nn.Linear``) when called: the head stays a
    parameter of the model, not of this input (and may be built after it)."""

    reads_complete = True

    def __init__(self, head, concat: bool = False):
        super().__init__()
        self._head = head
        self.concat = concat

    def width(self, d_model: int) -> int:
        return 2 * d_model if self.concat else d_model

    def forward(self, z_i, z_c=None, observed=None):
        w = self._head().weight
        z_c = z_c.detach().expand_as(z_i)
        if self.concat:
            return torch.cat([project_out(z_i, w), project_out(z_c, w)], dim=-1)
        return project_out((z_c - z_i).detach(), w)


class TokensAndMask(RouterInput):
    """[z_i, observed] [..., D + M]: the feature router also reads the
    observed-modality mask (known at test time)."""

    reads_mask = True

    def __init__(self, num_modalities: int):
        super().__init__()
        self.num_modalities = num_modalities

    def width(self, d_model: int) -> int:
        return d_model + self.num_modalities

    def forward(self, z_i, z_c=None, observed=None):
        m = mask_tokens(observed, z_i, self.num_modalities).reshape(*z_i.shape[:-1], self.num_modalities)
        return torch.cat([z_i, m], dim=-1)


class MaskOnly(RouterInput):
    """observed [..., M] as the router's only input: a router by missing
    pattern (the tokens' content is not read)."""

    reads_mask = True

    def __init__(self, num_modalities: int):
        super().__init__()
        self.num_modalities = num_modalities

    def width(self, d_model: int) -> int:
        return self.num_modalities

    def forward(self, z_i, z_c=None, observed=None):
        return mask_tokens(observed, z_i, self.num_modalities).reshape(*z_i.shape[:-1], self.num_modalities)


#: ``model.research.residual_input`` -> the residual router's input, given M
#: and a callable returning the model's task head (the label-free inputs
#: project its rows out).
RESIDUAL_INPUTS = {
    "concat": lambda num_modalities, head: ConcatResidual(),
    "diff": lambda num_modalities, head: DiffResidual(),
    "pattern": lambda num_modalities, head: PatternResidual(),
    "diff-label-free": lambda num_modalities, head: LabelFreeResidual(head, concat=False),
    "concat-label-free": lambda num_modalities, head: LabelFreeResidual(head, concat=True),
}
#: ``model.research.feature_input`` -> the feature router's input, given M.
FEATURE_INPUTS = {
    "tokens": lambda num_modalities: IncompleteTokens(),
    "tokens+mask": TokensAndMask,
    "mask": MaskOnly,
}


def residual_input(name: str, num_modalities: int, head) -> RouterInput:
    return RESIDUAL_INPUTS[name](num_modalities, head)


def feature_input(name: str, num_modalities: int) -> RouterInput:
    return FEATURE_INPUTS[name](num_modalities)
