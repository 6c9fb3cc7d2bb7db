"""Training recipe of the RGB + depth network (seed 002 §III-D/E, SPEC 3.6): class-weighted cross-entropy plus
centre and island terms on the features at the exit of the fusion network. The seed's Eq. 5,
L = L_CE(w) + lambda_1 L_C + lambda_2 L_I, "set up with lambda_1 = 1e-2 and lambda_2 = 10", is read with the
island loss's own parametrisation (Cai et al. 2018, the seed's [6], whose settings these are):

    L = L_CE(w) + lambda_1 (L_C + lambda_2 L_I)

with w_c = N / (K n_c) (Eq. 2-3), L_C the centre loss (Eq. 4; mean over the batch instead of the sum, so lambda_1
does not depend on the batch size) and L_I = sum_{j != k} (cos(c_j, c_k) + 1) (Eq. 6 as intended: the seed's
printed denominator ``||c_j|| - ||c_k||`` is a typo for the product of the norms). L_I depends on the centres only,
so the two readings train the network identically; they differ in how hard the centres are pushed apart relative to
being pulled to their class: lambda_2 = 10 relative (Cai) vs 1,000 (lambda_2 / lambda_1 in the literal reading,
where the push all but ignores the classes). Centres learn by their own SGD
(lr alpha = 0.5) on alpha ∂(L_C + lambda_2 L_I)/∂c, independent of lambda_1 (:meth:`ClassCentres.weighted`),
outside the One-Cycle schedule.

Optimisers: the model's ``param_groups()`` (``backbones``, ``fusion``) become one optimiser each, so the One-Cycle
schedule can give them different peaks (``optim.max_lr: {backbones: 1e-4, fusion: 1e-3}``, Table III). Models
without ``param_groups`` train as one ``model`` group, so the recipe works on any ferkit model (it needs
``forward_features`` and ``forward_head``: the losses act on the features, the CE on the logits).

Loss variants of Table VIII: ``loss="ce"`` | ``"centre"`` | ``"island"``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ferkit.losses import CentreLoss, centre_optimizer_spec, pairwise_cosine_penalty
from .base import Method, OptimizerSpec, StepOutput, register_method
from .supervised import class_weights

__all__ = ["RGBDIsland"]

_LOSSES = ("ce", "centre", "island")


@register_method("rgbd")
class RGBDIsland(Method):
    def __init__(self, model: nn.Module, loss: str = "island", lambda_centre: float = 1e-2,
                 lambda_island: float = 10.0, centre_lr: float = 0.5, class_weighted: bool = True,
                 label_smoothing: float = 0.0, backbone_lr: float | None = None):
        super().__init__(model)
        if loss not in _LOSSES:
            raise ValueError(f"method.kwargs.loss: must be one of {', '.join(_LOSSES)}, got {loss!r}")
        for name, value in (("lambda_centre", lambda_centre), ("lambda_island", lambda_island),
                            ("centre_lr", centre_lr)):
            if value < 0:
                raise ValueError(f"method.kwargs.{name}: must be >= 0, got {value}")
        self.loss_kind = loss
        self.lambda_centre, self.lambda_island = lambda_centre, lambda_island
        self.centre_lr = centre_lr
        self.class_weighted, self.label_smoothing = class_weighted, label_smoothing
        self.backbone_lr = backbone_lr
        self.centres = CentreLoss(model.num_classes, model.num_features) if loss != "ce" else None
        self.register_buffer("ce_weight", torch.empty(0), persistent=False)

    def set_epoch_context(self, **info: Any) -> None:
        if self.class_weighted and "class_counts" in info:
            self.ce_weight = class_weights(torch.as_tensor(info["class_counts"]))

    def optimizer_specs(self) -> list[OptimizerSpec]:
        groups = self.model.param_groups() if hasattr(self.model, "param_groups") else \
            {"model": list(self.model.parameters())}
        specs = []
        for name, params in groups.items():
            params = [p for p in params if p.requires_grad]
            overrides = {"lr": self.backbone_lr} if name == "backbones" and self.backbone_lr is not None else {}
            if params:
                specs.append(OptimizerSpec(name, params, overrides=overrides))
        if self.centres is not None:
            specs.append(centre_optimizer_spec(self.centres, lr=self.centre_lr))
        return specs

    def training_step(self, batch: dict[str, Any], ctx) -> StepOutput:
        extra = {"depth": batch["depth"]} if "depth" in batch else {}
        feat = self.model.forward_features(batch["image"], **extra)  # (B, D): exit of the fusion network
        logits = self.model.forward_head(feat)
        labels = batch["label"]
        weight = self.ce_weight.to(logits.device) if self.ce_weight.numel() else None
        ce = F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=self.label_smoothing)
        loss, logs = ce, {"ce": ce.detach()}
        if self.centres is not None:
            centres = self.centres.weighted(self.lambda_centre)
            centre_terms = centre = self.centres.centre_distance(feat, labels, centres=centres)  # Eq. 4
            logs["centre"] = centre.detach()
            if self.loss_kind == "island":
                island = pairwise_cosine_penalty(centres)  # Eq. 6
                centre_terms = centre + self.lambda_island * island  # the island loss (Cai et al.)
                logs["island"] = island.detach()
            loss = loss + self.lambda_centre * centre_terms
        return StepOutput(loss=loss, logits=logits, logs=logs)
