"""The one dataset protocol every adapter follows.

A dataset is an index of :class:`FaceRecord` (built once, validated: a bad entry is an error naming file and line, or
— with ``skip_bad`` — a counted, listed skip) and ``load(i)`` which returns a *raw* sample dict:

    {"image": PIL.Image (RGB), "label": int, "index": int,
     optional "depth": PIL.Image (mode "F" or "L"), "landmarks": float32 (68, 2) pixel coords,
     "subject": str, and any per-sample flags (e.g. "occlusion", "yaw", "pitch", "intensity")}

Tensors come from a view (:class:`TransformView`) that applies a sample transform, so one index can be seen
through a train and an eval pipeline, or through weak and strong pipelines at once (D3FER).
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

__all__ = ["DataError", "FaceRecord", "FaceDataset", "TransformView", "Subset", "resolve_inside", "open_image",
           "to_mode", "ImageTooLarge", "MAX_PIXELS", "text_problem"]


class DataError(ValueError):
    """A bad dataset entry. The message names the file (and line) and says what is wrong."""


@dataclass
class FaceRecord:
    path: str | None  # absolute path of the image (None for in-memory sets)
    label: int
    source: str = ""  # where the entry came from: "list.txt:12" or the image path
    subject: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # depth path, landmarks, occlusion, yaw, intensity, ...


def resolve_inside(root: Path, rel: str, source: str) -> Path:
    """Join ``rel`` onto ``root`` and refuse paths that escape the dataset root (``../``, absolute paths, links)."""
    root = root.resolve()
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise DataError(f"{source}: path {rel!r} escapes the dataset root {root}")
    return p


# byte-order marks of encodings that are not UTF-8 (UTF-32 LE first: it starts with UTF-16 LE's)
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
         (codecs.BOM_UTF16_BE, "UTF-16"))


def text_problem(path: str | Path) -> str | None:
    """Why ``path`` is not usable UTF-8 text, as one line ``"<path>[:<line>]: ..."``; None when it is.

    Called when reading a config or list file failed to decode: it names the encoding (byte-order mark) or the
    first line holding a byte that is not UTF-8 (latin-1 / cp1252 exports) or a NUL (UTF-16 without a mark).
    """
    with open(path, "rb") as f:
        head = f.read(4)
        for bom, name in _BOMS:
            if head.startswith(bom):
                return f"{path}: {name} text; save the file as UTF-8"
        f.seek(0)
        for lineno, line in enumerate(f, 1):  # a newline byte is never part of a multi-byte UTF-8 character
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"{path}:{lineno}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                        "save the file as UTF-8")
            if b"\x00" in line:
                return (f"{path}:{lineno}: NUL byte in text (UTF-16 without a byte-order mark?); "
                        "save the file as UTF-8")
    return None


# decoded pixels above this are refused before decoding (decompression bombs); JPEGs count after draft reduction
MAX_PIXELS = 64_000_000
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageTooLarge(DataError):
    """An image whose decoded size is over the pixel limit (a decompression bomb, or simply too big)."""


def open_image(path: str | Path | BinaryIO, source: str = "", mode: str = "RGB", max_side: int | None = 4096,
               max_pixels: int = MAX_PIXELS, formats: Sequence[str] | None = None):
    """The one image decoder (datasets, ``ferkit predict``, ``ferkit serve``): a file path or binary file object
    -> an 8-bit ``mode`` image (:func:`to_mode`), decoded fully so that truncated files fail here.

    Memory stays bounded: a JPEG whose long side is over ``max_side`` is decoded reduced (``draft``), then every
    image is downscaled to ``max_side`` (``thumbnail``; ``None``: never); an image that would still decode to more
    than ``max_pixels`` pixels is refused with :class:`ImageTooLarge` before decoding. Animations give their first
    frame; an EXIF orientation tag is applied (the picture comes back upright). Any failure is a one-line
    :class:`DataError` naming ``source`` (default: the path).
    """
    from PIL import Image

    where = source or str(path)
    try:
        with Image.open(path, formats=formats) as im:
            if max_side and max(im.size) > max_side:
                im.draft(mode if mode in ("RGB", "L") else None, _fit(im.size, max_side))
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLarge(f"{where}: picture is {w}x{h} = {w * h / 1e6:.1f} MP; the limit is "
                                    f"{max_pixels / 1e6:.1f} MP (refused undecoded)")
            im.load()
            out = to_mode(_upright(im), mode)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{where}: refused as a possible decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001  on corrupt data PIL raises OSError, SyntaxError, struct.error ...
        shown = f" {path}" if source and isinstance(path, (str, Path)) and source != str(path) else ""
        raise DataError(f"{where}: unreadable image{shown} ({e.__class__.__name__}: {e})") from None
    if max_side and max(out.size) > max_side:
        out.thumbnail((max_side, max_side))
    return out


def _upright(im):
    """``im`` turned as its EXIF orientation tag says (phone photos are stored sideways with such a tag)."""
    from PIL import ImageOps

    if im.getexif().get(0x0112, 1) in (None, 1):  # 0x0112: Orientation; 1 = stored upright
        return im
    return ImageOps.exif_transpose(im)


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled so that its long side is ``max_side`` (aspect kept: ``draft`` then reduces both sides)."""
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def to_mode(image, mode: str = "RGB"):
    """A decoded PIL image -> 8-bit ``mode`` ("RGB", "L"; empty: keep the mode but for 16-bit and alpha).

    16-bit grey is scaled to 8 bits (value / 257; PIL's own conversion clips everything over 255 to white);
    transparent pixels (alpha, palette or colour-key transparency) are composited over white rather than showing
    whatever colour the file stores under them; CMYK, palette, 1-bit and the rest are PIL conversions.
    """
    from PIL import Image

    if image.mode in _SIXTEEN_BIT:
        arr = np.asarray(image).astype(np.float64)
        if image.mode != "I" or arr.max(initial=0) > 255:  # mode "I" holding 8-bit values stays as it is
            arr = np.clip(arr, 0, 65535) / 257.0
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert(mode) if mode else image.copy()


