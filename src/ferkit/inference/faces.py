"""Faces in the wild (SPEC 2.5): detection, 68-point landmarks and eye-levelled crops, with weights from the wheels.

Backends (nothing is downloaded; both carry their models inside their pip wheels):

* ``mediapipe`` — MediaPipe 0.10.21 ``solutions.face_detection`` (BlazeFace, full-range model: box, score and six
  key points, the two eye centres among them) and ``solutions.face_mesh`` (478 points). 0.10.21 is the last release
  that bundles these models; later ones need a downloaded ``.task`` file.
* ``haar`` — OpenCV < 5 Haar cascades (``cv2.data.haarcascades``: frontal face + eye), the light fallback picked
  automatically when mediapipe is not installed. Its "score" is the cascade's last-stage weight, not a probability.

Crops are aligned by a similarity transform (rotation + uniform scale + shift) that puts the eyes on a horizontal
line and the face box, widened by ``margin`` of its side on every side, on the output square.

The 68 iBUG points are read off MediaPipe's mesh with a fixed correspondence (``MESH_TO_IBUG68``: one mesh vertex,
or the mean of two where no vertex sits on the iBUG point; the correspondence of P. Yan's Mediapipe_2_Dlib_Landmarks).
MediaPipe's jaw contour lies slightly inside iBUG's, so points 0-16 are the least faithful.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "Face", "AlignedFace", "FaceDetector", "MediaPipeDetector", "HaarDetector", "FaceMeshLandmarks",
    "make_detector", "mediapipe_available", "align_face", "alignment_matrix", "detect_and_align", "MESH_TO_IBUG68",
    "DEFAULT_MARGIN", "FaceBackendError", "transform_points",
]

DEFAULT_MARGIN = 0.25  # widening of the detector box on each side, as a fraction of its side (when metadata has none)
_DETECT_MAX_SIDE = 1280  # photos are searched at most this large (boxes are mapped back to full resolution)

# iBUG-68 index -> MediaPipe mesh vertices (averaged when two). Jaw 0-16, brows 17-26, nose 27-35, eyes 36-47,
# outer lips 48-59, inner lips 60-67; "right"/"left" as iBUG: 36 = the outer corner of the eye on the image left.
MESH_TO_IBUG68: tuple[tuple[int, ...], ...] = (
    (127,), (234,), (93,), (132, 58), (58, 172), (136,), (150,), (176,), (152,), (400,), (379,), (365,), (397, 288),
    (361,), (323,), (454,), (356,),
    (70,), (63,), (105,), (66,), (107,),
    (336,), (296,), (334,), (293,), (300,),
    (168, 6), (197, 195), (5,), (4,), (75,), (97,), (2,), (326,), (305,),
    (33,), (160,), (158,), (133,), (153,), (144,),
    (362,), (385,), (387,), (263,), (373,), (380,),
    (61,), (39,), (37,), (0,), (267,), (269,), (291,), (321,), (314,), (17,), (84,), (91,),
    (78,), (82,), (13,), (312,), (308,), (317,), (14,), (87,),
)
_IBUG_FROM_PAIRS = np.array([(v[0], v[-1]) for v in MESH_TO_IBUG68])  # (68, 2): the same vertex twice when single


class FaceBackendError(RuntimeError):
    """A requested face backend is not installed or cannot start."""


@dataclass
class Face:
    """One detected face in source-image pixels."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float | None = None
    eyes: tuple[tuple[float, float], tuple[float, float]] | None = None  # (image-left eye, image-right eye) centres
    landmarks: np.ndarray | None = None  # (68, 2) iBUG order, pixels

    @property
    def int_box(self) -> tuple[int, int, int, int]:
        return tuple(int(round(v)) for v in self.box)  # type: ignore[return-value]

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


@dataclass
class AlignedFace:
    face: Face
    image: Image.Image  # size x size RGB crop
    matrix: np.ndarray = field(repr=False)  # (2, 3) source pixels -> crop pixels


class FaceDetector(Protocol):
    name: str

    def detect(self, image: Image.Image) -> list[Face]:
        """Faces in ``image``, most confident first."""


def mediapipe_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("mediapipe") is not None
    except (ImportError, ValueError):
        return False


