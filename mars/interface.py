"""What training, evaluation and the CLI require of a method's model.

Shapes: B samples, M modalities, K classes; feature maps H x W.

Every model the method registry (:mod:`mars.methods`) builds satisfies
:class:`TrainableModel`. :class:`MethodModel` is the ``nn.Module`` base that
gives the optional hooks their defaults, so a method implements ``forward``
and ``loss`` and overrides only the hooks it needs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from .data import MissingnessProtocol, MultimodalDataset

__all__ = ["Output", "TrainableModel", "MethodModel"]


class Output(NamedTuple):
    """logits: [B, K] or [B, K, H, W]; aux: losses and routing statistics."""

    logits: torch.Tensor
    aux: dict[str, torch.Tensor]


@runtime_checkable
class TrainableModel(Protocol):
    """The model interface of :func:`mars.train.train`, :func:`mars.evaluate.evaluate_subsets`
    and the ``mars`` command.

    ``model(features, observed, available=None, mode="eval", **extra) -> Output``:
        ``features`` {modality: [B, d_m] or [B, C_m, H, W]}, ``observed`` [B, M]
        bool (the modalities this pass may use), ``available`` [B, M] bool
        (every modality the sample has: the complete pass of MARS), ``mode``
        "train" | "eval" (| "oracle" where the method has one). ``extra`` is
        ``sample_index`` when :attr:`takes_sample_index` is set.
    ``loss(out, labels, ignore_index=None) -> (total, parts)``: the training
        loss of a "train" output and its parts as floats (for the log).

    Training hooks, called by the training loop on the unwrapped model:

    ``prepare(train_set, *, protocol, seed, resume, log)``
        once before the first epoch, after the weights are built or restored
        (``resume=True``: they come from a checkpoint; rebuild caches only).
        MCE trains its frozen unimodal models there, MoE-Retriever attaches its
        supporting pool. Must not draw from the global torch RNG.
    ``set_epoch(epoch)``
        at the start of every epoch (0-based), before its first step.
    ``takes_sample_index``
        the training forward gets ``sample_index`` [B] int64, the batch's rows
        in the training set (for per-sample caches).
    ``may_skip_parameters``
        a training step can leave some parameters without gradient;
        data-parallel training then runs DistributedDataParallel with
        ``find_unused_parameters=True``.
    ``takes_mask_stack`` (optional, default False)
        the training forward takes ``observed`` [P, B, M], P masks per sample
        (``--masks-per-step P``), and returns logits [P * B, ...] mask-major;
        ``loss`` repeats the labels. Without it the training loop repeats the
        batch P times instead.
    """

    takes_sample_index: bool
    may_skip_parameters: bool

    def __call__(self, features: dict[str, torch.Tensor], observed: torch.Tensor,
                 available: torch.Tensor | None = None, mode: str = "eval", **extra: Any) -> Output: ...

    def loss(self, out: Output, labels: torch.Tensor,
             ignore_index: int | None = None) -> tuple[torch.Tensor, dict[str, float]]: ...

    def prepare(self, train_set: MultimodalDataset, *, protocol: MissingnessProtocol, seed: int, resume: bool,
                log: Callable[..., None] = print) -> None: ...

    def set_epoch(self, epoch: int) -> None: ...


class MethodModel(nn.Module):
    """Base of the methods' models: the hooks of :class:`TrainableModel` with
    their defaults (no set-up, no per-epoch state, no sample index, every
    parameter used by every step)."""

    takes_sample_index: bool = False
    may_skip_parameters: bool = False
    takes_mask_stack: bool = False

    def prepare(self, train_set: MultimodalDataset, *, protocol: MissingnessProtocol, seed: int, resume: bool,
                log: Callable[..., None] = print) -> None:
        """Nothing to set up."""

    def set_epoch(self, epoch: int) -> None:
        """No per-epoch state."""
