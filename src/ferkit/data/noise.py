"""Synthetic label noise (SPEC 2.3, seed 000 §0.3): a fixed fraction of training labels replaced by a random
*different* class, seeded, with the flipped indices returned so noise-robust methods can be scored on detection."""
from __future__ import annotations

import numpy as np

__all__ = ["inject_label_noise"]


def inject_label_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly ``round(rate * N)`` labels, each to a class drawn uniformly among the *other* ``K - 1``.

    Returns ``(noisy_labels, flipped_indices)``: a new int64 array (the input is not modified) and the sorted
    indices that were changed. Deterministic in ``seed``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    rng = np.random.default_rng(seed)
    n_flip = int(round(rate * len(labels)))
    flipped = np.sort(rng.choice(len(labels), size=n_flip, replace=False)).astype(np.int64)
    noisy = labels.astype(np.int64, copy=True)
    # an offset in 1..K-1 added modulo K is a uniform draw among the other classes
    noisy[flipped] = (noisy[flipped] + rng.integers(1, num_classes, size=n_flip)) % num_classes
    return noisy, flipped
