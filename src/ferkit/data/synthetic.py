"""Built-in synthetic faces (SPEC 2.4): procedurally rendered cartoon faces with known ground truth.

The default dataset of ferkit: no download, deterministic from a seed, any resolution, thousands of images per
minute on one core. Every sample carries an RGB image, a depth map, the 68 iBUG landmarks, the expression label and
intensity, a subject id, the head pose, the occlusion type and the lighting factor.

How a face is made
------------------
* **Identity** (subject): head ellipsoid, jaw shape, feature placement, skin / hair / iris colours, hair style and a
  resting expression, all drawn from ``(seed, subject number)``. Train, val and test use disjoint subject numbers.
* **Expression**: facial action units (FACS) with the EMFACS prototypes (``PROTOTYPES``). Each AU is a displacement
  field on the 68 landmarks (``_AU_DISPLACEMENT``) plus the wrinkles it makes (``_paint_creases``) and the bumps it
  makes in depth (``_bump_field``). Activations scale with the intensity level (1..4) and get per-sample jitter and
  spontaneous activity, so fear / surprise, anger / disgust and weak sadness / neutral are genuinely confusable.
* **Geometry**: the face lives on the front of a head ellipsoid displaced by a bump field (nose, brow ridge, cheeks,
  lips, chin, open mouth). Face coordinates: x to the image right, y down, z towards the camera, in units of about
  half a face width. The head is rotated (yaw, pitch, small roll) and projected orthographically; each pixel is ray
  cast onto the displaced ellipsoid, which gives depth, the head mask and the face coordinates at which a frontal
  texture (features, hair, mask or glasses) is looked up. Landmarks are the same 3D points projected, so image,
  depth and landmarks agree at every pose.
* **Nuisances**: random background, back hair, lighting direction and strength, colour cast, blur, noise, occluders
  (RAN protocol: mask, sunglasses and top / bottom / left / right half patches; RGB only, depth is untouched) and
  optional low light.

Conventions: landmarks are pixel coordinates with pixel centres at integer positions (the cv2 / dlib convention).
Positive yaw turns the nose towards the image right, positive pitch lifts the nose (head up). Depth is
``(z + 2) / 3.8`` for the head and neck (about 0.35..0.95, larger = closer) and 0 on the background.
"""
from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from ..labels import LABEL_SPACES
from .base import FaceDataset, FaceRecord

__all__ = [
    "OCCLUSIONS", "AU_NAMES", "PROTOTYPES", "SyntheticConfig", "SampleParams", "render_sample", "sample_params",
    "render_params", "render_arrays", "expression_aus", "make_identity", "SyntheticFaces", "write_synthetic",
    "contact_sheet",
]

OCCLUSIONS = ("none", "mask", "glasses", "top", "bottom", "left", "right")
SPLITS = {"train": 0, "val": 1, "test": 2, "all": 3}
_SUBJECT_STRIDE = 100_000  # subject numbers of split s are SPLITS[s] * stride + k, so splits never share identities
RENDERER_VERSION = 2  # bump when the pictures change, so on-disk caches are rebuilt

# Facial action units used (FACS numbers). AU14 is one-sided (subject's right = image left): the dimpler together
# with a trace of one-sided lip corner pull, i.e. the R12A+R14A of contempt.
AU_NAMES = ("AU1", "AU2", "AU4", "AU5", "AU6", "AU7", "AU9", "AU12", "AU14", "AU15", "AU17", "AU20", "AU23",
            "AU25", "AU26")
_AU = {n: i for i, n in enumerate(AU_NAMES)}

# EMFACS prototypes, weights at full intensity.
PROTOTYPES: dict[str, dict[str, float]] = {
    "anger": {"AU4": 1.0, "AU5": 0.6, "AU7": 0.8, "AU23": 1.0},
    "disgust": {"AU9": 1.0, "AU15": 0.7, "AU17": 0.8},
    "fear": {"AU1": 0.9, "AU2": 0.7, "AU4": 0.6, "AU5": 1.0, "AU7": 0.4, "AU20": 1.0, "AU25": 0.7, "AU26": 0.5},
    "happiness": {"AU6": 0.9, "AU12": 1.0},
    "sadness": {"AU1": 1.0, "AU4": 0.6, "AU15": 1.0},
    "surprise": {"AU1": 1.0, "AU2": 1.0, "AU5": 0.9, "AU25": 0.7, "AU26": 1.0},
    "neutral": {},
    "contempt": {"AU14": 1.0},
}
# AUs that often join a prototype in real faces; each is switched on per sample with probability 1/2.
_OPTIONAL_AUS: dict[str, dict[str, float]] = {
    "happiness": {"AU25": 0.7},
    "sadness": {"AU17": 0.5},
    "anger": {"AU17": 0.5},
    "disgust": {"AU4": 0.4, "AU25": 0.4},
    "fear": {"AU26": 0.9},
}
INTENSITY_SCALE = (0.0, 0.45, 0.65, 0.85, 1.0)  # AU activation per intensity level 0 (neutral) .. 4

# Texture grid in face coordinates (x right, y down; about 1 unit = half a face width).
_TEX_X = 1.35
_TEX_Y0, _TEX_Y1 = -1.85, 1.65
_HEAD_CY = -0.1  # head ellipsoid centre (y) and rotation pivot
_DEPTH_OFFSET, _DEPTH_RANGE = 2.0, 3.8


@dataclass
class SyntheticConfig:
    """What to render. Every field enters the cache key; ``seed`` picks identities and samples."""

    size: int = 112  # output H = W
    num_classes: int = 7  # 7 or 8 (adds contempt)
    num_subjects: int = 60  # identities in this split
    samples_per_subject: int = 50
    occlusion_prob: float = 0.25  # probability of one of the 6 occlusion types (uniform among them)
    pose_max_yaw: float = 60.0
    pose_max_pitch: float = 30.0
    low_light_prob: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.size < 16:
            problems.append(f"size={self.size} (need >= 16)")
        if self.num_classes not in (7, 8):
            problems.append(f"num_classes={self.num_classes} (need 7 or 8)")
        if self.num_subjects < 1 or self.samples_per_subject < 1:
            problems.append("num_subjects and samples_per_subject must be >= 1")
        if self.num_subjects > _SUBJECT_STRIDE:
            problems.append(f"num_subjects={self.num_subjects} (at most {_SUBJECT_STRIDE})")
        for name in ("occlusion_prob", "low_light_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} (need 0..1)")
        if not 0.0 <= self.pose_max_yaw <= 60.0 or not 0.0 <= self.pose_max_pitch <= 30.0:
            problems.append("pose_max_yaw must be in 0..60 and pose_max_pitch in 0..30")
        if problems:
            raise ValueError("SyntheticConfig: " + "; ".join(problems))

    @property
    def class_names(self) -> tuple[str, ...]:
        return LABEL_SPACES["synthetic8" if self.num_classes == 8 else "synthetic7"]

    @property
    def num_samples(self) -> int:
        return self.num_subjects * self.samples_per_subject


# ----------------------------------------------------------------------------------------------------------------
# Landmark layout (iBUG 68) and action units as landmark displacements
# ----------------------------------------------------------------------------------------------------------------
def _side_of_points() -> np.ndarray:
    """-1 for points on the image-left half, +1 right, 0 on the midline (sign of 'outward' in x)."""
    side = np.zeros(68, np.float32)
    left = [*range(0, 8), *range(17, 22), 31, 32, *range(36, 42), 48, 49, 50, 58, 59, 60, 61, 67]
    right = [*range(9, 17), *range(22, 27), 34, 35, *range(42, 48), 52, 53, 54, 55, 56, 63, 64, 65]
    side[left], side[right] = -1.0, 1.0
    return side


_SIDE = _side_of_points()
_MIRROR = np.array([16 - i for i in range(17)] + [26 - i for i in range(10)] + [27, 28, 29, 30, 35, 34, 33, 32, 31]
                   + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
                   + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65])


def _table(*rows: tuple[Sequence[int], float, float]) -> np.ndarray:
    """(68, 2) displacement at activation 1 from rows (points, dx outward from the midline, dy downward)."""
    d = np.zeros((68, 2), np.float32)
    for idx, dx_out, dy in rows:
        for i in idx:
            d[i] += (_SIDE[i] * dx_out, dy)
    return d


