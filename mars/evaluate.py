"""Evaluation on every non-empty modality subset.

For each subset S of the M modalities, the observed mask of a sample is
S intersected with what the sample actually has (samples left with nothing are
skipped for that subset). All (sample, subset) pairs run in large batches.
Classification reports accuracy, segmentation pixel accuracy (``score``) and
mean IoU; anti-spoofing data (``data.bona_fide_class`` set, e.g. CASIA-SURF)
also APCER (attacks accepted as real), BPCER (real rejected as attacks) and
ACER = (APCER + BPCER) / 2. Summaries: the mean over subsets and the mean by number of observed
modalities.

Everything runs on the data's device (the model must be there too): the
pairs, the batches and the counts; the counts come back to the CPU once, at
the end. ``precision="bf16"`` runs the forward passes under autocast
(:func:`mars.devices.autocast`).
"""
from __future__ import annotations

import math
import statistics

import torch

from .data import MultimodalDataset, all_subsets, subset_name
from .devices import autocast
from .distributed import DistContext
from .stats import specialisation_nmi


def _available(data: MultimodalDataset) -> torch.Tensor:
    if data.available is not None:
        return data.available
    return torch.ones(len(data), data.num_modalities, dtype=torch.bool, device=data.device)


def _batches(local: int, total: int, batch_size: int, ctx: DistContext | None,
             device: torch.device) -> list[torch.Tensor]:
    """Positions of each batch (on ``device``). Under a data-parallel ``ctx``
    every rank makes the same number of batches (expert-parallel layers need
    every rank in every forward), sized from the largest rank's share."""
    if ctx is None or not ctx.enabled:
        return [torch.arange(s, min(s + batch_size, local), device=device) for s in range(0, local, batch_size)]
    n = max(1, math.ceil(math.ceil(total / ctx.world) / batch_size))
    return list(torch.tensor_split(torch.arange(local, device=device), n))


