"""ARM — Amend Representation Module (Shi & Zhu 2021, arXiv 2103.10189; seed 003 §3, SPEC 3.3).

Official code: https://github.com/JiaweiShiCV/Amend-Representation-Module (``ResNet18_ARM___RAF``). ARM replaces the
pooling layer of a ResNet-18 (trunk -> 512x7x7 at 224 px):

* feature arrangement (FA, §3.2, Fig. 2): ``PixelShuffle(16)`` -> 2x112x112, each 16x16 block a "feature cluster";
* de-albino (DA, §3.3): one single-channel Conv2d(1, 1, k=32, s=8, no padding, no bias) shared by both channels
  -> 2x11x11, BatchNorm2d(2), mean over channels -> a_i (11x11 = 121);
* sharing affinity (SA, §3.4): a_i + λ a_GAR with a_GAR the mean of a over the batch (Eqs. 1-2), λ learnable, 1.0;
* Linear(121, K). Trained with plain CE (``method: supervised``). Key names follow the official module
  (``features.*``, ``arm.de_albino.weight``, ``arm.bn.*``, ``arm.alpha``, ``fc.*``).

Deviations / ferkit's reading of the paper:

* Batch-independent inference. The official eval uses the *test batch's* mean, so a prediction depends on the other
  images of the batch and one image alone cannot be classified. ferkit keeps a running mean of a_GAR (buffer
  ``arm.running_gar``, momentum like BatchNorm's) while training and uses it in eval mode. ``batch_affinity=True``
  restores the official batch mean. A model whose running mean was never tracked (a fresh one, or an official
  checkpoint, which has none: loading one warns) uses the batch mean in eval until it trains or
  :meth:`AmendRepresentation.calibrate` estimates the mean from data (``ARM.calibrate_affinity``).
* Inputs of another size are resized to ``img_size`` (224) inside the model, as the paper resizes every image —
  FER2013's 48 px included (§4.3) — to 224; the 121-d head is defined for that size.
* Table 2 ablations (not specified by the paper, ferkit's choices): DA off = the pooling ARM substitutes, with DA's
  geometry (average pooling k=32, s=8 after FA; global average pooling without FA, which is the baseline row). FA off
  with DA on = the shared single-channel kernel on every one of the 512 channels of the 7x7 map (kernel 3, stride 1,
  Fig. 4's illustration), BatchNorm2d(512), the 512 channel maps flattened (they are distinct features, unlike FA's
  two parallel copies of each position). Fig. 6's kernel study is that setting with ``kernel_size=k``, affinity off.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ferkit.layers import resnet18_trunk, trunk_checkpoint_filter
from .registry import ModelInfo, register_model

__all__ = ["ARM", "AmendRepresentation", "ABLATIONS", "official_to_ferkit", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)

_C = 512  # trunk channels
_UPSCALE = 16  # PixelShuffle factor: 512 channels -> 2 channels (512 / 16²)


def _trunk_grid(img_size: int) -> int:
    """Side of the trunk's output map: five stride-2 stages with 'same' padding, each ceil(n / 2) (224 -> 7)."""
    for _ in range(5):
        img_size = math.ceil(img_size / 2)
    return img_size


