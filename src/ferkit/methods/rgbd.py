"""Training recipe of the RGB + depth network (seed 002 §III-D/E, SPEC 3.6): class-weighted cross-entropy plus
centre and island terms on the features at the exit of the fusion network, "set up with lambda_1 = 1e-2 and
lambda_2 = 10". Two readings, ``eq5``:

* ``"paper"`` (default; SPEC): Eq. 5 as printed, L = L_CE(w) + lambda_1 L_C + lambda_2 L_I, with Eq. 2's weighted CE
  averaged over N (w_c = N / (K n_c), Eq. 3), Eq. 4's centre loss summed over the batch, 1/2 sum_i ||x_i - c_yi||^2
  (the printed norm is read squared, as the centre loss of Wen et al. that it cites), and L_I = sum_{j != k}
  (cos(c_j, c_k) + 1) (Eq. 6; the printed denominator ``||c_j|| - ||c_k||`` is a typo for the product of the norms).
  Centres learn by their own SGD (lr alpha = 0.5) on the plain gradient of L: the push (lambda_2 = 10) is 1,000 times
  the pull (lambda_1 = 0.01).
* ``"cai"``: the island loss's own parametrisation (Cai et al. 2018, the seed's [6], whose settings these values are),
  L = L_CE(w) + lambda_1 (L_C + lambda_2 L_I), with torch's weighted-mean CE (divided by sum_i w_yi) and the centre loss
  averaged over the batch (lambda_1 independent of the batch size); centres step on alpha d(L_C + lambda_2 L_I)/dc,
  independent of lambda_1 (:meth:`ClassCentres.weighted`): push 10 times the pull. L_I depends on the centres only,
  so the readings differ for the network only by the CE normalisation and the centre loss's scale.

Optimisers: the model's ``param_groups()`` (``backbones``, ``fusion``) become one optimiser each, so the One-Cycle
schedule can give them different peaks (``optim.max_lr: {backbones: 1e-4, fusion: 1e-3}``, Table III). Models
without ``param_groups`` train as one ``model`` group, so the recipe works on any ferkit model (it needs
``forward_features`` and ``forward_head``: the losses act on the features, the CE on the logits).

Loss variants of Table VIII: ``loss="ce"`` | ``"centre"`` | ``"island"``.
"""
from __future__ import annotations

from typing import Any, Literal

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
                 label_smoothing: float = 0.0, backbone_lr: float | None = None,
                 eq5: Literal["paper", "cai"] = "paper"):
        super().__init__(model)
        if eq5 not in ("paper", "cai"):
            raise ValueError(f"method.kwargs.eq5: 'paper' or 'cai', got {eq5!r}")
        self.eq5 = eq5
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
        ce = self._cross_entropy(logits, labels, weight)
        loss, logs = ce, {"ce": ce.detach()}
        if self.centres is None:
            return StepOutput(loss=loss, logits=logits, logs=logs)
        paper = self.eq5 == "paper"
        centres = self.centres.centres if paper else self.centres.weighted(self.lambda_centre)
        centre = self.centres.centre_distance(feat, labels, centres=centres)  # (1/2N) sum ||x_i - c_yi||^2
        centre = centre * len(labels) if paper else centre  # Eq. 4 sums over the batch; cai: batch mean
        logs["centre"] = centre.detach()
        island = pairwise_cosine_penalty(centres) if self.loss_kind == "island" else None  # Eq. 6
        if island is not None:
            logs["island"] = island.detach()
        if paper:  # Eq. 5: L_CE + lambda_1 L_C + lambda_2 L_I
            loss = loss + self.lambda_centre * centre + (self.lambda_island * island if island is not None else 0)
        else:  # Cai et al.: L_CE + lambda_1 (L_C + lambda_2 L_I)
            loss = loss + self.lambda_centre * (centre + (self.lambda_island * island if island is not None else 0))
        return StepOutput(loss=loss, logits=logits, logs=logs)

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Eq. 2 (``paper``): -(1/N) sum_i w_yi log p_i,yi; ``cai``: torch's weighted mean (divided by sum_i w_yi)."""
        if self.eq5 == "cai" or weight is None:
            return F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=self.label_smoothing)
        per_sample = F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=self.label_smoothing,
                                     reduction="none")
        return per_sample.mean()