def make_detector(backend: str = "auto", **kwargs: Any) -> FaceDetector:
    """``auto``: MediaPipe when installed (``pip install ferkit[faces]``), else OpenCV's Haar cascades."""
    if backend == "auto":
        backend = "mediapipe" if mediapipe_available() else "haar"
    if backend == "mediapipe":
        return MediaPipeDetector(**kwargs)
    if backend == "haar":
        return HaarDetector(**kwargs)
    raise ValueError(f"unknown face detector {backend!r} (auto, mediapipe, haar)")


def _rgb_array(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def _downscale_for_search(arr: np.ndarray, max_side: int = _DETECT_MAX_SIDE) -> tuple[np.ndarray, float]:
    """Large photos are searched at a bounded size; returns the array and the factor back to full resolution."""
    h, w = arr.shape[:2]
    if max(h, w) <= max_side:
        return arr, 1.0
    f = max_side / max(h, w)
    return cv2.resize(arr, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA), 1.0 / f


# ---------------------------------------------------------------------------------------------------------- MediaPipe
MEDIAPIPE_INSTALL = (
    "install the faces extra in the same pip command as every other extra you use, e.g. "
    "`pip install -e \".[faces]\"` or `pip install -e \".[test,all,faces]\"`: MediaPipe 0.10.21 (the last release "
    "with the face detection / mesh solutions) needs numpy<2 and protobuf<5, so pip then picks versions of numpy, "
    "protobuf, opencv, onnx and tensorboard that all fit it (added to an environment built without it, it "
    "downgrades numpy and protobuf under packages that need newer ones); or use --detector haar")


def _import_mediapipe():
    try:
        import mediapipe as mp  # noqa: F401  (prints a harmless protobuf notice on import with protobuf >= 5)
    except (ImportError, AttributeError) as e:  # AttributeError: a numpy-1 build imported under numpy 2
        raise FaceBackendError(f"the mediapipe face backend cannot import mediapipe "
                               f"({type(e).__name__}: {e}); {MEDIAPIPE_INSTALL}") from e
    if not hasattr(mp, "solutions"):
        raise FaceBackendError(f"mediapipe {getattr(mp, '__version__', '?')} has no face solutions (ferkit needs "
                               f"mediapipe==0.10.21); {MEDIAPIPE_INSTALL}")
    return mp


class FaceMeshLandmarks:
    """MediaPipe face mesh (478 points with ``refine=True``) and its iBUG-68 subset.

    ``detect68(image)`` returns the (68, 2) pixel landmarks of the largest face, or ``None`` when no face is found.
    Thread-safe (one graph, one lock).
    """

    def __init__(self, max_faces: int = 1, refine: bool = True, min_confidence: float = 0.5):
        mp = _import_mediapipe()
        self.max_faces = max_faces
        self._lock = threading.Lock()
        try:
            self._mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=max_faces,
                                                         refine_landmarks=refine,
                                                         min_detection_confidence=min_confidence)
        except AttributeError:
            # protobuf >= 6 lacks FieldDescriptor.label, which FaceMesh uses to set its two thresholds; the bundled
            # graph's own thresholds (0.5, the same defaults) apply when none are set.
            from mediapipe.python.solution_base import SolutionBase

            self._mesh = SolutionBase(binary_graph_path=mp.solutions.face_mesh._BINARYPB_FILE_PATH,
                                      side_inputs={"num_faces": max_faces, "with_attention": refine,
                                                   "use_prev_landmarks": False},
                                      outputs=["multi_face_landmarks"])

    def detect478(self, image: Image.Image | np.ndarray) -> list[np.ndarray]:
        """(N, 3) pixel x, y and relative depth per face (N = 478, or 468 without ``refine``), largest face first."""
        arr = image if isinstance(image, np.ndarray) else _rgb_array(image)
        h, w = arr.shape[:2]
        with self._lock:
            result = self._mesh.process(arr)
        faces = []
        for lm in result.multi_face_landmarks or []:
            pts = np.array([(p.x * w, p.y * h, p.z * w) for p in lm.landmark], dtype=np.float32)
            faces.append(pts)
        faces.sort(key=lambda p: -float(np.ptp(p[:, 0]) * np.ptp(p[:, 1])))
        return faces

    @staticmethod
    def mesh_to_ibug68(mesh: np.ndarray) -> np.ndarray:
        """(>=468, D) mesh -> (68, 2) iBUG points (mean of the one or two corresponding vertices)."""
        return mesh[_IBUG_FROM_PAIRS, :2].mean(axis=1).astype(np.float32)

    def detect68(self, image: Image.Image | np.ndarray) -> np.ndarray | None:
        faces = self.detect478(image)
        return self.mesh_to_ibug68(faces[0]) if faces else None

    def close(self) -> None:
        self._mesh.close()


