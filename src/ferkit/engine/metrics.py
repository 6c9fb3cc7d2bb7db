"""Classification metrics of the FER papers: WA (overall accuracy), UA (mean per-class recall), macro-F1,
per-class accuracy, confusion matrix (counts and row-normalised)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

__all__ = ["classification_metrics", "normalize_confusion"]


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if len(labels) == 0:
        return {"n": 0, "wa": float("nan"), "ua": float("nan"), "f1": float("nan"),
                "per_class": [float("nan")] * num_classes, "confusion": np.zeros((num_classes,) * 2, int).tolist()}
    cm = confusion_matrix(labels, preds, labels=list(range(num_classes)))
    support = cm.sum(axis=1)
    per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    present = np.unique(labels)
    return {
        "n": int(len(labels)),
        "wa": float((labels == preds).mean()),
        "ua": float(np.nanmean(per_class)),  # over classes present in the evaluated set
        "f1": float(f1_score(labels, preds, labels=present, average="macro", zero_division=0)),
        "per_class": [None if np.isnan(x) else float(x) for x in per_class],
        "confusion": cm.tolist(),
    }


def normalize_confusion(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm, dtype=np.float64)
    return cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
