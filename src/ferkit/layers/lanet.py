"""LANet spatial attention (seed 002 §III-C, Fig. 5b), after the local attention network of TransFER
(Xue et al., ICCV 2021).

One LANet turns a feature map into one spatial mask with two learnable 1x1 convolutions instead of CBAM's pooling:
Conv1x1(C -> C/r) + BN + ReLU + Conv1x1(C/r -> 1) + BN + Sigmoid (SPEC 3.6). Seed 002 uses S = 4 of them and keeps,
per position, the largest of the S masks; TransFER's random dropping of whole masks is replaced by the batch norms
("believing it provides similar regularization effect but without hyperparameters").

The reduction ratio is not given by the paper; r = 8 is the value of the authors' public experiment code.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["LANet", "MultiLANet"]


class LANet(nn.Module):
    """One spatial attention map: (B, C, H, W) -> (B, 1, H, W) in (0, 1)."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, 1, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


class MultiLANet(nn.Module):
    """S LANets whose masks are max-pooled over S (seed 002 §III-C): (B, C, H, W) -> (B, 1, H, W)."""

    def __init__(self, channels: int, num_maps: int = 4, reduction: int = 8):
        super().__init__()
        if num_maps < 1:
            raise ValueError(f"num_maps must be >= 1, got {num_maps}")
        self.maps = nn.ModuleList(LANet(channels, reduction) for _ in range(num_maps))

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The S individual masks, (B, S, H, W)."""
        return torch.cat([m(x) for m in self.maps], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_maps(x).amax(dim=1, keepdim=True)  # max over the S maps -> (B, 1, H, W)
