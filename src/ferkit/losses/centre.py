"""Class-centre losses, shared by DSAN (FR_C + CCS, seed 001 Eqs. 4-5) and the RGB-D network (centre / island loss,
seed 002, after Wen et al. 2016 and Cai et al. 2018).

Centres are parameters of the loss module (so they are checkpointed with the method) and learn through their own
optimiser: SGD, lr 0.5, no weight decay (DACL practice) — see :func:`centre_optimizer_spec`.

The centres' step does not depend on the weight λ the centre term has in the network's loss: Wen et al. update
c_j <- c_j - α Δc_j with Δc_j = ∂L_C/∂c_j, not ∂(λ L_C)/∂c_j (common centre-loss code divides the centres' gradient
by λ before their SGD step). :meth:`ClassCentres.weighted` does that inside the graph, so it holds under DDP, AMP and
SAM without the engine knowing. Without it, λ = 0.01 and lr 0.5 move a centre at most 0.5 % of the way to its class
per step: the centres stay at their random start, and a term that pulls features towards random points is lowest
with the features switched off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ferkit.methods.base import OptimizerSpec

__all__ = ["ClassCentres", "CentreLoss", "IslandLoss", "pairwise_cosine_penalty", "centre_optimizer_spec",
           "scale_gradient"]


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass."""
    return x.detach() + scale * (x - x.detach())


def pairwise_cosine_penalty(centres: torch.Tensor) -> torch.Tensor:
    """sum_{i != j} (cos(c_i, c_j) + 1): pushes class centres apart (island loss; DSAN's CCS, Eq. 5)."""
    c = F.normalize(centres, dim=1)
    cos = c @ c.t()
    off_diag = ~torch.eye(len(c), dtype=torch.bool, device=c.device)
    return (cos[off_diag] + 1).sum()


class ClassCentres(nn.Module):
    """K learnable centres in R^D with the (weighted) centre distance used by every centre-style loss."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(num_classes, dim))

    def weighted(self, lam: float) -> torch.Tensor:
        """The centres as they enter a term weighted by ``lam`` in the loss: same values, gradient scaled by 1 / lam,
        so their SGD step is α ∂L/∂c whatever lam is (Wen et al.'s update; see the module note)."""
        return scale_gradient(self.centres, 1.0 / lam) if lam > 0 else self.centres

    def centre_distance(self, feat: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                        centres: torch.Tensor | None = None) -> torch.Tensor:
        """(1 / 2N) sum_i sum_j w_ij (f_ij - c_{y_i, j})^2; ``weights`` None means w = 1 (plain centre loss);
        ``centres`` defaults to this module's (pass :meth:`weighted` for a λ-independent centre step)."""
        centres = self.centres if centres is None else centres
        sq = (feat.float() - centres[labels].float()).pow(2)  # (N, D)
        if weights is not None:
            sq = weights.float() * sq
        return sq.sum(1).mean() / 2


class CentreLoss(ClassCentres):
    """Centre loss (Wen et al. 2016)."""

    def forward(self, feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.centre_distance(feat, labels)


class IslandLoss(ClassCentres):
    """Island loss (Cai et al. 2018): centre loss + ``lambda_island`` * sum_{i != j} (cos(c_i, c_j) + 1)."""

    def __init__(self, num_classes: int, dim: int, lambda_island: float = 10.0):
        super().__init__(num_classes, dim)
        self.lambda_island = lambda_island

    def forward(self, feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.centre_distance(feat, labels) + self.lambda_island * pairwise_cosine_penalty(self.centres)


def centre_optimizer_spec(module: nn.Module, lr: float = 0.5, name: str = "centres") -> OptimizerSpec:
    """Centres learn by their own SGD (lr 0.5, no momentum, no weight decay), outside the model's schedule."""
    return OptimizerSpec(name, list(module.parameters()), kind="sgd",
                         overrides={"lr": lr, "weight_decay": 0.0, "momentum": 0.0}, scheduled=False, clip=False)
