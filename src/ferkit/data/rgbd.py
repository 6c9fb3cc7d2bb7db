"""RGB-D expression datasets of seed 002 (SPEC 2.2): BU-3DFE, Bosphorus, CalD3rMenD3s and their merge.

None of them can be downloaded; the readers follow the published file formats:

* **BU-3DFE** (Yin et al. 2006): ``<root>/[Subjects/]F0001/F0001_AN01WH_F2D.bmp`` (2D frontal photo) with the
  VRML 2.0 mesh ``F0001_AN01WH_F3D.wrl`` (``IndexedFaceSet``: ``coord Coordinate { point [...] }`` +
  ``coordIndex [...]``). Name = subject (F/M + 4 digits), expression (AN DI FE HA NE SA SU), intensity (00 for
  neutral, 01..04), race code. The mesh is rendered into a depth map by a z-buffer, orthographically along the
  mesh's z axis, its x-y extent fitted (with ``frame_margin``) into the RGB image's frame: the database gives no
  camera model (seed 002 §III-A says so), so RGB and depth agree in framing, not pixel for pixel.
* **Bosphorus** (Savran et al. 2008): ``<root>/bs000/bs000_E_ANGER_0.png`` with ``bs000_E_ANGER_0.bnt``, the
  binary 3D point file read by the database's ``read_bntfile.m``: uint16 nrows, uint16 ncols, float64 zmin,
  uint16 n + n bytes of image file name, uint32 5*N, then N x 5 float64 stored column by column (x, y, z, u, v;
  u, v = image coordinates normalised to [0, 1]; z == zmin is background). The grid is triangulated and rendered
  at the (u, v) positions, i.e. exactly in the RGB image's frame. Classes: the six ``E_*`` expressions, ``N_N``
  neutral, and the action units of seed 002 Table I (AU24 anger, AU9 disgust, AU12 happiness, AU15 sadness,
  AU2 surprise, AU1 fear; ``use_aus=False`` keeps only the ``E_*`` / ``N_N`` scans). Poses, occlusions and the
  other AUs are counted in ``dropped``.
* **CalD3rMenD3s** (Ulrich et al.): ``<root>/{CalD3r,MenD3s}/<Emotion>/RGB/[aligned_]<G>_<id>_<code>_<label>_Color.png``
  with the RealSense SR300 depth ``.../<Emotion>/DEPTH/..._Depth.png`` (16-bit, 0 = no data, larger = farther),
  the layout of the authors' release. Subject = part + gender + id.
* **rgbd_merged**: the three under ``<root>/{BU3DFE,Bosphorus,CalD3rMenD3s}`` (or the ``*_root`` options), subject
  ids prefixed with the dataset name (seed 002 §IV-E: 12,098 samples).

Every depth map follows ferkit's convention (the one of the synthetic faces): float32 in [0, 1], larger = closer,
0 = background; the face is mapped linearly onto [``DEPTH_FLOOR``, 1] (Eq. 1's X / max(X) then holds with
max = 1). Class order: ``LABEL_SPACES["bu3dfe"]`` for all (``exclude=[...]`` drops classes, e.g. surprise for the
6-class CalD3rMenD3s setting). Splits: ``all`` (for cross-validation) or ``train`` / ``test``, a seeded
subject-disjoint 80/20 holdout (``test_fraction``, ``split_seed``). Rendered depth maps are cached under
``$FERKIT_CACHE/rgbd_depth`` at ``depth_resolution`` (long side; the transforms resize both modalities anyway).
"""
from __future__ import annotations

import hashlib
import inspect
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..labels import LABEL_SPACES
from .adapters import AdapterDataset, BadEntries
from .base import DataError, FaceDataset, FaceRecord

__all__ = [
    "RGBD_ADAPTERS", "RGBDDataset", "ClassSubset", "DEPTH_FLOOR", "read_wrl", "read_bnt", "BntScan",
    "rasterize_depth", "mesh_depth_map", "bnt_depth_map", "png_depth_map", "normalise_depth",
    "bu3dfe", "bosphorus", "cald3rmend3s", "rgbd_merged", "build_rgbd_dataset", "register_cli",
]

DEPTH_FLOOR = 0.2  # depth of the farthest face point; background is 0
DEPTH_CACHE_VERSION = 1  # bump when rendering changes
_CLASSES = LABEL_SPACES["bu3dfe"]  # anger, disgust, fear, happiness, neutral, sadness, surprise
_IMAGE_EXT = (".bmp", ".png", ".jpg", ".jpeg")

