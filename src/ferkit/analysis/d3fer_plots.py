"""D3FER-specific figures: noise-detection quality per epoch (SPEC 3.5 "report per epoch: filtering precision /
recall ... and correction accuracy"), one line per noise level. t-SNE and Grad-CAM grids live in ``tsne.py`` and
``gradcam.py``."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["FILTER_METRICS", "plot_filtering_curves"]

FILTER_METRICS = (("filter_precision", "filtering precision"), ("filter_recall", "filtering recall"),
                  ("correction_acc", "correction accuracy"), ("selected_frac", "selected fraction"))


def plot_filtering_curves(histories: Mapping[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """One panel per filtering statistic (in %) against the epoch; ``histories`` maps a run label (e.g. "40 %
    noise") to its per-epoch records (``metrics.jsonl`` lines). Warm-up epochs carry no statistic and are skipped."""
    fig, axes = plt.subplots(1, len(FILTER_METRICS), figsize=(4.2 * len(FILTER_METRICS), 3.6), squeeze=False)
    for ax, (key, name) in zip(axes[0], FILTER_METRICS):
        for label, history in histories.items():
            points = [(r["epoch"], 100 * r[key]) for r in history if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(handles, labels, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
