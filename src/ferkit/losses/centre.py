"""Class-centre losses, shared by DSAN (FR_C + CCS, seed 001 Eqs. 4-5) and the RGB-D network (centre / island loss,
seed 002, after Wen et al. 2016 and Cai et al. 2018).

Centres are parameters of the loss module (so they are checkpointed with the method) and learn through their own
optimiser: SGD, lr 0.5, no weight decay (DACL practice) — see :func:`centre_optimizer_spec`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ferkit.methods.base import OptimizerSpec

__all__ = ["ClassCentres", "CentreLoss", "IslandLoss", "pairwise_cosine_penalty", "centre_optimizer_spec"]


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

    def centre_distance(self, feat: torch.Tensor, labels: torch.Tensor,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
        """(1 / 2N) sum_i sum_j w_ij (f_ij - c_{y_i, j})^2; ``weights`` None means w = 1 (plain centre loss)."""
        sq = (feat.float() - self.centres[labels].float()).pow(2)  # (N, D)
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
