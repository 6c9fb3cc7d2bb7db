"""Plain supervised training: cross-entropy with optional class weights and label smoothing (SPEC 2.3)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, StepOutput, register_method

__all__ = ["Supervised", "class_weights"]


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """w_c = N / (K n_c) (SPEC 2.3); empty classes get weight 0."""
    counts = counts.float()
    w = counts.sum() / (len(counts) * counts.clamp_min(1))
    return torch.where(counts > 0, w, torch.zeros_like(w))


@register_method("supervised")
class Supervised(Method):
    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, class_weighted: bool = False,
                 soft_targets: bool = False):
        """``soft_targets``: cross-entropy against the sample's label distribution (``batch["soft_label"]``, e.g.
        FERPlus's probability mode, Barsoum et al. 2016) instead of its hard label."""
        super().__init__(model)
        self.label_smoothing = label_smoothing
        self.class_weighted = class_weighted
        self.soft_targets = soft_targets
        self.register_buffer("ce_weight", torch.empty(0), persistent=False)

    def set_epoch_context(self, **info: Any) -> None:
        if self.class_weighted and "class_counts" in info:
            self.ce_weight = class_weights(torch.as_tensor(info["class_counts"]))

    def training_step(self, batch: dict[str, Any], ctx) -> StepOutput:
        logits = self.model(batch["image"])
        weight = self.ce_weight.to(logits.device) if self.ce_weight.numel() else None
        loss = F.cross_entropy(logits, self._target(batch, logits), weight=weight, label_smoothing=self.label_smoothing)
        return StepOutput(loss=loss, logits=logits, logs={"ce": loss.detach()})

    def _target(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
        if not self.soft_targets:
            return batch["label"]
        if "soft_label" not in batch:
            raise ValueError("method.kwargs.soft_targets: the dataset gives no soft labels (FERPlus with "
                             "data.options.label_mode=probability does)")
        return batch["soft_label"].to(device=logits.device, dtype=torch.float32)
