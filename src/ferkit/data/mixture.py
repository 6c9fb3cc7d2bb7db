"""Several benchmarks as one dataset (``data.dataset: mixture``), in one label space.

Each part is a dataset of its own (any adapter, its root, options and split names); labels go through
:func:`ferkit.labels.label_map` into ``classes`` (a label space name such as ``fer2013``, or a list of names), and a
part's samples whose class the target space lacks (FERPlus contempt in a 7-class space) are left out and counted. A
part without the asked split (``splits: {train: train}`` only) takes no part in it. Example (the built-in model)::

    data:
      dataset: mixture
      options:
        classes: fer2013
        parts:
          - {dataset: rafdb, root: ../shared/data/rafdb, splits: {train: train, test: test}}
          - {dataset: fer2013, root: ../shared/data/fer2013, splits: {train: train, val: val}}
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..labels import LABEL_SPACES, label_map
from .base import DataError, FaceDataset

__all__ = ["Mixture", "build_mixture"]

_PART_KEYS = {"dataset", "root", "splits", "options"}


class Mixture(FaceDataset):
    """The records of ``parts`` in order, labels mapped into ``class_names``."""

    name = "mixture"

    def __init__(self, parts: Sequence[FaceDataset], class_names: Sequence[str], split: str):
        self.parts = list(parts)
        self.maps = [label_map(p.class_names, class_names) for p in self.parts]
        self.index: list[tuple[int, int]] = []  # (part, index in part)
        records = []
        self.dropped: dict[str, int] = {}
        for k, (part, mapping) in enumerate(zip(self.parts, self.maps)):
            for i, r in enumerate(part.records):
                if r.label not in mapping:
                    key = f"{part.name}: {part.class_names[r.label]} (not in the target classes)"
                    self.dropped[key] = self.dropped.get(key, 0) + 1
                    continue
                self.index.append((k, i))
                records.append(replace(r, label=mapping[r.label], meta={**r.meta, "part": part.name}))
        if not records:
            raise DataError(f"mixture: no samples for split {split!r}")
        super().__init__(records, class_names, split=split, skipped=[s for p in self.parts for s in p.skipped])

    def load(self, index: int) -> dict[str, Any]:
        k, i = self.index[index]
        sample = self.parts[k].load(i)
        sample["label"], sample["index"] = self.maps[k][sample["label"]], index
        return sample

    def subsets(self) -> dict[str, np.ndarray]:
        """One mask per part (``part=rafdb``), so a run reports each benchmark inside the mixture."""
        names = self.meta_column("part")
        return {f"part={p.name}": names == p.name for p in self.parts} if len(self.parts) > 1 else {}

    def describe(self) -> str:
        text = super().describe() + " from " + ", ".join(f"{p.name}[{p.split}] {len(p)}" for p in self.parts)
        if self.dropped:
            text += ", dropped " + ", ".join(f"{n} {reason}" for reason, n in self.dropped.items())
        return text


def _target_classes(classes: str | Sequence[str]) -> list[str]:
    if isinstance(classes, str):
        if classes not in LABEL_SPACES:
            raise DataError(f"mixture: classes {classes!r} is not a label space; known: {', '.join(LABEL_SPACES)}")
        return list(LABEL_SPACES[classes])
    return list(classes)


def build_mixture(parts: Sequence[Mapping[str, Any]], classes: str | Sequence[str], split: str, *,
                  skip_bad: bool = False, build=None) -> Mixture:
    """``build(dataset, root, split, skip_bad, options) -> FaceDataset`` makes each part (default: the adapters)."""
    if build is None:
        from .adapters import build_dataset as adapter

        def build(dataset, root, part_split, bad, options):
            return adapter(dataset, root, part_split, skip_bad=bad, **options)
    if not parts:
        raise DataError("data.options.parts: a mixture needs at least one part")
    made = []
    for n, spec in enumerate(parts):
        where = f"data.options.parts[{n}]"
        if not isinstance(spec, Mapping) or "dataset" not in spec:
            raise DataError(f"{where}: must be a mapping with at least 'dataset' (and root, splits, options)")
        unknown = set(spec) - _PART_KEYS
        if unknown:
            raise DataError(f"{where}: unknown key {sorted(unknown)[0]!r}; keys: {', '.join(sorted(_PART_KEYS))}")
        splits = dict(spec.get("splits") or {"train": "train", "test": "test"})
        if split not in splits:
            continue
        root = spec.get("root")
        made.append(build(spec["dataset"], Path(root) if root else None, splits[split], skip_bad,
                          dict(spec.get("options") or {})))
    if not made:
        raise DataError(f"data.options.parts: no part has a {split!r} split")
    return Mixture(made, _target_classes(classes), split)