_AU_DISPLACEMENT: dict[str, np.ndarray] = {
    # AU1 inner brow raiser
    "AU1": _table(((21, 22), -0.01, -0.13), ((20, 23), -0.005, -0.085), ((19, 24), 0, -0.04), ((18, 25), 0, -0.012)),
    # AU2 outer brow raiser
    "AU2": _table(((17, 26), 0.01, -0.13), ((18, 25), 0, -0.11), ((19, 24), 0, -0.06), ((20, 23), 0, -0.02)),
    # AU4 brow lowerer: brows down and together, upper lids pushed down
    "AU4": _table(((21, 22), -0.06, 0.13), ((20, 23), -0.045, 0.11), ((19, 24), -0.025, 0.08), ((18, 25), -0.01, 0.05),
                  ((17, 26), 0, 0.03), ((37, 38, 43, 44), 0, 0.015)),
    # AU5 upper lid raiser
    "AU5": _table(((37, 38, 43, 44), 0, -0.05), ((36, 39, 42, 45), 0, -0.005)),
    # AU6 cheek raiser: lower lids pushed up
    "AU6": _table(((40, 41, 46, 47), 0, -0.03), ((36, 45), 0, -0.012)),
    # AU7 lid tightener: lids narrowed from below and above
    "AU7": _table(((40, 41, 46, 47), 0, -0.035), ((37, 38, 43, 44), 0, 0.025)),
    # AU9 nose wrinkler: nose wings and upper lip up, inner brows down
    "AU9": _table(((31, 35), 0.02, -0.045), ((32, 34), 0.01, -0.045), ((33,), 0, -0.035), ((21, 22), 0, 0.05),
                  ((20, 23), 0, 0.03), ((50, 51, 52), 0, -0.04), ((49, 53), 0, -0.02), ((61, 62, 63), 0, -0.035),
                  ((40, 41, 46, 47), 0, -0.015)),
    # AU12 lip corner puller
    "AU12": _table(((48, 54), 0.1, -0.11), ((60, 64), 0.09, -0.1), ((49, 53), 0.06, -0.08), ((55, 59), 0.06, -0.085),
                   ((50, 52, 56, 58), 0.02, -0.035), ((61, 63), 0.02, -0.04), ((65, 67), 0.02, -0.045),
                   ((40, 41, 46, 47), 0, -0.01)),
    # AU14 dimpler + trace of AU12, subject's right side only (points of the image-left half): contempt R12A+R14A
    "AU14": _table(((48,), 0.07, -0.08), ((60,), 0.06, -0.07), ((49, 59), 0.025, -0.035), ((61, 67), 0.01, -0.015)),
    # AU15 lip corner depressor
    "AU15": _table(((48, 54), -0.01, 0.075), ((60, 64), -0.01, 0.06), ((49, 53, 55, 59), 0, 0.03),
                   ((56, 57, 58), 0, 0.01)),
    # AU17 chin raiser: lower lip and chin pushed up
    "AU17": _table(((55, 56, 58, 59), 0, -0.03), ((57,), 0, -0.04), ((65, 66, 67), 0, -0.03), ((7, 8, 9), 0, -0.03),
                   ((6, 10), 0, -0.015), ((48, 54), 0, 0.015), ((51,), 0, -0.01)),
    # AU20 lip stretcher: corners pulled sideways, lips thinned
    "AU20": _table(((48, 54), 0.09, 0.02), ((60, 64), 0.085, 0.02), ((49, 53, 55, 59), 0.05, 0.0),
                   ((50, 51, 52), 0, 0.012), ((56, 57, 58), 0, -0.012)),
    # AU23 lip tightener: mouth narrower, red of the lips thinner
    "AU23": _table(((48, 54), -0.04, 0), ((60, 64), -0.035, 0), ((49, 53, 55, 59), -0.02, 0),
                   ((49, 50, 52, 53), 0, 0.02), ((51,), 0, 0.025), ((55, 56, 58, 59), 0, -0.02), ((57,), 0, -0.025)),
    # AU25 lips part
    "AU25": _table(((65, 66, 67), 0, 0.06), ((66,), 0, 0.008), ((61, 62, 63), 0, -0.015),
                   ((55, 56, 57, 58, 59), 0, 0.05)),
    # AU26 jaw drop: lower lip, chin and lower jaw move down
    "AU26": _table(((65, 67), 0, 0.19), ((66,), 0, 0.21), ((56, 57, 58), 0, 0.2), ((55, 59), 0, 0.14),
                   ((60, 64), -0.02, 0.02), ((48, 54), -0.02, 0.03), ((61, 62, 63), 0, -0.01), ((8,), 0, 0.2),
                   ((7, 9), 0, 0.19), ((6, 10), 0, 0.16), ((5, 11), 0, 0.11), ((4, 12), 0, 0.06), ((3, 13), 0, 0.02)),
}
_AU_STACK = np.stack([_AU_DISPLACEMENT[n] for n in AU_NAMES])  # (num_AUs, 68, 2)


# ----------------------------------------------------------------------------------------------------------------
# Identities and per-sample parameters
# ----------------------------------------------------------------------------------------------------------------
_SKIN_ANCHORS = np.array([(112, 72, 52), (141, 85, 60), (198, 134, 98), (226, 174, 138), (246, 210, 184)], np.float32)
_HAIR_COLOURS = np.array([(24, 20, 18), (58, 38, 26), (105, 70, 42), (196, 160, 98), (150, 68, 34), (150, 148, 142),
                          (212, 206, 196)], np.float32)
_HAIR_P = np.array([0.3, 0.25, 0.18, 0.1, 0.07, 0.06, 0.04])
_IRIS_COLOURS = np.array([(88, 54, 30), (40, 28, 20), (70, 110, 160), (80, 118, 72), (118, 98, 52)], np.float32)


@dataclass(frozen=True)
class Identity:
    """Everything that makes one subject look like themself (face units, RGB colours)."""

    a: float  # head ellipsoid half-width
    b: float  # half-height
    c: float  # half-depth
    jaw_top: tuple[float, float]  # (half-width, y) where the jaw line starts below the ears
    jaw_power: float  # superellipse exponent of the jaw: 2 = oval, 3+ = square
    chin_y: float
    eye_y: float
    eye_sep: float  # half distance between eye centres
    eye_w: float  # half eye width
    eye_h: float  # upper lid height above the eye axis
    eye_tilt: float
    brow_gap: float
    brow_thick: float
    brow_arch: float
    nose_tip_y: float
    nose_w: float
    nose_h: float  # protrusion
    mouth_y: float
    mouth_w: float
    lip_up: float
    lip_low: float
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    iris: tuple[float, float, float]
    hairline: float
    hair_curve: float
    side_x: float
    side_end: float
    bangs: float | None  # y of a fringe, or None
    long_hair: bool
    bald: bool
    rest_mouth: float  # resting lip-corner offset (+ down: looks a little sad)
    rest_brow: float  # resting inner-brow offset (+ down: looks a little cross)
    jitter: np.ndarray = field(repr=False, compare=False, hash=False)  # (68, 2) personal landmark asymmetry


@lru_cache(maxsize=4096)
def make_identity(seed: int, subject_num: int) -> Identity:
    """The identity of subject ``subject_num`` under ``seed`` (deterministic)."""
    r = np.random.default_rng([seed, 7919, subject_num])
    u = r.uniform
    t = u(0, 1) * (len(_SKIN_ANCHORS) - 1)
    lo = int(min(t, len(_SKIN_ANCHORS) - 2))
    skin = _SKIN_ANCHORS[lo] + (t - lo) * (_SKIN_ANCHORS[lo + 1] - _SKIN_ANCHORS[lo]) + r.normal(0, 6, 3)
    hair = _HAIR_COLOURS[r.choice(len(_HAIR_COLOURS), p=_HAIR_P)] * u(0.85, 1.15)
    a = u(0.95, 1.1)
    eye_y = u(-0.2, -0.1)
    bald = u() < 0.07
    return Identity(
        a=a, b=u(1.55, 1.68), c=u(1.05, 1.25), jaw_top=(a * u(0.9, 0.95), u(-0.05, 0.1)), jaw_power=u(2.0, 3.2),
        chin_y=u(0.95, 1.08), eye_y=eye_y, eye_sep=u(0.38, 0.45), eye_w=u(0.16, 0.19), eye_h=u(0.065, 0.085),
        eye_tilt=u(-0.015, 0.03), brow_gap=u(0.17, 0.24), brow_thick=u(0.055, 0.09), brow_arch=u(0.02, 0.07),
        nose_tip_y=u(0.2, 0.3), nose_w=u(0.15, 0.2), nose_h=u(0.27, 0.37), mouth_y=u(0.53, 0.62),
        mouth_w=u(0.28, 0.36), lip_up=u(0.05, 0.08), lip_low=u(0.06, 0.1),
        skin=tuple(np.clip(skin, 0, 255)), hair=tuple(np.clip(hair, 0, 255)),
        iris=tuple(_IRIS_COLOURS[r.integers(len(_IRIS_COLOURS))]),
        hairline=-1.2 if bald else (u(-1.1, -0.95) if u() < 0.15 else u(-0.95, -0.72)), hair_curve=u(0.05, 0.3),
        side_x=u(0.82, 0.92), side_end=u(0.6, 1.3) if u() < 0.4 else u(-0.35, 0.1),
        bangs=u(-0.62, -0.5) if u() < 0.25 else None, long_hair=u() < 0.4, bald=bald,
        rest_mouth=r.normal(0, 0.015), rest_brow=r.normal(0, 0.02),
        jitter=r.normal(0, 0.008, (68, 2)).astype(np.float32),
    )


@dataclass
class SampleParams:
    """The random draws of one sample; rendering is a pure function of these (overridable, e.g. contact sheet)."""

    subject_num: int
    label: int
    intensity: int  # 0 for neutral, 1..4 otherwise
    au_gain: np.ndarray  # per-AU multiplicative jitter of the prototype weights
    au_noise: np.ndarray  # spontaneous activity added to every AU
    au_optional: np.ndarray  # which optional co-occurring AUs are on
    yaw: float
    pitch: float
    roll: float
    occlusion: str
    lighting: float  # brightness factor (0.1..0.3 in low light)
    scale: float  # framing jitter
    shift: tuple[float, float]
    render_seed: int  # seeds the rest (background, light direction, occluder colours, noise)


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def subject_number(cfg: SyntheticConfig, split: str, index: int) -> int:
    """Global subject number of sample ``index`` (splits use disjoint ranges)."""
    return _split_code(split) * _SUBJECT_STRIDE + index // cfg.samples_per_subject


def subject_id(subject_num: int) -> str:
    return f"S{subject_num:06d}"


