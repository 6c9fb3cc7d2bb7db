"""Dataset statistics: class distribution per split (seed 002 Figs. 3 and 15), subjects per class where known, image
sizes, and duplicate images found by hash — within a split and, worse, shared between splits (a train/test leak).

File-backed records are hashed on their file bytes (md5) and sized from the image header without decoding; in-memory
records (FER2013 CSV pixels, the synthetic set) are hashed on their decoded pixels, which is stated in the output.
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ferkit.data.base import FaceDataset  # noqa: E402

__all__ = ["SplitStats", "split_stats", "find_duplicates", "plot_class_distribution", "stats_markdown",
           "dataset_stats"]


@dataclass
class SplitStats:
    split: str
    class_names: list[str]
    counts: np.ndarray  # (K,) samples per class
    subjects_per_class: np.ndarray | None  # (K,) distinct subjects with at least one sample of the class
    num_subjects: int | None
    sizes: Counter  # (width, height) -> count
    hashes: list[str] = field(default_factory=list)  # one per record, "" when not hashed
    sources: list[str] = field(default_factory=list)  # record source, relative to the dataset root when inside it
    hashed_on: str = ""  # "file bytes", "pixels" or a mix
    labels: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # rows the protocol left out, by reason (FERPlus votes)
    flipped: int | None = None  # labels differing from the clean list (a published noisy list), None: none given

    @property
    def n(self) -> int:
        return int(self.counts.sum())


def _image_size_and_hash(ds: FaceDataset, i: int, want_hash: bool) -> tuple[tuple[int, int], str, str]:
    """((w, h), md5 hex, what was hashed) of record ``i``."""
    from PIL import Image

    path = ds.records[i].path
    if path is not None:
        with Image.open(path) as im:  # header only: no pixel decoding
            size = im.size
        digest = hashlib.md5(Path(path).read_bytes()).hexdigest() if want_hash else ""
        return size, digest, "file bytes"
    image = ds.load(i)["image"]
    digest = hashlib.md5(image.tobytes()).hexdigest() if want_hash else ""
    return image.size, digest, "pixels"


def split_stats(ds: FaceDataset, *, hash_images: bool = True) -> SplitStats:
    """Counts, subjects, sizes and (optionally) per-record hashes of one split."""
    k = ds.num_classes
    targets = ds.targets
    counts = np.bincount(targets, minlength=k)
    subjects = ds.subjects
    per_class = None
    if subjects is not None:
        per_class = np.asarray([len({s for s in subjects[targets == c] if s is not None}) for c in range(k)])
    sizes: Counter = Counter()
    hashes, kinds = [], set()
    for i in range(len(ds)):
        size, digest, kind = _image_size_and_hash(ds, i, hash_images)
        sizes[size] += 1
        hashes.append(digest)
        kinds.add(kind)
    return SplitStats(ds.split or "?", list(ds.class_names), counts, per_class,
                      None if subjects is None else len({s for s in subjects if s is not None}), sizes, hashes,
                      [_short(r.source, ds.root) for r in ds.records], " + ".join(sorted(kinds)) if hash_images else "",
                      targets.tolist(), dict(getattr(ds, "dropped", {}) or {}),
                      None if ds.clean_targets is None else int((ds.clean_targets != targets).sum()))


def _short(source: str, root: Path | None) -> str:
    if root is not None:
        try:
            return str(Path(source).resolve().relative_to(Path(root).resolve()))
        except (ValueError, OSError):
            pass
    return source


def find_duplicates(stats: Sequence[SplitStats]) -> list[list[tuple[str, str, int]]]:
    """Groups of identical images, each a list of ``(split, source, label)``; groups spanning splits first."""
    groups: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    for s in stats:
        for digest, src, label in zip(s.hashes, s.sources, s.labels):
            if digest:
                groups[digest].append((s.split, src, int(label)))
    dups = [g for g in groups.values() if len(g) > 1]
    return sorted(dups, key=lambda g: (len({d[0] for d in g}) == 1, -len(g), g[0][1]))


def plot_class_distribution(stats: Sequence[SplitStats], path: str | Path, title: str = "") -> Path:
    """Grouped bars: one group per class, one bar per split, counts on the bars (seed 002 Fig. 3 layout)."""
    names = stats[0].class_names
    k, m = len(names), len(stats)
    width = 0.8 / m
    fig, ax = plt.subplots(figsize=(max(6.0, (0.7 + 0.25 * m) * k + 1.5), 4.2))
    colors = plt.get_cmap("tab10")
    x = np.arange(k)
    for j, s in enumerate(stats):
        pos = x - 0.4 + width * (j + 0.5)
        bars = ax.bar(pos, s.counts, width, label=f"{s.split} (n={s.n})", color=colors(j))
        for b, c in zip(bars, s.counts):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), str(int(c)), ha="center", va="bottom",
                    fontsize=7 if m > 2 else 8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("images")
    ax.set_ylim(0, max(int(s.counts.max()) for s in stats) * 1.15 + 1)
    ax.set_title(title or "class distribution per split")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def stats_markdown(stats: Sequence[SplitStats], duplicates: list[list[tuple[str, str, int]]] | None = None,
                   title: str = "", plot: str | None = None, max_examples: int = 10) -> str:
    names = stats[0].class_names
    lines = [f"# Dataset statistics: {title}" if title else "# Dataset statistics", ""]
    header = ["class"] + [f"{s.split} n" for s in stats] + [f"{s.split} %" for s in stats]
    rows = [[c] + [int(s.counts[i]) for s in stats] + [f"{100 * s.counts[i] / max(s.n, 1):.1f}" for s in stats]
            for i, c in enumerate(names)]
    rows.append(["**total**"] + [s.n for s in stats] + ["100.0"] * len(stats))
    lines += ["## Class distribution", ""] + _md_table(header, rows) + [""]
    for s in stats:
        if s.dropped:
            lines.append(f"- {s.split}: {s.n + sum(s.dropped.values())} rows, {sum(s.dropped.values())} left out by "
                         "the protocol (" + ", ".join(f"{n} {why}" for why, n in s.dropped.items()) + ")")
        if s.flipped is not None:
            share = 100 * s.flipped / max(s.n, 1)
            lines.append(f"- {s.split}: labels from a noisy list; {s.flipped} of {s.n} ({share:.2f} %) differ from the "
                         "clean list (the counts above are the noisy labels)")
    if any(s.dropped or s.flipped is not None for s in stats):
        lines.append("")
    if plot:
        lines += [f"![class distribution]({plot})", ""]
    with_subjects = [s for s in stats if s.subjects_per_class is not None]
    if with_subjects:
        header = ["class"] + [f"{s.split} subjects" for s in with_subjects]
        rows = [[c] + [int(s.subjects_per_class[i]) for s in with_subjects] for i, c in enumerate(names)]
        rows.append(["**distinct subjects**"] + [s.num_subjects for s in with_subjects])
        lines += ["## Subjects per class", ""] + _md_table(header, rows) + [""]
    else:
        lines += ["Subjects: not known for this dataset.", ""]
    lines += ["## Image sizes (width x height)", ""]
    for s in stats:
        common = ", ".join(f"{w}x{h}: {n}" for (w, h), n in s.sizes.most_common(5))
        more = f" (+{len(s.sizes) - 5} other sizes)" if len(s.sizes) > 5 else ""
        lines.append(f"- {s.split}: {common}{more}")
    lines.append("")
    if duplicates is not None:
        hashed = sorted({s.hashed_on for s in stats if s.hashed_on})
        cross = [g for g in duplicates if len({d[0] for d in g}) > 1]
        conflicting = [g for g in duplicates if len({d[2] for d in g}) > 1]
        lines += ["## Duplicates (md5 of " + (", ".join(hashed) or "nothing") + ")", "",
                  f"{len(duplicates)} groups of identical images ({sum(len(g) for g in duplicates)} images); "
                  f"**{len(cross)} groups shared between splits**, {len(conflicting)} groups with conflicting labels.",
                  ""]
        for g in duplicates[:max_examples]:
            lines.append("- " + ", ".join(f"{sp}: `{src}` ({names[y]})" for sp, src, y in g[:6])
                         + (" ..." if len(g) > 6 else ""))
        lines.append("")
    return "\n".join(lines)


def dataset_stats(splits: Mapping[str, FaceDataset], out_dir: str | Path | None = None, *, title: str = "",
                  hash_images: bool = True) -> tuple[list[SplitStats], str]:
    """Statistics of named splits; with ``out_dir`` also ``class_distribution.png`` and ``stats.md`` there."""
    stats = []
    for name, ds in splits.items():
        s = split_stats(ds, hash_images=hash_images)
        s.split = name
        stats.append(s)
    if len({tuple(s.class_names) for s in stats}) > 1:
        lists = "; ".join(f"{s.split}: {s.class_names}" for s in stats)
        raise ValueError(f"splits have different class lists: {lists}")
    dups = find_duplicates(stats) if hash_images else None
    plot = None
    if out_dir is not None:
        out = Path(out_dir)
        plot_class_distribution(stats, out / "class_distribution.png", title=title)
        plot = "class_distribution.png"
    md = stats_markdown(stats, dups, title=title, plot=plot)
    if out_dir is not None:
        (Path(out_dir) / "stats.md").write_text(md, encoding="utf-8")
    return stats, md
