"""Evaluation on every non-empty modality subset.

For each subset S of the M modalities, the observed mask of a sample is
S intersected with what the sample actually has (samples left with nothing are
skipped for that subset). Classification reports accuracy, segmentation
pixel accuracy and mean IoU. Summaries: the mean over subsets and the mean by
number of observed modalities.
"""
from __future__ import annotations

import statistics

import torch

from .data import MultimodalDataset, all_subsets, subset_name


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield torch.arange(start, min(n, start + size))


def _features(data: MultimodalDataset, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {m: data.features[m][idx] for m in data.modalities}


def _available(data: MultimodalDataset) -> torch.Tensor:
    if data.available is not None:
        return data.available
    return torch.ones(len(data), data.num_modalities, dtype=torch.bool)


@torch.no_grad()
def evaluate_subsets(model, data: MultimodalDataset, mode: str = "eval", batch_size: int = 512,
                     num_experts: int | None = None) -> dict:
    """-> {"subsets": [{name, size, score, miou?, n}], "mean", "by_size": {size: mean},
    "usage": [subsets, E] routing shares (when the model routes and num_experts is given)}."""
    model.eval()
    avail = _available(data)
    rows, usage = [], []
    for mask in all_subsets(data.num_modalities):
        observed = avail & mask
        keep = observed.any(dim=1).nonzero().flatten()
        correct = total = 0
        inter = union = None
        counts = torch.zeros(num_experts or 1)
        for idx in _batches(keep.numel(), batch_size):
            sel = keep[idx]
            out = model(_features(data, sel), observed[sel], avail[sel], mode=mode)
            pred, labels = out.logits.argmax(dim=1), data.labels[sel]
            valid = labels != data.ignore_index if data.ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
            correct += int(((pred == labels) & valid).sum())
            total += int(valid.sum())
            if data.task == "segmentation":
                K = data.num_classes
                p, l = pred[valid], labels[valid]
                i_ = torch.bincount(l[p == l], minlength=K).double()
                u_ = (torch.bincount(p, minlength=K) + torch.bincount(l, minlength=K)).double() - i_
                inter = i_ if inter is None else inter + i_
                union = u_ if union is None else union + u_
            if num_experts and "indices" in out.aux:
                counts += torch.bincount(out.aux["indices"].reshape(-1).cpu(), minlength=num_experts).float()
        row = {"name": subset_name(mask, data.modalities), "size": int(mask.sum()), "n": int(keep.numel()),
               "score": correct / total if total else float("nan")}
        if inter is not None:
            present = union > 0
            row["miou"] = float((inter[present] / union[present]).mean()) if bool(present.any()) else float("nan")
        rows.append(row)
        usage.append(counts / counts.sum().clamp(min=1))
    scored = [r for r in rows if r["n"]]
    by_size: dict[int, list[float]] = {}
    for r in scored:
        by_size.setdefault(r["size"], []).append(r["score"])
    result = {
        "subsets": rows,
        "mean": statistics.mean(r["score"] for r in scored) if scored else float("nan"),
        "by_size": {s: statistics.mean(v) for s, v in sorted(by_size.items())},
    }
    if num_experts:
        result["usage"] = torch.stack(usage).tolist()
    return result