def _draw_pose(r: np.random.Generator, max_deg: float, p_wide: float) -> float:
    """Mostly near frontal (normal, sd = max/5), a tail uniform over the whole range."""
    if max_deg <= 0:
        return 0.0
    v = r.uniform(-max_deg, max_deg) if r.uniform() < p_wide else r.normal(0, max_deg / 5)
    return float(np.clip(v, -max_deg, max_deg))


def sample_params(cfg: SyntheticConfig, split: str, index: int) -> SampleParams:
    """Draw the parameters of sample ``index`` from its own RNG ``default_rng([seed, split, index])``."""
    if not 0 <= index < cfg.num_samples:
        raise IndexError(f"sample index {index} out of range 0..{cfg.num_samples - 1}")
    r = np.random.default_rng([cfg.seed, _split_code(split), index])
    k = cfg.num_classes
    subj = subject_number(cfg, split, index)
    label = (index % cfg.samples_per_subject + subj) % k  # balanced within each subject
    neutral = cfg.class_names[label] == "neutral"
    n_au = len(AU_NAMES)
    noise = np.abs(r.normal(0, 0.04, n_au))
    if r.uniform() < 0.25:  # a stray action unit: real 'neutral' faces are rarely perfectly still
        noise[r.integers(n_au)] += r.uniform(0.05, 0.25)
    occluded = r.uniform() < cfg.occlusion_prob
    occlusion = OCCLUSIONS[1 + r.integers(6)] if occluded else "none"
    low = r.uniform() < cfg.low_light_prob
    return SampleParams(
        subject_num=subj, label=int(label), intensity=0 if neutral else int(r.integers(1, 5)),
        au_gain=r.uniform(0.75, 1.25, n_au), au_noise=noise, au_optional=r.uniform(size=n_au) < 0.5,
        yaw=_draw_pose(r, cfg.pose_max_yaw, 0.3), pitch=_draw_pose(r, cfg.pose_max_pitch, 0.25),
        roll=float(np.clip(r.normal(0, 4), -10, 10)), occlusion=occlusion,
        lighting=float(r.uniform(0.1, 0.3) if low else r.uniform(0.8, 1.15)),
        scale=float(r.uniform(0.93, 1.07)), shift=(float(r.normal(0, 0.02)), float(r.normal(0, 0.02))),
        render_seed=int(r.integers(2**31)),
    )


def expression_aus(class_name: str, p: SampleParams) -> np.ndarray:
    """AU activations (len(AU_NAMES),) of the prototype of ``class_name`` at the sample's intensity and jitter."""
    proto = dict(PROTOTYPES[class_name])
    for au, w in _OPTIONAL_AUS.get(class_name, {}).items():
        if p.au_optional[_AU[au]]:
            proto[au] = max(proto.get(au, 0.0), w)
    acts = p.au_noise.copy()
    scale = INTENSITY_SCALE[p.intensity]
    for au, w in proto.items():
        acts[_AU[au]] += w * scale * p.au_gain[_AU[au]]
    return np.clip(acts, 0.0, 1.2)


# ----------------------------------------------------------------------------------------------------------------
# Face geometry in face coordinates
# ----------------------------------------------------------------------------------------------------------------
def _neutral_landmarks(idt: Identity) -> np.ndarray:
    """The identity's resting 68 landmarks (x, y) in face coordinates."""
    lm = np.zeros((68, 2), np.float32)
    # jaw 0..16: superellipse from below the image-left ear round the chin
    theta = np.linspace(0, np.pi, 17)
    e = 2.0 / idt.jaw_power
    cos, sin = np.cos(theta), np.sin(theta)
    w, y0 = idt.jaw_top
    lm[:17, 0] = -w * np.sign(cos) * np.abs(cos) ** e
    lm[:17, 1] = y0 + (idt.chin_y - y0) * np.abs(sin) ** e
    # image-left brow 17..21 (outer -> inner), arched
    t = np.linspace(0, 1, 5)
    x_out, x_in = idt.eye_sep + idt.eye_w * 1.4, max(0.1, idt.eye_sep - idt.eye_w * 1.1)
    brow_y = idt.eye_y - idt.brow_gap
    lm[17:22, 0] = -(x_out + (x_in - x_out) * t)
    lm[17:22, 1] = brow_y - idt.brow_arch * (1 - ((t - 0.45) / 0.6) ** 2) + 0.03 * (1 - t) ** 2
    lm[[21], 1] += idt.rest_brow
    # image-left eye 36..41: outer corner, upper lid (2), inner corner, lower lid (2)
    cx, cy, ew, eh = -idt.eye_sep, idt.eye_y, idt.eye_w, idt.eye_h
    lm[36:42] = [(cx - ew, cy - idt.eye_tilt), (cx - 0.35 * ew, cy - eh), (cx + 0.35 * ew, cy - eh * 0.95),
                 (cx + ew, cy + idt.eye_tilt * 0.3), (cx + 0.35 * ew, cy + eh * 0.7), (cx - 0.35 * ew, cy + eh * 0.75)]
    # nose: bridge 27..30 down to the tip, lower nose 31..33 (left half)
    lm[27:31, 1] = np.linspace(idt.eye_y - 0.02, idt.nose_tip_y, 4)
    ty, nw = idt.nose_tip_y, idt.nose_w
    lm[31:34] = [(-nw, ty + 0.05), (-nw * 0.5, ty + 0.085), (0, ty + 0.1)]
    # mouth: outer lip 48..51 and 57..59, inner lip 60..62 and 66..67 (left half)
    mx, my, ul, ll = idt.mouth_w, idt.mouth_y, idt.lip_up, idt.lip_low
    lm[48:52] = [(-mx, my + idt.rest_mouth), (-mx * 0.6, my - ul * 0.8), (-mx * 0.22, my - ul * 1.1),
                 (0, my - ul * 0.85)]
    lm[57:60] = [(0, my + ll), (-mx * 0.28, my + ll * 0.95), (-mx * 0.62, my + ll * 0.7)]
    lm[60:63] = [(-mx * 0.85, my + idt.rest_mouth * 0.8), (-mx * 0.3, my), (0, my)]
    lm[66:68] = [(0, my), (-mx * 0.3, my)]
    # mirror the left half onto the right
    right = _SIDE > 0
    lm[right] = lm[_MIRROR[right]] * (-1, 1)
    return lm + idt.jitter


def face_landmarks(idt: Identity, aus: np.ndarray) -> np.ndarray:
    """68 (x, y) face-coordinate landmarks of ``idt`` making the expression ``aus``."""
    return _neutral_landmarks(idt) + np.tensordot(aus.astype(np.float32), _AU_STACK, axes=1)


@dataclass(frozen=True)
class _Grid:
    """Pixel grid over face coordinates, shared by the texture and the bump field."""

    k: float  # pixels per face unit

    @property
    def shape(self) -> tuple[int, int]:
        return int(np.ceil((_TEX_Y1 - _TEX_Y0) * self.k)), int(np.ceil(2 * _TEX_X * self.k))

    def px(self, xy: np.ndarray) -> np.ndarray:
        return (np.asarray(xy, np.float32) - (-_TEX_X, _TEX_Y0)) * self.k

    def ipts(self, xy: np.ndarray) -> np.ndarray:
        """Fixed-point (shift=4) integer points for cv2 drawing."""
        return _fixed_pts(self.px(xy))

    def thick(self, units: float) -> int:
        """A line thickness in whole pixels (at least 1) for a width in face units."""
        return max(1, int(round(units * self.k)))

    def fill(self, img: np.ndarray, poly: np.ndarray, colour: Any) -> None:
        """Anti-aliased filled polygon given in face coordinates."""
        cv2.fillPoly(img, [self.ipts(poly)], colour, cv2.LINE_AA, shift=4)

    def line(self, img: np.ndarray, pts: np.ndarray, colour: Any, width: float) -> None:
        """Anti-aliased open polyline in face coordinates, ``width`` in face units."""
        cv2.polylines(img, [self.ipts(pts)], False, colour, self.thick(width), cv2.LINE_AA, 4)

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.shape
        """Face coordinates of the pixel centres along x and along y."""
        xs = (np.arange(w, dtype=np.float32) + 0.5) / self.k - _TEX_X
        return xs, (np.arange(h, dtype=np.float32) + 0.5) / self.k + _TEX_Y0


