"""Datasets from config: the built-in synthetic faces or any adapter, optional validation split, label noise."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferkit.config import DataConfig
from .base import FaceDataset, Subset

__all__ = ["DataSplits", "known_datasets", "build_splits", "cache_dir", "synthetic_config"]


def cache_dir() -> Path:
    return Path(os.environ.get("FERKIT_CACHE", Path.home() / ".cache" / "ferkit"))


def known_datasets() -> list[str]:
    from .adapters import ADAPTERS
    from .rgbd import RGBD_ADAPTERS

    return sorted({"synthetic", "mixture", *ADAPTERS, *RGBD_ADAPTERS})


def synthetic_config(d: DataConfig, split: str):
    from .synthetic import SyntheticConfig

    s = d.synthetic
    subjects = s.train_subjects if split == "train" else s.test_subjects
    if split == "all":
        subjects = s.train_subjects + s.test_subjects
    return SyntheticConfig(size=s.render_size, num_classes=s.num_classes, num_subjects=subjects,
                           samples_per_subject=s.samples_per_subject, occlusion_prob=s.occlusion_prob,
                           pose_max_yaw=s.pose_max_yaw, pose_max_pitch=s.pose_max_pitch,
                           low_light_prob=s.low_light_prob, seed=s.seed)


def build_dataset(d: DataConfig, split: str, progress: bool = False, *, train: bool = False) -> FaceDataset:
    """The dataset of ``split``; ``train``: the training split, which reads ``data.noise.file`` where given."""
    if d.dataset == "synthetic":
        from .synthetic import SyntheticFaces

        return SyntheticFaces(split, synthetic_config(d, split), workers=min(2, os.cpu_count() or 1),
                              cache_dir=str(cache_dir() / "synthetic"), progress=progress)
    from .adapters import build_dataset as build_adapter
    from .rgbd import RGBD_ADAPTERS, build_rgbd_dataset

    if d.dataset == "mixture":
        return _mixture(d, split, progress)
    if d.dataset in RGBD_ADAPTERS:  # RGB-D sets of seed 002 (BU-3DFE, Bosphorus, CalD3rMenD3s, merged)
        ds = build_rgbd_dataset(d.dataset, d.root, split, skip_bad=d.skip_bad, **d.options)
    elif d.root is None:
        raise ValueError(f"data.root: dataset {d.dataset!r} needs a root directory")
    else:
        options = dict(d.options)
        if train and d.noise.file:
            from .adapters import adapters_with_option, canonical_dataset

            readers = adapters_with_option("noise_file")
            if canonical_dataset(d.dataset) not in readers:
                raise ValueError(f"data.noise.file: dataset {d.dataset!r} has no published noisy label lists "
                                 f"(read by: {', '.join(readers)}); use data.noise.rate for synthetic noise")
            options["noise_file"] = d.noise.file
        ds = build_adapter(d.dataset, d.root, split, skip_bad=d.skip_bad, **options)
    return _decode_once(ds, d, progress)


def _decode_once(ds: FaceDataset, d: DataConfig, progress: bool) -> FaceDataset:
    if d.decode_cache:
        from .cache import attach_decode_cache

        attach_decode_cache(ds, cache_dir() / "decoded", progress=progress)
    return ds


def _mixture(d: DataConfig, split: str, progress: bool) -> FaceDataset:
    """``data.dataset: mixture`` (:mod:`ferkit.data.mixture`): ``data.options`` holds ``parts`` and ``classes``."""
    from .adapters import build_dataset as build_adapter
    from .mixture import build_mixture

    unknown = sorted(set(d.options) - {"parts", "classes"})
    if unknown:
        raise ValueError(f"data.options.{unknown[0]}: a mixture takes only 'parts' and 'classes'")
    if "classes" not in d.options:
        raise ValueError("data.options.classes: a mixture needs the label space to map its parts into (e.g. fer2013)")

    def part(dataset, root, part_split, skip_bad, options):
        return _decode_once(build_adapter(dataset, root, part_split, skip_bad=skip_bad, **options), d, progress)

    return build_mixture(d.options.get("parts") or [], d.options["classes"], split, skip_bad=d.skip_bad, build=part)


@dataclass
class DataSplits:
    train: FaceDataset
    test: FaceDataset
    val: FaceDataset | None = None

    @property
    def select(self) -> tuple[str, FaceDataset]:
        """The split that picks the best checkpoint: validation if there is one, else test (said so in the run)."""
        return ("val", self.val) if self.val is not None else ("test", self.test)


def _limit(ds: FaceDataset, n: int, seed: int, split: str) -> FaceDataset:
    if n <= 0 or n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng([seed, 99]).permutation(len(ds))[:n])
    return Subset(ds, idx, split)


def build_splits(d: DataConfig, seed: int = 0, progress: bool = False) -> DataSplits:
    train = build_dataset(d, d.train_split, progress, train=True)
    test = build_dataset(d, d.test_split, progress)
    val = build_dataset(d, d.val_split, progress) if d.val_split else None
    if val is None and d.val_fraction > 0:
        from .splits import holdout_split

        tr_idx, va_idx = holdout_split(train.targets, d.val_fraction, seed, groups=train.subjects)
        train, val = Subset(train, tr_idx, "train"), Subset(train, va_idx, "val")
    if train.class_names != test.class_names:
        raise ValueError(f"data: train classes {train.class_names} differ from test classes {test.class_names}")
    return DataSplits(_limit(train, d.limit_train, seed, "train"), _limit(test, d.limit_test, seed, "test"), val)