class AmendRepresentation(nn.Module):
    """The DA and SA blocks (Fig. 3): (B, C, S, S) feature map -> representation (B, D) (Eqs. 1-2)."""

    def __init__(self, channels: int, side: int, kernel_size: int, stride: int, de_albino: bool = True,
                 channel_mean: bool = True, sharing_affinity: bool = True, affinity_init: float = 1.0,
                 learn_affinity: bool = True, batch_affinity: bool = False, gar_momentum: float = 0.1):
        super().__init__()
        if not 1 <= kernel_size <= side:
            raise ValueError(f"kernel_size: must be in [1, {side}] for a {side}x{side} map, got {kernel_size!r}")
        if stride < 1:
            raise ValueError(f"stride: must be >= 1, got {stride!r}")
        out = (side - kernel_size) // stride + 1  # no padding (§3.3)
        self.channel_mean = channel_mean
        self.batch_affinity = batch_affinity
        self.gar_momentum = gar_momentum
        if de_albino:
            self.de_albino = nn.Conv2d(1, 1, kernel_size, stride, padding=0, bias=False)  # one kernel for all channels
            self.bn = nn.BatchNorm2d(channels)
            self.pool = None
        else:  # the pooling ARM substitutes (Table 2 rows without DA)
            self.de_albino = self.bn = None
            self.pool = nn.AvgPool2d(kernel_size, stride) if channel_mean else nn.AdaptiveAvgPool2d(1)
            out = out if channel_mean else 1
        self.dim = out * out * (1 if channel_mean else channels)
        self.sharing_affinity = sharing_affinity
        if sharing_affinity:
            alpha = torch.tensor([float(affinity_init)])  # λ in Eq. 2 (official name ``alpha``); fixed or learnt
            if learn_affinity:
                self.alpha = nn.Parameter(alpha)
            else:
                self.register_buffer("alpha", alpha)
            self.register_buffer("running_gar", torch.zeros(self.dim))  # running a_GAR for batch-free inference
            self.register_buffer("num_gar_tracked", torch.tensor(0, dtype=torch.long))

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        """DA block: (B, C, S, S) -> a (B, D) before the affinity."""
        b, c = x.shape[:2]
        if self.de_albino is not None:
            y = self.de_albino(x.reshape(b * c, 1, *x.shape[2:]))  # shared single-channel kernel (B*C, 1, s, s)
            y = self.bn(y.reshape(b, c, *y.shape[2:]))  # (B, C, s, s)
        else:
            y = self.pool(x)
        if self.channel_mean:
            y = y.mean(1)  # the C parallel copies averaged -> (B, s, s)
        return y.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.represent(x)  # (B, D)
        if not self.sharing_affinity:
            return a
        return a + self.alpha * self._global_average(a)  # a_i + λ a_GAR (Eq. 2)

    def _global_average(self, a: torch.Tensor) -> torch.Tensor:
        """a_GAR (Eq. 1): the batch mean while training (and in official mode), else the running mean."""
        if self.training:
            gar = a.mean(0)
            with torch.no_grad():
                m = self.gar_momentum
                self.running_gar.mul_(1 - m).add_(gar.detach().float(), alpha=m)
                self.num_gar_tracked.add_(1)
            return gar
        if self.batch_affinity:
            return a.mean(0)
        if int(self.num_gar_tracked) == 0:  # never trained nor calibrated (warned when an official file loads)
            return a.mean(0)
        return self.running_gar.to(a.dtype)

    @torch.no_grad()
    def calibrate(self, representations: Iterable[torch.Tensor]) -> None:
        """Set the running a_GAR to the mean of eval-mode representations a (B, D) over a data set."""
        total, n = None, 0
        for a in representations:
            s = a.float().sum(0)
            total, n = (s if total is None else total + s), n + len(a)
        if n == 0:
            raise ValueError("calibrate: no samples")
        self.running_gar.copy_(total / n)
        self.num_gar_tracked.fill_(1)


