"""ResNet-18 baseline: torchvision trunk, global max pooling, linear head (SPEC 3.1; DSAN Table 1: 11.18 M params,
1818.56 M MACs at 224x224). Every paper compares against it.

Pretrained trunk weights come from a user-given file: torchvision's ImageNet ResNet-18 or DAN's MS-Celeb
``resnet18_msceleb.pth`` (``{'state_dict': torchvision keys}``); a full ferkit checkpoint of this model loads as is.
"""
from __future__ import annotations

import torch
from torch import nn

from ferkit.layers import drop_source_classifier, resnet18_trunk, torchvision_resnet_to_trunk
from .registry import ModelInfo, register_model

__all__ = ["ResNet18Baseline", "checkpoint_filter_fn"]


class ResNet18Baseline(nn.Module):
    """features (ResNet-18 trunk) -> global max pool -> fc."""

    def __init__(self, num_classes: int = 7, in_chans: int = 3, drop_rate: float = 0.0, norm: str = "batch"):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 512
        self.features = resnet18_trunk(in_chans, norm)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 512, H/32, W/32)
        return torch.amax(x, dim=(2, 3))  # global max pool -> (B, 512)

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(feat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """ferkit checkpoints pass through; torchvision / MS-Celeb ResNet-18 files are mapped onto ``features.*``."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if any(k.startswith("features.") for k in state):
        return state
    return drop_source_classifier(torchvision_resnet_to_trunk(state))


@register_model(ModelInfo(
    name="resnet18", paper="SPEC 3.1 / DSAN Table 1", paper_params_m=11.18, paper_macs_g=1.81856,
    gradcam_layer="features.7", classifier="fc", filter_fn=checkpoint_filter_fn))
def resnet18(num_classes: int = 7, **kwargs) -> ResNet18Baseline:
    return ResNet18Baseline(num_classes=num_classes, **kwargs)