def _gaussians(grid: _Grid, centres: np.ndarray, sigmas: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Sum of axis-aligned Gaussians on the grid, each added as a separable outer product inside +-3.5 sigma."""
    h, w = grid.shape
    out = np.zeros((h, w), np.float32)
    xs, ys = grid.axes()
    lo = np.floor(grid.px(centres - 3.5 * sigmas)).astype(int).clip(0, (w, h))
    hi = np.ceil(grid.px(centres + 3.5 * sigmas)).astype(int).clip(0, (w, h))
    for (cx, cy), (sx, sy), a, (x0, y0), (x1, y1) in zip(centres, sigmas, heights, lo, hi):
        gx = np.exp(-0.5 * ((xs[x0:x1] - cx) / sx) ** 2)
        gy = np.exp(-0.5 * ((ys[y0:y1] - cy) / sy) ** 2) * a
        out[y0:y1, x0:x1] += gy[:, None] * gx[None, :]
    return out


def _bump_field(grid: _Grid, idt: Identity, lm: np.ndarray, aus: np.ndarray) -> np.ndarray:
    """Height (face z) added to the head ellipsoid: nose, brow ridge, eye sockets, cheeks, lips, chin and the mouth
    cavity. Bumps follow the landmarks and the AUs, so expression shows in depth too."""
    A = dict(zip(AU_NAMES, aus))
    cheek_y = lm[30, 1] + 0.03 - 0.07 * A["AU6"] - 0.03 * A["AU12"]  # AU6 / AU12 lift and fill the cheeks
    cheek_h = 0.04 + 0.06 * A["AU6"] + 0.03 * A["AU12"]
    lip_h = 0.05 * (1 - 0.4 * A["AU23"]) + 0.02 * A["AU17"]  # AU23 thins the lips, AU17 pushes the lower lip out
    mouth_half = abs(lm[54, 0] - lm[48, 0]) / 2
    parts: list[tuple[Any, tuple[float, float], float]] = [  # (centre, (sigma x, sigma y), height)
        *[(c, (0.11, 0.1), h) for c, h in zip(np.linspace(lm[27], lm[30], 5), np.linspace(0.05, 0.85, 5) * idt.nose_h)],
        (lm[31], (0.06, 0.05), 0.06), (lm[35], (0.06, 0.05), 0.06),  # nose wings
        *[(lm[i], (0.09, 0.07), 0.05) for i in (18, 20, 23, 25)],  # brow ridge, moves with AU1 / AU2 / AU4
        (lm[36:42].mean(0), (0.1, 0.07), -0.06), (lm[42:48].mean(0), (0.1, 0.07), -0.06),  # eye sockets
        ((-0.52, cheek_y), (0.17, 0.15), cheek_h), ((0.52, cheek_y), (0.17, 0.15), cheek_h),
        ((lm[51] + lm[62]) / 2, (0.6 * mouth_half, 0.05), lip_h),  # upper lip
        ((lm[57] + lm[66]) / 2, (0.6 * mouth_half, 0.05), lip_h),  # lower lip
        (lm[8] + (0, -0.12), (0.2, 0.12), 0.05 + 0.05 * A["AU17"]),  # chin, AU17 raises the chin boss
    ]
    centres, sigmas, heights = (np.array(v, np.float32) for v in zip(*parts))
    bump = _gaussians(grid, centres, sigmas, heights)
    opening = _mouth_opening(lm)
    if opening > 0.01:  # open mouth: a cavity inside the inner lip line
        cavity = np.zeros_like(bump)
        grid.fill(cavity, lm[60:68], -min(0.25, 1.5 * opening))
        bump += cv2.GaussianBlur(cavity, (0, 0), grid.k * 0.02 + 0.5)
    return bump.astype(np.float32)


def _mouth_opening(lm: np.ndarray) -> float:
    """Vertical gap between the inner lips (face units)."""
    return float(np.mean(lm[[65, 66, 67], 1] - lm[[63, 62, 61], 1]))


def _ellipsoid_z(idt: Identity, xy: np.ndarray) -> np.ndarray:
    q = 1 - (xy[..., 0] / idt.a) ** 2 - ((xy[..., 1] - _HEAD_CY) / idt.b) ** 2
    return idt.c * np.sqrt(np.clip(q, 0, None))


def _sample_grid(field_: np.ndarray, grid: _Grid, xy: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a grid field at face points ``xy`` (..., 2)."""
    p = grid.px(xy) - 0.5
    flat = np.ascontiguousarray(p.reshape(-1, 1, 2), dtype=np.float32)
    out = cv2.remap(field_, flat, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(xy.shape[:-1])


# ----------------------------------------------------------------------------------------------------------------
# Texture: the frontal face painted in face coordinates
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _catmull_rom_basis(n: int) -> np.ndarray:
    """(n, 4) weights of the control points p0..p3 at n parameters t in [0, 1)."""
    t = np.arange(n, dtype=np.float32)[:, None] / n
    return 0.5 * np.hstack([-t + 2 * t ** 2 - t ** 3, 2 - 5 * t ** 2 + 3 * t ** 3, t + 4 * t ** 2 - 3 * t ** 3,
                            -t ** 2 + t ** 3])


def _spline(pts: np.ndarray, n: int = 5, closed: bool = True) -> np.ndarray:
    """Catmull-Rom curve through ``pts`` with ``n`` samples per segment."""
    p = np.asarray(pts, np.float32)
    if closed:
        q = np.concatenate([p[-1:], p, p[:2]])
    else:
        q = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
    segs = len(q) - 3
    idx = np.arange(segs)[:, None] + np.arange(4)[None]  # (segs, 4) control point indices
    c = np.einsum("nk,skd->snd", _catmull_rom_basis(n), q[idx]).reshape(-1, 2)
    return c if closed else np.concatenate([c, p[-1:]])


def _fixed_pts(px: np.ndarray) -> np.ndarray:
    """(N, 2) float pixel points to cv2's fixed-point int32 points (shift=4: 1/16 pixel)."""
    return np.round(np.asarray(px, np.float32) * 16).astype(np.int32)


def _fixed(v: Any) -> tuple[int, ...]:
    """Pixel values (float) to cv2's fixed-point integers (shift=4)."""
    return tuple(int(round(float(x) * 16)) for x in np.ravel(v))


def _circle(img: np.ndarray, centre_px: Any, radius_px: float, colour: Any, thickness: int = -1) -> None:
    cv2.circle(img, _fixed(centre_px), _fixed(radius_px)[0], colour, thickness, cv2.LINE_AA, 4)


def _ellipse(img: np.ndarray, centre_px: Any, axes_px: Any, angle: float, colour: Any, thickness: int = -1) -> None:
    cv2.ellipse(img, _fixed(centre_px), _fixed(axes_px), angle, 0, 360, colour, thickness, cv2.LINE_AA, 4)


def _colour(c: Iterable[float]) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.clip(np.asarray(list(c), np.float32), 0, 255))


def _fill_clipped(tex: np.ndarray, grid: _Grid, clip_poly: np.ndarray,
                  draw: Callable[[np.ndarray, np.ndarray], None]) -> None:
    """Run ``draw(roi, offset_px)`` on a copy of the bounding box of ``clip_poly`` and keep it inside the polygon."""
    p = grid.px(clip_poly)
    x0, y0 = np.floor(p.min(0)).astype(int) - 1
    x1, y1 = np.ceil(p.max(0)).astype(int) + 2
    h, w = tex.shape[:2]
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return
    roi = tex[y0:y1, x0:x1]
    mask = np.zeros(roi.shape[:2], np.uint8)
    cv2.fillPoly(mask, [_fixed_pts(p - (x0, y0))], 255, cv2.LINE_AA, shift=4)
    layer = roi.copy()
    draw(layer, np.array([x0, y0], np.float32))
    a = mask[..., None].astype(np.float32) / 255
    roi[:] = (layer * a + roi * (1 - a)).astype(np.uint8)


def _paint_hair(tex: np.ndarray, grid: _Grid, idt: Identity) -> None:
    """Hair above a hairline (optional fringe) and down the sides of the head."""
    xs = np.linspace(-_TEX_X, _TEX_X, 41, dtype=np.float32)
    y = idt.hairline + idt.hair_curve * xs ** 2
    if idt.bangs is not None:
        y = np.where(np.abs(xs) < 0.6, np.maximum(y, idt.bangs + 0.03 * np.cos(xs * 40)), y)
    side = np.clip((np.abs(xs) - idt.side_x) / 0.12, 0, 1)
    y = y + (max(idt.side_end, idt.hairline) - y) * side * side * (3 - 2 * side)
    if idt.bald:
        y = np.where(np.abs(xs) > idt.side_x, y, _TEX_Y0)
    edge = np.stack([xs, y], 1)
    poly = np.vstack([edge, [(_TEX_X, _TEX_Y0), (-_TEX_X, _TEX_Y0)]])
    grid.fill(tex, poly, _colour(idt.hair))


def _paint_ears(tex: np.ndarray, grid: _Grid, idt: Identity) -> None:
    """Ears on the sides of the head (seen when it turns; short hair leaves them free)."""
    y = (idt.eye_y + idt.nose_tip_y) / 2
    for s in (-1, 1):
        c = grid.px((s * idt.a * 0.95, y))
        _ellipse(tex, c, (0.07 * grid.k, 0.2 * grid.k), 0, _colour(np.asarray(idt.skin) * 0.93))
        _ellipse(tex, c, (0.035 * grid.k, 0.12 * grid.k), 0, _colour(np.asarray(idt.skin) * 0.72), grid.thick(0.015))


def _paint_brows(tex: np.ndarray, grid: _Grid, idt: Identity, lm: np.ndarray) -> None:
    colour = _colour(np.minimum(np.asarray(idt.hair) * 0.6 + 12, np.asarray(idt.skin) * 0.45))
    profile = np.linspace(0.55, 1.0, 5)[:, None]  # thin outer end, thick inner end
    for idx in (list(range(17, 22)), list(range(26, 21, -1))):
        p = lm[idx]
        top = _spline(p - (0, 0.55 * idt.brow_thick) * profile, 3, closed=False)
        bot = _spline(p + (0, 0.45 * idt.brow_thick) * profile, 3, closed=False)
        grid.fill(tex, np.vstack([top, bot[::-1]]), colour)


def _paint_eyes(tex: np.ndarray, grid: _Grid, idt: Identity, lm: np.ndarray) -> None:
    """Sclera, iris and pupil clipped to the lids, lash line on the upper lid, lid crease above."""
    lash = _colour(np.asarray(idt.hair) * 0.3 + 15)
    lid = _colour(np.asarray(idt.skin) * 0.7)
    r_iris = idt.eye_h * 1.2
    for idx in (list(range(36, 42)), list(range(42, 48))):
        p = lm[idx]
        outline = _spline(p, 4)
        centre = (p[0] + p[3]) / 2 + (0, -idt.eye_h * 0.15)

        def draw(roi: np.ndarray, off: np.ndarray, centre=centre) -> None:
            roi[:] = (236, 232, 226)  # sclera
            c, r = grid.px(centre) - off, r_iris * grid.k
            _circle(roi, c, r, _colour(idt.iris))
            _circle(roi, c, 0.45 * r, (15, 12, 12))  # pupil
            _circle(roi, c + (-0.3 * r, -0.35 * r), 0.22 * r, (250, 250, 250))  # catch light

        _fill_clipped(tex, grid, outline, draw)
        upper = _spline(p[[0, 1, 2, 3]], 4, closed=False)
        lower = _spline(p[[3, 4, 5, 0]], 4, closed=False)
        grid.line(tex, upper, lash, 0.028)
        grid.line(tex, lower, lid, 0.01)
        crease = upper + (0, -0.45 * idt.eye_h)
        grid.line(tex, crease[2:-2], lid, 0.008)


def _paint_nose(tex: np.ndarray, grid: _Grid, idt: Identity, lm: np.ndarray) -> None:
    dark = _colour(np.asarray(idt.skin) * 0.45)
    fold = _colour(np.asarray(idt.skin) * 0.72)
    for a, b, s in ((31, 32, -1), (35, 34, 1)):
        nostril = grid.px(lm[a] * 0.45 + lm[b] * 0.55 + (0, -0.015))
        _ellipse(tex, nostril, (idt.nose_w * 0.22 * grid.k, 0.017 * grid.k), s * 20, dark)
        wing = np.array([lm[a] + (s * 0.01, 0.01), lm[a] + (s * 0.03, -0.045), lm[a] + (-s * 0.015, -0.09)])
        grid.line(tex, _spline(wing, 4, closed=False), fold, 0.014)


def _paint_mouth(tex: np.ndarray, grid: _Grid, idt: Identity, lm: np.ndarray) -> None:
    """Lips; when open, the dark mouth with upper (and lower) teeth."""
    skin = np.asarray(idt.skin)
    lip = _colour(skin * (0.8, 0.52, 0.52) + (30, 6, 12))
    grid.fill(tex, _spline(lm[48:60], 4), lip)
    inner = _spline(lm[60:68], 4)
    gap = _mouth_opening(lm)
    line = _colour(skin * (0.45, 0.25, 0.25))
    if gap > 0.012:
        def draw(roi: np.ndarray, off: np.ndarray) -> None:
            roi[:] = (70, 22, 28)
            top = lm[60:65]
            teeth = np.vstack([top, top[::-1] + (0, min(0.07, 0.5 * gap))])
            cv2.fillPoly(roi, [_fixed_pts(grid.px(teeth) - off)], (238, 236, 226), cv2.LINE_AA, shift=4)

        _fill_clipped(tex, grid, inner, draw)
    grid.line(tex, _spline(lm[60:65], 4, closed=False), line, 0.02)


def _paint_creases(grid: _Grid, idt: Identity, lm: np.ndarray, aus: np.ndarray) -> np.ndarray:
    """Wrinkle layer (0..255): how strongly each crease darkens the skin follows the AU that makes it."""
    A = {n: float(min(1.0, v)) for n, v in zip(AU_NAMES, aus)}
    layer = np.zeros(grid.shape, np.uint8)

    def crease(pts: np.ndarray, strength: float, width: float = 0.02) -> None:
        if strength > 0.08:
            grid.line(layer, _spline(pts, 4, closed=False), int(255 * min(1.0, strength)), width)

    brow_top = lm[17:27, 1].min()
    for i in range(3):  # forehead lines: AU1 (centre) and AU2 (across)
        y = brow_top - 0.14 - 0.09 * i
        xs = np.linspace(-0.6, 0.6, 5)
        crease(np.stack([xs, y + 0.02 * np.cos(xs * 3)], 1), A["AU2"] * 0.9)
        xs = np.linspace(-0.32, 0.32, 4)
        crease(np.stack([xs, y - 0.02 * np.cos(xs * 4)], 1), A["AU1"] * 0.9)
    for s in (-1, 1):
        # AU4 glabella furrows between the brows
        x = lm[21 if s < 0 else 22, 0] * 0.45
        crease(np.array([(x, brow_top - 0.02), (x * 0.8, lm[21, 1] + 0.05), (x * 0.9, lm[27, 1] + 0.05)]), A["AU4"])
        # nasolabial fold: rest + AU12 / AU9 / AU6 / AU20
        wing, corner = lm[31 if s < 0 else 35], lm[48 if s < 0 else 54]
        fold = np.array([wing + (s * 0.05, -0.01), corner + (s * 0.1, -0.07), corner + (s * 0.08, 0.06 + 0.05 * A["AU15"])])
        crease(fold, 0.15 + 0.7 * A["AU12"] + 0.6 * A["AU9"] + 0.3 * A["AU6"] + 0.4 * A["AU20"] + 0.3 * A["AU15"])
        # AU6 crow's feet and lower-lid bulge
        outer = lm[36 if s < 0 else 45]
        for dy in (-0.04, 0.0, 0.04):
            crease(np.array([outer + (s * 0.04, dy * 0.5), outer + (s * 0.12, dy * 1.5)]), A["AU6"] * 0.9, 0.012)
        lower = lm[[41, 40] if s < 0 else [47, 46]] + (0, 0.05)
        crease(np.vstack([outer + (s * -0.02, 0.04), lower]), 0.6 * A["AU6"] + 0.4 * A["AU7"], 0.012)
        # AU20 stretch lines at the corners
        crease(np.array([corner + (s * 0.03, -0.02), corner + (s * 0.08, 0.0)]), A["AU20"] * 0.8, 0.012)
    # AU9: horizontal wrinkles across the nose bridge
    for i, t in enumerate((0.25, 0.5)):
        y = lm[27, 1] + t * (lm[29, 1] - lm[27, 1])
        crease(np.array([(-0.09, y + 0.01), (0, y - 0.01), (0.09, y + 0.01)]), A["AU9"])
    # AU17 mentalis: crease below the lower lip
    y = lm[57, 1] + 0.12
    crease(np.array([(-0.16, y), (0, y + 0.03), (0.16, y)]), A["AU17"] + 0.3 * A["AU15"])
    # AU14 dimple beside the subject's right mouth corner
    crease(np.array([lm[48] + (-0.04, -0.05), lm[48] + (-0.055, 0.0), lm[48] + (-0.04, 0.04)]), A["AU14"] * 1.2)
    return layer


def _paint_mask(tex: np.ndarray, grid: _Grid, idt: Identity, lm: np.ndarray, r: np.random.Generator) -> None:
    """Surgical mask over nose and mouth, with pleats and ear straps."""
    colour = np.array([(170, 200, 225), (235, 238, 240), (40, 42, 48), (120, 170, 200)][r.integers(4)], np.float32)
    top_y = lm[28, 1] + r.uniform(-0.03, 0.05)
    top = np.array([lm[1] + (-0.05, 0), (-0.42, lm[29, 1]), (0, top_y), (0.42, lm[29, 1]), lm[15] + (0.05, 0)])
    bottom = lm[14:1:-1] * (1.08, 1.0) + (0, 0.08)
    poly = np.vstack([_spline(top, 4, closed=False), bottom])
    grid.fill(tex, poly, _colour(colour))
    pleat = _colour(colour * 0.75)
    for t in (0.35, 0.55, 0.75):
        y = top_y + t * (lm[8, 1] - top_y)
        grid.line(tex, np.array([(-0.55, y + 0.04), (0, y), (0.55, y + 0.04)]), pleat, 0.012)
    for s, side in ((-1, lm[1]), (1, lm[15])):
        strap = np.array([side + (s * 0.03, 0), (s * idt.a, idt.eye_y + 0.05)])
        grid.line(tex, strap, _colour(colour * 0.9), 0.02)


def _paint_glasses(tex: np.ndarray, grid: _Grid, idt: Identity, lm: np.ndarray, r: np.random.Generator) -> None:
    """Dark sunglasses: two lenses over the eyes, bridge and temples."""
    lens = _colour(np.array((22, 24, 28)) + r.uniform(0, 30, 3))
    frame = _colour(r.uniform(0, 90, 3))
    ax = (idt.eye_w * 1.5 + 0.04, idt.eye_h * 1.8 + 0.06)
    centres = [lm[36:42].mean(0) + (0, 0.01), lm[42:48].mean(0) + (0, 0.01)]
    for c in centres:
        axes = (ax[0] * grid.k, ax[1] * grid.k)
        _ellipse(tex, grid.px(c), axes, 0, lens)
        _ellipse(tex, grid.px(c), axes, 0, frame, grid.thick(0.02))
        glint = np.array([c + (-ax[0] * 0.5, -ax[1] * 0.2), c + (-ax[0] * 0.2, -ax[1] * 0.6)])
        grid.line(tex, glint, (110, 112, 118), 0.015)
    bridge = np.array([centres[0] + (ax[0], -0.03), (0, centres[0][1] - 0.05), centres[1] + (-ax[0], -0.03)])
    grid.line(tex, _spline(bridge, 3, closed=False), frame, 0.025)
    for s, c in ((-1, centres[0]), (1, centres[1])):
        arm = np.array([c + (s * ax[0], -0.02), (s * (idt.a + 0.05), c[1] - 0.01)])
        grid.line(tex, arm, frame, 0.025)


def _paint_texture(grid: _Grid, idt: Identity, lm: np.ndarray, aus: np.ndarray, occlusion: str,
                   r: np.random.Generator) -> np.ndarray:
    """The frontal face texture (H, W, 3) uint8 in face coordinates. Mask and glasses are painted here so they
    follow the head; half-face patches are added in the image instead."""
    tex = np.empty(grid.shape + (3,), np.uint8)
    tex[:] = _colour(idt.skin)
    creases = _paint_creases(grid, idt, lm, aus)
    tex = (tex * (1 - 0.55 / 255 * creases[..., None].astype(np.float32))).astype(np.uint8)
    _paint_ears(tex, grid, idt)
    _paint_hair(tex, grid, idt)
    _paint_brows(tex, grid, idt, lm)
    _paint_eyes(tex, grid, idt, lm)
    _paint_nose(tex, grid, idt, lm)
    _paint_mouth(tex, grid, idt, lm)
    if occlusion == "mask":
        _paint_mask(tex, grid, idt, lm, r)
    elif occlusion == "glasses":
        _paint_glasses(tex, grid, idt, lm, r)
    return tex


# ----------------------------------------------------------------------------------------------------------------
# Projection, ray casting and shading
# ----------------------------------------------------------------------------------------------------------------
def rotation_matrix(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """Camera-from-face rotation Rz(roll) Rx(pitch) Ry(yaw); yaw > 0 turns the nose to the image right,
    pitch > 0 lifts it."""
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return (rz @ rx @ ry).astype(np.float32)


@dataclass(frozen=True)
class _Camera:
    """Orthographic camera: pixel = centre + scale * (R (p - pivot))[:2]."""

    R: np.ndarray
    scale: float  # pixels per face unit
    centre: tuple[float, float]  # pixel of the pivot

    def project(self, p_face: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) face points -> (N, 2) pixels and (N,) camera z."""
        pc = (p_face - (0, _HEAD_CY, 0)) @ self.R.T
        return pc[:, :2] * self.scale + self.centre, pc[:, 2]

    def pixel_coords(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Camera-plane coordinates (face units, pivot at 0) of the pixel columns and of the pixel rows."""
        px = np.arange(size, dtype=np.float32)
        return (px - np.float32(self.centre[0])) / self.scale, (px - np.float32(self.centre[1])) / self.scale


def _make_camera(size: int, p: SampleParams, nasion: np.ndarray) -> _Camera:
    """Frame the face like an aligned crop: eyes at ~40 % height; 60 % of the pose-induced shift of the nose bridge is
    compensated, as a face detector would re-centre a turned face."""
    R = rotation_matrix(p.yaw, p.pitch, p.roll)
    scale = 0.35 * size * p.scale
    rel = nasion - (0, _HEAD_CY, 0)
    drift = (R @ rel - rel)[:2] * scale
    centre = (size * (0.5 + p.shift[0]) - 0.6 * drift[0], size * (0.41 + p.shift[1]) - 0.6 * drift[1])
    return _Camera(R, scale, (float(centre[0]), float(centre[1])))


def _raycast_head(cam: _Camera, size: int, idt: Identity, grid: _Grid, bump: np.ndarray, lm: np.ndarray,
                  iters: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: head mask, camera z, face x and face y of the displaced head ellipsoid seen there.

    The ellipsoid is hit analytically; the bump displaces it along the face z axis, handled by a damped
    fixed-point iteration on the ray's offset."""
    R = cam.R.astype(np.float64)
    M = R @ np.diag([1 / idt.a ** 2, 1 / idt.b ** 2, 1 / idt.c ** 2]) @ R.T
    cols, rows = cam.pixel_coords(size)
    X0, Y0 = np.broadcast_to(cols[None, :], (size, size)), np.broadcast_to(rows[:, None], (size, size))
    Rt = R.T.astype(np.float32)
    h = np.zeros((size, size), np.float32)
    for it in range(iters):
        X = X0 - h * R[0, 2]
        Y = Y0 - h * R[1, 2]
        B = M[0, 2] * X + M[1, 2] * Y
        Cq = M[0, 0] * X * X + 2 * M[0, 1] * X * Y + M[1, 1] * Y * Y - 1
        disc = B * B - M[2, 2] * Cq
        t = (-B + np.sqrt(np.maximum(disc, 0))) / M[2, 2]
        fx = Rt[0, 0] * X + Rt[0, 1] * Y + Rt[0, 2] * t
        fy = Rt[1, 0] * X + Rt[1, 1] * Y + Rt[1, 2] * t + _HEAD_CY
        if it == iters - 1:
            break
        new = _lookup(bump, grid, fx, fy)
        h = new if it == 0 else 0.5 * (h + new)
    # the head ends at the jaw line; beyond the jaw's ends (below the ears) it carries on down into the neck
    side_y = lm[4, 1]
    jaw = np.interp(fx, np.r_[-idt.a, lm[:17, 0], idt.a], np.r_[side_y, lm[:17, 1], side_y])
    mask = (disc >= 0) & (fy <= jaw)
    z = (t + h * R[2, 2]).astype(np.float32)
    return mask, z, fx.astype(np.float32), fy.astype(np.float32)


def _splat_nose(cam: _Camera, size: int, idt: Identity, grid: _Grid, bump: np.ndarray, lm: np.ndarray,
                head: np.ndarray, z: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> None:
    """Forward-project a dense patch of the nose surface with a z-test (in place). In a turned head the nose sticks
    out of the ellipsoid's silhouette, where the ray cast cannot find it."""
    step = 1.0 / (2.5 * cam.scale)  # about 2.5 samples per pixel
    xs = np.arange(lm[31, 0] - 0.1, lm[35, 0] + 0.1, step, dtype=np.float32)
    ys = np.arange(lm[27, 1], lm[33, 1] + 0.04, step, dtype=np.float32)
    pts = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    h = _sample_grid(bump, grid, pts)
    pts, h = pts[h > 0.03], h[h > 0.03]  # only the raised part
    px, pz = cam.project(np.hstack([pts, (_ellipsoid_z(idt, pts) + h)[:, None]]))
    ix, iy = np.round(px).astype(np.int64).T
    inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
    flat, pz, pts = (iy * size + ix)[inside], pz[inside], pts[inside]
    order = np.lexsort((-pz, flat))  # by pixel, nearest first
    first = np.r_[True, flat[order][1:] != flat[order][:-1]]
    near = order[first]  # the nearest sample of every pixel hit
    pix, pz, pts = flat[near], pz[near], pts[near]
    win = pz > np.where(head.take(pix), z.take(pix), -np.inf) + 1e-3
    pix, pz, pts = pix[win], pz[win], pts[win]
    for arr, val in ((head, True), (z, pz), (fx, pts[:, 0]), (fy, pts[:, 1])):
        np.put(arr, pix, val)


def _lookup(img: np.ndarray, grid: _Grid, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a texture-grid image at per-pixel face coordinates."""
    mx = ((fx + _TEX_X) * grid.k - 0.5).astype(np.float32)
    my = ((fy - _TEX_Y0) * grid.k - 0.5).astype(np.float32)
    return cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def _neck(cam: _Camera, size: int, idt: Identity) -> tuple[np.ndarray, np.ndarray]:
    """A vertical cylinder under the head (does not turn with it): mask and camera z."""
    radius = 0.52 * idt.a
    X, Y = cam.pixel_coords(size)
    q = radius ** 2 - X ** 2
    z_row = np.where(q > 0, -0.35 + 0.85 * np.sqrt(np.maximum(q, 0)), -np.inf).astype(np.float32)
    mask = (q[None, :] > 0) & (Y[:, None] > -0.2)
    return mask, np.broadcast_to(z_row[None, :], (size, size))


def _shade(z: np.ndarray, scale: float, light: np.ndarray, ambient: float) -> np.ndarray:
    """Lambert shading from the depth map's normals."""
    gy, gx = np.gradient(z)
    gx = np.clip(gx * scale, -4, 4)
    gy = np.clip(gy * scale, -4, 4)
    ndotl = (-gx * light[0] - gy * light[1] + light[2]) / np.sqrt(gx * gx + gy * gy + 1)
    return ambient + (1 - ambient) * np.clip(ndotl, 0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Image-space layers: background, back hair, occluding patches, camera effects
# ----------------------------------------------------------------------------------------------------------------
def _background(size: int, r: np.random.Generator) -> np.ndarray:
    """Two-colour gradient plus a few blurred shapes (out-of-focus clutter)."""
    small = 32  # drawn small and enlarged: the blur comes for free
    c0, c1 = r.uniform(0, 255, 3), r.uniform(0, 255, 3)
    ang = r.uniform(0, 2 * np.pi)
    t = np.linspace(-0.5, 0.5, small, dtype=np.float32)
    ramp = np.clip(0.5 + np.cos(ang) * t[None, :] + np.sin(ang) * t[:, None], 0, 1)[..., None]
    bg = (c0 * (1 - ramp) + c1 * ramp).astype(np.float32)
    for _ in range(r.integers(0, 5)):
        centre = tuple(int(v) for v in r.uniform(0, small, 2))
        colour = tuple(float(v) for v in r.uniform(0, 255, 3))
        if r.uniform() < 0.5:
            cv2.circle(bg, centre, int(r.uniform(0.05, 0.3) * small), colour, -1, cv2.LINE_AA)
        else:
            half = r.uniform(0.05, 0.3, 2) * small
            cv2.rectangle(bg, (int(centre[0] - half[0]), int(centre[1] - half[1])),
                          (int(centre[0] + half[0]), int(centre[1] + half[1])), colour, -1, cv2.LINE_AA)
    return cv2.resize(cv2.GaussianBlur(bg, (0, 0), 1.2), (size, size), interpolation=cv2.INTER_LINEAR)


def _draw_back_hair(img: np.ndarray, cam: _Camera, idt: Identity) -> None:
    """Long hair behind the head, falling to the shoulders (RGB only)."""
    a = idt.a
    outline = np.array([(-a * 1.1, -1.3), (-a * 1.2, -0.2), (-a * 1.15, 1.2), (-a * 1.05, 2.4), (a * 1.05, 2.4),
                        (a * 1.15, 1.2), (a * 1.2, -0.2), (a * 1.1, -1.3), (0, -1.9)], np.float32)
    pts3 = np.hstack([outline, np.full((len(outline), 1), -0.3, np.float32)])
    px, _ = cam.project(pts3)
    cv2.fillPoly(img, [_fixed_pts(_spline(px, 4))], _colour(np.asarray(idt.hair) * 0.8), cv2.LINE_AA, shift=4)


def _half_patch(img: np.ndarray, landmarks: np.ndarray, side: str, r: np.random.Generator) -> None:
    """Opaque random-colour patch over the top / bottom / left / right half of the face (RAN occlusion types)."""
    lo, hi = landmarks.min(0), landmarks.max(0)
    lo = lo - (0.1 * (hi[0] - lo[0]), 0.35 * (hi[1] - lo[1]))  # reach up over the forehead
    hi = hi + 0.1 * (hi - lo)
    mid = (lo + hi) / 2 + r.uniform(-0.05, 0.05, 2) * (hi - lo)
    x0, y0, x1, y1 = lo[0], lo[1], hi[0], hi[1]
    x0, x1, y0, y1 = {"top": (x0, x1, y0, mid[1]), "bottom": (x0, x1, mid[1], y1),
                      "left": (x0, mid[0], y0, y1), "right": (mid[0], x1, y0, y1)}[side]
    colour = r.uniform(0, 255, 3)
    p0, p1 = (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1)))
    cv2.rectangle(img, p0, p1, _colour(colour), -1, cv2.LINE_AA)
    if r.uniform() < 0.5:  # stripes, so patches are not all flat colour
        step = max(3, int(r.uniform(0.04, 0.1) * img.shape[0]))
        stripe = _colour(colour * r.uniform(0.5, 0.8))
        for x in range(p0[0], p1[0], 2 * step):
            cv2.rectangle(img, (x, p0[1]), (min(x + step, p1[0]), p1[1]), stripe, -1)


def _camera_effects(img: np.ndarray, p: SampleParams, r: np.random.Generator) -> np.ndarray:
    """Colour cast, brightness (``lighting``), optional blur and sensor noise (strong in low light)."""
    img = img * (p.lighting * (1 + r.normal(0, 0.05, 3))).astype(np.float32)
    if r.uniform() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), r.uniform(0.3, 0.8))
    sigma = r.uniform(12, 20) if p.lighting < 0.5 else r.uniform(1, 5)
    img = img + r.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Putting a sample together
# ----------------------------------------------------------------------------------------------------------------
def _render_head(cam: _Camera, size: int, idt: Identity, lm: np.ndarray, aus: np.ndarray, occlusion: str,
                 r: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Head and neck: foreground mask, camera z, lit colour (float RGB) and the face landmarks in pixels."""
    grid = _Grid(k=max(40.0, 1.4 * cam.scale))
    bump = _bump_field(grid, idt, lm, aus)
    landmarks, _ = cam.project(np.hstack([lm, (_ellipsoid_z(idt, lm) + _sample_grid(bump, grid, lm))[:, None]]))

    head, z_head, fx, fy = _raycast_head(cam, size, idt, grid, bump, lm)
    _splat_nose(cam, size, idt, grid, bump, lm, head, z_head, fx, fy)
    neck, z_neck = _neck(cam, size, idt)
    neck &= ~head
    z = np.where(head, z_head, np.where(neck, z_neck, -1.0)).astype(np.float32)

    tex = _paint_texture(grid, idt, lm, aus, occlusion, r)
    colour = _lookup(tex, grid, fx, fy).astype(np.float32)  # front and back of the head share (x, y)
    colour[neck] = np.asarray(idt.skin, np.float32) * 0.85
    light = np.array([r.uniform(-0.7, 0.7), r.uniform(-0.7, 0.2), 1.0], np.float32)
    colour *= _shade(z, cam.scale, light / np.linalg.norm(light), r.uniform(0.45, 0.65))[..., None] * 1.1
    return head | neck, z, colour, landmarks.astype(np.float32)


def render_params(cfg: SyntheticConfig, p: SampleParams) -> dict[str, Any]:
    """Render the sample described by ``p`` (see :func:`render_sample` for the returned fields)."""
    S = cfg.size
    r = np.random.default_rng(p.render_seed)
    idt = make_identity(cfg.seed, p.subject_num)
    aus = expression_aus(cfg.class_names[p.label], p)
    lm = face_landmarks(idt, aus)
    cam = _make_camera(S, p, np.array([lm[27, 0], lm[27, 1], _ellipsoid_z(idt, lm[27])], np.float32))
    fg, z, colour, landmarks = _render_head(cam, S, idt, lm, aus, p.occlusion, r)

    img = _background(S, r)
    if idt.long_hair:
        _draw_back_hair(img, cam, idt)
    alpha = fg.astype(np.float32)
    alpha = (alpha * cv2.GaussianBlur(alpha, (3, 3), 0.6))[..., None]  # soften the silhouette
    img = colour * alpha + img * (1 - alpha)
    if p.occlusion in ("top", "bottom", "left", "right"):
        _half_patch(img, landmarks, p.occlusion, r)
    depth = np.where(fg, np.clip((z + _DEPTH_OFFSET) / _DEPTH_RANGE, 0.01, 1.0), 0.0).astype(np.float32)
    return {
        "rgb": _camera_effects(img, p, r), "depth": depth, "landmarks": landmarks, "label": p.label,
        "intensity": p.intensity, "subject": subject_id(p.subject_num), "yaw": p.yaw, "pitch": p.pitch,
        "occlusion": p.occlusion, "lighting": p.lighting, "aus": {n: float(v) for n, v in zip(AU_NAMES, aus)},
    }


def render_sample(cfg: SyntheticConfig, split: str, index: int) -> dict[str, Any]:
    """Render sample ``index`` of ``split``; bit-identical for the same (cfg, split, index).

    Returns {"rgb": uint8 (S,S,3), "depth": float32 (S,S), "landmarks": float32 (68,2), "label": int,
    "intensity": int, "subject": str, "yaw": float, "pitch": float, "occlusion": str, "lighting": float,
    "aus": dict[str, float]}.
    """
    return render_params(cfg, sample_params(cfg, split, index))


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------
_META_KEYS = ("label", "intensity", "subject", "yaw", "pitch", "occlusion", "lighting")


def _render_range(job: tuple[dict, str, int, int]) -> dict[str, np.ndarray]:
    """Render samples [start, stop) into stacked arrays (a multiprocessing work unit)."""
    cfg_dict, split, start, stop = job
    cfg = SyntheticConfig(**cfg_dict)
    n, S = stop - start, cfg.size
    out = {"rgb": np.empty((n, S, S, 3), np.uint8), "depth": np.empty((n, S, S), np.float16),
           "landmarks": np.empty((n, 68, 2), np.float32)}
    meta: dict[str, list] = {k: [] for k in _META_KEYS}
    for j, i in enumerate(range(start, stop)):
        s = render_sample(cfg, split, i)
        out["rgb"][j], out["depth"][j], out["landmarks"][j] = s["rgb"], s["depth"], s["landmarks"]
        for k in _META_KEYS:
            meta[k].append(s[k])
    out.update({k: np.asarray(v) for k, v in meta.items()})
    return out


def _worker_init() -> None:
    cv2.setNumThreads(1)


def render_arrays(cfg: SyntheticConfig, split: str, workers: int = 1, progress: bool = False) -> dict[str, np.ndarray]:
    """Render a whole split into arrays (rgb uint8, depth float16, landmarks float32, per-sample meta)."""
    n = cfg.num_samples
    chunk = max(1, min(64, n // max(1, 4 * workers)))
    jobs = [(asdict(cfg), split, s, min(n, s + chunk)) for s in range(0, n, chunk)]
    parts: list[dict[str, np.ndarray]] = []
    with tqdm(total=n, desc=f"synthetic {split}", unit="img", disable=not progress) as bar:
        if workers > 1:
            # never plain fork: a parent whose OpenCV / OpenMP thread pools are running hands the child a held lock
            # (seen: workers hanging in cv2.setNumThreads). forkserver forks from a clean, thread-free server.
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            if method == "forkserver":  # the server imports this module (and torch, via base) once for all workers
                ctx.set_forkserver_preload([__name__])
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for part in pool.imap(_render_range, jobs):
                    parts.append(part)
                    bar.update(len(part["label"]))
        else:
            for job in jobs:
                parts.append(_render_range(job))
                bar.update(len(parts[-1]["label"]))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _cache_path(cache_dir: str | os.PathLike, cfg: SyntheticConfig, split: str) -> Path:
    key = json.dumps({"cfg": asdict(cfg), "split": split, "version": RENDERER_VERSION}, sort_keys=True)
    return Path(cache_dir) / f"synthetic_{split}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"


class SyntheticFaces(FaceDataset):
    """The built-in synthetic faces as a :class:`FaceDataset` with RGB and depth.

    Every sample is rendered once at construction into in-memory arrays (``self.rgb`` uint8 (N,S,S,3),
    ``self.depth`` float16 (N,S,S), ``self.landmarks`` float32 (N,68,2)), in a process pool when ``workers > 1``;
    with ``cache_dir`` the arrays are also stored as ``.npz`` keyed by a hash of (cfg, split, renderer version), so a
    second run loads them instantly. Splits train / val / test have disjoint subjects; "all" is one more disjoint pool
    for subject-wise cross-validation. With ``workers > 1`` the pool starts processes by forkserver / spawn, so a
    script doing this at top level needs the usual ``if __name__ == "__main__":`` guard.
    """

    name = "synthetic"

    def __init__(self, split: str = "train", cfg: SyntheticConfig | None = None, *, workers: int = 1,
                 cache_dir: str | os.PathLike | None = None, progress: bool = False):
        cfg = cfg or SyntheticConfig()
        _split_code(split)
        self.cfg = cfg
        arrays = self._load_or_render(cfg, split, workers, cache_dir, progress)
        self.rgb, self.depth, self.landmarks = arrays["rgb"], arrays["depth"], arrays["landmarks"]
        records = [
            FaceRecord(path=None, label=int(arrays["label"][i]), source=f"synthetic:{split}:{i}",
                       subject=str(arrays["subject"][i]),
                       meta={"occlusion": str(arrays["occlusion"][i]), "yaw": float(arrays["yaw"][i]),
                             "pitch": float(arrays["pitch"][i]), "intensity": int(arrays["intensity"][i]),
                             "lighting": float(arrays["lighting"][i])})
            for i in range(len(arrays["label"]))
        ]
        super().__init__(records, cfg.class_names, split=split, modalities=("image", "depth"))

    @staticmethod
    def _load_or_render(cfg: SyntheticConfig, split: str, workers: int, cache_dir, progress: bool) -> dict:
        path = _cache_path(cache_dir, cfg, split) if cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            except (OSError, ValueError) as e:  # a broken cache is re-rendered, not trusted
                print(f"synthetic: ignoring unreadable cache {path} ({e})")
        arrays = render_arrays(cfg, split, workers, progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        return arrays

    def load(self, index: int) -> dict[str, Any]:
        from PIL import Image

        r = self.records[index]
        return {
            "image": Image.fromarray(self.rgb[index], "RGB"),
            "depth": Image.fromarray(self.depth[index].astype(np.float32), "F"),
            "landmarks": self.landmarks[index].copy(), "label": r.label, "index": index, "subject": r.subject,
            "occlusion": r.meta["occlusion"], "yaw": r.meta["yaw"], "pitch": r.meta["pitch"],
            "intensity": r.meta["intensity"], "lighting": r.meta["lighting"],
        }

    def subsets(self) -> dict[str, np.ndarray]:
        occ = self.meta_column("occlusion").astype(str)
        yaw = np.abs(self.meta_column("yaw").astype(np.float64))
        pitch = np.abs(self.meta_column("pitch").astype(np.float64))
        out = {"occluded": occ != "none"}
        out.update({f"occlusion:{t}": occ == t for t in OCCLUSIONS[1:]})
        out["pose>30"] = (yaw > 30) | (pitch > 30)
        out["pose>45"] = (yaw > 45) | (pitch > 45)
        out["frontal_clean"] = (occ == "none") & (yaw <= 30) & (pitch <= 30)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Export and preview
# ----------------------------------------------------------------------------------------------------------------
def write_synthetic(out_dir: str | os.PathLike, cfg: SyntheticConfig, splits: Sequence[str] = ("train", "test"),
                    workers: int = 1) -> Path:
    """Write ``<out>/<split>/<class>/<id>.png``, the depth as 16-bit ``<id>_depth.png`` (depth * 65535) and
    ``<out>/manifest.csv`` (path, split, label, subject, intensity, yaw, pitch, occlusion, lighting, landmarks as
    136 space-separated numbers x0 y0 x1 y1 ...). Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = cfg.class_names
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "label", "subject", "intensity", "yaw", "pitch", "occlusion", "lighting",
                    "landmarks"])
        for split in splits:
            a = render_arrays(cfg, split, workers)
            for i in range(len(a["label"])):
                cls = names[int(a["label"][i])]
                rel = Path(split) / cls / f"{i:06d}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(out / rel), cv2.cvtColor(a["rgb"][i], cv2.COLOR_RGB2BGR))
                d16 = np.round(a["depth"][i].astype(np.float32) * 65535).astype(np.uint16)
                cv2.imwrite(str(out / rel.with_name(f"{i:06d}_depth.png")), d16)
                lms = " ".join(f"{v:.2f}" for v in a["landmarks"][i].ravel())
                w.writerow([rel.as_posix(), split, cls, a["subject"][i], int(a["intensity"][i]),
                            f"{a['yaw'][i]:.2f}", f"{a['pitch'][i]:.2f}", a["occlusion"][i],
                            f"{a['lighting'][i]:.3f}", lms])
    return out


# (header, overrides): the first 8 cover frontal, |yaw| > 30 and all six occlusion types
_SHEET_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("frontal", {}), ("yaw+40", {"yaw": 40.0, "pitch": 5.0}), ("mask", {"occlusion": "mask"}),
    ("glasses yaw-35", {"occlusion": "glasses", "yaw": -35.0}), ("top", {"occlusion": "top"}),
    ("bottom yaw+35", {"occlusion": "bottom", "yaw": 35.0}), ("left", {"occlusion": "left"}),
    ("right yaw-50", {"occlusion": "right", "yaw": -50.0}), ("yaw-55", {"yaw": -55.0, "pitch": -10.0}),
    ("pitch+25", {"pitch": 25.0}), ("low light", {"lighting": 0.2}), ("intensity 1", {"intensity": 1}),
)


