"""Landmark-stream pretraining for POSTER: ``ferkit landmarks pretrain`` (SPEC 3.4 fallback).

POSTER's landmark stream is pytorch_face_landmark's MobileFaceNet, frozen. Its weights
(``mobilefacenet_model_best.pth.tar``) cannot be downloaded here, and a frozen *random* network gives features that
know nothing of landmarks. This module trains the same network to regress the 68 iBUG points, so its ``conv_6_sep``
map carries landmark information as in the paper, from either

* ``--source synthetic`` (default): the built-in synthetic faces' ground-truth landmarks (exact, any pose and
  occlusion), or
* ``--source mediapipe --images DIR``: a folder of face crops, labelled by MediaPipe face mesh reduced to the 68
  iBUG points (``ferkit.inference.faces.FaceMeshLandmarks().detect68``; needs ``ferkit[faces]``). Images without a
  detected face are left out and counted.

Inputs are what POSTER's landmark stream sees: the face at 112x112, normalised with POSTER's ImageNet mean / std.
Augmentation is geometric only where landmarks follow it (pad-crop, small rotation); no horizontal flip, which would
swap the left / right point indices. Targets follow pytorch_face_landmark: 136 numbers, the (x, y) of each point
divided by the crop size. The score is the NME: mean point error over the outer-eye-corner distance (points 36, 45).

The output is a safetensors file with the MobileFaceNet weights under the official key names (plus metadata); POSTER
loads it frozen through ``method.kwargs.landmark_weights=PATH`` (``methods/poster.py``), like the official file.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ferkit.config import AugmentConfig
from ferkit.data.base import FaceDataset, FaceRecord
from .mobilefacenet import NUM_LANDMARKS, MobileFaceNet

__all__ = ["LandmarkPretrainConfig", "pretrain_landmarks", "landmark_nme", "landmark_targets", "FolderLandmarks",
           "evaluate_landmarks", "init_mean_shape", "register_cli"]

_logger = logging.getLogger("ferkit")

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # POSTER's normalisation (official transforms), so features match at use
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTER_EYE_CORNERS = (36, 45)  # iBUG 68, 0-based: the inter-ocular normaliser of the NME


@dataclass
class LandmarkPretrainConfig:
    out: str
    source: Literal["synthetic", "mediapipe"] = "synthetic"
    images: str | None = None  # folder of face crops (source=mediapipe)
    holdout: float = 0.1  # fraction of the folder held out for the NME (source=mediapipe)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    input_size: int = 112
    rotation: float = 10.0
    crop_padding: int = 6
    train_subjects: int = 40
    test_subjects: int = 12
    samples_per_subject: int = 60
    seed: int = 0
    time_budget_min: float = 0.0  # stop after the batch that crosses it (0: none)
    device: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        if self.source == "mediapipe" and not self.images:
            raise ValueError("landmarks pretrain: --source mediapipe needs --images DIR")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("landmarks pretrain: epochs and batch size must be >= 1 and lr > 0")


def landmark_targets(points: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 68, 2) pixel coordinates -> (B, 136) normalised by the crop size (x0, y0, x1, y1, ...)."""
    return (points / size).flatten(1)


def landmark_nme(pred: torch.Tensor, points: torch.Tensor, size: int) -> torch.Tensor:
    """Per-sample NME: mean point-to-point error / outer-eye-corner distance. pred (B, 136), points (B, 68, 2) px."""
    pred_px = pred.reshape(-1, NUM_LANDMARKS, 2) * size
    err = (pred_px - points).norm(dim=-1).mean(1)  # (B,)
    a, b = OUTER_EYE_CORNERS
    return err / (points[:, a] - points[:, b]).norm(dim=-1).clamp_min(1e-6)


class FolderLandmarks(FaceDataset):
    """Face crops in a folder, labelled with 68 landmarks by ``detect68(PIL image) -> (68, 2) | None`` (MediaPipe
    face mesh subset). Detection runs once here; images without a face (or that do not decode) are listed in
    ``skipped``."""

    name = "folder_landmarks"

    def __init__(self, folder: str | Path, detect68: Callable[[Any], np.ndarray | None]):
        from ferkit.data.base import DataError, open_image
        from ferkit.inference.predictor import iter_image_files

        records, skipped = [], []
        for path in iter_image_files([folder]):
            try:
                image = open_image(path)
            except DataError as e:
                skipped.append(str(e))
                continue
            points = detect68(image)
            if points is None:
                skipped.append(f"{path}: no face found")
                continue
            records.append(FaceRecord(str(path), 0, str(path), meta={"landmarks": np.asarray(points, np.float32)}))
        if not records:
            raise ValueError(f"landmarks pretrain: no face found in any image under {folder}")
        super().__init__(records, ["face"], split="train", root=folder, skipped=skipped)

    def load(self, index: int) -> dict[str, Any]:
        from ferkit.data.base import open_image

        r = self.records[index]
        image = open_image(r.path, r.source)  # decoded as in __init__, so the landmarks fit
        return {"image": image, "landmarks": r.meta["landmarks"].copy(), "label": 0, "index": index}


