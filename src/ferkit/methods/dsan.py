"""DSAN training (seed 001 §3.2-3.4): L = α L_FR + (1 - α) L_CE (Eq. 11), with the feature-recalibration loss
L_FR = L_FR_CE + λ1 L_FR_C + λ2 L_CCS (Eq. 6) on GFE-AN and CE on MFF-AN.

* L_FR_CE (Eq. 3): CE of GFE-AN's classifier on the recalibrated feature a ⊗ v^h1.
* L_FR_C (Eq. 4): (1/2N) Σ_i Σ_j a'_ij (a_ij v^h1_ij - c_{y_i, j})², a' = a (DACL's sparse centre loss on the
  recalibrated feature) — :meth:`ferkit.losses.ClassCentres.centre_distance` with ``weights = a``.
* L_CCS (Eq. 5): Σ_{i≠j} (cos(c_i, c_j) + 1) — :func:`ferkit.losses.pairwise_cosine_penalty`.
* The class centres c ∈ R^{K×d} are learnable loss state of this method (checkpointed with it) and learn by their own
  SGD, lr 0.5 (DACL practice, SPEC 3.2), via :func:`ferkit.losses.centre_optimizer_spec`, with a step that does not
  shrink with λ1 (:meth:`ferkit.losses.ClassCentres.weighted`; with λ1 = 0.01 and a plain gradient the centres stayed
  at their random start). ``centre_warmup_epochs`` ramps FR_C's gradient on the network in over the first epochs:
  from a random trunk, FR_C is lowest with the attention switched off, and it won over the still-flat CE (a
  from-scratch DSAN stayed at chance; the from-scratch presets also lower the lr, see ``dsan_synthetic``).

Optimisation (``optimisation``): ``"paper"`` is §4.2's split — the first branch (GFE-AN's HFE1 and SA, trained with
L_FR and L_CCS) and the class centres by SGD (lr 0.9, momentum 0.9, weight decay 1e-4, the paper's values), the rest
(trunk, MFF-AN and both classifiers) by the config's optimiser (Adam 1e-3 in the paper presets); the centres take the
plain gradient of Eq. 6. ``"ferkit"`` (the default; the from-scratch and CPU-scale presets) puts every network weight
on the config's optimiser and only the centres on their own SGD (``centre_lr``, no momentum, no weight decay, step
independent of λ1, see above). The paper presets (``dsan_rafdb`` and its children) use ``"paper"``.

Table 5's loss variants are ``loss_variant`` (see :data:`LOSS_VARIANTS`): with SA off (a ≡ 1) Eq. 7 reduces L_FR to
CE, centre loss and island loss. :data:`ABLATIONS` names every ablation row of Tables 5-7 and Figs. 6, 8, 9 as config
overrides. ``on_train_epoch_end`` logs P(a_ij = 0) over the epoch's training samples (Fig. 10).
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ferkit.losses import ClassCentres, centre_optimizer_spec, pairwise_cosine_penalty, scale_gradient
from ferkit.models.dsan import DSAN, DSANOutput
from .base import Method, OptimizerSpec, StepOutput, register_method

__all__ = ["DSANMethod", "LOSS_VARIANTS", "ABLATIONS", "ablation_overrides"]

# Table 5 rows: name -> (SA in the model, L_FR_C on, L_CCS on). Without SA, a ≡ 1 and Eq. 7 applies.
LOSS_VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "ce": (False, False, False),  # L_CE
    "centre": (False, True, False),  # L_C  = CE + λ1 centre loss
    "island": (False, True, True),  # L_I  = CE + λ1 (centre loss + (λ2/λ1) Σ (cos + 1))
    "fr_ce": (True, False, False),  # L_FR_CE
    "fr_ce+fr_c": (True, True, False),  # L_FR_CE + λ1 L_FR_C
    "fr": (True, True, True),  # L_FR (Eq. 6), the paper's loss
}


def _rows() -> dict[str, dict[str, dict[str, Any]]]:
    """Every ablation row as ``{"model": kwargs, "method": kwargs}`` on top of a dsan preset."""
    gfe_only, mff_only = {"alpha": 1.0}, {"alpha": 0.0}
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for name, (sa, _, _) in LOSS_VARIANTS.items():  # Table 5: GFE-AN alone (its last row = Table 6 row 3)
        rows[f"table5.{name}"] = {"model": {**gfe_only, "sa": sa}, "method": {"loss_variant": name}}
    table6 = [  # (HFE1, SA, HFE2, LFA); rows without SA train GFE-AN with CE (Table 6 row 2 = Table 5 row 1)
        (False, False, False, False), (True, False, False, False), (True, True, False, False),
        (False, False, True, False), (False, False, True, True), (True, False, True, False),
        (True, False, True, True), (True, True, True, False), (True, True, True, True)]
    for i, (hfe1, sa, hfe2, lfa) in enumerate(table6, 1):
        gfe, mff = hfe1 or sa, hfe2 or lfa
        model = {"hfe1": hfe1, "sa": sa, "hfe2": hfe2, "lfa": lfa}
        if not mff:  # row 1 is the max-pooled ResNet-18 baseline: GFE-AN with nothing but its classifier
            model.update(gfe_only)
        elif not gfe:
            model.update(mff_only)
        rows[f"table6.row{i}"] = {"model": model, "method": {"loss_variant": "fr" if sa else "ce"}}
    rows["table7.layers1_r1"] = {"model": {**gfe_only, "sa_layers": 1, "reduction": 1}, "method": {}}
    for r in range(1, 7):  # Table 7 is measured on GFE-AN (its r = 2 row = Table 6 row 3)
        rows[f"table7.layers2_r{r}"] = {"model": {**gfe_only, "sa_layers": 2, "reduction": r}, "method": {}}
    for lam in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1):  # Fig. 6a: λ1 sweep at λ2 = 0.01 (GFE-AN)
        rows[f"fig6.lambda1_{lam:g}"] = {"model": dict(gfe_only), "method": {"lambda1": lam, "lambda2": 0.01}}
    for lam in (0.0, 1e-3, 1e-2, 1e-1, 1.0):  # Fig. 6b: λ2 sweep at λ1 = 0.01
        rows[f"fig6.lambda2_{lam:g}"] = {"model": dict(gfe_only), "method": {"lambda1": 0.01, "lambda2": lam}}
    for f in (1, 2, 4, 8, 16, 32):  # Fig. 8: number of local features F (d = C/F)
        rows[f"fig8.F{f}"] = {"model": {"num_local": f}, "method": {}}
    for a10 in range(11):  # Fig. 9: α from 0 (MFF-AN) to 1 (GFE-AN)
        rows[f"fig9.alpha{a10 / 10:.1f}"] = {"model": {"alpha": a10 / 10}, "method": {}}
    return rows


ABLATIONS: dict[str, dict[str, dict[str, Any]]] = _rows()


def ablation_overrides(row: str) -> list[str]:
    """Config overrides for one ablation row, e.g. ``ferkit train --config dsan_rafdb $(...)``."""
    if row not in ABLATIONS:
        raise KeyError(f"unknown DSAN ablation {row!r}; known: {', '.join(ABLATIONS)}")
    spec = ABLATIONS[row]
    return [f"{part}.kwargs.{k}={_yaml_scalar(v)}" for part in ("model", "method") for k, v in spec[part].items()]


def _yaml_scalar(v: Any) -> str:
    """A value as YAML reads it back (PyYAML takes ``1e-05`` for a string, ``0.00001`` for a float)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return np.format_float_positional(v, trim="0")
    return str(v)


