"""Predictor: checkpoint (or run directory) -> batched expression predictions for every face in photos or crops.

Preprocessing is rebuilt from the checkpoint's metadata alone (input size, mean/std, grey conversion, class names,
optional ``face_margin``), torchvision-style, so nothing else from the training run is needed.

``faces="none"``: every input already is a face crop (one prediction per image, box = the whole image).
``faces="detect"``: faces are found (``ferkit.inference.faces``), aligned to the model's input and classified; an
image yields one prediction per face, or one row that says why there is none (no face, unreadable file, unsupported
format) — a bad input never stops a run.
``faces="auto"`` (the CLI's default): an image the size and shape of a face crop (longer side <= ``CROP_MAX_SIDE``,
aspect ratio <= ``CROP_MAX_ASPECT``: FER2013's 48 px, RAF-DB's 100 px, CK+, SFEW's aligned faces) is taken as a crop,
as these sets are distributed and as the models were trained; anything larger goes through detection. Every row says
which (``source``: ``detected`` or ``crop``).

A model trained on ferkit's synthetic faces carries ``dataset: synthetic`` in its metadata; the predictor then holds
a ``domain_warning`` (logged, shown by ``ferkit serve``): such a model is not meant for real photos.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ferkit.config import AugmentConfig
from ferkit.data.base import DataError, open_image, to_mode
from ferkit.data.transforms import build_transform
from ferkit.engine.checkpoint import CheckpointError, load_weights
from ferkit.models import DEFAULT_WEIGHTS, create_model

from .faces import DEFAULT_MARGIN, FaceDetector, align_face, make_detector

_logger = logging.getLogger("ferkit")

__all__ = ["Predictor", "Prediction", "ImageResult", "load_checkpoint_model", "resolve_checkpoint",
           "resolve_device", "iter_image_files", "looks_like_crop", "domain_warning", "IMAGE_EXTENSIONS",
           "VIDEO_EXTENSIONS", "FACE_MODES"]

FACE_MODES = ("auto", "detect", "none")
# px: face crops as FER2013 (48), CK+48, RAF-DB (100), SFEW (143x181) ship them; JAFFE's photos (256) are not crops
CROP_MAX_SIDE = 192
CROP_MAX_ASPECT = 1.6  # longer / shorter side

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
ImageInput = Image.Image | np.ndarray | str | Path


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory resolves to its best checkpoint (else last); a file is taken as is; a weights name
    (``ferkit:resnet18-fer7``, a file under ``$FERKIT_WEIGHTS``) resolves through :mod:`ferkit.models.weights`."""
    from ferkit.models.weights import WeightsNotFound, resolve_weights

    try:
        p = resolve_weights(path)  # an existing path comes back as is
    except WeightsNotFound as e:
        raise CheckpointError(str(e)) from None
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (p / "checkpoints" / name).is_file():
                return p / "checkpoints" / name
        raise CheckpointError(f"{p}: run directory has no checkpoints/best.safetensors or last.safetensors")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    return p


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    state, meta = load_weights(resolve_checkpoint(path))
    model = create_model(meta["model"], num_classes=meta["num_classes"], **meta.get("model_kwargs", {}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {meta['model']}: missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")
    return model.to(device).eval(), meta


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` = CUDA when available, else CPU; an unavailable CUDA device is a clear error."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {name} requested but CUDA is not available (use --device cpu)")
    return torch.device(name)


@dataclass
class Prediction:
    """One row: a face (or, with ``status`` != ok, the reason an image has none)."""

    path: str
    label: str | None
    probs: dict[str, float] | None
    error: str | None = None
    box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 in the source image
    face: int | None = None  # index of the face in its image, most confident first
    score: float | None = None  # detector confidence
    landmarks: np.ndarray | None = field(default=None, repr=False)  # (68, 2) iBUG points in source pixels
    status: str = "ok"  # ok | no_face | unreadable | unsupported
    source: str | None = None  # how the face was found: detected | crop (taken whole as a face crop)

    def row(self, landmarks: bool = False) -> dict[str, Any]:
        """Flat record for CSV / JSON lines / DataFrames (landmarks only on request: 136 numbers)."""
        out: dict[str, Any] = {"path": self.path, "face": self.face, "status": self.status, "source": self.source,
                               "label": self.label, "error": self.error}
        x0, y0, x1, y1 = self.box if self.box is not None else (None,) * 4
        out.update(x0=x0, y0=y0, x1=x1, y1=y1, score=None if self.score is None else round(self.score, 4))
        if self.probs:
            out.update({f"p_{k}": round(v, 6) for k, v in self.probs.items()})
        if landmarks and self.landmarks is not None:
            out["landmarks"] = np.round(self.landmarks, 2).tolist()
        return out


@dataclass
class ImageResult:
    """All predictions of one input image (and the image itself, for annotation)."""

    path: str
    predictions: list[Prediction]
    image: Image.Image | None = None


@dataclass
class _Pending:
    path: str
    image: Image.Image | None
    crops: list[torch.Tensor]
    rows: list[Prediction]  # filled but for label/probs when crops are present


class Predictor:
    """Expression classifier for face crops or photos, built from a checkpoint's weights and metadata."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: str | torch.device = "cpu", batch_size: int = 64,
                 faces: str = "none", detector: FaceDetector | str | None = None, margin: float | None = None):
        if faces not in FACE_MODES:
            raise ValueError(f"faces={faces!r}: expected 'auto' (crops taken whole, photos detected), 'detect' or "
                             "'none' (inputs are crops)")
        if "depth" in meta.get("modalities", ["image"]):
            raise CheckpointError(f"{meta['model']} needs a depth map beside each image; photo inference is RGB only")
        self.device = resolve_device(device)
        self.memory_format = _memory_format(model)
        self.model, self.meta = model.to(self.device, memory_format=self.memory_format).eval(), meta
        self.batch_size = batch_size
        self.class_names: list[str] = list(meta["class_names"])
        self.input_size = int(meta["input_size"][-1])
        self.transform = build_transform("eval", self.input_size, meta["mean"], meta["std"], AugmentConfig(),
                                         grayscale=bool(meta.get("grayscale", False)))
        self.faces = faces
        self.margin = float(margin if margin is not None else meta.get("face_margin", DEFAULT_MARGIN))
        if faces != "none" and not hasattr(detector, "detect"):
            detector = make_detector(detector or "auto")
        self.detector: FaceDetector | None = detector if faces != "none" else None
        self.counts: Counter = Counter()  # images and faces by outcome, for the one-line summary
        self.domain_warning = domain_warning(meta)
        if self.domain_warning:
            _logger.warning("%s", self.domain_warning)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", batch_size: int = 64, faces: str = "none",
                        detector: FaceDetector | str | None = None, margin: float | None = None) -> "Predictor":
        """``path``: a ``.safetensors`` checkpoint or a run directory (its best checkpoint)."""
        model, meta = load_checkpoint_model(path, "cpu")
        return cls(model, meta, device, batch_size, faces=faces, detector=detector, margin=margin)

    from_run = from_checkpoint  # a run directory resolves to its best checkpoint

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_WEIGHTS, device: str = "cpu", batch_size: int = 64,
                        faces: str = "auto", detector: FaceDetector | str | None = None,
                        margin: float | None = None) -> "Predictor":
        """Named weights (``ferkit models`` lists them; the built-in model by default), never downloaded."""
        return cls.from_checkpoint(name, device, batch_size, faces=faces, detector=detector, margin=margin)

    # ---------------------------------------------------------------------------------------------- tensors
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform({"image": image.convert("RGB")})["image"]

    @torch.inference_mode()
    def predict_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) preprocessed -> (B, K) probabilities."""
        x = batch.to(self.device, memory_format=self.memory_format)
        return self.model(x).float().softmax(1).cpu().numpy()

    def predict_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Face crops -> (N, K) probabilities, in batches (no detection)."""
        out = [self.predict_tensor(torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]))
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)))

    # ---------------------------------------------------------------------------------------------- faces
    def predict(self, images: Sequence[ImageInput] | ImageInput) -> list[list[Prediction]]:
        """Per input (PIL image, RGB array or path): its predictions, one per face (see ``Prediction``).

        A single input counts as a list of one (a path string is not a sequence of characters here).
        """
        if _is_single_input(images):
            images = [images]
        sources = [(_name(im, i), im) for i, im in enumerate(images)]
        return [r.predictions for r in self.predict_sources(sources)]

    def predict_paths(self, paths: Iterable[str | Path]) -> Iterator[Prediction]:
        """Batched over files (and faces); a file that cannot be used yields a row saying why."""
        for result in self.predict_sources((str(p), p) for p in paths):
            yield from result.predictions

    def predict_frame(self, paths: Iterable[str | Path], landmarks: bool = False):
        """Predictions as a pandas DataFrame (one row per face or failed image)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("Predictor.predict_frame needs pandas (`pip install pandas`)") from e
        return pd.DataFrame([p.row(landmarks) for p in self.predict_paths(paths)])

    def predict_sources(self, sources: Iterable[tuple[str, ImageInput]], keep_images: bool = False
                        ) -> Iterator[ImageResult]:
        """Core loop: (name, image or path) -> ``ImageResult`` in input order; crops of many images share a batch."""
        pending: list[_Pending] = []
        n_crops = 0
        for name, source in sources:
            item = self._prepare(name, source, keep_images)
            pending.append(item)
            n_crops += len(item.crops)
            if n_crops >= self.batch_size:
                yield from self._flush(pending)
                pending, n_crops = [], 0
        if pending:
            yield from self._flush(pending)

    def _prepare(self, name: str, source: ImageInput, keep_image: bool) -> _Pending:
        try:
            image = _load(source)
        except DataError as e:
            if _unsupported_extension(source):
                msg = f"unsupported format {Path(source).suffix or '(no extension)'!r}: {e}"
                return _Pending(name, None, [], [Prediction(name, None, None, msg, status="unsupported")])
            return _Pending(name, None, [], [Prediction(name, None, None, str(e), status="unreadable")])
        kept = image if keep_image else None
        if self.detector is None or (self.faces == "auto" and looks_like_crop(image.size)):
            w, h = image.size
            return _Pending(name, kept, [self.preprocess(image)],
                            [Prediction(name, None, None, box=(0, 0, w, h), source="crop")])
        faces = self.detector.detect(image)
        if not faces:
            return _Pending(name, kept, [], [Prediction(name, None, None, "no face detected", status="no_face")])
        arr = np.asarray(image.convert("RGB"))
        crops, rows = [], []
        for k, face in enumerate(faces):
            crops.append(self.preprocess(align_face(arr, face, self.input_size, self.margin).image))
            rows.append(Prediction(name, None, None, box=face.int_box, face=k, score=face.score,
                                   landmarks=face.landmarks, source="detected"))
        return _Pending(name, kept, crops, rows)

    def _flush(self, pending: list[_Pending]) -> Iterator[ImageResult]:
        crops = [c for p in pending for c in p.crops]
        probs = [self.predict_tensor(torch.stack(crops[i:i + self.batch_size]))
                 for i in range(0, len(crops), self.batch_size)]
        flat = iter(np.concatenate(probs) if probs else [])
        for p in pending:
            if p.crops:
                for row in p.rows:
                    pr = next(flat)
                    row.label = self.class_names[int(pr.argmax())]
                    row.probs = dict(zip(self.class_names, map(float, pr)))
            self._count(p.rows)
            yield ImageResult(p.path, p.rows, p.image)

    def _count(self, rows: list[Prediction]) -> None:
        self.counts["images"] += 1
        first = rows[0]
        if first.status != "ok":
            self.counts[first.status] += 1
            return
        self.counts["crop" if first.source == "crop" else "images_with_faces"] += 1
        self.counts["faces"] += len(rows)

    def summary(self) -> str:
        """One line: images read, faces detected (in how many images), images taken as crops, failures."""
        c = self.counts
        parts = [f"{c['images']} images", f"{c['faces'] - c['crop']} faces detected in {c['images_with_faces']}",
                 f"{c['crop']} taken as face crops", f"{c['no_face']} without a face"]
        parts += [f"{c[k]} {k}" for k in ("unreadable", "unsupported") if c[k]]
        return ", ".join(parts)


def looks_like_crop(size: tuple[int, int]) -> bool:
    """An image the size and shape of a face crop as FER datasets distribute them (see ``faces="auto"``)."""
    w, h = size
    return max(w, h) <= CROP_MAX_SIDE and max(w, h) <= CROP_MAX_ASPECT * max(min(w, h), 1)


def domain_warning(meta: dict) -> str | None:
    """The warning a model trained on synthetic faces carries (``None`` for real data)."""
    if meta.get("dataset") != "synthetic":
        return None
    return (f"{meta.get('model', 'this model')} was trained on ferkit's synthetic faces, not on real photos: expect "
            "wrong answers on real faces (on JAFFE such a model was right for 19.7 % of faces). For real faces use "
            "the built-in model (ferkit:resnet18-fer7, the default of `ferkit predict` / `ferkit serve`) or a model "
            "trained on real data.")


def _memory_format(model: torch.nn.Module) -> torch.memory_format:
    """Channels-last (NHWC) for conv nets: oneDNN / cuDNN convolve without reordering every activation to their
    blocked layout and back, and max-pooling and im2col run on contiguous channels (ResNet-18, one CPU thread:
    1.1-1.4x faster at batch 64 and 1.4-1.7x at batch 1 on 48-112 px crops; answers equal NCHW's within 1e-5)."""
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return torch.channels_last if has_conv else torch.contiguous_format


def _is_single_input(images: Any) -> bool:
    return isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim == 3)


def _name(image: ImageInput, index: int) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"<image {index}>"


def _load(source: ImageInput) -> Image.Image:
    if isinstance(source, Image.Image):
        return to_mode(source, "RGB")  # 16-bit and transparency as from files
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise DataError(f"array input must be uint8 RGB (H, W, 3), got {source.dtype} {source.shape}")
        return Image.fromarray(source)
    if Path(source).is_dir():
        raise DataError(f"{source}: is a folder (pass folders through iter_image_files)")
    return open_image(source)


def _unsupported_extension(source: ImageInput) -> bool:
    return isinstance(source, (str, Path)) and Path(source).suffix.lower() not in IMAGE_EXTENSIONS


def iter_image_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, folders walked recursively (sorted) for image extensions."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            yield p