@torch.no_grad()
def evaluate_subsets(model, data: MultimodalDataset, mode: str = "eval", batch_size: int = 4096,
                     num_experts: int | None = None, ctx: DistContext | None = None, precision: str = "fp32") -> dict:
    """-> {"subsets": [{name, size, n, score, miou?, apcer?, bpcer?, acer?}], "mean",
    "by_size": {size: mean}, "miou_mean"? / "acer_mean"? (segmentation / anti-spoofing),
    "usage": [subsets, E] share of routed tokens per expert, "usage_counts": [subsets, E]
    the (token, slot) assignments themselves and "specialisation_nmi" (NMI between
    missing pattern and expert, :func:`mars.stats.specialisation_nmi`), when
    num_experts is given}.

    With a data-parallel ``ctx`` each rank evaluates a strided share of the
    (sample, subset) pairs and the counts are summed: every rank gets the result."""
    model.eval()
    device = data.device
    avail = _available(data)
    masks = torch.stack(all_subsets(data.num_modalities)).to(device)  # [S, M]
    n_sub, K = masks.shape[0], data.num_classes
    observed_all = avail[:, None, :] & masks[None]  # [N, S, M]
    sample, subset = observed_all.any(dim=2).nonzero(as_tuple=True)  # the pairs to evaluate
    counts = torch.bincount(subset, minlength=n_sub).cpu()
    if ctx is not None and ctx.enabled:
        sample, subset = ctx.shard(sample), ctx.shard(subset)
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
    correct, total = zeros(n_sub), zeros(n_sub)
    kc = K if data.task == "segmentation" else 0  # per-class IoU counts: segmentation only
    inter, union = zeros(n_sub, kc), zeros(n_sub, kc)
    usage = zeros(n_sub, num_experts or 1)
    spoof = zeros(4, n_sub)  # attacks, attacks accepted, bona fide, bona fide rejected
    for chunk in _batches(sample.numel(), int(counts.sum()), batch_size, ctx, device):
        s_idx, sub = sample[chunk], subset[chunk]
        feats = {m: data.features[m][s_idx] for m in data.modalities}
        with autocast(device, precision):
            out = model(feats, observed_all[s_idx, sub], avail[s_idx], mode=mode)
        pred, labels = out.logits.argmax(dim=1), data.labels[s_idx]
        valid = labels != data.ignore_index if data.ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
        per_sample = lambda t: t.reshape(t.shape[0], -1).sum(dim=1).double()  # noqa: E731
        correct.index_add_(0, sub, per_sample((pred == labels) & valid))
        total.index_add_(0, sub, per_sample(valid))
        if data.bona_fide_class is not None:
            real, said_real = labels == data.bona_fide_class, pred == data.bona_fide_class
            for row, hits in enumerate((~real, ~real & said_real, real, real & ~said_real)):
                spoof[row].index_add_(0, sub, hits.double())
        if data.task == "segmentation":
            sub_px = sub.view(-1, *([1] * (labels.dim() - 1))).expand_as(labels)[valid]
            p, l = pred[valid], labels[valid]
            hit = p == l
            inter += torch.bincount(sub_px[hit] * K + l[hit], minlength=n_sub * K).view(n_sub, K).double()
            both = torch.bincount(sub_px * K + p, minlength=n_sub * K) + torch.bincount(sub_px * K + l, minlength=n_sub * K)
            union += both.view(n_sub, K).double()
        if num_experts and "indices" in out.aux:
            idx = out.aux["indices"]  # [B, N, k]
            rows = sub.view(-1, 1, 1).expand_as(idx).reshape(-1)
            usage.index_put_((rows, idx.reshape(-1).to(device)), torch.ones(rows.numel(), dtype=torch.float64, device=device),
                             accumulate=True)
    if ctx is not None:
        ctx.sum_(*(t for t in (correct, total, inter, union, usage, spoof) if t.numel()))  # same shapes on every rank
    correct, total, inter, union, usage, spoof = (t.cpu() for t in (correct, total, inter, union, usage, spoof))
    union -= inter
    rows = []
    for s in range(n_sub):
        row = {"name": subset_name(masks[s], data.modalities), "size": int(masks[s].sum()), "n": int(counts[s]),
               "score": float(correct[s] / total[s]) if total[s] > 0 else float("nan")}
        if data.task == "segmentation":
            present = union[s] > 0
            row["miou"] = float((inter[s][present] / union[s][present]).mean()) if bool(present.any()) else float("nan")
        if data.bona_fide_class is not None:
            rate = lambda num, den: float(num / den) if den > 0 else float("nan")  # noqa: E731
            row["apcer"], row["bpcer"] = rate(spoof[1, s], spoof[0, s]), rate(spoof[3, s], spoof[2, s])
            row["acer"] = (row["apcer"] + row["bpcer"]) / 2
        rows.append(row)
    scored = [r for r in rows if r["n"]]
    by_size: dict[int, list[float]] = {}
    for r in scored:
        by_size.setdefault(r["size"], []).append(r["score"])
    result = {
        "subsets": rows,
        "mean": statistics.mean(r["score"] for r in scored) if scored else float("nan"),
        "by_size": {s: statistics.mean(v) for s, v in sorted(by_size.items())},
    }
    for metric in ("miou", "acer"):  # means over the subsets where the metric is defined
        values = [r[metric] for r in scored if metric in r and r[metric] == r[metric]]
        if values:
            result[f"{metric}_mean"] = statistics.mean(values)
    if num_experts:
        result["usage"] = (usage / usage.sum(dim=1, keepdim=True).clamp(min=1)).tolist()
        result["usage_counts"] = usage.tolist()
        result["specialisation_nmi"] = specialisation_nmi(result["usage_counts"])
    return result


@torch.no_grad()
def router_agreement(model, data: MultimodalDataset, protocol, seed: int, precision: str = "fp32") -> float:
    """Top-k agreement of the feature and residual routers (MARS) on ``data``
    under ``protocol``'s masks fixed by ``seed`` (mars.data.MissingnessProtocol.fixed_masks;
    drawn on the CPU, moved to the data's device)."""
    model.eval()
    avail = _available(data)
    masks = protocol.fixed_masks(avail, seed)
    feats = {m: data.features[m] for m in data.modalities}
    with autocast(data.device, precision):
        return model.router_agreement(feats, masks, avail)