def _datasets(cfg: LandmarkPretrainConfig) -> tuple[FaceDataset, FaceDataset]:
    if cfg.source == "synthetic":
        from ferkit.data.build import cache_dir
        from ferkit.data.synthetic import SyntheticConfig, SyntheticFaces

        def split(name: str, subjects: int) -> SyntheticFaces:
            sc = SyntheticConfig(size=cfg.input_size, num_subjects=subjects,
                                 samples_per_subject=cfg.samples_per_subject, seed=cfg.seed)
            return SyntheticFaces(name, sc, workers=2, cache_dir=str(cache_dir() / "synthetic"))

        return split("train", cfg.train_subjects), split("test", cfg.test_subjects)
    try:
        from ferkit.inference.faces import FaceMeshLandmarks
    except ImportError as e:
        raise ImportError(f"landmarks pretrain --source mediapipe needs the faces extra: pip install 'ferkit[faces]' "
                          f"({e})") from None
    from ferkit.data.base import Subset

    full = FolderLandmarks(cfg.images, FaceMeshLandmarks().detect68)
    if full.skipped:
        _logger.info("landmarks pretrain: %d of %d images without a face were left out",
                     len(full.skipped), len(full.skipped) + len(full))
    order = np.random.default_rng(cfg.seed).permutation(len(full))
    n_test = max(1, int(round(cfg.holdout * len(full)))) if len(full) > 1 else 0
    return Subset(full, order[n_test:], "train"), Subset(full, order[:n_test] if n_test else order, "test")


def _loaders(cfg: LandmarkPretrainConfig, train: FaceDataset, test: FaceDataset):
    from ferkit.data.loader import SeededViews, make_eval_loader, make_train_loader
    from ferkit.data.samplers import EpochSampler
    from ferkit.data.transforms import build_transform

    aug = AugmentConfig(hflip=False, crop_padding=cfg.crop_padding, rotation=cfg.rotation)  # no flip: L/R indices
    tf_train = build_transform("train", cfg.input_size, IMAGENET_MEAN, IMAGENET_STD, aug)
    tf_eval = build_transform("eval", cfg.input_size, IMAGENET_MEAN, IMAGENET_STD, aug)
    sampler = EpochSampler(train.targets, "random", seed=cfg.seed)
    train_loader = make_train_loader(SeededViews(train, {"image": tf_train}, seed=cfg.seed), sampler, cfg.batch_size)
    test_loader = make_eval_loader(SeededViews(test, {"image": tf_eval}, seed=cfg.seed), 2 * cfg.batch_size)
    return sampler, train_loader, test_loader


@torch.no_grad()
def init_mean_shape(model: MobileFaceNet, dataset: FaceDataset, max_samples: int = 512) -> None:
    """Start the regressor at the training set's mean shape: the GDC head ends in BatchNorm1d, so setting its bias /
    weight to the per-coordinate mean / std of the normalised targets makes the untrained output follow their
    marginal distribution (from the default bias 0, weight 1 Adam needs hundreds of steps to get there)."""
    n = min(len(dataset), max_samples)
    pick = np.random.default_rng(0).permutation(len(dataset))[:n]
    targets = []
    for i in pick:
        sample = dataset.load(int(i))
        w, h = sample["image"].size
        targets.append((np.asarray(sample["landmarks"], np.float32) / np.float32([w, h])).reshape(-1))
    t = torch.as_tensor(np.stack(targets))  # (n, 136)
    bn = model.output_layer.bn
    bn.bias.copy_(t.mean(0))
    bn.weight.copy_(t.std(0).clamp_min(1e-3) if n > 1 else torch.full_like(bn.weight, 0.05))


def _forward(model: MobileFaceNet, image: torch.Tensor) -> torch.Tensor:
    # the landmark stream sees the face at 112 (nearest), exactly as inside POSTER
    return model(F.interpolate(image, size=112) if image.shape[-1] != 112 else image)


@torch.no_grad()
def evaluate_landmarks(model: MobileFaceNet, loader, device: torch.device, size: int) -> float:
    """Mean NME over a loader (eval mode)."""
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        points = batch["landmarks"].to(device)
        total += float(landmark_nme(_forward(model, batch["image"].to(device)), points, size).sum())
        n += len(points)
    return total / max(n, 1)


