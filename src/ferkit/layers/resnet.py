"""ResNet-18 trunk shared by the baseline, DSAN and ARM.

The trunk is torchvision's ResNet-18 without its pooling and classifier, kept as ``nn.Sequential`` of the original
children so its keys (``0`` conv1, ``1`` bn1, ``4``..``7`` layer1..layer4) match the official DAN / ARM code, which
builds it the same way (``nn.Sequential(*list(resnet.children())[:-2])`` under the name ``features``).
"""
from __future__ import annotations

import logging
import re

import torch
import torchvision
from torch import nn

__all__ = ["resnet18_trunk", "torchvision_resnet_to_trunk", "trunk_checkpoint_filter", "RESNET18_TRUNK_PARAMS"]

_logger = logging.getLogger(__name__)

RESNET18_TRUNK_PARAMS = 11_176_512  # SPEC 3.1
_TV_TO_SEQ = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


def resnet18_trunk(in_chans: int = 3, norm: str = "batch") -> nn.Sequential:
    """torchvision ResNet-18 minus avgpool/fc: (B, in_chans, H, W) -> (B, 512, H/32, W/32).

    ``norm="group"`` swaps BatchNorm for GroupNorm(32): batch-independent, for tiny per-process batches and CPU DDP
    (no SyncBatchNorm there). Official checkpoints are BatchNorm.
    """
    if norm not in ("batch", "group"):
        raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
    norm_layer = (lambda c: nn.GroupNorm(32, c)) if norm == "group" else None
    net = torchvision.models.resnet18(weights=None, norm_layer=norm_layer)
    if in_chans != 3:
        net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return nn.Sequential(*list(net.children())[:-2])


def torchvision_resnet_to_trunk(state: dict, prefix: str = "features.") -> dict[str, torch.Tensor]:
    """Map a torchvision-keyed ResNet-18 state dict onto the trunk's keys under ``prefix``.

    Accepts a plain torchvision state dict (ImageNet file), DAN's MS-Celeb file ``{'state_dict': ...}``, and keys
    prefixed by ``module.`` (DataParallel). The source's own classifier ``fc.*`` is not part of the trunk: it is
    returned under ``_source_fc.*`` so the loader reports it as unexpected instead of dropping it silently; callers
    that know it is the foreign head (ImageNet 1000 / MS-Celeb classes) remove it explicitly.
    """
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = re.sub(r"^module\.", "", key)
        head, _, rest = key.partition(".")
        if head in _TV_TO_SEQ:
            out[f"{prefix}{_TV_TO_SEQ[head]}.{rest}"] = value
        elif head == "fc":
            out[f"_source_fc.{rest}"] = value
        else:
            out[key] = value
    return out


def drop_source_classifier(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the foreign classifier of a trunk file (ImageNet / MS-Celeb head) and log what was removed."""
    dropped = [k for k in state if k.startswith("_source_fc.")]
    if dropped:
        _logger.info("trunk file: its own classifier is not used: %s", ", ".join(k[len('_source_'):] for k in dropped))
    return {k: v for k, v in state.items() if not k.startswith("_source_fc.")}


def trunk_checkpoint_filter(state: dict, model: nn.Module, classifier: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``checkpoint_filter_fn`` body for models made of this trunk (``features.*``) plus a head of their own.

    A ferkit checkpoint (keys under ``features.``) passes through. A torchvision / MS-Celeb trunk file is mapped onto
    ``features.*`` with its own classifier dropped; a ferkit trunk file (``features.*`` keys only) is taken as is;
    in both cases the model's head keys outside ``classifier`` are declared fresh
    (a :class:`~ferkit.models.registry.FilteredState`), so the loader reports them as missing (``kept_fresh``) and a
    strict load still succeeds, and the classifier as new.
    """
    from ferkit.models.registry import FilteredState  # here: ferkit.models imports this package

    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if any(k.startswith("features.") for k in state):
        if not all(k.startswith("features.") for k in state):
            return state  # a whole ferkit checkpoint of this model
        # else a ferkit trunk file (features.* only, e.g. the FERPlus-pretrained trunk): the head stays fresh
    else:
        state = drop_source_classifier(torchvision_resnet_to_trunk(state))
    fresh = [k for k in model.state_dict() if not k.startswith("features.")
             and not any(k == c or k.startswith(c + ".") for c in classifier)]
    return FilteredState(state, fresh=fresh)
