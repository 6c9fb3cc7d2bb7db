"""Drawing predictions on pictures: a box per face, its label and confidence, and the landmarks when known."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from .predictor import Prediction

__all__ = ["draw_predictions", "annotate_image", "label_colour"]

# Tableau-10 in RGB: a stable colour per class index
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def label_colour(label: str | None, class_names: Sequence[str]) -> tuple[int, int, int]:
    if label is None or label not in class_names:
        return (200, 200, 200)
    return _PALETTE[list(class_names).index(label) % len(_PALETTE)]


def draw_predictions(frame: np.ndarray, predictions: Sequence[Prediction], class_names: Sequence[str]) -> np.ndarray:
    """Draw on an RGB uint8 array in place (and return it). Rows without a box or label are skipped."""
    h, w = frame.shape[:2]
    thick = max(1, round(max(h, w) / 400))
    scale = max(0.4, max(h, w) / 1200)
    for p in predictions:
        if p.box is None or p.label is None:
            continue
        colour = label_colour(p.label, class_names)
        x0, y0, x1, y1 = p.box
        cv2.rectangle(frame, (x0, y0), (x1, y1), colour, thick, cv2.LINE_AA)
        text = f"{p.label} {p.probs[p.label]:.2f}" if p.probs else p.label
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = y0 - 4 if y0 - th - base - 4 >= 0 else y1 + th + 4
        cv2.rectangle(frame, (x0, ty - th - base), (x0 + tw + 4, ty + base), colour, -1)
        cv2.putText(frame, text, (x0 + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
        if p.landmarks is not None:
            for x, y in np.round(p.landmarks).astype(int):
                cv2.circle(frame, (int(x), int(y)), thick, colour, -1)
    return frame


def annotate_image(image: Image.Image, predictions: Sequence[Prediction], class_names: Sequence[str]) -> Image.Image:
    """A copy of ``image`` with the predictions drawn."""
    arr = np.array(image.convert("RGB"))
    return Image.fromarray(draw_predictions(arr, predictions, class_names))
