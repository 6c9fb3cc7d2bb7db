"""Evaluation protocols of the RGB-D paper (seed 002 §III-E, §IV) on top of :func:`run_crossval`, and the per-fold
z-score normalisation they use.

``ferkit cv --config PRESET --protocol NAME [--folds K] [--repeats N] [--zscore/--no-zscore] --out DIR``

==============  =================================================================================================
subject_kfold   subject-wise k-fold CV of the whole pool (default 10 folds, 1 repeat, no z-score): the generic one
bu3dfe          the literature protocol (AFNet, CMANet, FFNet, MFEViT, CMFN): neutral dropped (6 classes), the two
                highest intensity levels, 60 random subjects chosen once from the seed, subject-wise 10-fold CV
                repeated N times with different folds (paper: N = 100, 720 samples); result = mean of the
                repetition means (Table IV: 91.66 %)
fivefold        5-fold subject-wise CV of the full dataset, every class and intensity (Table V: BU-3DFE 87.6 %)
holdout         one subject-disjoint 80/20 split (the merged set, Table IX: 68.48 %)
==============  =================================================================================================

The RGB-D protocols normalise each fold with the mean / std of its *training* part, per modality (seed 002 §III-B,
Eq. 1): RGB per channel into ``data.mean`` / ``data.std``, depth into ``data.depth_mean`` / ``data.depth_std``,
measured on the images the model sees (eval transform at the model's input size, before augmentation).
``protocol.json`` records the protocol and the chosen subjects (the papers never published theirs); a rerun with
the same out directory resumes and refuses a different selection.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ferkit.config import Config
from ferkit.data.base import FaceDataset, Subset

__all__ = ["PROTOCOLS", "Protocol", "run_protocol", "bu3dfe_protocol_pool", "zscore_stats", "with_zscore",
           "zscore_fold_config", "zscore_overrides"]

_logger = logging.getLogger("ferkit")


# ---------------------------------------------------------------------------------------------------------------
# per-fold z-score statistics (Eq. 1)
# ---------------------------------------------------------------------------------------------------------------
def zscore_stats(dataset: FaceDataset, cfg: Config, max_samples: int | None = None, seed: int = 0
                 ) -> dict[str, Any]:
    """Per-channel RGB mean / std and depth mean / std of ``dataset`` (pixels in [0, 1]) at the model's input size.

    ``max_samples``: estimate on a seeded random subset of that size (large training sets)."""
    from ferkit.data.transforms import build_transform
    from ferkit.engine.trainer import input_spec

    size = input_spec(cfg)["input_size"][-1]
    tf = build_transform("eval", size, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], cfg.data.augment,
                         grayscale=cfg.data.grayscale, depth_mean_std=(0.0, 1.0))
    idx = np.arange(len(dataset))
    if max_samples and max_samples < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), max_samples, replace=False))
    s = {"rgb": np.zeros(3), "rgb2": np.zeros(3), "d": 0.0, "d2": 0.0}
    n_pix, n_depth = 0, 0
    for i in idx:
        sample = tf(dataset.load(int(i)))
        img = sample["image"].double().flatten(1)  # (3, H*W)
        s["rgb"] += img.sum(1).numpy()
        s["rgb2"] += (img ** 2).sum(1).numpy()
        n_pix += img.shape[1]
        if "depth" in sample:
            d = sample["depth"].double()
            s["d"] += float(d.sum())
            s["d2"] += float((d ** 2).sum())
            n_depth += d.numel()
    if n_pix == 0:
        raise ValueError(f"{dataset.name}: no samples to compute z-score statistics on")
    mean = s["rgb"] / n_pix
    out: dict[str, Any] = {"mean": mean.tolist(), "std": _std(s["rgb2"] / n_pix, mean).tolist(),
                           "n_samples": len(idx)}
    if n_depth:
        d_mean = s["d"] / n_depth
        out.update(depth_mean=float(d_mean), depth_std=float(_std(np.array(s["d2"] / n_depth), d_mean)))
    return out


def _std(mean_sq: np.ndarray, mean: np.ndarray | float) -> np.ndarray:
    return np.sqrt(np.maximum(mean_sq - np.square(mean), 0.0)).clip(min=1e-6)  # a constant channel still divides


def with_zscore(cfg: Config, stats: dict[str, Any]) -> Config:
    """``cfg`` with ``data.mean/std`` (and ``data.depth_mean/std`` when measured) set to ``stats``."""
    d = replace(cfg.data, mean=list(stats["mean"]), std=list(stats["std"]))
    if "depth_mean" in stats:
        d = replace(d, depth_mean=stats["depth_mean"], depth_std=stats["depth_std"])
    return replace(cfg, data=d)


def zscore_fold_config(cfg: Config, train: FaceDataset) -> Config:
    """Fold hook for :func:`run_crossval`: statistics of the fold's training part only."""
    stats = zscore_stats(train, cfg)
    _logger.info("z-score on %d training samples: RGB mean %s std %s, depth mean %.4f std %.4f", stats["n_samples"],
                 np.round(stats["mean"], 4).tolist(), np.round(stats["std"], 4).tolist(),
                 stats.get("depth_mean", float("nan")), stats.get("depth_std", float("nan")))
    return with_zscore(cfg, stats)


