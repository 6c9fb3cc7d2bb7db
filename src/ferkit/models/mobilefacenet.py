"""MobileFaceNet 68-point landmark regressor (Chen et al., MobileFaceNets, 2018; landmark version from
cunjian/pytorch_face_landmark), POSTER's landmark stream (SPEC 3.4).

Key names follow pytorch_face_landmark's ``MobileFaceNet([112, 112], 136)`` so ``mobilefacenet_model_best.pth.tar``
(``{'state_dict': ...}``) loads by name: ``conv1``, ``conv2_dw``, ``conv_23``, ``conv_3.model.N``, ``conv_34``,
``conv_4``, ``conv_45``, ``conv_5``, ``conv_6_sep`` (each ``conv`` / ``bn`` / ``prelu``; depth-wise units ``conv`` /
``conv_dw`` / ``project``) and the GDC head ``output_layer.{conv_6_dw, linear, bn}``.

Input: a 112x112 face crop. ``forward_features`` gives the ``conv_6_sep`` map (B, 512, 7, 7) that POSTER uses as 49
landmark tokens; ``forward`` regresses 136 numbers, the 68 (x, y) points interleaved and normalised to [0, 1] by the
crop size (the repo's ``landmark.reshape(-1, 2) * crop_size``).

This file registers no model (a regressor, not an expression classifier); ``ferkit landmarks pretrain``
(``models/landmarks.py``) trains it when the official weights are not at hand.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .registry import KeyReport, load_filtered_state, load_state_file

__all__ = ["MobileFaceNet", "mobilefacenet_filter_fn", "load_mobilefacenet", "NUM_LANDMARKS"]

NUM_LANDMARKS = 68


class ConvBlock(nn.Module):
    """conv -> BN -> PReLU (official ``Conv_block``)."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_c)
        self.prelu = nn.PReLU(out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn(self.conv(x)))


class LinearBlock(nn.Module):
    """conv -> BN without activation (official ``Linear_block``)."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``hidden`` -> 3x3 depth-wise (stride) -> 1x1 linear projection."""

    def __init__(self, in_c: int, out_c: int, hidden: int, stride: int = 2, residual: bool = False):
        super().__init__()
        self.conv = ConvBlock(in_c, hidden)
        self.conv_dw = ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden)
        self.project = LinearBlock(hidden, out_c)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class Residual(nn.Module):
    """``num_block`` stride-1 residual depth-wise units (official ``Residual``; keys ``model.N``)."""

    def __init__(self, channels: int, num_block: int, hidden: int):
        super().__init__()
        self.model = nn.Sequential(*[DepthWise(channels, channels, hidden, stride=1, residual=True)
                                     for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class GDC(nn.Module):
    """Global depth-wise convolution head: 7x7 depth-wise conv -> flatten -> linear -> BN1d."""

    def __init__(self, channels: int, out_features: int):
        super().__init__()
        self.conv_6_dw = LinearBlock(channels, channels, kernel=7, groups=channels)
        self.linear = nn.Linear(channels, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(self.conv_6_dw(x).flatten(1)))


class MobileFaceNet(nn.Module):
    """112x112 face -> 136 landmark coordinates (``forward``) or the 512x7x7 ``conv_6_sep`` map
    (``forward_features``).

    ``feature_dim`` is the width of ``conv_6_sep`` (512 in the official model; smaller only for fast tests).
    """

    def __init__(self, num_outputs: int = 2 * NUM_LANDMARKS, feature_dim: int = 512):
        super().__init__()
        self.num_outputs = num_outputs
        self.num_features = feature_dim
        self.conv1 = ConvBlock(3, 64, 3, 2, 1)
        self.conv2_dw = ConvBlock(64, 64, 3, 1, 1, groups=64)
        self.conv_23 = DepthWise(64, 64, hidden=128)
        self.conv_3 = Residual(64, num_block=4, hidden=128)
        self.conv_34 = DepthWise(64, 128, hidden=256)
        self.conv_4 = Residual(128, num_block=6, hidden=256)
        self.conv_45 = DepthWise(128, 128, hidden=512)
        self.conv_5 = Residual(128, num_block=2, hidden=256)
        self.conv_6_sep = ConvBlock(128, feature_dim)
        self.output_layer = GDC(feature_dim, num_outputs)
        self._init_weights()

    def _init_weights(self) -> None:
        # the official initialisation: He (fan-out) for convolutions and linear layers, BN at identity
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2_dw(self.conv1(x))  # (B, 64, 56, 56)
        x = self.conv_3(self.conv_23(x))  # (B, 64, 28, 28)
        x = self.conv_4(self.conv_34(x))  # (B, 128, 14, 14)
        x = self.conv_5(self.conv_45(x))  # (B, 128, 7, 7)
        return self.conv_6_sep(x)  # (B, feature_dim, 7, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.forward_features(x))  # (B, 136): x0, y0, x1, y1, ... in [0, 1]


# ------------------------------------------------------------------------------------------------------------------
def mobilefacenet_filter_fn(state: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """pytorch_face_landmark checkpoint (``{'state_dict': ...}``, possibly ``module.``-prefixed) or a plain state
    dict (``ferkit landmarks pretrain`` output) -> MobileFaceNet keys. Nothing is dropped here."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def load_mobilefacenet(model: MobileFaceNet, path: str | Path, strict: bool = True) -> KeyReport:
    """Load ``mobilefacenet_model_best.pth.tar`` or a ``ferkit landmarks pretrain`` checkpoint into ``model``.

    Missing, unexpected and shape-mismatched keys are reported; ``strict`` raises ``CheckpointMismatchError``.
    """
    state = mobilefacenet_filter_fn(load_state_file(path), model)
    return load_filtered_state(model, state, strict=strict, source=str(path))
