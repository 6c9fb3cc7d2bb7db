"""Evaluation: predictions, probabilities and features over a loader; metrics over the whole set and named subsets
(occlusion / pose tables like DSAN Table 4); optional horizontal-flip test-time augmentation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import DistInfo, all_gather_cat
from .metrics import classification_metrics

__all__ = ["Predictions", "predict_loader", "evaluate_predictions", "subset_table", "model_inputs", "ClassSelect"]


@dataclass
class Predictions:
    indices: np.ndarray
    labels: np.ndarray
    probs: np.ndarray  # (N, K)
    features: np.ndarray | None = None  # (N, D) penultimate features when asked for
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)


class ClassSelect(nn.Module):
    """A classifier whose outputs are taken in another order or subset: ``index[j]`` is the model output that becomes
    class ``j`` (cross-dataset evaluation: a 7-class model scored in a test set's own class order)."""

    def __init__(self, model: nn.Module, index: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self.model(x, **extra).index_select(1, self.index.to(x.device))


def model_inputs(batch: dict[str, torch.Tensor], model: nn.Module | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The image plus the extra modalities a model takes as keyword arguments (RGB-D: ``depth``); given ``model``,
    only those its registry entry declares (an RGB model on the RGB-D synthetic set gets no depth)."""
    keys: tuple[str, ...] = ("depth",)
    if getattr(model, "model_name", None):
        from ferkit.models import model_info

        keys = tuple(k for k in keys if k in model_info(model.model_name).modalities)
    extra = {k: batch[k] for k in keys if k in batch}
    return batch["image"], extra


def _forward(model: nn.Module, x: torch.Tensor, extra: dict, flip_tta: bool) -> torch.Tensor:
    probs = model(x, **extra).float().softmax(1)
    if flip_tta:
        flipped = {k: v.flip(-1) for k, v in extra.items()}
        probs = (probs + model(x.flip(-1), **flipped).float().softmax(1)) / 2
    return probs


@torch.no_grad()
def predict_loader(model: nn.Module, loader, device: torch.device, *, flip_tta: bool = False,
                   with_features: bool = False, amp_dtype: torch.dtype | None = None,
                   dist_info: DistInfo | None = None) -> Predictions:
    was_training = model.training
    model.eval()
    idx, labels, probs, feats = [], [], [], []
    for batch in loader:
        x, extra = model_inputs({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                                 for k, v in batch.items()}, model)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            probs.append(_forward(model, x, extra, flip_tta).cpu())
            if with_features and hasattr(model, "forward_features"):
                feats.append(model.forward_features(x, **extra).float().cpu())
        labels.append(torch.as_tensor(batch["label"]))
        idx.append(torch.as_tensor(batch["index"]))
    model.train(was_training)
    out = Predictions(torch.cat(idx).numpy(), torch.cat(labels).numpy(), torch.cat(probs).numpy(),
                      torch.cat(feats).numpy() if feats else None)
    return out


def evaluate_predictions(pred: Predictions, num_classes: int, subsets: dict[str, np.ndarray] | None = None) -> dict:
    """Metrics for the whole set and, per named subset mask (indexed by dataset index), WA / UA / n."""
    result = classification_metrics(pred.labels, pred.preds, num_classes)
    if subsets:
        table = {}
        for name, mask in subsets.items():
            sel = np.asarray(mask, dtype=bool)[pred.indices]
            if sel.any():
                m = classification_metrics(pred.labels[sel], pred.preds[sel], num_classes)
                table[name] = {"n": m["n"], "wa": m["wa"], "ua": m["ua"]}
        result["subsets"] = table
    return result


def subset_table(metrics: dict) -> str:
    """Markdown table of subset accuracies (DSAN Table 4 layout)."""
    rows = metrics.get("subsets") or {}
    if not rows:
        return ""
    lines = ["| subset | n | WA % | UA % |", "|---|---:|---:|---:|",
             f"| all | {metrics['n']} | {100 * metrics['wa']:.2f} | {100 * metrics['ua']:.2f} |"]
    lines += [f"| {k} | {v['n']} | {100 * v['wa']:.2f} | {100 * v['ua']:.2f} |" for k, v in rows.items()]
    return "\n".join(lines)