class MediaPipeDetector:
    """BlazeFace boxes + eye key points; optionally 68 landmarks per face (face mesh run on the face's region)."""

    name = "mediapipe"

    def __init__(self, min_score: float = 0.5, full_range: bool = True, landmarks: bool = False):
        mp = _import_mediapipe()
        self._lock = threading.Lock()
        # model_selection 1 = full-range model (faces up to ~5 m), 0 = short-range (selfies)
        self._det = mp.solutions.face_detection.FaceDetection(model_selection=int(full_range),
                                                              min_detection_confidence=min_score)
        self._mesh = FaceMeshLandmarks(max_faces=1) if landmarks else None

    def detect(self, image: Image.Image) -> list[Face]:
        full = _rgb_array(image)
        arr, back = _downscale_for_search(full)
        h, w = arr.shape[:2]
        with self._lock:
            result = self._det.process(arr)
        faces = []
        for d in result.detections or []:
            rb = d.location_data.relative_bounding_box
            box = (rb.xmin * w * back, rb.ymin * h * back, (rb.xmin + rb.width) * w * back,
                   (rb.ymin + rb.height) * h * back)
            kp = d.location_data.relative_keypoints  # 0: subject's right eye (image left), 1: left eye, 2: nose...
            eyes = ((kp[0].x * w * back, kp[0].y * h * back), (kp[1].x * w * back, kp[1].y * h * back))
            face = Face(_clip_box(box, full.shape), float(d.score[0]), _order_eyes(eyes))
            if self._mesh is not None:
                self._add_landmarks(full, face)
            faces.append(face)
        faces.sort(key=lambda f: -(f.score or 0.0))
        return faces

    def _add_landmarks(self, full: np.ndarray, face: Face) -> None:
        """Mesh on the face's neighbourhood (box widened by half its side), so each face gets its own mesh."""
        x0, y0, x1, y1 = face.box
        pad = 0.5 * max(x1 - x0, y1 - y0)
        ix0, iy0 = max(0, int(x0 - pad)), max(0, int(y0 - pad))
        ix1, iy1 = min(full.shape[1], int(x1 + pad)), min(full.shape[0], int(y1 + pad))
        lm = self._mesh.detect68(np.ascontiguousarray(full[iy0:iy1, ix0:ix1]))
        if lm is not None:
            face.landmarks = lm + np.array([ix0, iy0], dtype=np.float32)
            face.eyes = _order_eyes((tuple(face.landmarks[36:42].mean(0)), tuple(face.landmarks[42:48].mean(0))))


