"""The method registry: every method ``mars`` trains, named once.

The CLI (``--method``, ``mars compare --methods``), the configuration
(``ModelConfig.method``), training and expert sharding read the names, the
spellings and the capabilities of a method from :data:`REGISTRY`; nothing else
lists method names (the configuration says which options each method reads
and its defaults).

A method's builder is named by its import path ("module:attribute") and
imported when a model is built: the models import the configuration, which
validates method names against this registry, so the registry imports no model.
A builder is called as ``builder(modalities, shapes, num_classes, task,
config)`` and returns a model that satisfies
:class:`mars.interface.TrainableModel`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .interface import TrainableModel

__all__ = ["Method", "REGISTRY", "DEFAULT_METHOD", "get", "canonical", "names", "cli_names", "aliases", "build_model"]


@dataclass(frozen=True)
class Method:
    """One method.

    name: canonical name (``ModelConfig.method``, ``config.json``, summaries
        and the rows of ``mars compare``).
    cli_name: the spelling the command line and the README show.
    aliases: other accepted spellings (besides ``name`` and ``cli_name``).
    builder: "module:attribute" of the model class or factory.
    summary: one line for ``--help``.
    sparse_moe: the method fuses through one set of experts over the fused
        tokens behind one router (its expert calls are the same on every rank):
        ``--expert-parallel`` can shard them, evaluation reports expert usage.
    residual_router: the model has MARS's residual router (oracle evaluation,
        feature-vs-residual router agreement).
    compare_default: part of ``mars compare``'s default ``--methods``.
    on_backbone: the model is built on a fusion backbone (``--backbone``):
        ``mars compare --backbones`` runs it once per backbone.

    A method's default options are in :data:`mars.config.METHOD_DEFAULTS`.
    """

    name: str
    cli_name: str
    builder: str
    summary: str
    aliases: tuple[str, ...] = ()
    sparse_moe: bool = False
    residual_router: bool = False
    compare_default: bool = False
    on_backbone: bool = False

    @property
    def spellings(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.name, self.cli_name, *self.aliases)))

    def builder_callable(self):
        """The builder, imported."""
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module), attr)


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("mars", "mars", "mars.model:MarsModel",
           "MARS: residual-guided routing with discrepancy-aware noise", sparse_moe=True, residual_router=True,
           compare_default=True, on_backbone=True),
    Method("moe", "vanilla-moe", "mars.model:MarsModel",
           "the same MoE gated by the feature router only", aliases=("vanilla_moe",), sparse_moe=True,
           compare_default=True, on_backbone=True),
    Method("late_fusion", "late-fusion", "mars.baselines.late_fusion:LateFusion",
           "per-modality classifiers, logits averaged; no MoE", compare_default=True),
    Method("moe_retriever", "moe-retriever", "mars.baselines.moe_retriever:MoERetrieverModel",
           "MoE-Retriever: missing modalities retrieved from supporting samples", aliases=("retriever",)),
    Method("mce", "mce", "mars.baselines.mce:MCEModel",
           "MCE: learning- and representation-capability enhancement"),
    Method("backbone", "backbone", "mars.model:BackboneModel",
           "the fusion backbone alone (--backbone), no MoE", aliases=("backbone_only",), on_backbone=True),
)}

DEFAULT_METHOD = "mars"

_BY_SPELLING = {s: m for m in REGISTRY.values() for s in m.spellings}


def names() -> tuple[str, ...]:
    """The canonical names, in registry order."""
    return tuple(REGISTRY)


def cli_names() -> tuple[str, ...]:
    """The command-line spellings, in registry order."""
    return tuple(m.cli_name for m in REGISTRY.values())


def aliases() -> dict[str, str]:
    """Every accepted spelling other than a canonical name -> its canonical name."""
    return {s: m.name for s, m in _BY_SPELLING.items() if s != m.name}


def get(name: str) -> Method:
    """The method for any accepted spelling ("late-fusion", "late_fusion", ...)."""
    method = _BY_SPELLING.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"method must be one of {names()} (or {sorted(aliases())}), got {name!r}")
    return method


def canonical(name: str) -> str:
    """The canonical name for any accepted spelling."""
    return get(name).name


def build_model(modalities, shapes, num_classes, task, config):
    """The model of ``config.method`` (see :class:`Method`)."""
    model = get(config.method).builder_callable()(modalities, shapes, num_classes, task, config)
    if not isinstance(model, TrainableModel):
        raise TypeError(f"the builder of {config.method!r} returned {type(model).__name__}, "
                        "which does not implement mars.interface.TrainableModel")
    return model
