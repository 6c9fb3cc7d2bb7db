"""Sample transforms built from config: raw sample dict (PIL) -> tensors for the model.

Geometry (resize, crop, flip, rotation, erasing) is applied with one draw of random parameters to RGB, depth and
landmarks together (SPEC 2.3, seed 002: paired augmentation); photometric changes (colour jitter, RandAugment) touch
RGB only. ``weak`` = 4-pixel pad-crop + flip, ``strong`` = weak + RandAugment(2 ops) (D3FER, seed 000).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from ferkit.config import AugmentConfig

__all__ = ["SampleTransform", "PixelNoise", "build_transform", "DEPTH_MEAN_STD"]

DEPTH_MEAN_STD = (0.5, 0.25)  # default depth normalisation (depth maps in [0, 1]); RGB-D protocols set per-fold stats
_NUMERIC_KEYS = ("label", "index", "yaw", "pitch", "intensity", "noisy", "true_label", "soft_label")


class PixelNoise(v2.Transform):
    """Additive Gaussian noise of variance ``var`` on 0-255 pixel values, clipped to uint8 (the official POSTER / ARM
    ``add_gaussian_noise``). Touches 8-bit images only: depth maps and landmarks pass through unchanged."""

    def __init__(self, var: float):
        super().__init__()
        self.std = float(var) ** 0.5

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image) or inpt.dtype != torch.uint8:
            return inpt
        noisy = inpt.float() + torch.randn(inpt.shape) * self.std
        return tv_tensors.wrap(noisy.round_().clamp_(0, 255).to(torch.uint8), like=inpt)


class SampleTransform:
    """Callable ``sample -> sample`` with tensors: image (3,H,W) normalised, depth (1,H,W), landmarks (68,2)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], augment: AugmentConfig | None,
                 grayscale: bool = False, depth_mean_std: tuple[float, float] = DEPTH_MEAN_STD):
        self.size = size
        self.grayscale = grayscale
        self.depth_mean_std = depth_mean_std
        aug = augment
        geometric: list[Any] = []
        photometric: list[Any] = []
        post: list[Any] = []
        if aug is not None:  # on the source image, before resizing, as the official POSTER / ARM code
            if aug.flip_or_noise > 0:
                one_of = v2.RandomChoice([v2.RandomHorizontalFlip(p=1.0), PixelNoise(aug.noise_var)])
                geometric.append(v2.RandomApply([one_of], p=aug.flip_or_noise))
            if aug.gaussian_noise > 0:
                geometric.append(v2.RandomApply([PixelNoise(aug.noise_var)], p=aug.gaussian_noise))
        geometric.append(v2.Resize((size, size), antialias=True))
        if aug is not None:
            if aug.scale_jitter > 0:
                geometric.append(v2.RandomResizedCrop(size, scale=(1 - aug.scale_jitter, 1.0), antialias=True))
            if aug.crop_padding > 0:
                geometric.append(v2.RandomCrop(size, padding=aug.crop_padding))
            if aug.hflip:
                geometric.append(v2.RandomHorizontalFlip(p=aug.hflip_prob))
            if aug.rotation > 0:
                geometric.append(v2.RandomRotation(aug.rotation))
            if aug.color_jitter > 0:
                j = aug.color_jitter
                photometric.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
            if aug.randaugment_ops > 0:
                photometric.append(v2.RandAugment(num_ops=aug.randaugment_ops, magnitude=aug.randaugment_magnitude))
            if aug.erasing > 0:
                post.append(v2.RandomErasing(p=aug.erasing, scale=tuple(aug.erasing_scale)))
        self.geometric = v2.Compose(geometric)
        self.photometric = v2.Compose(photometric) if photometric else None
        self.normalize = v2.Normalize(list(mean), list(std))
        self.post = v2.Compose(post) if post else None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        pil = sample["image"]
        if self.grayscale:
            pil = pil.convert("L").convert("RGB")
        image = tv_tensors.Image(v2.functional.pil_to_tensor(pil))
        h, w = image.shape[-2:]
        inputs: dict[str, Any] = {"image": image}
        if "depth" in sample:
            inputs["depth"] = tv_tensors.Image(torch.from_numpy(np.array(sample["depth"], dtype=np.float32))[None])
        if "landmarks" in sample:
            inputs["landmarks"] = tv_tensors.KeyPoints(torch.as_tensor(sample["landmarks"], dtype=torch.float32),
                                                       canvas_size=(h, w))
        out = self.geometric(inputs)
        img = out["image"]
        if self.photometric is not None:
            img = self.photometric(img)
        img = self.normalize(v2.functional.to_dtype(img, torch.float32, scale=True))
        result: dict[str, Any] = {"image": img.as_subclass(torch.Tensor)}
        if "depth" in out:
            m, s = self.depth_mean_std
            result["depth"] = ((out["depth"] - m) / s).as_subclass(torch.Tensor)
        if self.post is not None:  # erasing: one rectangle on RGB and depth alike (one draw on the stacked 4 channels;
            # torchvision refuses a dict of images with different channel counts)
            stacked = torch.cat([result["image"], result["depth"]]) if "depth" in result else result["image"]
            erased = self.post(tv_tensors.Image(stacked)).as_subclass(torch.Tensor)
            result["image"] = erased[:3]
            if "depth" in result:
                result["depth"] = erased[3:]
        if "landmarks" in out:
            result["landmarks"] = out["landmarks"].as_subclass(torch.Tensor).reshape(-1, 2)
        for key in _NUMERIC_KEYS:
            if key in sample:
                result[key] = sample[key]
        return result


def build_transform(kind: str, size: int, mean: Sequence[float], std: Sequence[float], augment: AugmentConfig,
                    grayscale: bool = False, depth_mean_std: tuple[float, float] = DEPTH_MEAN_STD) -> SampleTransform:
    """``kind``: ``eval`` (resize only), ``train`` (the config's augmentation), ``weak``, ``strong`` (seed 000)."""
    if kind == "eval":
        aug = None
    elif kind == "train":
        aug = augment
    elif kind == "weak":
        aug = AugmentConfig(hflip=True, crop_padding=4)
    elif kind == "strong":
        aug = AugmentConfig(hflip=True, crop_padding=4, randaugment_ops=2,
                            randaugment_magnitude=augment.randaugment_magnitude, erasing=augment.erasing,
                            erasing_scale=list(augment.erasing_scale))
    else:
        raise ValueError(f"unknown transform kind {kind!r} (eval, train, weak, strong)")
    return SampleTransform(size, mean, std, aug, grayscale=grayscale, depth_mean_std=depth_mean_std)