def zscore_overrides(stats: dict[str, Any]) -> list[str]:
    """The statistics as ``key=value`` config overrides (``ferkit rgbd stats``)."""
    fmt = lambda v: "[" + ",".join(f"{x:.6f}" for x in v) + "]"  # noqa: E731
    out = [f"data.mean={fmt(stats['mean'])}", f"data.std={fmt(stats['std'])}"]
    if "depth_mean" in stats:
        out += [f"data.depth_mean={stats['depth_mean']:.6f}", f"data.depth_std={stats['depth_std']:.6f}"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# sample selection
# ---------------------------------------------------------------------------------------------------------------
def bu3dfe_protocol_pool(dataset: FaceDataset, num_subjects: int = 60, intensities: tuple[int, ...] = (3, 4),
                         drop_neutral: bool = True, seed: int = 0) -> FaceDataset:
    """The BU-3DFE literature subset: no neutral (classes relabelled), the given intensity levels, ``num_subjects``
    subjects drawn once from ``seed`` (100 subjects x 6 classes x 2 levels -> 60 x 12 = 720 samples)."""
    from ferkit.data.rgbd import ClassSubset

    pool = ClassSubset(dataset, [c for c in dataset.class_names if c != "neutral"]) if drop_neutral else dataset
    levels = pool.meta_column("intensity")
    if any(v is None for v in levels):
        raise ValueError(f"{dataset.name}: the bu3dfe protocol needs an intensity level per sample")
    keep = np.isin(levels.astype(np.int64), intensities)
    if pool.subjects is None:
        raise ValueError(f"{dataset.name}: the bu3dfe protocol needs subject ids")
    subjects = np.unique(pool.subjects[keep].astype(str))
    if len(subjects) < num_subjects:
        raise ValueError(f"{dataset.name}: {len(subjects)} subjects have intensity {intensities} samples, "
                         f"the protocol draws {num_subjects}")
    chosen = np.sort(np.random.default_rng(seed).choice(subjects, num_subjects, replace=False))
    keep &= np.isin(pool.subjects.astype(str), chosen)
    return Subset(pool, np.flatnonzero(keep), "all")


# ---------------------------------------------------------------------------------------------------------------
# protocols
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    name: str
    folds: int
    repeats: int
    zscore: bool
    prepare: Callable[[FaceDataset, int], FaceDataset] | None = None  # (pool, seed) -> protocol pool
    holdout: float = 0.0  # > 0: one subject-disjoint split with this test fraction instead of k-fold


PROTOCOLS: dict[str, Protocol] = {
    "subject_kfold": Protocol("subject_kfold", folds=10, repeats=1, zscore=False),
    "bu3dfe": Protocol("bu3dfe", folds=10, repeats=100, zscore=True,
                       prepare=lambda ds, seed: bu3dfe_protocol_pool(ds, seed=seed)),
    "fivefold": Protocol("fivefold", folds=5, repeats=1, zscore=True),
    "holdout": Protocol("holdout", folds=1, repeats=1, zscore=True, holdout=0.2),
}


def _holdout_partition(pool: FaceDataset, fraction: float, seed: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    from ferkit.data.splits import holdout_split

    train_idx, test_idx = holdout_split(pool.targets, fraction, seed, groups=pool.subjects)
    return [[(train_idx, test_idx)]]


def _check_protocol_record(out: Path, record: dict[str, Any]) -> None:
    path = out / "protocol.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise ValueError(f"{out}: holds a cross-validation with another protocol setting ({', '.join(diff)}); "
                             "use a new --out directory")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))


def run_protocol(cfg: Config, out_dir: str | Path, protocol: str = "subject_kfold", *, folds: int | None = None,
                 repeats: int | None = None, zscore: bool | None = None, split: str = "all",
                 dataset: FaceDataset | None = None, keep_states: bool = False,
                 pool_fn: Callable[[FaceDataset, int], FaceDataset] | None = None) -> dict[str, Any]:
    """Run a named protocol (``folds`` / ``repeats`` / ``zscore`` default to the protocol's own; ``pool_fn``
    replaces its sample selection, e.g. ``bu3dfe_protocol_pool`` with fewer subjects on a small set)."""
    from ferkit.data.build import build_dataset
    from .crossval import run_crossval

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    p = PROTOCOLS[protocol]
    folds, repeats = folds or p.folds, repeats or p.repeats
    zscore = p.zscore if zscore is None else zscore
    pool = dataset if dataset is not None else build_dataset(cfg.data, split)
    prepare = pool_fn or p.prepare
    if prepare is not None:
        pool = prepare(pool, cfg.seed)
    out = Path(out_dir)
    partitions = _holdout_partition(pool, p.holdout, cfg.seed) if p.holdout else None
    subjects = sorted(set(pool.subjects.astype(str))) if pool.subjects is not None else None
    _check_protocol_record(out, {"protocol": protocol, "folds": folds if not p.holdout else 1,
                                 "repeats": repeats if not p.holdout else 1, "zscore": zscore, "seed": cfg.seed,
                                 "dataset": pool.name, "classes": pool.class_names, "n_samples": len(pool),
                                 "subjects": subjects, "holdout_test_fraction": p.holdout or None})
    _logger.info("protocol %s: %d samples, %d subjects, %s", protocol, len(pool), len(subjects or []),
                 "80/20 holdout" if p.holdout else f"{folds}-fold x {repeats}")
    return run_crossval(cfg, out, folds=folds, repeats=repeats, dataset=pool, keep_states=keep_states,
                        fold_config=zscore_fold_config if zscore else None, partitions=partitions)
