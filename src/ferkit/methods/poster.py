"""POSTER's training recipe (seed 004 §3.3; official zczcwh/POSTER ``train.py``; SPEC 3.4).

* Loss: CE + 2 x label-smoothing CE with epsilon 0.2. The official ``LabelSmoothingCrossEntropy`` is
  (1 - eps) NLL + eps * mean_k(-log p_k), exactly ``F.cross_entropy(label_smoothing=eps)``.
* Optimiser: SAM over Adam (rho 0.05) — ``optim.name: sam_adam`` (pytorch-optimizer's ``SAM``), ExponentialLR 0.98.
  One step = loss and gradients at w, SAM's ``first_step`` climbs to w + e(w), loss and gradients again there (the
  closure), ``second_step`` returns to w and lets Adam apply the second gradients. With a non-SAM optimiser
  (ablations) the step is the plain single pass.

Backbone initialisation (the official run starts from face.evoLVe ``ir50.pth`` and pytorch_face_landmark
``mobilefacenet_model_best.pth.tar``) is part of this recipe, so the two files are method options:
``method.kwargs.image_weights`` / ``method.kwargs.landmark_weights``. They are read once when the method is built
(never in the model constructor); a resumed run then overwrites them with its saved state. The landmark file may
also be a ``ferkit landmarks pretrain`` checkpoint (the fallback when the official weights are not at hand,
SPEC 3.4). A full POSTER checkpoint goes through ``model.pretrained`` instead; giving both is refused.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, StepOutput, register_method

__all__ = ["PosterMethod", "poster_loss"]

_logger = logging.getLogger(__name__)


def poster_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.2,
                smooth_weight: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE + ``smooth_weight`` x label-smoothing CE (official train.py: ``2 * lsce_loss + CE_loss``).
    Returns (total, ce, lsce)."""
    ce = F.cross_entropy(logits, target)
    lsce = F.cross_entropy(logits, target, label_smoothing=smoothing)
    return ce + smooth_weight * lsce, ce, lsce


@register_method("poster")
class PosterMethod(Method):
    """SAM two-pass training of POSTER (or any classifier) with CE + 2 x label-smoothing CE."""

    manual_optimization = True

    def __init__(self, model: nn.Module, smoothing: float = 0.2, smooth_weight: float = 2.0,
                 image_weights: str | None = None, landmark_weights: str | None = None,
                 strict_backbones: bool = True):
        super().__init__(model)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"method.kwargs.smoothing: must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing
        self.smooth_weight = smooth_weight
        if image_weights or landmark_weights:
            self._load_backbones(image_weights, landmark_weights, strict_backbones)

    def _load_backbones(self, image_weights: str | None, landmark_weights: str | None, strict: bool) -> None:
        from ferkit.models.poster import Poster, load_backbones

        if not isinstance(self.model, Poster):
            raise ValueError("method.kwargs.image_weights / landmark_weights: only POSTER models have these streams")
        for key, path in (("image_weights", image_weights), ("landmark_weights", landmark_weights)):
            if path and not Path(path).is_file():
                from ferkit.config import ConfigError

                raise ConfigError(f"method.kwargs.{key}: file not found: {path}")
        if getattr(self.model, "key_report", None) is not None:
            raise ValueError("model.pretrained already loaded a full checkpoint; do not also give backbone files "
                             "(method.kwargs.image_weights / landmark_weights)")
        for stream, report in load_backbones(self.model, image_weights, landmark_weights, strict=strict).items():
            path = image_weights if stream == "image" else landmark_weights
            _logger.info("POSTER %s stream <- %s: %s", stream, Path(path).name, report)

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(batch["image"])  # (B, K)
        total, ce, lsce = poster_loss(logits, batch["label"], self.smoothing, self.smooth_weight)
        return total, logits, {"ce": ce.detach(), "lsce": lsce.detach()}

    def training_step(self, batch: dict[str, Any], ctx) -> StepOutput:
        loss, logits, logs = self._loss(batch)  # at w
        ctx.backward(loss)
        if hasattr(ctx.optimizer("model"), "first_step"):  # SAM: perturb, recompute, restore, update
            def closure() -> torch.Tensor:
                loss_adv, _, _ = self._loss(batch)  # at w + e(w)
                ctx.backward(loss_adv)
                logs["sam_loss"] = loss_adv.detach()
                return loss_adv

            ctx.optimizer_step(closure)
        else:
            ctx.optimizer_step()
        return StepOutput(loss=loss.detach(), logits=logits.detach(), logs=logs)
