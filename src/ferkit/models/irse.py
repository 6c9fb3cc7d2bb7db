"""IR-50: the ArcFace "improved residual" trunk (Deng et al., CVPR 2019) in the face.evoLVe layout, as POSTER's image
stream (SPEC 3.4; official zczcwh/POSTER ``models/ir50.py``).

Layout and key names follow face.evoLVe's ``Backbone(50, drop_ratio, 'ir')`` so its ``ir50.pth`` loads by name:
``input_layer.{0: conv, 1: bn, 2: prelu}``, ``body.N.res_layer.{0: bn, 1: conv3x3, 2: prelu, 3: conv3x3(stride),
4: bn}``, ``body.N.shortcut_layer.{0: conv1x1, 1: bn}`` (only where the width changes), and
``output_layer.{0: bn2d, 3: linear, 4: bn1d}``.

POSTER keeps the first three stages (3, 4, 14 units; 64 / 128 / 256 channels, each stage opening with a stride-2
unit), so a 112x112 face gives 256x14x14. The face-recognition ``output_layer`` is built but never run: it exists
because POSTER's official checkpoints carry it (SPEC 3.4 counts its 12.85 M parameters). The file ``ir50.pth`` also
holds the 4th stage (``body.21`` .. ``body.23``); :func:`load_ir50` leaves those out by name and logs them.

This file registers no model: IR-50 is a building block (see ``models/poster.py``).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .registry import KeyReport, load_filtered_state, load_state_file

__all__ = ["BottleneckIR", "IRBackbone", "ir50_filter_fn", "load_ir50", "IR50_LAYERS", "IR50_CHANNELS"]

_logger = logging.getLogger(__name__)

IR50_LAYERS = (3, 4, 14)  # units per stage kept by POSTER (face.evoLVe IR-50 has a 4th stage of 3 units)
IR50_CHANNELS = (64, 128, 256)


class BottleneckIR(nn.Module):
    """ArcFace IR unit: BN -> conv3x3 -> PReLU -> conv3x3(stride) -> BN, plus a max-pool or conv1x1+BN shortcut."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)  # a strided identity
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def _embedding_layer(channels: int, spatial: int = 7, embedding: int = 512) -> nn.Sequential:
    """face.evoLVe's face-embedding head (BN2d, dropout, flatten, linear, BN1d) on the 4th stage's output."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.Dropout(0.0), nn.Flatten(),
                         nn.Linear(channels * spatial * spatial, embedding), nn.BatchNorm1d(embedding))


class IRBackbone(nn.Module):
    """The first ``len(layers)`` stages of an IR network: (B, 3, 112, 112) -> (B, channels[-1], 14, 14).

    ``output_layer=True`` also builds face.evoLVe's (unused) embedding head, sized for a 4th stage of twice the last
    width, so the official files load with every tensor accounted for.
    """

    def __init__(self, layers: Sequence[int] = IR50_LAYERS, channels: Sequence[int] = IR50_CHANNELS,
                 in_chans: int = 3, output_layer: bool = True):
        super().__init__()
        if len(layers) != len(channels):
            raise ValueError(f"IRBackbone: {len(layers)} stage depths but {len(channels)} widths")
        self.input_layer = nn.Sequential(nn.Conv2d(in_chans, channels[0], 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(channels[0]), nn.PReLU(channels[0]))
        units = []
        in_c = channels[0]
        for n, depth in zip(layers, channels):
            for i in range(n):
                units.append(BottleneckIR(in_c, depth, 2 if i == 0 else 1))  # each stage opens with stride 2
                in_c = depth
        self.body = nn.Sequential(*units)
        self.num_features = channels[-1]
        self.output_layer = _embedding_layer(2 * channels[-1]) if output_layer else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(x)  # (B, C0, H, W)
        return self.body(x)  # (B, C_last, H / 2^stages, W / 2^stages)


# ------------------------------------------------------------------------------------------------------------------
_BODY_KEY = re.compile(r"^body\.(\d+)\.")


def ir50_filter_fn(state: dict, model: IRBackbone) -> tuple[dict[str, torch.Tensor], list[str]]:
    """face.evoLVe ``ir50.pth`` (plain state dict, optionally under ``state_dict`` / with ``module.``) -> this module.

    Returns the state to load and the keys left out by design: units ``body.N`` beyond the ones this backbone has
    (the 4th stage POSTER does not use). Everything else goes to the loader, which reports what does not fit.
    """
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    n_units = len(model.body)
    kept, skipped = {}, []
    for k, v in state.items():
        m = _BODY_KEY.match(k)
        if m and int(m.group(1)) >= n_units:
            skipped.append(k)
        else:
            kept[k] = v
    return kept, skipped


def load_ir50(model: IRBackbone, path: str | Path, strict: bool = True) -> KeyReport:
    """Load face.evoLVe IR-50 weights (``ir50.pth``) into ``model``; report every key that does not fit.

    The 4th-stage units the file holds are left out by name (logged). Any other missing, unexpected or
    shape-mismatched key is in the returned report; ``strict`` raises ``CheckpointMismatchError`` on them.
    """
    state, skipped = ir50_filter_fn(load_state_file(path), model)
    if skipped:
        units = sorted({int(_BODY_KEY.match(k).group(1)) for k in skipped})
        _logger.info("%s: left out %d keys of IR units %s (4th stage, unused by POSTER)", path, len(skipped), units)
    return load_filtered_state(model, state, strict=strict, source=str(path))
