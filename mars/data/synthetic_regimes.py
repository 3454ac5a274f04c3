"""A synthetic CLASSIFICATION set where routing must matter (``--data
synthetic-regimes``): hidden regimes that change what each modality's
features mean.

Generative story (K classes, G regimes, M modalities, code width L):

* label y uniform over K and regime g uniform over G, independent (exactly
  balanced: every (y, g) pair equally often);
* class codes c_1..c_K in R^L, N(0, 1) entries;
* per modality m and regime g a permutation pi_{m,g} of the classes: the
  identity for g = 0, and for g >= 1 a cycle through a random
  ``round(conflict * K)`` classes (different per modality and regime). In
  regime g modality m shows the code of class pi_{m,g}(y): the same input
  direction means different classes in different regimes, and the modalities
  disagree about which (a block swap of the class code, nonlinear in the
  input because g is not given);
* x_m = ``signal`` * c_{pi_{m,g}(y)} Q_m + kappa_m * r_{m,g} + ``noise`` * N(0, I),
  with Q_m [L, d_m] orthonormal rows (a fixed random embedding) and r_{m,g}
  a unit regime direction of modality m (orthogonal to its class subspace);
* the first modality ("priv") reveals g strongly (kappa_0 =
  ``kappa_privileged``); the others only weakly (kappa_m = ``kappa``). The
  privileged modality is meant to be often missing: the benchmark's
  protocol (:data:`REGIMES_PROTOCOL`) drops it in 70% of the masks.

So the correction a sample needs depends on its regime and on which
modalities are observed: with the privileged modality the regime is clear,
without it only the weak signals (kappa) tell it. ``conflict=0`` removes the
regimes' effect on the labels (every method should be level), and
``kappa=0`` leaves nothing to infer the regime from without the privileged
modality. Widths are small (d_m = 12, L = 6) so that a shared network has
little room to absorb the per-regime corrections.

Everything is a deterministic function of the arguments (one
``torch.Generator`` seeded with ``data_seed``). :func:`bayes_accuracy`
computes the Bayes-optimal accuracy of any observed subset exactly from the
generator's parameters (the posterior over (y, g) of a Gaussian mixture), and
:func:`regimes_of` gives each sample's regime (for oracle routing, never a
model input).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .dataset import MultimodalDataset
from .splits import DEFAULT_FRACTIONS, split_indices, standardize_splits, stratify_keys

__all__ = ["RegimesSpec", "generate_regimes", "make_regimes", "regime_splits", "bayes_accuracy",
           "REGIMES_PROTOCOL"]

#: The benchmark's training protocol: the privileged modality dropped in 70%
#: of the masks, the others in 30%.
REGIMES_PROTOCOL = "independent:0.7,0.3,0.3"


@dataclass(frozen=True)
class RegimesSpec:
    """The generator's arguments (see the module docstring)."""

    n: int = 3200
    num_classes: int = 8
    num_regimes: int = 2
    num_modalities: int = 3
    code_dim: int = 6
    dim: int = 12
    conflict: float = 1.0
    kappa: float = 0.6
    kappa_privileged: float = 3.0
    signal: float = 1.0
    noise: float = 1.0
    data_seed: int = 0

    def __post_init__(self):
        ints = dict(n=self.n, num_classes=self.num_classes, num_regimes=self.num_regimes,
                    num_modalities=self.num_modalities, code_dim=self.code_dim, dim=self.dim)
        limits = dict(n=(1, 10**6), num_classes=(2, 1000), num_regimes=(1, 64), num_modalities=(2, 16),
                      code_dim=(1, 1024), dim=(2, 4096))
        for name, (low, high) in limits.items():
            if not low <= ints[name] <= high:
                raise ValueError(f"synthetic regimes: {name} must be in [{low}, {high}], got {ints[name]}")
        if self.dim < self.code_dim + 1:
            raise ValueError(f"synthetic regimes: dim must be > code_dim (room for the regime direction), got "
                             f"dim={self.dim}, code_dim={self.code_dim}")
        if not 0.0 <= self.conflict <= 1.0:
            raise ValueError(f"synthetic regimes: conflict must be in [0, 1], got {self.conflict}")
        for name in ("kappa", "kappa_privileged", "signal", "noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"synthetic regimes: {name} must be a finite number >= 0, got {value}")
        if self.noise == 0:
            raise ValueError("synthetic regimes: noise must be > 0 (the Bayes accuracy needs a density)")

    @property
    def modalities(self) -> list[str]:
        return ["priv"] + [f"m{m}" for m in range(1, self.num_modalities)]


def _parameters(spec: RegimesSpec, gen: torch.Generator):
    """(means [M, K, G, d], permutations [M, G, K]) of the generator."""
    K, G, M, L, d = spec.num_classes, spec.num_regimes, spec.num_modalities, spec.code_dim, spec.dim
    codes = torch.randn(K, L, generator=gen, dtype=torch.float64)
    moved = int(round(spec.conflict * K))
    perms = torch.arange(K).repeat(M, G, 1)  # [M, G, K]: pi_{m,g}(y)
    for m in range(M):
        for g in range(1, G):
            if moved >= 2:
                cycle = torch.randperm(K, generator=gen)[:moved]
                perms[m, g, cycle] = cycle.roll(1)
    means = torch.zeros(M, K, G, d, dtype=torch.float64)
    for m in range(M):
        basis = torch.linalg.qr(torch.randn(d, L + G, generator=gen, dtype=torch.float64)).Q.T  # [L + G, d]
        embed, regime_dirs = basis[:L], basis[L:]  # class subspace, G regime directions orthogonal to it
        kappa = spec.kappa_privileged if m == 0 else spec.kappa
        for g in range(G):
            shown = codes[perms[m, g]]  # [K, L]: the code each class shows in regime g
            means[m, :, g] = spec.signal * shown @ embed + kappa * regime_dirs[g]
    return means, perms


def generate_regimes(spec: RegimesSpec = RegimesSpec(), *, return_info: bool = False):
    """One unsplit dataset (see the module docstring): modalities "priv",
    "m1", ... with features [n, dim] float32, labels [n], complete. With
    ``return_info`` also {"regime": g [n] int64, "means": [M, K, G, d] float64,
    "noise": float}: what :func:`bayes_accuracy` needs."""
    gen = torch.Generator().manual_seed(int(spec.data_seed))
    K, G = spec.num_classes, spec.num_regimes
    means, _ = _parameters(spec, gen)
    pair = (torch.arange(spec.n) % (K * G))[torch.randperm(spec.n, generator=gen)]
    labels, regime = pair % K, pair // K
    features = {}
    for m, name in enumerate(spec.modalities):
        x = means[m, labels, regime] + spec.noise * torch.randn(spec.n, spec.dim, generator=gen, dtype=torch.float64)
        features[name] = x.float().contiguous()
    data = MultimodalDataset(modalities=spec.modalities, features=features, labels=labels.long(), num_classes=K,
                             task="classification", name=f"synthetic-regimes(data_seed={spec.data_seed})")
    if return_info:
        return data, {"regime": regime.long(), "means": means, "noise": spec.noise}
    return data


def _split_indices(data: MultimodalDataset, fractions, seed: int, test_seed: int | None):
    return split_indices(stratify_keys(data.labels, data.ignore_index), fractions, seed, test_seed)


def make_regimes(seed: int = 0, *, standardize: bool = True, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 test_seed: int | None = None, spec: RegimesSpec = RegimesSpec()):
    """(train, val, test) of :func:`generate_regimes`: the same data for every
    run, split stratified by ``seed`` (the test split fixed by ``test_seed``
    unless None), standardised per feature on train when ``standardize``."""
    data = generate_regimes(spec)
    splits = tuple(data.subset(i) for i in _split_indices(data, fractions, seed, test_seed))
    if standardize:
        splits = standardize_splits(*splits)
    return splits


def regime_splits(seed: int = 0, *, fractions: Sequence[float] = DEFAULT_FRACTIONS, test_seed: int | None = None,
                  spec: RegimesSpec = RegimesSpec()) -> tuple[Tensor, Tensor, Tensor]:
    """Each sample's regime g, in the order of :func:`make_regimes`'s (train, val, test)."""
    data, info = generate_regimes(spec, return_info=True)
    return tuple(info["regime"][i] for i in _split_indices(data, fractions, seed, test_seed))


def bayes_accuracy(features: dict[str, Tensor], labels: Tensor, observed: Tensor,
                   spec: RegimesSpec = RegimesSpec()) -> Tensor:
    """Whether the Bayes-optimal prediction from the observed modalities is
    right, per sample: features {m: [N, d]} RAW (unstandardised: as
    :func:`generate_regimes` made them), labels [N], observed [N, M] bool ->
    [N] bool. The posterior over y sums over the regimes: p(y | x_S) ∝
    sum_g prod_{m in S} N(x_m; mu_{m,y,g}, noise^2 I) (uniform priors)."""
    gen = torch.Generator().manual_seed(int(spec.data_seed))
    means, _ = _parameters(spec, gen)  # the same draws as generate_regimes
    N, K, G = labels.shape[0], spec.num_classes, spec.num_regimes
    loglik = torch.zeros(N, K, G, dtype=torch.float64)
    for m, name in enumerate(spec.modalities):
        x = features[name].double()  # [N, d]
        sq = ((x[:, None, None, :] - means[m][None]) ** 2).sum(-1)  # [N, K, G]
        loglik += observed[:, m].double()[:, None, None] * (-0.5 * sq / spec.noise**2)
    posterior = torch.logsumexp(loglik, dim=2)  # [N, K]
    return posterior.argmax(dim=1) == labels