# --------------------------------------------------------------------------------------------------------------- Haar
class HaarDetector:
    """OpenCV Viola-Jones frontal-face cascade; eyes from the eye cascade inside the face's upper part."""

    name = "haar"

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24,
                 cascade: str = "haarcascade_frontalface_default.xml"):
        root = Path(getattr(getattr(cv2, "data", None), "haarcascades", ""))
        face_xml, eye_xml = root / cascade, root / "haarcascade_eye.xml"
        if not face_xml.is_file():
            raise FaceBackendError(f"OpenCV Haar cascades not found ({face_xml}); they ship with "
                                   "opencv-python(-headless) < 5")
        self._face = cv2.CascadeClassifier(str(face_xml))
        self._eye = cv2.CascadeClassifier(str(eye_xml))
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size
        self._lock = threading.Lock()

    def detect(self, image: Image.Image) -> list[Face]:
        grey_full = np.asarray(image.convert("L"))
        grey, back = _downscale_for_search(grey_full)
        grey = cv2.equalizeHist(grey)
        with self._lock:
            rects, _, weights = self._face.detectMultiScale3(
                grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                minSize=(self.min_size, self.min_size), outputRejectLevels=True)
        faces = []
        for (x, y, w, h), wt in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1)):
            eyes = self._eyes(grey, x, y, w, h)
            if eyes is not None:
                eyes = _order_eyes(tuple((ex * back, ey * back) for ex, ey in eyes))
            box = (x * back, y * back, (x + w) * back, (y + h) * back)
            faces.append(Face(_clip_box(box, grey_full.shape), float(wt), eyes))
        faces.sort(key=lambda f: -(f.score or 0.0))
        return faces

    def _eyes(self, grey: np.ndarray, x: int, y: int, w: int, h: int):
        """One eye in each half of the face's upper 60 %, else None (the crop is then not rotated)."""
        roi = grey[y: y + int(0.6 * h), x: x + w]
        with self._lock:
            found = self._eye.detectMultiScale(roi, 1.1, 5, minSize=(max(8, w // 10), max(8, w // 10)))
        halves: dict[int, tuple[float, float, float]] = {}
        for ex, ey, ew, eh in np.asarray(found).reshape(-1, 4):
            cx, cy = x + ex + ew / 2, y + ey + eh / 2
            side = int(cx > x + w / 2)
            if side not in halves or ew * eh > halves[side][2]:
                halves[side] = (cx, cy, ew * eh)
        if len(halves) < 2:
            return None
        return (halves[0][:2], halves[1][:2])


def _order_eyes(eyes):
    a, b = eyes
    return (a, b) if a[0] <= b[0] else (b, a)


def _clip_box(box, shape) -> tuple[float, float, float, float]:
    h, w = shape[:2]
    x0, y0, x1, y1 = box
    return (float(max(0.0, x0)), float(max(0.0, y0)), float(min(w, x1)), float(min(h, y1)))


# ---------------------------------------------------------------------------------------------------------- alignment
def alignment_matrix(face: Face, size: int, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """(2, 3) similarity transform source -> crop: box centre to crop centre, eye line horizontal, box side
    ``(1 + 2 margin) * max(w, h)`` to ``size`` pixels."""
    x0, y0, x1, y1 = face.box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(x1 - x0, y1 - y0, 1.0) * (1 + 2 * margin)
    angle = 0.0
    if face.eyes is not None:
        (lx, ly), (rx, ry) = face.eyes
        angle = math.degrees(math.atan2(ry - ly, rx - lx))  # > 0: the image-right eye is lower (y points down)
    m = cv2.getRotationMatrix2D((cx, cy), angle, size / side)
    m[:, 2] += (size / 2 - cx, size / 2 - cy)
    return m


def align_face(image: Image.Image | np.ndarray, face: Face, size: int, margin: float = DEFAULT_MARGIN) -> AlignedFace:
    """Eye-levelled ``size`` x ``size`` RGB crop; outside the photo is black."""
    arr = image if isinstance(image, np.ndarray) else _rgb_array(image)
    m = alignment_matrix(face, size, margin)
    src, warp = arr, m.copy()
    scale = math.hypot(m[0, 0], m[0, 1])
    if scale < 0.5:  # a big face into a small crop: area-average the region first, so the warp does not alias
        src, pre = _shrunk_region(arr, m, size, target_scale=0.5 / scale)
        warp = m @ pre
    crop = cv2.warpAffine(src, warp, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return AlignedFace(face, Image.fromarray(crop), m)


def _shrunk_region(arr: np.ndarray, m: np.ndarray, size: int, target_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The source region the crop covers, shrunk by ``1 / target_scale``; returns it and the (3, 3) map
    shrunk-region pixels -> source pixels."""
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64) @ inv.T
    h, w = arr.shape[:2]
    x0, y0 = (max(0, int(math.floor(v))) for v in corners.min(0))
    x1, y1 = min(w, int(math.ceil(corners[:, 0].max()))), min(h, int(math.ceil(corners[:, 1].max())))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return arr, np.eye(3)[:3]
    region = arr[y0:y1, x0:x1]
    nw, nh = max(1, round((x1 - x0) / target_scale)), max(1, round((y1 - y0) / target_scale))
    small = cv2.resize(region, (nw, nh), interpolation=cv2.INTER_AREA)
    fx, fy = (x1 - x0) / nw, (y1 - y0) / nh
    pre = np.array([[fx, 0, x0 + 0.5 * fx - 0.5], [0, fy, y0 + 0.5 * fy - 0.5], [0, 0, 1]])
    return small, pre


def detect_and_align(image: Image.Image, detector: FaceDetector, size: int, margin: float = DEFAULT_MARGIN,
                     max_faces: int | None = None) -> list[AlignedFace]:
    """All faces of ``image`` (most confident first, at most ``max_faces``) as aligned crops."""
    faces = detector.detect(image)[:max_faces]
    arr = _rgb_array(image)
    return [align_face(arr, f, size, margin) for f in faces]


def transform_points(points: np.ndarray | Sequence[Sequence[float]], matrix: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine map to (N, 2) points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ matrix[:, :2].T + matrix[:, 2]
