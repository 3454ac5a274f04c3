"""A controlled synthetic CLASSIFICATION dataset for missing-modality learning
(``--data synthetic-missing``): complementary modalities, and a known,
pattern-specific way in which each missing pattern changes what the fused
representation holds.

Generative story (K classes, M modalities, r latent dimensions per modality,
L = M * r):

* class y, uniform over K (exactly balanced); class prototypes c_y in R^L with
  N(0, 1) entries; the sample's latent u = c_y + ``latent_noise`` * N(0, I_L);
* the latent is cut into M blocks G_1..G_M of r dimensions. Modality m sees
  its own block strongly and every other block weakly:
  s_m = g_m * u with g_m[j] = ``strong`` for j in G_m and ``weak`` otherwise;
* x_m = Q_m s_m + ``noise`` * N(0, I), Q_m [d_m, L] with orthonormal columns
  (a fixed random embedding), then scaled and shifted by per-modality
  constants (so standardisation has something to do).

So every modality holds all of the class information, but each holds a
different part of it well (complementary), and no single modality separates
the classes as well as all of them together.

What a missing pattern does, by construction: dropping modality m removes
the only strong view of block G_m. The complete fused representation reads
G_m with gain ``strong``; the incomplete one has only the other modalities'
views of G_m, with gain ``weak`` and more noise. The residual between the
complete and the incomplete representation therefore lies in the directions
of the missing blocks (one block per missing modality: a shift known per
pattern), and the correction that restores the complete reading -- amplify
the weak views of exactly the missing blocks by strong / weak -- differs from
pattern to pattern. A single head on the fused representation applies one
gain to every pattern; experts that specialise by missing pattern can apply
the right one. This is the structure residual-guided specialisation is meant
to find (:func:`missing_shift` returns the per-pattern block structure).

Everything comes from one ``torch.Generator`` seeded with ``seed``: the data
is a deterministic function of the arguments. Small by default (2,400
samples, 4 modalities of 24 features, 8 classes; under a second to make).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .dataset import MultimodalDataset
from .splits import DEFAULT_FRACTIONS, split_dataset, standardize_splits

__all__ = ["generate_missing", "make_missing", "missing_shift"]


def _check(n, num_modalities, num_classes, latent_per_modality, dims, strong, weak, noise, latent_noise):
    if n < 1 or num_modalities < 2 or num_classes < 2 or latent_per_modality < 1:
        raise ValueError(f"generate_missing: need n >= 1, num_modalities >= 2, num_classes >= 2, "
                         f"latent_per_modality >= 1; got n={n}, num_modalities={num_modalities}, "
                         f"num_classes={num_classes}, latent_per_modality={latent_per_modality}")
    L = num_modalities * latent_per_modality
    if len(dims) != num_modalities or any(d < L for d in dims):
        raise ValueError(f"generate_missing: dims must give one width per modality ({num_modalities}), each >= "
                         f"num_modalities * latent_per_modality = {L}; got {list(dims)}")
    if not (strong > weak >= 0) or noise < 0 or latent_noise < 0:
        raise ValueError(f"generate_missing: need strong > weak >= 0, noise >= 0, latent_noise >= 0; got "
                         f"strong={strong}, weak={weak}, noise={noise}, latent_noise={latent_noise}")


def generate_missing(
    n: int = 2400,
    num_modalities: int = 4,
    num_classes: int = 8,
    seed: int = 0,
    *,
    latent_per_modality: int = 4,
    dims: Sequence[int] | None = None,
    strong: float = 1.0,
    weak: float = 0.25,
    noise: float = 0.5,
    latent_noise: float = 0.6,
    return_latent: bool = False,
) -> MultimodalDataset | tuple[MultimodalDataset, Tensor]:
    """One unsplit dataset of ``n`` samples (see the module docstring):
    modalities ``"m0" .. "m{M-1}"`` with features [n, d_m] float32 (d_m =
    ``dims[m]``, default 24 each), labels [n] int64, complete (every
    modality available). ``return_latent``: also the latents u [n, L]."""
    M, K, r = num_modalities, num_classes, latent_per_modality
    L = M * r
    dims = [max(24, L)] * M if dims is None else [int(d) for d in dims]
    _check(n, M, K, r, dims, strong, weak, noise, latent_noise)
    gen = torch.Generator().manual_seed(int(seed))
    labels = (torch.arange(n) % K)[torch.randperm(n, generator=gen)]
    prototypes = torch.randn(K, L, generator=gen)
    u = prototypes[labels] + latent_noise * torch.randn(n, L, generator=gen)
    modalities = [f"m{m}" for m in range(M)]
    features = {}
    for m in range(M):
        gain = torch.full((L,), float(weak))
        gain[m * r:(m + 1) * r] = float(strong)
        Q = torch.linalg.qr(torch.randn(dims[m], L, generator=gen)).Q  # [d_m, L], orthonormal columns
        x = (u * gain) @ Q.T + noise * torch.randn(n, dims[m], generator=gen)
        scale = 0.5 + 2.5 * torch.rand((), generator=gen)
        shift = 4.0 * torch.rand(dims[m], generator=gen) - 2.0
        features[modalities[m]] = (x * scale + shift).float().contiguous()
    data = MultimodalDataset(modalities=modalities, features=features, labels=labels.long(), num_classes=K,
                             task="classification", name=f"synthetic-missing(seed={seed})")
    return (data, u) if return_latent else data


def missing_shift(observed: Tensor, latent_per_modality: int = 4) -> Tensor:
    """The known effect of a missing pattern: observed [..., M] bool ->
    [..., L] bool, True on the latent dimensions whose strong view is lost
    (the blocks of the missing modalities), where the complete and the
    incomplete representations differ by construction."""
    observed = torch.as_tensor(observed, dtype=torch.bool)
    return (~observed).repeat_interleave(int(latent_per_modality), dim=-1)


def make_missing(
    n: int = 2400,
    num_modalities: int = 4,
    num_classes: int = 8,
    seed: int = 0,
    *,
    data_seed: int = 0,
    standardize: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    test_seed: int | None = None,
    **kwargs,
) -> tuple[MultimodalDataset, MultimodalDataset, MultimodalDataset]:
    """(train, val, test) of ``generate_missing(n, num_modalities, num_classes,
    data_seed, **kwargs)``: the same data for every run (like the embedded
    mfeat), split stratified by ``seed`` (the run's seed; the test split
    fixed by ``test_seed`` unless None, :func:`mars.data.splits.split_indices`),
    standardised per feature on train when ``standardize``."""
    data = generate_missing(n, num_modalities, num_classes, data_seed, **kwargs)
    splits = split_dataset(data, fractions, seed, test_seed)
    if standardize:
        splits = standardize_splits(*splits)
    return splits  # type: ignore[return-value]
