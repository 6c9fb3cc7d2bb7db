"""DataLoaders whose per-sample randomness is seeded from (seed, epoch, index).

Augmentation draws do not depend on worker count, worker scheduling or where a run was resumed: each sample's
transforms run under ``torch`` RNG seeded from its key, so an interrupted-and-resumed run sees the same pixels.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .base import FaceDataset
from .samplers import EpochSampler

__all__ = ["SeededViews", "make_train_loader", "make_eval_loader"]


class SeededViews(Dataset):
    """Apply several named transforms to one raw sample: ``{"image": train_tf}`` or, for D3FER,
    ``{"image": weak_tf, "image_strong": strong_tf}``. Keys other than the view's image come from the first view."""

    def __init__(self, dataset: FaceDataset, views: dict[str, Callable[[dict], dict]], seed: int = 0,
                 labels: np.ndarray | None = None):
        self.dataset = dataset
        self.views = views
        self.seed = seed
        self.labels = labels  # overridden labels (synthetic label noise); None: the dataset's own

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        raw = self.dataset.load(index)
        if self.labels is not None:
            raw.setdefault("true_label", raw["label"])  # a noisy list's dataset already gives its clean label
            raw["label"] = int(self.labels[index])
        out: dict[str, Any] = {}
        with torch.random.fork_rng(devices=[]):
            for n, (name, tf) in enumerate(self.views.items()):
                torch.manual_seed(_sample_seed(self.seed, epoch, index, n))
                sample = tf(dict(raw))
                if not out:
                    out = sample
                    if name != "image":
                        out[name] = out.pop("image")
                else:
                    out[name] = sample["image"]
        return out


def _sample_seed(seed: int, epoch: int, index: int, view: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, view]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _private_generator(seed: int) -> torch.Generator:
    """DataLoader iterators draw a base seed when created; from the global RNG that would shift dropout masks after
    a resume. Per-sample seeding makes the base seed irrelevant, so it comes from a private generator."""
    return torch.Generator().manual_seed(seed)


def make_train_loader(views: SeededViews, sampler: EpochSampler, batch_size: int, num_workers: int = 0,
                      persistent_workers: bool = False, pin_memory: bool = False) -> DataLoader:
    return DataLoader(views, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=persistent_workers and num_workers > 0, pin_memory=pin_memory,
                      drop_last=False, generator=_private_generator(views.seed))


def make_eval_loader(views: SeededViews, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                     indices: np.ndarray | None = None) -> DataLoader:
    keys = list(range(len(views))) if indices is None else [int(i) for i in indices]
    return DataLoader(views, batch_size=batch_size, sampler=keys, num_workers=num_workers, pin_memory=pin_memory,
                      generator=_private_generator(views.seed))
