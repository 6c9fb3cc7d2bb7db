"""``ferkit faces``: detect and align a whole image folder offline into face crops plus a manifest.

Output layout (the source folder structure is kept, so class sub-folders stay an image-folder dataset)::

    OUT/<relative folder>/<stem>_f<k>.png   aligned crops, k = face index (most confident first)
    OUT/manifest.csv                         source, crop, face, x0, y0, x1, y1, score, detector
    OUT/no_face.csv                          source, status (no_face | unreadable), reason

Resumable: a rerun skips every source already named in ``manifest.csv`` or ``no_face.csv``. One source's rows are
written (and flushed) only after all its crops are on disk, so an interrupted run loses at most the image in hand.
"""
from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ferkit.data.base import DataError, open_image

from .faces import DEFAULT_MARGIN, FaceDetector, align_face
from .predictor import IMAGE_EXTENSIONS

__all__ = ["AlignSummary", "align_dataset", "MANIFEST_COLUMNS", "NO_FACE_COLUMNS"]

_log = logging.getLogger(__name__)
MANIFEST_COLUMNS = ["source", "crop", "face", "x0", "y0", "x1", "y1", "score", "detector"]
NO_FACE_COLUMNS = ["source", "status", "reason"]


@dataclass
class AlignSummary:
    images: int = 0  # processed in this run
    skipped: int = 0  # already done by an earlier run
    faces: int = 0
    no_face: int = 0
    unreadable: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"{self.images} images in {self.seconds:.1f} s: {self.faces} faces, {self.no_face} without a face, "
                f"{self.unreadable} unreadable; {self.skipped} already done")


def _sources(root: Path) -> Iterator[Path]:
    yield from sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def _done(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    with open(path, newline="", encoding="utf-8") as f:
        return {row["source"] for row in csv.DictReader(f) if row.get("source")}


def _appender(path: Path, columns: list[str]):
    new = not path.is_file() or path.stat().st_size == 0
    fh = open(path, "a", newline="", encoding="utf-8")
    writer = csv.DictWriter(fh, fieldnames=columns)
    if new:
        writer.writeheader()
    return fh, writer


def align_dataset(src: str | Path, out: str | Path, detector: FaceDetector, size: int = 112,
                  margin: float = DEFAULT_MARGIN, largest_only: bool = False, image_format: str = "png",
                  limit: int | None = None) -> AlignSummary:
    """Crop every face of every image under ``src`` into ``out`` (see the module docstring)."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder of images")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise DataError(f"{out}: the output folder must not be inside the source folder {src}")
    out.mkdir(parents=True, exist_ok=True)
    manifest, missing = out / "manifest.csv", out / "no_face.csv"
    done = _done(manifest) | _done(missing)
    summary = AlignSummary()
    start = time.perf_counter()
    mf, mw = _appender(manifest, MANIFEST_COLUMNS)
    nf, nw = _appender(missing, NO_FACE_COLUMNS)
    try:
        for path in _sources(src):
            rel = path.relative_to(src).as_posix()
            if rel in done:
                summary.skipped += 1
                continue
            if limit is not None and summary.images >= limit:
                break
            summary.images += 1
            try:
                image = open_image(path)
            except DataError as e:
                summary.unreadable += 1
                nw.writerow({"source": rel, "status": "unreadable", "reason": str(e)})
                nf.flush()
                continue
            faces = detector.detect(image)
            if largest_only:
                faces = sorted(faces, key=lambda f: -f.area)[:1]
            if not faces:
                summary.no_face += 1
                nw.writerow({"source": rel, "status": "no_face", "reason": f"no face found by {detector.name}"})
                nf.flush()
                continue
            rows = []
            for k, face in enumerate(faces):
                crop_rel = Path(rel).with_name(f"{Path(rel).stem}_f{k}.{image_format}").as_posix()
                (out / crop_rel).parent.mkdir(parents=True, exist_ok=True)
                align_face(image, face, size, margin).image.save(out / crop_rel)
                x0, y0, x1, y1 = face.int_box
                rows.append({"source": rel, "crop": crop_rel, "face": k, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                             "score": None if face.score is None else round(face.score, 4),
                             "detector": detector.name})
            mw.writerows(rows)
            mf.flush()
            summary.faces += len(rows)
    finally:
        mf.close()
        nf.close()
        summary.seconds = time.perf_counter() - start
    return summary