def pretrain_landmarks(cfg: LandmarkPretrainConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train MobileFaceNet to regress 68 landmarks; write ``cfg.out`` (safetensors, official key names).

    Mean-shape initialisation of the head, L1 loss on the normalised coordinates, Adam with cosine decay. Returns the test NME before and after training,
    the epochs run and the output path.
    """
    from ferkit.engine.checkpoint import save_weights
    from ferkit.engine.trainer import resolve_device, seed_everything

    say = progress or _logger.info
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    train, test = _datasets(cfg)
    sampler, train_loader, test_loader = _loaders(cfg, train, test)
    model = MobileFaceNet()
    init_mean_shape(model, train)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * max(len(train_loader), 1))
    nme_start = evaluate_landmarks(model, test_loader, device, cfg.input_size)
    start, epochs_run, stop, history = time.time(), 0, False, []
    for epoch in range(cfg.epochs):
        model.train()
        sampler.set_epoch(epoch)
        loss_sum, seen = 0.0, 0
        for batch in train_loader:
            image, points = batch["image"].to(device), batch["landmarks"].to(device)
            loss = F.l1_loss(_forward(model, image), landmark_targets(points, cfg.input_size))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, seen = loss_sum + float(loss.detach()) * len(image), seen + len(image)
            if cfg.time_budget_min and time.time() - start > 60 * cfg.time_budget_min:
                stop = True
                break
        epochs_run = epoch + 1
        nme = evaluate_landmarks(model, test_loader, device, cfg.input_size)
        history.append({"epoch": epochs_run, "train_l1": loss_sum / max(seen, 1), "test_nme": nme})
        say(f"landmarks epoch {epochs_run}/{cfg.epochs}: L1 {history[-1]['train_l1']:.4f}  test NME {nme:.4f}")
        if stop:
            say(f"landmarks: time budget of {cfg.time_budget_min} min reached")
            break
    nme_end = history[-1]["test_nme"]
    meta = {"format": "ferkit-landmarks", "model": "mobilefacenet", "num_points": NUM_LANDMARKS,
            "input_size": [3, 112, 112], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "target": "xy interleaved / crop size", "test_nme": nme_end, "test_nme_untrained": nme_start,
            "epochs": epochs_run, "train_samples": len(train), "test_samples": len(test),
            "elapsed_s": round(time.time() - start, 1), "history": history, "config": asdict(cfg)}
    save_weights(cfg.out, model.state_dict(), meta)
    return {"out": cfg.out, "test_nme": nme_end, "test_nme_untrained": nme_start, "epochs": epochs_run,
            "history": history}


# ------------------------------------------------------------------------------------------------------------------
def register_cli(subparsers, commands: dict) -> None:
    """``ferkit landmarks pretrain``."""
    p = subparsers.add_parser("landmarks", help="landmark stream tools (POSTER)")
    sub = p.add_subparsers(dest="landmarks_command", required=True)
    q = sub.add_parser("pretrain", help="train the 68-point MobileFaceNet POSTER freezes (fallback for "
                                        "mobilefacenet_model_best.pth.tar)")
    q.add_argument("--out", required=True, help="output .safetensors")
    q.add_argument("--source", choices=("synthetic", "mediapipe"), default="synthetic")
    q.add_argument("--images", default=None, help="folder of face crops (--source mediapipe)")
    d = LandmarkPretrainConfig
    for name, typ in (("epochs", int), ("batch_size", int), ("lr", float), ("train_subjects", int),
                      ("test_subjects", int), ("samples_per_subject", int), ("seed", int),
                      ("time_budget_min", float), ("threads", int), ("rotation", float), ("crop_padding", int),
                      ("holdout", float)):
        q.add_argument("--" + name.replace("_", "-"), type=typ, default=d.__dataclass_fields__[name].default)
    q.add_argument("--device", default="auto")
    commands["landmarks"] = cmd_landmarks


def cmd_landmarks(args: argparse.Namespace) -> int:
    from ferkit.config import ConfigError

    fields = {k: v for k, v in vars(args).items() if k in LandmarkPretrainConfig.__dataclass_fields__}
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: must end in .safetensors")
    try:
        cfg = LandmarkPretrainConfig(**fields)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    result = pretrain_landmarks(cfg, progress=print)
    if not math.isfinite(result["test_nme"]):
        raise ConfigError("landmarks pretrain: training diverged (non-finite NME); lower --lr")
    print(f"test NME {result['test_nme']:.4f} (untrained {result['test_nme_untrained']:.4f}) after "
          f"{result['epochs']} epochs -> {out}\nuse it with: ferkit train --config poster_synthetic "
          f"method.kwargs.landmark_weights={out}")
    return 0
