"""Matplotlib figures written as PNG (headless backend): training curves, confusion matrices, per-class bars."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from ferkit.engine.metrics import normalize_confusion  # noqa: E402

__all__ = ["plot_curves", "plot_confusion", "plot_per_class", "plot_run_comparison"]


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(history: Sequence[dict], path: Path) -> Path:
    """Loss (total and the method's logged terms), WA, UA and LR per epoch (one panel each)."""
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    axes[0].plot(epochs, [r["train_loss"] for r in history], marker="o", lw=2, label="train loss")
    terms = [k for k in history[-1] if k.startswith("train_") and k not in ("train_loss", "train_acc")
             and isinstance(history[-1][k], (int, float))
             and not all(r.get(k) == r["train_loss"] for r in history)]  # a lone CE term is the loss itself
    for k in terms:
        pts = [(r["epoch"], r[k]) for r in history if isinstance(r.get(k), (int, float))]
        axes[0].plot(*zip(*pts), marker=".", lw=1, alpha=0.8, label=k[len("train_"):])
    axes[0].set_title("training loss")
    _log_if_spread(axes[0], [r[k] for r in history for k in ["train_loss", *terms] if k in r])
    axes[0].legend(fontsize=7)
    for metric, ax in (("wa", axes[1]), ("ua", axes[2])):
        if "train_acc" in history[0] and metric == "wa":
            ax.plot(epochs, [100 * r["train_acc"] for r in history], marker="o", label="train (running)")
        for split in ("val", "test"):
            pts = [(r["epoch"], 100 * r[split][metric]) for r in history if split in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=split)
        lo, hi = ax.get_ylim()
        if hi - lo < 5:  # a flat curve: show a few points of context rather than magnified noise
            mid = (hi + lo) / 2
            ax.set_ylim(mid - 2.5, mid + 2.5)
        ax.set_title(f"{metric.upper()} %")
        ax.legend(fontsize=8)
    lrs = {name: [(r["epoch"], r["lr"][name]) for r in history if r["lr"].get(name, 0) > 0]
           for name in history[0].get("lr", {})}  # a schedule that ends at 0 loses its last point on a log axis
    for name, pts in lrs.items():
        if pts:
            axes[3].plot(*zip(*pts), marker="o", label=name)
    axes[3].set_title("learning rate (end of epoch)")
    _log_if_spread(axes[3], [v for pts in lrs.values() for _, v in pts], ratio=1.0)
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _log_if_spread(ax, values: Sequence[float], ratio: float = 20.0) -> None:
    """Log scale when every value is positive and they span more than ``ratio`` (loss terms of different size,
    learning rates of several optimisers or decaying over decades)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) and (v > 0).all() and v.max() / v.min() > ratio:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        if v.max() / v.min() < 1000:  # few decades: label 2x and 5x in between
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        else:
            ax.yaxis.set_minor_formatter(NullFormatter())


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Counts and row-normalised heatmaps side by side, class names on both axes."""
    cm = np.asarray(cm)
    norm = normalize_confusion(cm)
    k = len(class_names)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (2.2 + 0.75 * k), 1.8 + 0.7 * k), layout="constrained")
    for ax, mat, fmt, sub in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "row-normalised")):
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                val = format(int(mat[i, j]) if fmt == "d" else mat[i, j], fmt)
                ax.text(j, i, val, ha="center", va="center", fontsize=10 if k <= 8 else 7,
                        color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), class_names, rotation=45, ha="right")
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} ({sub})".strip())
    fig.colorbar(im, ax=axes, fraction=0.025)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_per_class(per_class: Sequence[float | None], class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Accuracy per class as bars with their values, and their mean (UA) as a dashed line."""
    vals = [100 * (v if v is not None else np.nan) for v in per_class]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(class_names), 3.4))
    bars = ax.bar(class_names, vals, color="#4c72b0")
    for b, v in zip(bars, vals):
        if not np.isnan(v):
            ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    if not np.isnan(vals).all():
        ua = float(np.nanmean(vals))
        ax.axhline(ua, color="#c44e52", ls="--", lw=1, label=f"UA (mean) {ua:.1f}")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy %")
    ax.set_title(title or "per-class accuracy")
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def plot_run_comparison(runs: Sequence[tuple[str, Sequence[dict]]], path: Path, metric: str = "wa") -> Path:
    """Several runs at once: test (solid) and validation (dashed) ``metric`` per epoch, and the last epoch's test WA
    and UA as grouped bars with their values."""
    fig, (ax_c, ax_b) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.get_cmap("tab10")
    finals = []
    for i, (name, history) in enumerate(runs):
        epochs = [r["epoch"] for r in history]
        for split, style in (("test", "-"), ("val", "--")):
            pts = [(e, 100 * r[split][metric]) for e, r in zip(epochs, history) if split in r]
            if pts:
                ax_c.plot(*zip(*pts), style, marker="o", ms=3, color=colors(i % 10), label=f"{name} ({split})")
        last = history[-1].get("test", {}) if history else {}
        finals.append((name, 100 * last.get("wa", np.nan), 100 * last.get("ua", np.nan)))
    ax_c.set(title=f"{metric.upper()} % per epoch", xlabel="epoch", ylabel=f"{metric.upper()} %")
    ax_c.grid(alpha=0.3)
    ax_c.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_c.legend(fontsize=7, loc="lower right")
    x = np.arange(len(finals))
    for off, col, label in ((-0.2, 1, "WA"), (0.2, 2, "UA")):
        vals = [f[col] for f in finals]
        bars = ax_b.bar(x + off, vals, 0.4, label=label, color="#4c72b0" if col == 1 else "#dd8452")
        for b, v in zip(bars, vals):
            if not np.isnan(v):
                ax_b.text(b.get_x() + b.get_width() / 2, v + 0.5, f"{v:.1f}", ha="center", fontsize=7)
    ax_b.set_xticks(x, [f[0] for f in finals], rotation=20, ha="right", fontsize=8)
    ax_b.set(title="test, last epoch", ylabel="%", ylim=(0, 105))
    ax_b.legend(fontsize=8)
    ax_b.grid(axis="y", alpha=0.3)
    return _save(fig, path)
