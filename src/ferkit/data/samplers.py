"""Epoch-seeded, resumable, rank-sharded samplers: random, class-balanced oversampling, MRR (ARM, seed 003 §4.4).

Each epoch's order is a pure function of (seed, epoch), so a run resumed mid-epoch continues with the same batches,
and under DDP every rank takes its share of the same order. Items are ``(epoch, index)`` pairs so that per-sample
augmentation can be seeded from them too (see :class:`ferkit.data.loader.SeededViews`).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "random_order", "class_balanced_order", "mrr_order", "ORDERS"]


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def random_order(labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    return _rng(seed, epoch).permutation(len(labels))


def class_balanced_order(labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """N draws with replacement, each class equally likely (oversampling for AffectNet, SPEC 2.3)."""
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return _rng(seed, epoch).choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())


def mrr_order(labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Minimal random resampling: every class contributes as many samples as the smallest class has (seed 003 §4.4).

    Each class is read as an endless stream of fresh permutations and epoch e takes the e-th slice of it, so draws
    are new every epoch, no image repeats within an epoch, and every sample of a large class is seen within
    ceil(n_c / n_min) + 1 epochs.
    """
    counts = np.bincount(labels)
    m = int(counts[counts > 0].min())
    picked = []
    for c in np.flatnonzero(counts):
        members = np.flatnonzero(labels == c)
        picked.append(_class_stream_slice(members, m, seed, int(c), epoch))
    order = np.concatenate(picked)
    return order[_rng(seed, epoch, 1).permutation(len(order))]


def _class_stream_slice(members: np.ndarray, m: int, seed: int, c: int, epoch: int) -> np.ndarray:
    n = len(members)
    start = epoch * m
    out: list[int] = []
    seen: set[int] = set()
    pos = start
    while len(out) < m:
        cycle, offset = divmod(pos, n)
        perm = members[_rng(seed, 7919, c, cycle).permutation(n)]
        for i in perm[offset:]:  # rest of this cycle; a straddling slice skips what it already took
            if len(out) == m:
                break
            if int(i) not in seen:
                seen.add(int(i))
                out.append(int(i))
        pos = (cycle + 1) * n
    return np.asarray(out[:m], dtype=np.int64)


ORDERS = {"random": random_order, "class_balanced": class_balanced_order, "mrr": mrr_order}


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for this rank; ``set_epoch(e, start)`` skips the first ``start`` items (resume)."""

    def __init__(self, labels: np.ndarray, kind: str = "random", seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if kind not in ORDERS:
            raise ValueError(f"unknown sampler {kind!r}; known: {', '.join(ORDERS)}")
        self.labels = np.asarray(labels)
        self.kind, self.seed, self.shuffle = kind, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.labels))
        return ORDERS[self.kind](self.labels, self.seed, epoch)

    def _rank_order(self) -> np.ndarray:
        order = self.epoch_order(self.epoch)
        per_rank = math.ceil(len(order) / self.world_size)
        if per_rank * self.world_size > len(order):  # pad by wrapping so every rank gets as many items
            order = np.concatenate([order, order[: per_rank * self.world_size - len(order)]])
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        return max(len(self._rank_order()) - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._rank_order()[self.start:]:
            yield (self.epoch, int(i))
