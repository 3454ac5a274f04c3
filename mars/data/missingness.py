"""Missing-modality protocols, and the enumeration of modality subsets.

A protocol turns ``available`` [N, M] bool (what the data has) into an
``observed`` mask [N, M] bool with ``observed <= available`` and at least one
observed modality per sample. Protocols (string form for the CLI in quotes):

* ``"uniform"``: a uniformly random non-empty subset of the sample's available
  modalities (each of the 2^k - 1 subsets equally likely).
* ``"rates:r_1,...,r_M"`` (also spelled ``"independent:r_1,...,r_M"``, MCE's
  imbalanced setting, e.g. ``independent:0.2,0.5,0.8``): modality m is
  dropped independently with probability r_m (one rate per modality, each in
  [0, 1)).
* ``"fixed:eta"``: every modality is dropped with probability eta in [0, 1).
* ``"none"``: nothing is dropped (observed = available).

A draw that leaves a sample with nothing observed is redrawn for that sample
(so the masks follow the independent-drop distribution conditioned on a
non-empty result; the observed missing rate of modality m is therefore
``(r_m - P(all dropped)) / (1 - P(all dropped))`` for complete data); after
``MAX_REDRAWS`` failed redraws the sample keeps one of its available modalities
chosen uniformly (only reachable with rates very close to 1). ``"uniform"`` is
the same rule with every rate 1/2.

Sampling uses only the given ``torch.Generator`` (on its device), so the masks
are a deterministic function of the generator state; ``fixed_masks`` draws the
masks of an evaluation set from a seed.

``all_subsets(M)`` lists the 2^M - 1 non-empty subsets as [M] bool masks,
ordered by size, then lexicographically by their sorted modality indices
(i.e. ``itertools.combinations`` order): for M = 3,
{0}, {1}, {2}, {0,1}, {0,2}, {1,2}, {0,1,2}.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

PROTOCOL_NAMES = ("uniform", "rates", "fixed", "none")
MAX_REDRAWS = 64
MAX_SUBSET_MODALITIES = 20


def _parse_rate(text: str, spec: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise ValueError(f"missingness protocol {spec!r}: {text.strip()!r} is not a number; expected a rate in [0, 1)") from None
    if not (0.0 <= r < 1.0):
        raise ValueError(f"missingness protocol {spec!r}: rate {r} is outside [0, 1) (1 would drop the modality always)")
    return r


@dataclass(frozen=True)
class MissingnessProtocol:
    """A missingness protocol: ``name`` in ``PROTOCOL_NAMES`` and its rates.

    ``rates`` holds one missing rate per modality for ``"rates"``, a single
    rate eta for ``"fixed"``, and nothing otherwise. Build one with
    ``MissingnessProtocol.parse("rates:0.2,0.5,0.8")`` or directly, e.g.
    ``MissingnessProtocol("fixed", (0.5,))``.
    """

    name: str = "uniform"
    rates: tuple[float, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "rates", tuple(float(r) for r in self.rates))
        spec = str(self)
        if self.name not in PROTOCOL_NAMES:
            raise ValueError(f"unknown missingness protocol {self.name!r}; expected one of {PROTOCOL_NAMES}")
        if self.name in ("uniform", "none") and self.rates:
            raise ValueError(f"missingness protocol {self.name!r} takes no rates, got {self.rates}")
        if self.name == "fixed" and len(self.rates) != 1:
            raise ValueError(f"missingness protocol 'fixed' takes exactly one rate eta, got {self.rates}")
        if self.name == "rates" and not self.rates:
            raise ValueError("missingness protocol 'rates' needs one rate per modality, e.g. 'rates:0.2,0.5,0.8'")
        for r in self.rates:
            if not (0.0 <= r < 1.0):
                raise ValueError(f"missingness protocol {spec!r}: rate {r} is outside [0, 1)")

    @classmethod
    def parse(cls, spec: "str | MissingnessProtocol") -> "MissingnessProtocol":
        """Parse ``"uniform"``, ``"none"``, ``"fixed:ETA"`` or ``"rates:R1,R2,..."``."""
        if isinstance(spec, MissingnessProtocol):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"missingness protocol must be a string, got {type(spec).__name__}")
        text = spec.strip()
        name, sep, args = text.partition(":")
        name = name.strip().lower()
        if name == "independent":
            name = "rates"
        usage = ("expected 'uniform', 'none', 'fixed:ETA' (e.g. 'fixed:0.5') or 'rates:R1,R2,...' / "
                 "'independent:R1,R2,...' (e.g. 'independent:0.2,0.5,0.8')")
        if name not in PROTOCOL_NAMES:
            raise ValueError(f"unknown missingness protocol {spec!r}; {usage}")
        if name in ("uniform", "none"):
            if sep:
                raise ValueError(f"missingness protocol {spec!r}: {name!r} takes no arguments; {usage}")
            return cls(name)
        if not sep or not args.strip():
            raise ValueError(f"missingness protocol {spec!r}: {name!r} needs rates; {usage}")
        rates = tuple(_parse_rate(a, spec) for a in args.split(","))
        if name == "fixed" and len(rates) != 1:
            raise ValueError(f"missingness protocol {spec!r}: 'fixed' takes one rate; {usage}")
        return cls(name, rates)

    def __str__(self) -> str:
        if not self.rates:
            return self.name
        return f"{self.name}:" + ",".join(f"{r:g}" for r in self.rates)

    def drop_probs(self, num_modalities: int) -> list[float]:
        """Per-modality drop probability before the non-empty redraw."""
        if self.name == "uniform":
            return [0.5] * num_modalities
        if self.name == "none":
            return [0.0] * num_modalities
        if self.name == "fixed":
            return [self.rates[0]] * num_modalities
        if len(self.rates) != num_modalities:
            raise ValueError(
                f"missingness protocol {str(self)!r} gives {len(self.rates)} rates, expected one per modality ({num_modalities})"
            )
        return list(self.rates)

    def sample(self, available: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Observed mask [N, M] bool for ``available`` [N, M] bool: a subset of
        each row's available modalities, never empty (rows of ``available``
        must not be empty). Random numbers come from ``generator``."""
        available = _check_available(available)
        n, M = available.shape
        if self.name == "none" or n == 0:
            return available.clone()
        device = generator.device if generator is not None else available.device
        avail = available.to(device)
        keep_p = 1.0 - torch.tensor(self.drop_probs(M), dtype=torch.float32, device=device)
        observed = torch.zeros_like(avail)
        todo = torch.arange(n, device=device)
        for _ in range(MAX_REDRAWS + 1):
            draw = torch.rand(todo.numel(), M, generator=generator, device=device) < keep_p
            draw &= avail[todo]
            ok = draw.any(dim=1)
            observed[todo[ok]] = draw[ok]
            todo = todo[~ok]
            if todo.numel() == 0:
                break
        if todo.numel():  # fallback: one available modality, uniformly
            scores = torch.rand(todo.numel(), M, generator=generator, device=device).masked_fill(~avail[todo], -1.0)
            observed[todo, scores.argmax(dim=1)] = True
        return observed.to(available.device)

    def fixed_masks(self, available: Tensor, seed: int) -> Tensor:
        """``sample`` with a fresh CPU generator seeded by ``seed``: the fixed
        test-time masks of an evaluation set."""
        return self.sample(available.cpu(), torch.Generator().manual_seed(int(seed))).to(available.device)

    def expected_missing_rates(self, num_modalities: int) -> list[float]:
        """Per-modality probability of being missing for complete data, after
        the non-empty redraw: ``(r_m - prod r) / (1 - prod r)``."""
        r = self.drop_probs(num_modalities)
        p_empty = math.prod(r)
        return [(x - p_empty) / (1.0 - p_empty) for x in r]