BU3DFE_CODES = {"AN": "anger", "DI": "disgust", "FE": "fear", "HA": "happiness", "NE": "neutral", "SA": "sadness",
                "SU": "surprise"}
_BU3DFE_NAME = re.compile(r"^([FM]\d{4})_([A-Z]{2})(\d{2})([A-Z]{2})_F2D\.(bmp|png|jpe?g)$", re.IGNORECASE)

BOSPHORUS_EXPRESSIONS = {"ANGER": "anger", "DISGUST": "disgust", "FEAR": "fear", "HAPPY": "happiness",
                         "SADNESS": "sadness", "SURPRISE": "surprise"}
# seed 002 Table I: the most expressive action unit of each class (after CK+)
BOSPHORUS_AU_CLASSES = {"LFAU_24": "anger", "LFAU_9": "disgust", "LFAU_12": "happiness", "LFAU_15": "sadness",
                        "UFAU_2": "surprise", "UFAU_1": "fear"}
_BOSPHORUS_NAME = re.compile(r"^(bs\d{3})_([A-Z]+)_([A-Za-z0-9]+)_(\d+)\.png$")


# ---------------------------------------------------------------------------------------------------------------
# depth maps: parsers, z-buffer, normalisation
# ---------------------------------------------------------------------------------------------------------------
def normalise_depth(closeness: np.ndarray) -> np.ndarray:
    """Finite values (larger = closer) -> [DEPTH_FLOOR, 1], the closest point 1; NaN (background) -> 0."""
    out = np.zeros(closeness.shape, np.float32)
    fg = np.isfinite(closeness)
    if fg.any():
        lo, hi = float(closeness[fg].min()), float(closeness[fg].max())
        scale = (closeness[fg] - lo) / (hi - lo) if hi > lo else np.ones(int(fg.sum()))
        out[fg] = DEPTH_FLOOR + (1.0 - DEPTH_FLOOR) * scale
    return out


def rasterize_depth(xy: np.ndarray, z: np.ndarray, tris: np.ndarray, height: int, width: int,
                    chunk_pixels: int = 2_000_000) -> np.ndarray:
    """Z-buffer: (H, W) map of the largest (closest) barycentric z over the triangles covering each pixel centre;
    NaN where no triangle does. ``xy``: (N, 2) pixel coordinates (pixel centres at integers), ``tris``: (M, 3)."""
    zbuf = np.full(height * width, -np.inf)
    p = xy[tris].astype(np.float64)  # (M, 3, 2)
    lo = np.maximum(np.ceil(p.min(1)), 0).astype(np.int64)
    hi = np.minimum(np.floor(p.max(1)), [width - 1, height - 1]).astype(np.int64)
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]  # twice the signed area
    keep = np.flatnonzero((hi >= lo).all(1) & (np.abs(area) > 1e-12))
    span = hi - lo + 1  # (M, 2): bounding box width, height
    counts = span[:, 0] * span[:, 1]
    bounds = np.cumsum(counts[keep])
    start = 0
    while start < len(keep):  # chunks of at most ~chunk_pixels candidate pixels
        stop = max(int(np.searchsorted(bounds, bounds[start] - counts[keep[start]] + chunk_pixels, "right")),
                   start + 1)
        _splat(zbuf, keep[start:stop], p, z[tris], lo, span, counts, area, width)
        start = stop
    zbuf = zbuf.reshape(height, width)
    zbuf[~np.isfinite(zbuf)] = np.nan
    return zbuf


