"""``python -m ferkit`` with one extra, test-only model registered, for subprocess and torchrun tests:
``python tests/tiny_cli.py train ...`` (or as torchrun's script).

``tiny_smooth`` is conv -> tanh -> conv -> tanh -> average pool -> fc: no ReLU and no max-pool, so its gradient is
continuous in the weights. Exactness tests that compare two runs through several SAM steps need that: SAM's ascent
point moves the weights by rho, and with ReLU a 1e-8 reduction-order difference flips an activation sitting within
1e-7 of its kink (seen with the ResNet-18 trunk: one flipped unit at step 2 changed layer-3 gradients by 4%), which
each following ascent then amplifies.
"""
import sys

import torch
from torch import nn

from ferkit.cli import main
from ferkit.models.registry import ModelInfo, register_model


class TinySmooth(nn.Module):
    def __init__(self, num_classes: int = 7, width: int = 16):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 2 * width
        self.conv1 = nn.Conv2d(3, width, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).mean(dim=(2, 3))  # (B, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@register_model(ModelInfo(name="tiny_smooth", input_size=(3, 32, 32), gradcam_layer="conv2", classifier="fc"))
def tiny_smooth(num_classes: int = 7, **kwargs) -> TinySmooth:
    return TinySmooth(num_classes=num_classes, **kwargs)


if __name__ == "__main__":  # guarded: data-loader worker processes import __main__
    sys.exit(main())