class ARM(nn.Module):
    """features (ResNet-18 trunk) -> arrangement (PixelShuffle) -> arm (DA + SA) -> fc."""

    def __init__(self, num_classes: int = 7, in_chans: int = 3, img_size: int = 224, arrangement: bool = True,
                 de_albino: bool = True, sharing_affinity: bool = True, kernel_size: int | None = None,
                 stride: int | None = None, affinity_init: float = 1.0, learn_affinity: bool = True,
                 batch_affinity: bool = False, gar_momentum: float = 0.1, drop_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.img_size = img_size
        grid = _trunk_grid(img_size)
        channels, side = (_C // _UPSCALE ** 2, grid * _UPSCALE) if arrangement else (_C, grid)
        if kernel_size is None:
            kernel_size = 32 if arrangement else 3  # §4.3 (32 > the 16x16 cluster) / Fig. 4
        if stride is None:
            stride = 8 if arrangement else 1  # half the cluster size (§4.3) / Fig. 6 (stride 1)
        self.features = resnet18_trunk(in_chans)
        self.arrangement = nn.PixelShuffle(_UPSCALE) if arrangement else nn.Identity()
        self.arm = AmendRepresentation(channels, side, kernel_size, stride, de_albino, channel_mean=arrangement,
                                       sharing_affinity=sharing_affinity, affinity_init=affinity_init,
                                       learn_affinity=learn_affinity, batch_affinity=batch_affinity,
                                       gar_momentum=gar_momentum)
        self.num_features = self.arm.dim
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.arm.dim, num_classes)

    def _amend_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self._resize(x)  # (B, 3, 224, 224)
        x = self.features(x)  # (B, 512, 7, 7)
        return self.arrangement(x)  # (B, 2, 112, 112) with FA

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.img_size, self.img_size):
            return x
        return F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)

    def forward_features(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """The amended representation (B, 121 with the paper's settings). Image only: ``extra`` is not used."""
        return self.arm(self._amend_input(x))

    def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.forward_features(x)))

    @torch.no_grad()
    def calibrate_affinity(self, images: Iterable[torch.Tensor]) -> None:
        """Estimate the running a_GAR from batches of images (eval mode), e.g. after loading an official checkpoint."""
        was_training = self.training
        self.eval()
        self.arm.calibrate(self.arm.represent(self._amend_input(x)) for x in images)
        self.train(was_training)


# Table 2 rows (arrangement, de-albino, affinity) and Fig. 6's kernel study, as model kwargs.
ABLATIONS: dict[str, dict[str, Any]] = {
    **{f"table2.fa{int(fa)}_da{int(da)}_sa{int(sa)}": {"arrangement": fa, "de_albino": da, "sharing_affinity": sa}
       for fa, da, sa in [(False, False, False), (False, True, False), (False, False, True), (True, True, False),
                          (True, False, True), (False, True, True), (True, True, True)]},
    **{f"fig6.k{k}": {"arrangement": False, "de_albino": True, "sharing_affinity": False, "kernel_size": k,
                      "stride": 1} for k in range(1, 8)},
}


def official_to_ferkit(state: dict) -> dict[str, torch.Tensor]:
    """An official checkpoint (``{'iter', 'model_state_dict', 'optimizer_state_dict'}`` or its bare state dict)
    -> ferkit's keys: the same names, minus ``module.`` prefixes, plus an untracked running a_GAR."""
    if "model_state_dict" in state:
        _logger.info("official ARM checkpoint (iter %s)", state.get("iter", "?"))
        state = state["model_state_dict"]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if "arm.alpha" in state and "arm.running_gar" not in state:
        dim = state["fc.weight"].shape[1] if "fc.weight" in state else 121
        state["arm.running_gar"] = torch.zeros(dim)
        state["arm.num_gar_tracked"] = torch.tensor(0, dtype=torch.long)
        _logger.warning("official ARM checkpoint has no running a_GAR: eval uses the batch mean (official behaviour) "
                        "until ARM.calibrate_affinity(images) runs")
    return state


def checkpoint_filter_fn(state: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Official ARM checkpoints, ferkit checkpoints, and torchvision / MS-Celeb ResNet-18 trunk files (the paper's
    ImageNet initialisation: ARM and fc stay freshly initialised)."""
    if "model_state_dict" in state or any(k.endswith("arm.alpha") for k in state):
        return official_to_ferkit(state)
    return trunk_checkpoint_filter(state, model, classifier=("fc",))


@register_model(ModelInfo(
    name="arm", paper="seed 003 (Shi & Zhu 2021); SPEC 3.3", paper_params_m=11.18, gradcam_layer="features.7",
    classifier="fc", filter_fn=checkpoint_filter_fn))
def arm(num_classes: int = 7, **kwargs) -> ARM:
    """ARM (ResNet-18) as published: FA (PixelShuffle 16), DA (k 32, s 8), learnable affinity λ = 1.0."""
    return ARM(num_classes=num_classes, **kwargs)
