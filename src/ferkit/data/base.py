"""The one dataset protocol every adapter follows.

A dataset is an index of :class:`FaceRecord` (built once, validated: a bad entry is an error naming file and line, or
— with ``skip_bad`` — a counted, listed skip) and ``load(i)`` which returns a *raw* sample dict:

    {"image": PIL.Image (RGB), "label": int, "index": int,
     optional "depth": PIL.Image (mode "F" or "L"), "landmarks": float32 (68, 2) pixel coords,
     "subject": str, and any per-sample flags (e.g. "occlusion", "yaw", "pitch", "intensity")}

Tensors come from a view (:class:`TransformView`) that applies a sample transform, so one index can be seen
through a train and an eval pipeline, or through weak and strong pipelines at once (D3FER).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

__all__ = ["DataError", "FaceRecord", "FaceDataset", "TransformView", "Subset", "resolve_inside", "open_image"]


class DataError(ValueError):
    """A bad dataset entry. The message names the file (and line) and says what is wrong."""


@dataclass
class FaceRecord:
    path: str | None  # absolute path of the image (None for in-memory sets)
    label: int
    source: str = ""  # where the entry came from: "list.txt:12" or the image path
    subject: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # depth path, landmarks, occlusion, yaw, intensity, ...


def resolve_inside(root: Path, rel: str, source: str) -> Path:
    """Join ``rel`` onto ``root`` and refuse paths that escape the dataset root (``../``, absolute paths, links)."""
    root = root.resolve()
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise DataError(f"{source}: path {rel!r} escapes the dataset root {root}")
    return p


def open_image(path: str | Path, source: str = "", mode: str = "RGB", max_side: int = 4096):
    """Open an image fully (so truncated files fail here, not later), convert it and bound its size.

    Huge images are downscaled while decoding (``draft`` for JPEG, then ``thumbnail``) so memory stays bounded.
    """
    from PIL import Image, UnidentifiedImageError

    where = source or str(path)
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # animated GIF / multi-page TIFF: the first frame
            if max(im.size) > max_side:
                im.draft(mode if mode in ("RGB", "L") else None, (max_side, max_side))
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                rng = float(arr.max() - arr.min()) or 1.0
                im = Image.fromarray(((arr - arr.min()) * (255.0 / rng)).astype(np.uint8))
            out = im.convert(mode) if mode else im.copy()
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{where}: unreadable image {path} ({e.__class__.__name__}: {e})") from None
    if max(out.size) > max_side:
        out.thumbnail((max_side, max_side))
    return out


class FaceDataset(Dataset):
    """Base class: an ordered index of records plus class names. Subclasses build ``records`` and may override
    ``load`` (in-memory or rendered sets)."""

    name: str = "dataset"

    def __init__(self, records: Sequence[FaceRecord], class_names: Sequence[str], *, split: str = "",
                 root: str | Path | None = None, modalities: tuple[str, ...] = ("image",),
                 skipped: list[str] | None = None):
        self.records = list(records)
        self.class_names = list(class_names)
        self.split = split
        self.root = Path(root) if root is not None else None
        self.modalities = modalities
        self.skipped = list(skipped or [])  # "source: reason" for every entry left out with skip_bad
        k = len(self.class_names)
        for r in self.records:
            if not 0 <= r.label < k:
                raise DataError(f"{r.source}: label {r.label} out of range 0..{k - 1} for {self.name}")

    # --- index-level views used by samplers, splits and subset evaluation ---
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def targets(self) -> np.ndarray:
        return np.fromiter((r.label for r in self.records), dtype=np.int64, count=len(self.records))

    @property
    def subjects(self) -> np.ndarray | None:
        subj = [r.subject for r in self.records]
        return None if all(s is None for s in subj) else np.asarray(subj, dtype=object)

    def meta_column(self, key: str, default: Any = None) -> np.ndarray:
        return np.asarray([r.meta.get(key, default) for r in self.records], dtype=object)

    def subsets(self) -> dict[str, np.ndarray]:
        """Named boolean masks for robustness evaluation (occlusion types, pose > 30 / 45 ...). Default: none."""
        return {}

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        sample: dict[str, Any] = {"image": open_image(r.path, r.source), "label": r.label, "index": index}
        if r.subject is not None:
            sample["subject"] = r.subject
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index)

    def describe(self) -> str:
        counts = np.bincount(self.targets, minlength=self.num_classes)
        per = ", ".join(f"{n}={c}" for n, c in zip(self.class_names, counts))
        extra = f", skipped {len(self.skipped)} bad entries" if self.skipped else ""
        return f"{self.name}[{self.split}] {len(self)} samples ({per}){extra}"


class Subset(FaceDataset):
    """Records ``indices`` of ``base`` as a dataset of its own (folds, validation carved from train)."""

    def __init__(self, base: FaceDataset, indices: Sequence[int], split: str):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = base.name
        super().__init__([base.records[i] for i in self.indices], base.class_names, split=split, root=base.root,
                         modalities=base.modalities)

    def load(self, index: int) -> dict[str, Any]:
        sample = self.base.load(int(self.indices[index]))
        sample["index"] = index
        return sample

    def subsets(self) -> dict[str, np.ndarray]:
        return {k: v[self.indices] for k, v in self.base.subsets().items()}


class TransformView(Dataset):
    """``dataset`` seen through ``transform(sample) -> sample`` (tensors out). Several views may share one index."""

    def __init__(self, dataset: FaceDataset, transform: Callable[[dict], dict]):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.dataset.load(index))