def _overlay_landmarks(rgb: np.ndarray, lm: np.ndarray) -> np.ndarray:
    out = rgb.copy()
    r = max(1, rgb.shape[0] // 80)
    for i, (x, y) in enumerate(lm):
        colour = (255, 60, 60) if i < 17 else (60, 255, 60) if i < 27 else (255, 255, 60) if i < 36 else \
            (60, 200, 255) if i < 48 else (255, 60, 255)
        cv2.circle(out, (int(round(x)), int(round(y))), r, colour, -1, cv2.LINE_AA)
    return out


def _depth_thumb(depth: np.ndarray) -> np.ndarray:
    """The depth map as a lit relief (shape is easier to read than grey levels)."""
    fg = depth > 0
    light = np.array([-0.4, -0.5, 1.0], np.float32)
    relief = _shade(depth * _DEPTH_RANGE, 0.35 * depth.shape[0], light / np.linalg.norm(light), 0.25)
    return cv2.cvtColor((np.where(fg, relief, 0) * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)


def contact_sheet(path: str | os.PathLike, cfg: SyntheticConfig | None = None, per_class: int = 8) -> Path:
    """A PNG grid: one row per class; first the frontal sample with its depth and landmarks, then ``per_class - 1``
    more cells mixing poses (|yaw| > 30) and each occlusion type (each cell a different subject)."""
    cfg = cfg or SyntheticConfig()
    S, names = cfg.size, cfg.class_names
    columns = [_SHEET_VARIANTS[i % len(_SHEET_VARIANTS)] for i in range(per_class)]
    headers = [columns[0][0], "depth", "landmarks"] + [c[0] for c in columns[1:]]
    pad, left, top = 2, int(S * 0.9), max(14, S // 6)
    sheet = np.full((top + len(names) * (S + pad), left + len(headers) * (S + pad), 3), 255, np.uint8)
    font, fscale = cv2.FONT_HERSHEY_SIMPLEX, max(0.3, S / 280)
    for j, h in enumerate(headers):
        cv2.putText(sheet, h, (left + j * (S + pad) + 2, top - 4), font, fscale, (0, 0, 0), 1, cv2.LINE_AA)
    base = sample_params(cfg, "test", 0)
    for row, name in enumerate(names):
        y = top + row * (S + pad)
        cv2.putText(sheet, name, (4, y + S // 2), font, fscale, (0, 0, 0), 1, cv2.LINE_AA)
        cells = []
        for col, (_, over) in enumerate(columns):
            p = replace(base, subject_num=SPLITS["test"] * _SUBJECT_STRIDE + row * per_class + col, label=row,
                        intensity=0 if name == "neutral" else 4, yaw=0.0, pitch=0.0, roll=0.0, occlusion="none",
                        lighting=1.0, au_noise=np.zeros(len(AU_NAMES)), au_gain=np.ones(len(AU_NAMES)),
                        render_seed=1000 * row + col)
            p = replace(p, **over)
            if name == "neutral":
                p = replace(p, intensity=0)
            s = render_params(cfg, p)
            cells.append(s["rgb"])
            if col == 0:
                cells += [_depth_thumb(s["depth"]), _overlay_landmarks(s["rgb"], s["landmarks"])]
        for j, cell in enumerate(cells):
            x = left + j * (S + pad)
            sheet[y:y + S, x:x + S] = cell
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return path
