"""PNG plots of a run: score against the number of observed modalities, and
the expert-usage heatmap (missing pattern x expert)."""
from __future__ import annotations

import io
from pathlib import Path

from .rundir import atomic_write_bytes
from .stats import usage_order


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    """PNG bytes rendered in memory, then written atomically (no torn file)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


def plot_by_size(curves: dict[str, dict[int, float]], path: Path, ylabel: str = "test accuracy") -> None:
    """curves: label -> {number of observed modalities: mean score}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for label, by_size in curves.items():
        sizes = sorted(int(s) for s in by_size)
        ax.plot(sizes, [by_size[s] if s in by_size else by_size[str(s)] for s in sizes], marker="o", label=label)
    ax.set_xlabel("observed modalities")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(plt, fig, path)


MAX_USAGE_ROWS = 64  # missing patterns shown in the expert-usage heatmap (2^M - 1 of them for M modalities)


def plot_usage(usage: list[list[float]], subsets: list[str], path: Path, title: str | None = None,
               ordered: bool = True, counts: list[list[float]] | None = None,
               max_rows: int = MAX_USAGE_ROWS) -> None:
    """usage [patterns, E]: share of each pattern's tokens routed to each
    expert. ``ordered``: experts by total share, patterns grouped by their
    most used expert (:func:`mars.stats.usage_order`), so specialisation
    shows as blocks down the diagonal; the axis labels keep the real names.
    At most ``max_rows`` patterns are drawn (14 modalities have 16,383): those
    with the most routed tokens (``counts`` [patterns, E], the token counts
    behind ``usage``), else the first ones; the title says how many are shown,
    so the plot's time and memory stay bounded."""
    plt = _pyplot()
    total = len(usage)
    keep = list(range(total))
    if total > max_rows:
        weight = [sum(row) for row in counts] if counts is not None and len(counts) == total else [0.0] * total
        keep = sorted(sorted(range(total), key=lambda i: (-weight[i], i))[:max_rows])
        usage, subsets = [usage[i] for i in keep], [subsets[i] for i in keep]
        what = "the most routed tokens" if counts is not None else "the first"
        title = (f"{title}\n" if title else "") + f"{max_rows} of {total} missing patterns ({what})"
    rows, cols = usage_order(usage) if ordered else (list(range(len(usage))), list(range(len(usage[0]))))
    shown = [[usage[r][c] for c in cols] for r in rows]
    height = max(3.0, 0.14 * len(subsets) + 1)
    fig, ax = plt.subplots(figsize=(7.0, height), dpi=120)
    im = ax.imshow(shown, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert" + (" (by total share)" if ordered else ""))
    ax.set_ylabel("observed modalities" + (" (grouped by top expert)" if ordered else ""))
    ax.set_yticks(range(len(subsets)))
    ax.set_yticklabels([subsets[r] for r in rows], fontsize=5)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([str(c) for c in cols])
    if title:
        ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    _save(plt, fig, path)