def _splat(zbuf: np.ndarray, idx: np.ndarray, p: np.ndarray, zt: np.ndarray, lo: np.ndarray, span: np.ndarray,
           counts: np.ndarray, area: np.ndarray, width: int) -> None:
    n = counts[idx]
    tri = np.repeat(idx, n)
    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # candidate number inside each bounding box
    px = lo[tri, 0] + k % span[tri, 0]
    py = lo[tri, 1] + k // span[tri, 0]
    a, b, c = p[tri, 0], p[tri, 1], p[tri, 2]
    w0 = ((b[:, 0] - px) * (c[:, 1] - py) - (b[:, 1] - py) * (c[:, 0] - px)) / area[tri]  # area(P, b, c) / area
    w1 = ((c[:, 0] - px) * (a[:, 1] - py) - (c[:, 1] - py) * (a[:, 0] - px)) / area[tri]  # area(P, c, a) / area
    w2 = 1.0 - w0 - w1
    inside = (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
    zz = w0 * zt[tri, 0] + w1 * zt[tri, 1] + w2 * zt[tri, 2]
    np.maximum.at(zbuf, (py * width + px)[inside], zz[inside])


def _numbers(body: str, path: Path, what: str) -> np.ndarray:
    try:
        return np.array(body.replace(",", " ").split(), dtype=np.float64)
    except ValueError as e:
        raise DataError(f"{path}: malformed {what} ({e})") from None


def _faces_from_index(index: np.ndarray) -> np.ndarray:
    """coordIndex (polygons separated by -1) -> (M, 3) triangles (fan triangulation of larger polygons)."""
    index = index.astype(np.int64)
    if len(index) and index[-1] != -1:
        index = np.append(index, -1)
    ends = np.flatnonzero(index == -1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts
    if len(lengths) and (lengths == 3).all():
        return index.reshape(-1, 4)[:, :3]
    tris = [(poly[0], poly[i], poly[i + 1]) for s, e in zip(starts, ends) for poly in [index[s:e]]
            for i in range(1, len(poly) - 1)]
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3)


def read_wrl(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (N, 3) and triangles (M, 3) of every ``IndexedFaceSet`` of a VRML 2.0 file (BU-3DFE ``_F3D.wrl``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="latin-1")
    except OSError as e:
        raise DataError(f"{path}: cannot read mesh ({e})") from None
    text = re.sub(r"#[^\n]*", "", text)  # comments (incl. the '#VRML V2.0 utf8' header)
    blocks = text.split("IndexedFaceSet")[1:]
    if not blocks:
        raise DataError(f"{path}: no IndexedFaceSet in the VRML file")
    vertices, faces, offset = [], [], 0
    for block in blocks:
        pts = re.search(r"(?<![A-Za-z])Coordinate\s*\{\s*point\s*\[([^\]]*)\]", block)
        idx = re.search(r"(?<![A-Za-z])coordIndex\s*\[([^\]]*)\]", block)
        if pts is None or idx is None:
            raise DataError(f"{path}: IndexedFaceSet without 'coord Coordinate {{ point [...] }}' or 'coordIndex'")
        v = _numbers(pts.group(1), path, "Coordinate point list")
        if len(v) % 3:
            raise DataError(f"{path}: Coordinate point list has {len(v)} numbers, not a multiple of 3")
        v = v.reshape(-1, 3)
        f = _faces_from_index(_numbers(idx.group(1), path, "coordIndex"))
        if len(f) and (f.min() < 0 or f.max() >= len(v)):
            raise DataError(f"{path}: coordIndex refers to vertex {int(f.max())} but there are {len(v)} points")
        vertices.append(v)
        faces.append(f + offset)
        offset += len(v)
    v, f = np.concatenate(vertices), np.concatenate(faces)
    if not len(f):
        raise DataError(f"{path}: the mesh has no faces")
    return v, f


def _fitted_frame(xy: np.ndarray, height: int, width: int, margin: float) -> np.ndarray:
    """Mesh x-y (y up) -> pixel coordinates (y down), the bounding box fitted into the frame, centred."""
    lo, hi = xy.min(0), xy.max(0)
    pad = margin * min(height, width)
    extent = np.maximum(hi - lo, 1e-12)
    s = min((width - 1 - 2 * pad) / extent[0], (height - 1 - 2 * pad) / extent[1])
    centre = (lo + hi) / 2
    px = (xy[:, 0] - centre[0]) * s + (width - 1) / 2
    py = -(xy[:, 1] - centre[1]) * s + (height - 1) / 2
    return np.stack([px, py], 1)


def mesh_depth_map(vertices: np.ndarray, faces: np.ndarray, height: int, width: int,
                   margin: float = 0.05) -> np.ndarray:
    """Orthographic z-buffer render of a mesh along +z (towards the viewer) at the given frame, normalised."""
    xy = _fitted_frame(vertices[:, :2], height, width, margin)
    return normalise_depth(rasterize_depth(xy, vertices[:, 2], faces, height, width))


@dataclass
class BntScan:
    nrows: int
    ncols: int
    zmin: float
    image_name: str
    points: np.ndarray  # (nrows * ncols, 5): x, y, z, u, v

    @property
    def valid(self) -> np.ndarray:
        return (self.points[:, 2] != self.zmin) & np.isfinite(self.points).all(1)


def read_bnt(path: str | Path) -> BntScan:
    """A Bosphorus ``.bnt`` file (layout of the database's ``read_bntfile.m``, little endian)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read 3D points ({e})") from None
    try:
        nrows, ncols, zmin, name_len = struct.unpack_from("<HHdH", raw, 0)
        name = raw[14:14 + name_len].decode("latin-1")
        (count,) = struct.unpack_from("<I", raw, 14 + name_len)
    except struct.error:
        raise DataError(f"{path}: truncated .bnt header") from None
    n = nrows * ncols
    if count != 5 * n:
        raise DataError(f"{path}: .bnt header says {count} values, expected 5 x {nrows} x {ncols} = {5 * n}")
    offset = 18 + name_len
    if len(raw) < offset + 8 * count:
        raise DataError(f"{path}: .bnt file truncated ({len(raw)} bytes, need {offset + 8 * count})")
    data = np.frombuffer(raw, dtype="<f8", count=count, offset=offset)
    return BntScan(nrows, ncols, zmin, name, data.reshape(5, n).T.copy())  # column-major (MATLAB fread)


def _grid_triangles(nrows: int, ncols: int, valid: np.ndarray) -> np.ndarray:
    """Two triangles per grid cell whose corners are valid scan points (row-major grid)."""
    idx = np.arange(nrows * ncols).reshape(nrows, ncols)
    a, b = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
    c, d = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tris = np.concatenate([np.stack([a, b, c], 1), np.stack([b, d, c], 1)])
    return tris[valid[tris].all(1)]


def bnt_depth_map(scan: BntScan, height: int, width: int) -> np.ndarray:
    """Depth of a Bosphorus scan in its RGB image's frame: the point grid rendered at its (u, v) positions.

    Which way v runs is read from the data: image rows go down while the face's y goes up, so the row coordinate
    must decrease with y. Grid cells spanning more than 4x the median edge (scan borders) are left out."""
    pts, valid = scan.points, scan.valid
    if valid.sum() < 3:
        raise DataError(f"{scan.image_name}: fewer than 3 valid 3D points in the scan")
    u, v, y = pts[:, 3], pts[:, 4], pts[:, 1]
    v_up = np.corrcoef(y[valid], v[valid])[0, 1] > 0 if np.ptp(v[valid]) > 0 else False
    rows = ((1.0 - v) if v_up else v) * height - 0.5
    xy = np.stack([u * width - 0.5, rows], 1)
    tris = _grid_triangles(scan.nrows, scan.ncols, valid)
    if len(tris):
        edges = np.linalg.norm(xy[tris] - xy[np.roll(tris, 1, axis=1)], axis=2).max(1)
        tris = tris[edges <= 4 * max(float(np.median(edges)), 1.0)]
    return normalise_depth(rasterize_depth(xy, pts[:, 2], tris, height, width))


def png_depth_map(path: str | Path, invert: bool = True) -> np.ndarray:
    """A sensor depth PNG (8/16-bit, 0 = no data) -> ferkit depth; ``invert``: the file stores distance
    (larger = farther, RealSense), so it is turned into closeness."""
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if raw is None:
        raise DataError(f"{path}: unreadable depth image")
    if raw.ndim == 3:
        raw = raw[..., 0]
    d = raw.astype(np.float64)
    d[d <= 0] = np.nan
    return normalise_depth(-d if invert else d)


def _depth_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) with the RGB frame's aspect and the long side ``resolution`` (0: the RGB size itself)."""
    if resolution <= 0 or max(height, width) <= resolution:
        return height, width
    s = resolution / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


# ---------------------------------------------------------------------------------------------------------------
# the dataset type
# ---------------------------------------------------------------------------------------------------------------
class RGBDDataset(AdapterDataset):
    """An :class:`AdapterDataset` whose samples also carry ``depth`` (PIL mode "F", ferkit convention) and
    ``intensity`` (-1 where the database has none). Each record names its depth source in ``meta``:
    ``depth_kind`` (wrl / bnt / png), ``depth_path`` and ``depth_opts``."""

    def __init__(self, name: str, records: Sequence[FaceRecord], class_names: Sequence[str], *, split: str,
                 root: str | Path | None, skipped: Sequence[str] = (), dropped: dict[str, int] | None = None,
                 depth_resolution: int = 256, depth_cache: bool = True):
        super().__init__(name, records, class_names, split=split, root=root, skipped=skipped, dropped=dropped,
                         sample_keys=("intensity",))
        self.modalities = ("image", "depth")
        self.depth_resolution = depth_resolution
        self.depth_cache = depth_cache

    def load(self, index: int) -> dict[str, Any]:
        from PIL import Image

        sample = super().load(index)
        w, h = sample["image"].size
        sample["depth"] = Image.fromarray(self.depth_map(self.records[index], h, w), "F")
        return sample

    def depth_map(self, r: FaceRecord, height: int, width: int) -> np.ndarray:
        """The record's depth in its RGB image's frame (at ``depth_resolution``), from the cache when there."""
        kind, path = r.meta["depth_kind"], Path(r.meta["depth_path"])
        opts = r.meta.get("depth_opts", {})
        h, w = (height, width) if kind == "png" else _depth_size(height, width, self.depth_resolution)
        cache = self._cache_file(path, kind, h, w, opts) if self.depth_cache and kind != "png" else None
        if cache is not None and cache.is_file():
            try:
                return np.load(cache).astype(np.float32)
            except (OSError, ValueError):
                pass  # a broken cache file is re-rendered
        if kind == "wrl":
            depth = mesh_depth_map(*read_wrl(path), h, w, margin=opts.get("frame_margin", 0.05))
        elif kind == "bnt":
            depth = bnt_depth_map(read_bnt(path), h, w)
        elif kind == "png":
            depth = png_depth_map(path, invert=opts.get("invert", True))
        else:
            raise DataError(f"{r.source}: unknown depth kind {kind!r}")
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, depth.astype(np.float16))
            os.replace(tmp, cache)
        return depth

    @staticmethod
    def _cache_file(path: Path, kind: str, h: int, w: int, opts: dict) -> Path | None:
        from .build import cache_dir

        try:
            st = path.stat()
        except OSError:
            return None
        key = f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{kind}|{h}x{w}|{sorted(opts.items())}|" \
              f"v{DEPTH_CACHE_VERSION}"
        return cache_dir() / "rgbd_depth" / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"


class ClassSubset(FaceDataset):
    """The samples of ``base`` whose class is in ``keep``, relabelled to ``keep``'s order (BU-3DFE 6 classes
    without neutral, CalD3rMenD3s without surprise)."""

    def __init__(self, base: FaceDataset, keep: Sequence[str], split: str | None = None):
        names = list(base.class_names)
        unknown = [k for k in keep if k not in names]
        if unknown:
            raise ValueError(f"{base.name}: classes {unknown} not in {names}")
        self.base = base
        self.label_map = {names.index(k): i for i, k in enumerate(keep)}
        self.indices = np.asarray([i for i, r in enumerate(base.records) if r.label in self.label_map], np.int64)
        self.name = base.name
        records = [replace(base.records[i], label=self.label_map[base.records[i].label]) for i in self.indices]
        super().__init__(records, keep, split=split or base.split, root=base.root, modalities=base.modalities)

    def load(self, index: int) -> dict[str, Any]:
        sample = self.base.load(int(self.indices[index]))
        sample["label"], sample["index"] = self.label_map[sample["label"]], index
        return sample

    def subsets(self) -> dict[str, np.ndarray]:
        return {k: v[self.indices] for k, v in self.base.subsets().items()}


# ---------------------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------------------
def _label_space(exclude: Sequence[str] | None, dataset: str) -> list[str]:
    exclude = [str(e).lower() for e in (exclude or [])]
    unknown = [e for e in exclude if e not in _CLASSES]
    if unknown:
        raise ValueError(f"{dataset}: exclude: unknown classes {unknown}; classes: {', '.join(_CLASSES)}")
    return [c for c in _CLASSES if c not in exclude]


def _root(root: str | Path | None, dataset: str) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"{dataset}: no dataset root given (data.root)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: {dataset} dataset root not found (or not a folder)")
    return path


