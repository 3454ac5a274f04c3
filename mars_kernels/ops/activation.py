"""Expert activations as the expert-MLP ops take them: the names, and the
parsed :class:`Activation` of a spec string. Its own module so that the op
module and its Triton launchers both import it without importing each other."""
from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["PLAIN_ACTIVATIONS", "GATED_ACTIVATIONS", "ACTIVATIONS", "Activation", "parse_activation"]

#: Element functions, applied to the hidden columns (H1 = H).
PLAIN_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "relu2")
#: Gated activations, a = f(gate) * up with the gate and up columns in h (H1 = 2H): name -> f.
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu",
                     "swiglu_clamp": "silu_alpha"}
ACTIVATIONS = PLAIN_ACTIVATIONS + tuple(GATED_ACTIVATIONS)


class Activation(NamedTuple):
    """An expert activation, as the ops take it: a string ``spec`` of the form
    ``name[:interleaved][:alpha=A][:limit=L][:up_offset=C]``.

    * ``gelu`` (erf), ``gelu_tanh`` (PyTorch's approximate="tanh"), ``silu``,
      ``relu``, ``relu2`` (relu(h)^2): f(h) on the H hidden columns (w1 [E, D, H]).
    * ``swiglu``, ``geglu``, ``geglu_tanh``, ``reglu``: f(gate) * up with f =
      silu, gelu, gelu_tanh, relu; w1 [E, D, 2H] holds the gate and up
      columns as [gate | up] halves, or, with ``:interleaved``, alternating
      (gate in column 2j, up in 2j + 1: GPT-OSS's layout).
    * ``swiglu_clamp``: the clamped SwiGLU of GPT-OSS-style experts,
      a = g sigmoid(alpha g) * (clip(up, -L, L) + C) with g = min(gate, L);
      defaults alpha 1, L = inf, C = 0 (then it is ``swiglu``).
    """

    name: str
    fn: str  # the element function: gelu | gelu_tanh | silu | relu | relu2 | silu_alpha
    gated: bool
    interleaved: bool = False
    alpha: float = 1.0
    limit: float = math.inf
    up_offset: float = 0.0

    @property
    def clamp(self) -> bool:
        return self.name == "swiglu_clamp"

    @property
    def spec(self) -> str:
        parts = [self.name] + (["interleaved"] if self.interleaved else [])
        if self.clamp:
            parts += [f"alpha={self.alpha!r}", f"limit={self.limit!r}", f"up_offset={self.up_offset!r}"]
        return ":".join(parts)


def parse_activation(spec) -> Activation:
    """The :class:`Activation` of a spec string (ValueError naming what is wrong)."""
    if isinstance(spec, Activation):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"activation must be a str, got {type(spec).__name__}")
    name, *options = spec.split(":")
    if name in PLAIN_ACTIVATIONS:
        act = Activation(name, name, False)
    elif name in GATED_ACTIVATIONS:
        act = Activation(name, GATED_ACTIVATIONS[name], True)
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS} (with ':' options), got {spec!r}")
    for option in options:
        key, eq, value = option.partition("=")
        if option == "interleaved" and act.gated:
            act = act._replace(interleaved=True)
        elif eq and act.clamp and key in ("alpha", "limit", "up_offset"):
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"activation {spec!r}: {option!r} is not a number") from None
            if math.isnan(number) or (key == "limit" and number < 0) or (key != "limit" and math.isinf(number)):
                raise ValueError(f"activation {spec!r}: {option!r} is out of range")
            act = act._replace(**{key: number})
        else:
            raise ValueError(f"activation {spec!r}: unknown option {option!r} (gated activations take "
                             "'interleaved'; swiglu_clamp takes alpha=, limit=, up_offset=)")
    return act