class FaceDataset(Dataset):
    """Base class: an ordered index of records plus class names. Subclasses build ``records`` and may override
    ``load`` (in-memory or rendered sets)."""

    name: str = "dataset"

    def __init__(self, records: Sequence[FaceRecord], class_names: Sequence[str], *, split: str = "",
                 root: str | Path | None = None, modalities: tuple[str, ...] = ("image",),
                 skipped: list[str] | None = None):
        self.records = list(records)
        self.class_names = list(class_names)
        self.split = split
        self.root = Path(root) if root is not None else None
        self.modalities = modalities
        self.skipped = list(skipped or [])  # "source: reason" for every entry left out with skip_bad
        k = len(self.class_names)
        for r in self.records:
            if not 0 <= r.label < k:
                raise DataError(f"{r.source}: label {r.label} out of range 0..{k - 1} for {self.name}")

    # --- index-level views used by samplers, splits and subset evaluation ---
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def targets(self) -> np.ndarray:
        return np.fromiter((r.label for r in self.records), dtype=np.int64, count=len(self.records))

    @property
    def subjects(self) -> np.ndarray | None:
        subj = [r.subject for r in self.records]
        return None if all(s is None for s in subj) else np.asarray(subj, dtype=object)

    @property
    def clean_targets(self) -> np.ndarray | None:
        """Clean labels where the labels were read from a published noisy list (RAF-DB's noise0N.txt), else None."""
        if not self.records or "clean_label" not in self.records[0].meta:
            return None
        return np.fromiter((r.meta["clean_label"] for r in self.records), dtype=np.int64, count=len(self.records))

    def meta_column(self, key: str, default: Any = None) -> np.ndarray:
        return np.asarray([r.meta.get(key, default) for r in self.records], dtype=object)

    def subsets(self) -> dict[str, np.ndarray]:
        """Named boolean masks for robustness evaluation (occlusion types, pose > 30 / 45 ...). Default: none."""
        return {}

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        sample: dict[str, Any] = {"image": open_image(r.path, r.source), "label": r.label, "index": index}
        if r.subject is not None:
            sample["subject"] = r.subject
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index)

    def describe(self) -> str:
        counts = np.bincount(self.targets, minlength=self.num_classes)
        per = ", ".join(f"{n}={c}" for n, c in zip(self.class_names, counts))
        extra = f", skipped {len(self.skipped)} bad entries" if self.skipped else ""
        return f"{self.name}[{self.split}] {len(self)} samples ({per}){extra}"


class Subset(FaceDataset):
    """Records ``indices`` of ``base`` as a dataset of its own (folds, validation carved from train)."""

    def __init__(self, base: FaceDataset, indices: Sequence[int], split: str):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = base.name
        super().__init__([base.records[i] for i in self.indices], base.class_names, split=split, root=base.root,
                         modalities=base.modalities)

    def load(self, index: int) -> dict[str, Any]:
        sample = self.base.load(int(self.indices[index]))
        sample["index"] = index
        return sample

    def subsets(self) -> dict[str, np.ndarray]:
        return {k: v[self.indices] for k, v in self.base.subsets().items()}


class TransformView(Dataset):
    """``dataset`` seen through ``transform(sample) -> sample`` (tensors out). Several views may share one index."""

    def __init__(self, dataset: FaceDataset, transform: Callable[[dict], dict]):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.dataset.load(index))
