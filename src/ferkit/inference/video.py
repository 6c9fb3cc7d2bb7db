"""Video and webcam: every ``stride``-th frame is classified (faces detected per frame), a per-frame CSV is written
and, optionally, an annotated video (all frames, each showing the latest predictions) through ``cv2.VideoWriter``.

A webcam is the same loop over ``cv2.VideoCapture(index)`` until ``max_frames`` or Ctrl-C.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
from PIL import Image

from ferkit.data.base import DataError

from .annotate import draw_predictions
from .predictor import Prediction, Predictor

__all__ = ["VideoSummary", "predict_video", "iter_frames", "video_columns"]

_log = logging.getLogger(__name__)


@dataclass
class VideoSummary:
    frames_read: int
    frames_classified: int
    faces: int
    fps: float
    size: tuple[int, int]  # width, height


def video_columns(class_names: list[str]) -> list[str]:
    return ["frame", "time_s", "face", "status", "label", "x0", "y0", "x1", "y1", "score",
            *[f"p_{c}" for c in class_names]]


def iter_frames(capture: cv2.VideoCapture, max_frames: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB frame) until the stream ends or ``max_frames`` frames were read."""
    index = 0
    while max_frames is None or index < max_frames:
        ok, bgr = capture.read()
        if not ok:
            return
        yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        index += 1


def _open(source: str | int | Path) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(int(source) if isinstance(source, int) else str(source))
    if not cap.isOpened():
        what = f"webcam {source}" if isinstance(source, int) else f"{source}"
        raise DataError(f"{what}: cannot open video (missing file, unsupported codec or no such camera)")
    return cap


def predict_video(predictor: Predictor, source: str | int | Path, stride: int = 1, csv_path: str | Path | None = None,
                  video_out: str | Path | None = None, max_frames: int | None = None,
                  on_frame: Callable[[int, list[Prediction]], None] | None = None,
                  progress: bool = False) -> VideoSummary:
    """Classify the faces of every ``stride``-th frame of a file or webcam (int index).

    ``csv_path``: one row per face per classified frame (a frame without a face is a ``no_face`` row).
    ``video_out``: annotated copy (MP4, codec mp4v) at the source's frame rate.
    ``progress``: a frame progress bar on stderr (tqdm; of the container's frame count where it reports one).
    Frames are whole scenes, never face crops: under ``faces="auto"`` they always go through detection.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    cap = _open(source)
    mode = predictor.faces
    if mode == "auto":
        predictor.faces = "detect"
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    fps = fps if 0 < fps < 1000 else 25.0  # webcams and some containers report 0
    writer, fh, rows = None, None, None
    latest: list[Prediction] = []
    n_read = n_classified = n_faces = 0
    size = (0, 0)
    try:
        if csv_path is not None:
            Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
            fh = open(csv_path, "w", newline="", encoding="utf-8")
            rows = csv.DictWriter(fh, fieldnames=video_columns(predictor.class_names), extrasaction="ignore")
            rows.writeheader()
        frames = iter_frames(cap, max_frames)
        if progress:
            from tqdm import tqdm

            total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) or None
            total = min(total, max_frames) if total and max_frames else (total or max_frames)
            frames = tqdm(frames, total=total, unit=" frames", desc=str(source))
        for index, frame in frames:
            n_read += 1
            size = (frame.shape[1], frame.shape[0])
            if index % stride == 0:
                name = f"frame:{index}"
                latest = next(iter(predictor.predict_sources([(name, Image.fromarray(frame))]))).predictions
                n_classified += 1
                n_faces += sum(p.status == "ok" for p in latest)
                if rows is not None:
                    for p in latest:
                        rows.writerow({**p.row(), "frame": index, "time_s": round(index / fps, 4)})
                if on_frame is not None:
                    on_frame(index, latest)
            if video_out is not None:
                if writer is None:
                    writer = _writer(video_out, fps, size)
                writer.write(cv2.cvtColor(draw_predictions(frame, latest, predictor.class_names), cv2.COLOR_RGB2BGR))
    except KeyboardInterrupt:
        _log.info("stopped after %d frames", n_read)
    finally:
        predictor.faces = mode
        cap.release()
        if writer is not None:
            writer.release()
        if fh is not None:
            fh.close()
    return VideoSummary(n_read, n_classified, n_faces, fps, size)


def _writer(path: str | Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise DataError(f"{path}: cannot write video (OpenCV has no mp4v encoder here)")
    return writer