@register_method("dsan")
class DSANMethod(Method):
    """Owns the DSAN model and its class centres; one step = one forward of both streams and Eq. 11."""

    def __init__(self, model: nn.Module, lambda1: float = 0.01, lambda2: float = 0.01, centre_lr: float = 0.5,
                 loss_variant: str = "fr", label_smoothing: float = 0.0, centre_warmup_epochs: int = 0,
                 optimisation: Literal["ferkit", "paper"] = "ferkit", sgd_lr: float = 0.9, sgd_momentum: float = 0.9,
                 sgd_weight_decay: float = 1e-4):
        super().__init__(model)
        if optimisation not in ("ferkit", "paper"):
            raise ValueError(f"method.kwargs.optimisation: 'ferkit' or 'paper', got {optimisation!r}")
        self.optimisation = optimisation
        self.sgd = {"lr": sgd_lr, "momentum": sgd_momentum, "weight_decay": sgd_weight_decay}  # §4.2, paper split
        if not isinstance(model, DSAN):
            raise ValueError(f"method dsan: needs model.name=dsan, got {type(model).__name__}")
        if loss_variant not in LOSS_VARIANTS:
            raise ValueError(f"method.kwargs.loss_variant: unknown {loss_variant!r}; known: {', '.join(LOSS_VARIANTS)}")
        if min(lambda1, lambda2) < 0:
            raise ValueError(f"method.kwargs.lambda1 / lambda2: must be >= 0, got {lambda1!r} / {lambda2!r}")
        gfe = model.gfe_an
        needs_sa, centre_on, ccs_on = LOSS_VARIANTS[loss_variant]
        if gfe is not None and needs_sa != (gfe.sa is not None):
            raise ValueError(f"method.kwargs.loss_variant={loss_variant} needs model.kwargs.sa={str(needs_sa).lower()}")
        self.lambda1 = lambda1 if centre_on else 0.0
        self.lambda2 = lambda2 if ccs_on else 0.0
        if centre_warmup_epochs < 0:
            raise ValueError(f"method.kwargs.centre_warmup_epochs: must be >= 0, got {centre_warmup_epochs!r}")
        self.centre_lr = centre_lr
        self.label_smoothing = label_smoothing
        self.centre_warmup_epochs = centre_warmup_epochs
        self._centre_ramp = 1.0
        uses_centres = gfe is not None and (self.lambda1 > 0 or self.lambda2 > 0)
        self.centres = ClassCentres(model.num_classes, gfe.dim) if uses_centres else None
        self._zero = self._total = 0.0

    def optimizer_specs(self) -> list[OptimizerSpec]:
        if self.optimisation == "paper":
            return self._paper_specs()
        specs = [OptimizerSpec("model", [p for p in self.model.parameters() if p.requires_grad])]
        if self.centres is not None:
            specs.append(centre_optimizer_spec(self.centres, lr=self.centre_lr))
        return specs

    def _paper_specs(self) -> list[OptimizerSpec]:
        """§4.2: "the first branch with L_FR and L_CCS using SGD" (GFE-AN without its classifier, and the centres),
        "the second branch and the two classifiers ... using Adam" (the config's optimiser; the trunk too)."""
        gfe = self.model.gfe_an
        first = [p for n, p in gfe.named_parameters() if not n.startswith("fc.")] if gfe is not None else []
        first += list(self.centres.parameters()) if self.centres is not None else []
        taken = {id(p) for p in first}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in taken]
        specs = [OptimizerSpec("model", rest)]
        if first:
            specs.append(OptimizerSpec("first_branch", [p for p in first if p.requires_grad], kind="sgd",
                                       overrides=dict(self.sgd)))
        return specs

    def feature_recalibration_loss(self, out: DSANOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_FR and its terms (Eqs. 3-6); with SA off, a ≡ 1 (Eq. 7). During the centre warm-up the network feels
        FR_C's gradient scaled by the ramp (the loss value and the centres' step stay those of Eq. 6)."""
        terms = {"fr_ce": F.cross_entropy(out.gfe_logits, labels, label_smoothing=self.label_smoothing)}  # Eq. 3
        fr = terms["fr_ce"]
        if self.centres is not None:
            # ferkit: the centres step by α ∂(FR_C + λ2/λ1 CCS)/∂c; paper: the plain gradient of Eq. 6
            centres = self.centres.weighted(self.lambda1) if self.optimisation == "ferkit" else self.centres.centres
            feature, attention = out.gfe_feature, out.attention
            if self._centre_ramp < 1.0:
                feature = scale_gradient(feature, self._centre_ramp)
                attention = None if attention is None else scale_gradient(attention, self._centre_ramp)
            terms["fr_c"] = self.centres.centre_distance(feature, labels, attention, centres)  # Eq. 4
            terms["ccs"] = pairwise_cosine_penalty(centres)  # Eq. 5
            fr = fr + self.lambda1 * terms["fr_c"] + self.lambda2 * terms["ccs"]  # Eq. 6
        terms["fr"] = fr
        return terms

    def training_step(self, batch: dict[str, Any], ctx) -> StepOutput:
        labels = batch["label"]
        out = self.model.forward_branches(batch["image"])
        alpha = self.model.alpha
        logs: dict[str, torch.Tensor] = {}
        loss = out.logits.new_zeros(())
        if out.gfe_logits is not None:
            fr_terms = self.feature_recalibration_loss(out, labels)
            logs.update(fr_terms)
            loss = loss + alpha * fr_terms["fr"]
        if out.mff_logits is not None:
            logs["mff_ce"] = F.cross_entropy(out.mff_logits, labels, label_smoothing=self.label_smoothing)
            loss = loss + (1 - alpha) * logs["mff_ce"]  # Eq. 11
        if out.attention is not None:
            self._zero = self._zero + (out.attention.detach() == 0).sum()  # stays on device: no sync per step
            self._total += out.attention.numel()
        return StepOutput(loss=loss, logits=out.logits, logs={k: v.detach() for k, v in logs.items()})

    def on_train_epoch_start(self, epoch: int) -> None:
        self._zero = self._total = 0.0
        # linear ramp over the warm-up epochs: 0, 1/w, 2/w, ... then 1
        self._centre_ramp = min(1.0, epoch / self.centre_warmup_epochs) if self.centre_warmup_epochs else 1.0

    def on_train_epoch_end(self, epoch: int) -> dict[str, float]:
        """P(a_ij = 0) over the epoch's training samples (Fig. 10); absent when SA is off."""
        return {"p_a_zero": float(self._zero) / self._total} if self._total else {}