def _check_available(available: Tensor) -> Tensor:
    if not isinstance(available, Tensor) or available.dim() != 2:
        raise ValueError(f"available must be a [N, M] bool tensor, got {getattr(available, 'shape', type(available))}")
    if available.dtype != torch.bool:
        raise ValueError(f"available must be bool, got {available.dtype}")
    if available.shape[0] and not bool(available.any(dim=1).all()):
        raise ValueError("available: every sample needs at least one available modality")
    return available


def parse_protocol(spec: "str | MissingnessProtocol") -> MissingnessProtocol:
    """Same as ``MissingnessProtocol.parse``."""
    return MissingnessProtocol.parse(spec)


def all_subsets(num_modalities: int) -> list[Tensor]:
    """The 2^M - 1 non-empty subsets of M modalities as [M] bool masks, by size
    then lexicographic in the sorted modality indices."""
    M = int(num_modalities)
    if M < 1 or M > MAX_SUBSET_MODALITIES:
        raise ValueError(f"all_subsets: num_modalities must be in [1, {MAX_SUBSET_MODALITIES}], got {num_modalities}")
    out = []
    for size in range(1, M + 1):
        for combo in itertools.combinations(range(M), size):
            mask = torch.zeros(M, dtype=torch.bool, device="cpu")  # CPU also under a meta-device context
            mask[list(combo)] = True
            out.append(mask)
    return out


def subset_masks(num_modalities: int) -> Tensor:
    """``all_subsets`` stacked: [2^M - 1, M] bool."""
    return torch.stack(all_subsets(num_modalities))


def subset_name(mask: Tensor, modalities: list[str], sep: str = "+") -> str:
    """``"fourier+pixel"`` for a [M] bool mask (modality order kept)."""
    mask = torch.as_tensor(mask).flatten()
    if mask.numel() != len(modalities):
        raise ValueError(f"subset_name: mask has {mask.numel()} entries, expected one per modality ({len(modalities)})")
    names = [m for m, on in zip(modalities, mask.tolist()) if on]
    if not names:
        raise ValueError("subset_name: the mask selects no modality")
    return sep.join(names)
