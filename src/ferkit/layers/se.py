"""Squeeze-excitation gate on a feature vector (POSTER's head, SE-style recalibration)."""
from __future__ import annotations

from torch import nn

__all__ = ["SEBlock"]


class SEBlock(nn.Module):
    """x * sigmoid(W2 relu(W1 x)) for (B, C) inputs."""

    def __init__(self, channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(x))))
