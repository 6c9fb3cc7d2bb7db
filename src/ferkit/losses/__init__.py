"""Losses the FER papers share: centre loss, island loss, DSAN's sparse centre term (one implementation each)."""
from .centre import ClassCentres, CentreLoss, IslandLoss, centre_optimizer_spec, pairwise_cosine_penalty, scale_gradient

__all__ = ["ClassCentres", "CentreLoss", "IslandLoss", "centre_optimizer_spec", "pairwise_cosine_penalty",
           "scale_gradient"]
