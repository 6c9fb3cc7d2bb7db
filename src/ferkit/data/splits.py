"""Index splits for the evaluation protocols (SPEC 5): subject-wise k-fold cross-validation, its repeated form
(BU-3DFE: 10-fold x 100), and a validation split carved from a training set.

Every function is deterministic in ``seed`` and returns sorted ``int64`` index arrays. No subject (group) ever
appears on both sides of a split.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["subject_kfold", "repeated_subject_kfold", "holdout_split"]

Fold = tuple[np.ndarray, np.ndarray]


def _groups(subjects: np.ndarray | Sequence | None, n: int | None) -> np.ndarray:
    """Integer group codes; ``None`` subjects = every sample its own group."""
    if subjects is None:
        if n is None:
            raise ValueError("subjects or labels are needed to know the number of samples")
        return np.arange(n)
    subjects = np.asarray(subjects, dtype=object)
    if any(s is None for s in subjects):
        raise ValueError("subject ids contain None: every sample needs a subject for subject-wise splits")
    return np.unique(subjects.astype(str), return_inverse=True)[1]


def _balanced_group_folds(groups: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold id per sample: groups in random order, then largest first, each to the currently smallest fold."""
    sizes = np.bincount(groups)
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_group = np.empty(len(sizes), dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    for g in order:
        smallest = np.flatnonzero(load == load.min())
        f = smallest[rng.integers(len(smallest))]
        fold_of_group[g] = f
        load[f] += sizes[g]
    return fold_of_group[groups]


def _stratified_group_folds(groups: np.ndarray, labels: np.ndarray, k: int,
                            rng: np.random.Generator) -> np.ndarray:
    """Fold id per sample: whole groups, largest first (random order among equal sizes), each to the fold that
    keeps the per-class shares and the fold sizes most even.

    The cost is that of scikit-learn's StratifiedGroupKFold (mean over classes of the std over folds of each
    fold's share of the class) plus the std of the fold sizes. scikit-learn's own shuffle only reorders groups
    with identical class distributions, so different seeds mostly give the same folds — useless for repeated CV.
    """
    classes = np.unique(labels, return_inverse=True)[1]
    n_groups, n_classes = int(groups.max()) + 1, int(classes.max()) + 1
    per_group = np.zeros((n_groups, n_classes), dtype=np.float64)
    np.add.at(per_group, (groups, classes), 1.0)
    class_total, sizes = per_group.sum(0), per_group.sum(1)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]
    counts = np.zeros((k, n_classes))
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    eye = np.eye(k)[:, :, None]
    for g in order:
        trial = counts[None] + eye * per_group[g]  # trial[f] = counts with group g added to fold f
        fold_sizes = trial.sum(2)
        cost = (trial / class_total).std(1).mean(1) + (fold_sizes / len(groups)).std(1)
        own_size = counts.sum(1)
        best = np.flatnonzero(cost <= cost.min() + 1e-12)
        best = best[own_size[best] == own_size[best].min()]
        f = best[rng.integers(len(best))]
        fold_of_group[g] = f
        counts[f] += per_group[g]
    return fold_of_group[groups]


def _to_pairs(folds: np.ndarray, k: int) -> list[Fold]:
    idx = np.arange(len(folds), dtype=np.int64)
    return [(idx[folds != f], idx[folds == f]) for f in range(k)]


def subject_kfold(subjects: np.ndarray | Sequence | None, k: int, seed: int,
                  labels: np.ndarray | Sequence | None = None) -> list[Fold]:
    """Subject-wise k-fold CV: ``k`` pairs ``(train_idx, test_idx)``; every subject is in exactly one test fold.

    Without labels, folds are balanced in sample count (greedy largest-subject-first into the smallest fold).
    With labels, folds are also stratified by class where the subjects allow it (StratifiedGroupKFold's criterion,
    with a real shuffle). ``subjects=None``: sample-wise (stratified) k-fold, which needs ``labels``.
    """
    n = None if labels is None else len(labels)
    groups = _groups(subjects, n)
    if labels is not None and len(labels) != len(groups):
        raise ValueError(f"labels ({len(labels)}) and subjects ({len(groups)}) differ in length")
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if not 2 <= k <= n_groups:
        raise ValueError(f"k must be between 2 and the number of subjects ({n_groups}), got {k}")
    rng = np.random.default_rng(seed)
    if subjects is None:  # one sample per group: scikit-learn's StratifiedKFold does this fast
        from sklearn.model_selection import StratifiedKFold

        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed % 2**32)
        return [(np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64))
                for tr, te in splitter.split(np.zeros(len(groups)), np.asarray(labels))]
    if labels is None:
        folds = _balanced_group_folds(groups, k, rng)
    else:
        folds = _stratified_group_folds(groups, np.asarray(labels), k, rng)
    return _to_pairs(folds, k)


def repeated_subject_kfold(subjects: np.ndarray | Sequence | None, k: int, seed: int,
                           labels: np.ndarray | Sequence | None = None, repeats: int = 1) -> list[list[Fold]]:
    """``repeats`` independent subject-wise k-fold partitions (outer list: repeat, inner: its k folds), each seeded
    from ``(seed, repeat)`` so that a repeat can be re-run on its own."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    return [subject_kfold(subjects, k, _child_seed(seed, r), labels) for r in range(repeats)]


def _child_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _stratified_holdout(labels: np.ndarray, n_val: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``n_val`` indices, per class in proportion (largest remainder), chosen at random."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_val / len(labels)
    take = np.floor(quota).astype(np.int64)
    extra = n_val - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


def _group_holdout(groups: np.ndarray, n_val: int, rng: np.random.Generator) -> np.ndarray:
    """Whole groups, in random order, added while that brings the validation size closer to ``n_val``."""
    sizes = np.bincount(groups)
    chosen, total = [], 0
    for g in rng.permutation(len(sizes)):
        if total >= n_val:
            break
        if not chosen or abs(total + sizes[g] - n_val) <= abs(total - n_val):
            chosen.append(g)
            total += sizes[g]
    if len(chosen) == len(sizes):  # keep at least one group for training
        chosen.pop()
    return np.flatnonzero(np.isin(groups, chosen))


def holdout_split(n_or_labels: int | np.ndarray | Sequence, fraction: float, seed: int,
                  groups: np.ndarray | Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation split from a training set: ``(train_idx, val_idx)`` with ``round(fraction * n)``
    validation samples (exactly, unless whole groups make that impossible).

    ``n_or_labels``: a sample count, or the labels (then stratified by class). ``groups`` (e.g. subjects): no group
    on both sides; sizes then match as closely as whole groups allow.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = None if np.ndim(n_or_labels) == 0 else np.asarray(n_or_labels)
    n = int(n_or_labels) if labels is None else len(labels)
    n_val = int(round(fraction * n))
    if not 1 <= n_val < n:
        raise ValueError(f"a fraction of {fraction} of {n} samples leaves an empty train or validation split")
    rng = np.random.default_rng(seed)
    if groups is not None:
        g = _groups(groups, None)
        if len(g) != n:
            raise ValueError(f"groups ({len(g)}) and samples ({n}) differ in length")
        if g.max() < 1:
            raise ValueError("a group-aware holdout needs at least two groups")
        val = _group_holdout(g, n_val, rng)
    elif labels is not None:
        val = _stratified_holdout(labels, n_val, rng)
    else:
        val = rng.choice(n, size=n_val, replace=False)
    mask = np.zeros(n, dtype=bool)
    mask[val] = True
    idx = np.arange(n, dtype=np.int64)
    return idx[~mask], idx[mask]