def _walk_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        out += [Path(dirpath) / f for f in sorted(filenames)]
    return out


def _need_file(path: Path, source: str, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{source}: {what} not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{source}: empty {what}: {path}")
    return path


def _split(records: list[FaceRecord], split: str, test_fraction: float, seed: int, dataset: str
           ) -> list[FaceRecord]:
    """``all``, or the ``train`` / ``test`` side of a seeded subject-disjoint holdout."""
    split = split.lower()
    if split == "all":
        return records
    if split not in ("train", "test"):
        raise DataError(f"{dataset}: unknown split {split!r}; known: all, train, test (subject-disjoint holdout)")
    from .splits import holdout_split

    labels = np.asarray([r.label for r in records])
    groups = np.asarray([r.subject for r in records], dtype=object)
    train_idx, test_idx = holdout_split(labels, test_fraction, seed, groups=groups)
    return [records[i] for i in (train_idx if split == "train" else test_idx)]


def _finish(name: str, records: list[FaceRecord], classes: list[str], split: str, root: Path, bad: BadEntries,
            dropped: Counter, opts: dict[str, Any]) -> RGBDDataset:
    records = _split(records, split, opts["test_fraction"], opts["split_seed"], name) if records else records
    return RGBDDataset(name, records, classes, split=split, root=root, skipped=bad.skipped, dropped=dict(dropped),
                       depth_resolution=opts["depth_resolution"], depth_cache=opts["depth_cache"])


def _common(test_fraction: float = 0.2, split_seed: int = 0, depth_resolution: int = 256,
            depth_cache: bool = True) -> dict[str, Any]:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return {"test_fraction": test_fraction, "split_seed": split_seed, "depth_resolution": depth_resolution,
            "depth_cache": depth_cache}


def _bu3dfe_records(root: Path, classes: list[str], bad: BadEntries, dropped: Counter,
                    frame_margin: float) -> list[FaceRecord]:
    records = []
    for path in _walk_files(root):
        m = _BU3DFE_NAME.match(path.name)
        if m is None:
            continue
        subject, code, level, race = m.group(1).upper(), m.group(2).upper(), int(m.group(3)), m.group(4).upper()
        with bad.entry():
            if code not in BU3DFE_CODES:
                raise DataError(f"{path}: unknown BU-3DFE expression code {code!r}")
            cls = BU3DFE_CODES[code]
            if cls not in classes:
                dropped[f"class {cls} excluded"] += 1
                continue
            if not 0 <= level <= 4 or (cls == "neutral") != (level == 0):
                raise DataError(f"{path}: intensity {level:02d} impossible for {cls}")
            mesh = _need_file(path.with_name(f"{m.group(1)}_{m.group(2)}{m.group(3)}{m.group(4)}_F3D.wrl"),
                              str(path), "3D mesh (.wrl)")
            records.append(FaceRecord(str(path), classes.index(cls), str(path), subject=subject,
                                      meta={"intensity": level, "race": race, "depth_kind": "wrl",
                                            "depth_path": str(mesh), "depth_opts": {"frame_margin": frame_margin},
                                            "dataset": "bu3dfe"}))
    return records


def bu3dfe(root: str | Path, split: str = "all", *, skip_bad: bool = False, exclude: Sequence[str] | None = None,
           frame_margin: float = 0.05, **common: Any) -> RGBDDataset:
    """BU-3DFE: ``*_F2D.bmp`` + ``*_F3D.wrl`` pairs, 100 subjects x (6 expressions x 4 intensities + neutral)."""
    opts, root_p = _common(**common), _root(root, "bu3dfe")
    classes, bad, dropped = _label_space(exclude, "bu3dfe"), BadEntries(skip_bad), Counter()
    records = _bu3dfe_records(root_p, classes, bad, dropped, frame_margin)
    return _finish("bu3dfe", records, classes, split, root_p, bad, dropped, opts)


def _bosphorus_class(kind: str, code: str, use_aus: bool) -> str | None:
    if kind == "E":
        return BOSPHORUS_EXPRESSIONS.get(code.upper())
    if kind == "N" and code.upper() == "N":
        return "neutral"
    if use_aus:
        return BOSPHORUS_AU_CLASSES.get(f"{kind}_{code}")
    return None


def _bosphorus_records(root: Path, classes: list[str], bad: BadEntries, dropped: Counter,
                       use_aus: bool) -> list[FaceRecord]:
    records = []
    for path in _walk_files(root):
        m = _BOSPHORUS_NAME.match(path.name)
        if m is None:
            continue
        subject, kind, code = m.group(1), m.group(2), m.group(3)
        cls = _bosphorus_class(kind, code, use_aus)
        if cls is None:
            dropped["pose / occlusion / unmapped action unit"] += 1
            continue
        if cls not in classes:
            dropped[f"class {cls} excluded"] += 1
            continue
        with bad.entry():
            scan = _need_file(path.with_suffix(".bnt"), str(path), "3D points (.bnt)")
            records.append(FaceRecord(str(path), classes.index(cls), str(path), subject=subject,
                                      meta={"intensity": -1, "code": f"{kind}_{code}", "depth_kind": "bnt",
                                            "depth_path": str(scan), "dataset": "bosphorus"}))
    return records


def bosphorus(root: str | Path, split: str = "all", *, skip_bad: bool = False, exclude: Sequence[str] | None = None,
              use_aus: bool = True, **common: Any) -> RGBDDataset:
    """Bosphorus: ``bsNNN_<kind>_<code>_<n>.png`` + ``.bnt``; expressions, neutral and Table I's action units."""
    opts, root_p = _common(**common), _root(root, "bosphorus")
    classes, bad, dropped = _label_space(exclude, "bosphorus"), BadEntries(skip_bad), Counter()
    records = _bosphorus_records(root_p, classes, bad, dropped, use_aus)
    return _finish("bosphorus", records, classes, split, root_p, bad, dropped, opts)


def _cald3r_name(path: Path) -> tuple[str, str, str, str] | None:
    """``[aligned_]<G>_<id>_<code>_<label>_Color.png`` -> (gender, id, code, label)."""
    stem = path.name[:-len("_Color.png")]
    stem = stem[len("aligned_"):] if stem.startswith("aligned_") else stem
    tokens = stem.split("_")
    if len(tokens) < 4:
        return None
    return tokens[0], tokens[1], "_".join(tokens[2:-1]), tokens[-1]


def _cald3r_records(root: Path, classes: list[str], bad: BadEntries, dropped: Counter,
                    invert_depth: bool) -> list[FaceRecord]:
    from ..labels import canonical_name

    records = []
    for path in _walk_files(root):
        if not path.name.endswith("_Color.png") or path.parent.name.upper() != "RGB":
            continue
        with bad.entry():
            fields = _cald3r_name(path)
            if fields is None:
                raise DataError(f"{path}: file name is not <gender>_<id>_<code>_<label>_Color.png")
            gender, ident, _, label = fields
            try:
                cls = canonical_name(label)
                folder = canonical_name(path.parent.parent.name)
            except KeyError as e:
                raise DataError(f"{path}: {e.args[0]}") from None
            if cls != folder:
                raise DataError(f"{path}: label {label!r} in the name contradicts the folder {path.parent.parent.name}")
            if cls not in classes:
                dropped[f"class {cls} excluded"] += 1
                continue
            part = path.parent.parent.parent.name
            depth = path.parent.parent / "DEPTH" / (path.name[:-len("_Color.png")] + "_Depth.png")
            if not depth.is_file():
                alt = [p for p in path.parent.parent.iterdir() if p.is_dir() and p.name.upper() == "DEPTH"]
                depth = alt[0] / depth.name if alt else depth
            _need_file(depth, str(path), "depth image")
            records.append(FaceRecord(str(path), classes.index(cls), str(path), subject=f"{part}:{gender}{ident}",
                                      meta={"intensity": -1, "depth_kind": "png", "depth_path": str(depth),
                                            "depth_opts": {"invert": invert_depth}, "dataset": "cald3rmend3s"}))
    return records


def cald3rmend3s(root: str | Path, split: str = "all", *, skip_bad: bool = False,
                 exclude: Sequence[str] | None = None, invert_depth: bool = True, **common: Any) -> RGBDDataset:
    """CalD3r + MenD3s: ``<part>/<Emotion>/RGB/*_Color.png`` with ``<part>/<Emotion>/DEPTH/*_Depth.png``."""
    opts, root_p = _common(**common), _root(root, "cald3rmend3s")
    classes, bad, dropped = _label_space(exclude, "cald3rmend3s"), BadEntries(skip_bad), Counter()
    records = _cald3r_records(root_p, classes, bad, dropped, invert_depth)
    return _finish("cald3rmend3s", records, classes, split, root_p, bad, dropped, opts)


_MERGED_PARTS: dict[str, tuple[str, Callable[..., list[FaceRecord]]]] = {
    "bu3dfe": ("BU3DFE", lambda r, c, b, d: _bu3dfe_records(r, c, b, d, 0.05)),
    "bosphorus": ("Bosphorus", lambda r, c, b, d: _bosphorus_records(r, c, b, d, True)),
    "cald3rmend3s": ("CalD3rMenD3s", lambda r, c, b, d: _cald3r_records(r, c, b, d, True)),
}


def rgbd_merged(root: str | Path, split: str = "all", *, skip_bad: bool = False,
                exclude: Sequence[str] | None = None, bu3dfe_root: str | None = None,
                bosphorus_root: str | None = None, cald3rmend3s_root: str | None = None,
                **common: Any) -> RGBDDataset:
    """BU-3DFE + Bosphorus + CalD3rMenD3s as one 7-class set (seed 002 §IV-E), subjects prefixed by dataset.

    Parts live in ``<root>/BU3DFE``, ``<root>/Bosphorus``, ``<root>/CalD3rMenD3s`` unless a ``*_root`` option
    points elsewhere; a part whose folder is missing is an error (the merge is the paper's three sets)."""
    opts = _common(**common)
    base = Path(root).expanduser() if root else None
    given = {"bu3dfe": bu3dfe_root, "bosphorus": bosphorus_root, "cald3rmend3s": cald3rmend3s_root}
    classes, bad, dropped = _label_space(exclude, "rgbd_merged"), BadEntries(skip_bad), Counter()
    records: list[FaceRecord] = []
    for key, (folder, read) in _MERGED_PARTS.items():
        where = given[key] or (base / folder if base is not None else None)
        part = read(_root(where, key), classes, bad, dropped)
        records += [replace(r, subject=f"{key}/{r.subject}") for r in part]
    return _finish("rgbd_merged", records, classes, split, base or Path("."), bad, dropped, opts)


RGBD_ADAPTERS: dict[str, Callable[..., FaceDataset]] = {
    "bu3dfe": bu3dfe,
    "bosphorus": bosphorus,
    "cald3rmend3s": cald3rmend3s,
    "rgbd_merged": rgbd_merged,
}


def build_rgbd_dataset(name: str, root: str | Path | None, split: str, *, skip_bad: bool = False,
                       **opts: Any) -> FaceDataset:
    """Build RGB-D dataset ``name`` (see :data:`RGBD_ADAPTERS`); an unknown option is a one-line ``ValueError``."""
    if name not in RGBD_ADAPTERS:
        raise ValueError(f"unknown RGB-D dataset {name!r}; known: {', '.join(sorted(RGBD_ADAPTERS))}")
    builder = RGBD_ADAPTERS[name]
    params = inspect.signature(builder).parameters
    allowed = sorted({p for p in params if p not in ("root", "split", "skip_bad", "common")} |
                     set(inspect.signature(_common).parameters))
    unknown = [k for k in opts if k not in allowed]
    if unknown:
        raise ValueError(f"dataset {name!r} has no option {unknown[0]!r}; options: {', '.join(allowed)}")
    return builder(root, split, skip_bad=skip_bad, **opts)


# ---------------------------------------------------------------------------------------------------------------
# CLI: ferkit rgbd stats | depth
# ---------------------------------------------------------------------------------------------------------------
def register_cli(sub, commands) -> None:
    p = sub.add_parser("rgbd", help="RGB-D tools: per-modality z-score statistics of a training split; depth maps")
    actions = p.add_subparsers(dest="rgbd_action", required=True)
    s = actions.add_parser("stats", help="mean/std of RGB and depth over the training split (seed 002 Eq. 1), "
                                         "printed as config overrides")
    s.add_argument("--config", "-c", required=True, help="preset name or YAML path")
    s.add_argument("overrides", nargs="*", metavar="key.sub=value")
    s.add_argument("--max-samples", type=int, default=0, help="estimate on a seeded sample of this size (0: all)")
    d = actions.add_parser("depth", help="render the depth map of a .wrl mesh / .bnt scan / depth PNG to a PNG")
    d.add_argument("source", help="BU-3DFE _F3D.wrl, Bosphorus .bnt or sensor depth PNG")
    d.add_argument("out", help="output PNG (8-bit, white = close)")
    d.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"), help="frame size")
    commands["rgbd"] = _cmd_rgbd


def _cmd_rgbd(args) -> int:
    if args.rgbd_action == "stats":
        from ferkit.config import load_config
        from ferkit.data.build import build_dataset
        from ferkit.engine.protocols import zscore_overrides, zscore_stats

        cfg = load_config(args.config, args.overrides)
        train = build_dataset(cfg.data, cfg.data.train_split)
        stats = zscore_stats(train, cfg, max_samples=args.max_samples or None)
        print(" ".join(zscore_overrides(stats)))
        return 0
    import cv2

    src = Path(args.source)
    h, w = args.size
    if src.suffix.lower() == ".wrl":
        depth = mesh_depth_map(*read_wrl(src), h, w)
    elif src.suffix.lower() == ".bnt":
        depth = bnt_depth_map(read_bnt(src), h, w)
    else:
        depth = png_depth_map(src)
    cv2.imwrite(args.out, np.round(depth * 255).astype(np.uint8))
    print(f"{args.out}: {depth.shape[1]}x{depth.shape[0]}, foreground {100 * (depth > 0).mean():.1f} %")
    return 0
