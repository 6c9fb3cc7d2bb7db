"""t-SNE of penultimate features coloured by class, one panel per run (DSAN Figs. 7 and 11 layout).

Features come from ``model.forward_features`` over the test set (``predict_loader(..., with_features=True)``).
sklearn's Barnes-Hut t-SNE (PCA initialisation, fixed seed) is used; large sets are subsampled per class so a panel of a
RAF-DB-sized test set (3,068 images) still renders in seconds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

__all__ = ["tsne_embed", "plot_tsne_grid", "class_colors", "subsample_per_class"]


def class_colors(k: int) -> np.ndarray:
    """(k, 4) RGBA colours: tab10 up to 10 classes, tab20 beyond."""
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return np.asarray([cmap(i % cmap.N) for i in range(k)])


def subsample_per_class(labels: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` samples, drawn per class in proportion to class size (every present
    class keeps at least one point)."""
    labels = np.asarray(labels)
    n = len(labels)
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = max(1, int(round(max_points * len(idx) / n)))
        keep.append(rng.choice(idx, size=min(take, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


def tsne_embed(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """(N, D) -> (N, 2). Perplexity is capped below N / 3 so tiny sets still embed; 2-D input is returned as is."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if x.shape[1] == 2:
        return x
    n = len(x)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 samples, got {n}")
    perp = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x)


def plot_tsne_grid(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], class_names: Sequence[str], path: Path, *,
                   seed: int = 0, perplexity: float = 30.0, max_points: int = 3000, cols: int | None = None,
                   point_size: float | None = None) -> Path:
    """One t-SNE scatter per ``(title, features (N, D), labels (N,))`` panel, side by side, one shared legend.

    Each panel is embedded independently (t-SNE axes carry no meaning across panels, so they are hidden).
    """
    if not panels:
        raise ValueError("plot_tsne_grid: no panels")
    k = len(class_names)
    colors = class_colors(k)
    n_panels = len(panels)
    cols = cols or min(n_panels, 3)
    rows = int(np.ceil(n_panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.4 * rows + 0.6), squeeze=False)
    for ax, (title, feats, labels) in zip(axes.flat, panels):
        feats, labels = np.asarray(feats), np.asarray(labels, dtype=np.int64)
        if len(feats) != len(labels):
            raise ValueError(f"panel {title!r}: {len(feats)} feature rows but {len(labels)} labels")
        keep = subsample_per_class(labels, max_points, seed)
        emb = tsne_embed(feats[keep], seed=seed, perplexity=perplexity)
        lab = labels[keep]
        size = point_size or float(np.clip(3000 / max(len(lab), 1), 4, 30))
        for c in range(k):
            sel = lab == c
            if sel.any():
                ax.scatter(emb[sel, 0], emb[sel, 1], s=size, color=colors[c], alpha=0.8, linewidths=0)
        ax.set_title(f"{title}  (n={len(lab)})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n_panels:]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colors[c], markersize=7, label=name)
               for c, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(k, 8), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07 if rows == 1 else 0.04, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
