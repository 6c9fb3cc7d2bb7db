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
    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, class_weighted: bool = False):
        super().__init__(model)
        self.label_smoothing = label_smoothing
        self.class_weighted = class_weighted
        self.register_buffer("ce_weight", torch.empty(0), persistent=False)

    def set_epoch_context(self, **info: Any) -> None:
        if self.class_weighted and "class_counts" in info:
            self.ce_weight = class_weights(torch.as_tensor(info["class_counts"]))

    def training_step(self, batch: dict[str, Any], ctx) -> StepOutput:
        logits = self.model(batch["image"])
        weight = self.ce_weight.to(logits.device) if self.ce_weight.numel() else None
        loss = F.cross_entropy(logits, batch["label"], weight=weight, label_smoothing=self.label_smoothing)
        return StepOutput(loss=loss, logits=logits, logs={"ce": loss.detach()})
