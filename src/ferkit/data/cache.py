"""Decode-once cache for small-image datasets (``data.decode_cache: true``).

Every image of a dataset is decoded once, at its stored size, into one uint8 ``.npy`` under
``$FERKIT_CACHE/decoded`` — FER2013's 28,709 48x48 grey training faces are 66 MB — and samples are then read from
a memory map of it instead of decoding a PNG / JPEG each epoch.

* Key: the file list in order with sizes and modification times (``os.stat`` only, so reusing a cache is cheap),
  the PIL version and the cache format: a changed, added or removed file (or another decoder) builds a new cache.
* Atomic: the array is written to a temporary file in the same folder and renamed into place; an interrupted build
  leaves at most a temporary file, never a corrupt cache. A lock file keeps concurrent builders (DDP ranks) from
  decoding the same set twice.
* Worker-safe: :class:`DecodedImages` pickles without its map and opens it lazily in each DataLoader worker.
* Exact: a cached sample is byte-identical to the decoded one (grey sets are stored as one channel and converted
  to RGB on read, as :func:`~ferkit.data.base.open_image` does).

Only sets whose images share one size qualify; for others (or in-memory sets such as the FER2013 CSV) the cache is
left off with a log line and images are decoded as before.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ferkit._files import remove_stale_temps

from .base import DataError, FaceDataset, FaceRecord, open_image

__all__ = ["DecodedImages", "attach_decode_cache", "build_decoded", "open_decoded", "cache_key"]

_logger = logging.getLogger("ferkit")
FORMAT_VERSION = 2  # 2: EXIF orientation applied by open_image
MAX_SIDE = 1024  # larger images are not what this cache is for (and open_image may downscale huge ones)
# header modes stored as one grey channel (16-bit greys are scaled to 8 bits by open_image); anything else is RGB
_GREY_MODES = frozenset({"L", "I;16", "I;16B", "I;16L", "I"})
_STALE_TMP_S = 3600.0  # temporary files of a build older than this are leftovers of a killed process
_WORKERS = min(8, os.cpu_count() or 1)  # PIL decodes with the GIL released


class DecodedImages:
    """Read-only view of a decoded-image ``.npy``: ``image(i)`` is record ``i`` as an RGB PIL image.

    The memory map is opened on first use in each process, so the object pickles small (DataLoader workers)."""

    def __init__(self, path: str | Path, shape: tuple[int, ...]):
        self.path = str(path)
        self.shape = tuple(shape)  # (N, H, W) grey or (N, H, W, 3) RGB
        self.mode = "L" if len(self.shape) == 3 else "RGB"
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    def image(self, index: int):
        from PIL import Image

        pixels = np.array(self.array[index])  # a private copy: nothing downstream can touch the map
        return Image.fromarray(pixels).convert("RGB")  # (H, W) uint8 -> "L", (H, W, 3) -> "RGB"


# ------------------------------------------------------------------------------------------------------------------
# what the files are
# ------------------------------------------------------------------------------------------------------------------
def _stat(r: FaceRecord) -> tuple[int, int]:
    """(bytes, mtime_ns) of the record's file."""
    try:
        st = os.stat(r.path)
    except OSError:
        raise DataError(f"{r.source}: image file not found: {r.path}") from None
    return st.st_size, st.st_mtime_ns


def _header(r: FaceRecord) -> tuple[tuple[int, int], str]:
    """((width, height), mode) from the file header (no pixel decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(r.path) as im:
            return im.size, im.mode
    except FileNotFoundError:
        raise DataError(f"{r.source}: image file not found: {r.path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{r.source}: unreadable image {r.path} ({e.__class__.__name__}: {e})") from None


def _headers(records: Sequence[FaceRecord]) -> list[tuple[tuple[int, int], str]]:
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        return list(pool.map(_header, records, chunksize=256))


def cache_key(records: Sequence[FaceRecord]) -> str:
    """Hex digest of the file list (paths, bytes, mtimes) and the decoder (format version, PIL version)."""
    import PIL

    h = hashlib.sha256(f"ferkit decode cache v{FORMAT_VERSION}, PIL {PIL.__version__}\n".encode())
    for r in records:
        nbytes, mtime = _stat(r)
        h.update(f"{r.path}\0{nbytes}\0{mtime}\n".encode())
    return h.hexdigest()


def _layout(headers: list) -> tuple[str, tuple[int, int]] | str:
    """(storage mode, (width, height)) shared by every image — or why the set does not qualify."""
    sizes = {h[0] for h in headers}
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])
        return f"images differ in size ({len(sizes)} sizes: {shown}, ...)"
    size = next(iter(sizes))
    if max(size) > MAX_SIDE:
        return f"{size[0]}x{size[1]} images are not small (limit {MAX_SIDE} px a side)"
    mode = "L" if all(h[1] in _GREY_MODES for h in headers) else "RGB"
    return mode, size


# ------------------------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------------------------
@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path`` (released by the OS if the holder dies)."""
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _decode_into(out: np.ndarray, records: Sequence[FaceRecord], mode: str, progress: bool) -> None:
    want = out.shape[1:3]

    def one(i: int) -> None:
        r = records[i]
        pixels = np.asarray(open_image(r.path, r.source, mode=mode))
        if pixels.shape[:2] != want:
            raise DataError(f"{r.source}: decoded to {pixels.shape[1]}x{pixels.shape[0]}, "
                            f"expected {want[1]}x{want[0]} (file changed during the cache build?)")
        out[i] = pixels

    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        jobs = pool.map(one, range(len(records)), chunksize=256)
        if progress:
            from tqdm import tqdm

            jobs = tqdm(jobs, total=len(records), desc="decode cache", unit="img")
        try:
            for _ in jobs:
                pass
        except BaseException:
            pool.shutdown(cancel_futures=True)  # Ctrl-C or a bad file: do not decode the rest first
            raise


def build_decoded(records: Sequence[FaceRecord], path: Path, mode: str, size: tuple[int, int],
                  progress: bool = False) -> None:
    """Decode ``records`` into ``path`` (temporary file, then an atomic rename) unless it is already there."""
    w, h = size
    shape = (len(records), h, w) if mode == "L" else (len(records), h, w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        if path.is_file():  # another process built it while this one waited for the lock
            return
        remove_stale_temps(path.parent, f"{path.name}.", _STALE_TMP_S)
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            _decode_into(out, records, mode, progress)
            out.flush()
            del out
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def open_decoded(path: str | Path, count: int) -> DecodedImages:
    """A built cache file, checked: uint8, (count, H, W) grey or (count, H, W, 3) RGB."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable decode cache ({e}); delete the file") from None
    grey = array.ndim == 3
    if array.dtype != np.uint8 or len(array) != count or not (grey or (array.ndim == 4 and array.shape[3] == 3)):
        raise DataError(f"{path}: decode cache holds {array.shape} {array.dtype}, expected {count} uint8 images; "
                        "delete the file")
    return DecodedImages(path, array.shape)  # mapped again, lazily, in whichever process reads


def attach_decode_cache(ds: FaceDataset, cache_root: str | Path, progress: bool = False,
                        max_bytes: int = 8 << 30) -> bool:
    """Serve ``ds``'s images from a decode-once cache under ``cache_root`` (built if needed). Returns False (with a
    log line saying why) for sets that do not qualify: other dataset types, in-memory images, mixed image sizes."""
    from .adapters import AdapterDataset

    where = f"{ds.name}[{ds.split}]"
    if not isinstance(ds, AdapterDataset) or ds.crop_face:
        return _off(where, "only plain image-file datasets are cached")
    if any(r.path is None for r in ds.records):
        return _off(where, "images are already held in memory")
    path = Path(cache_root) / f"{ds.name}-{ds.split}-{len(ds.records)}-{cache_key(ds.records)[:24]}.npy"
    t0 = time.perf_counter()
    fresh = not path.is_file()
    if fresh:
        layout = _layout(_headers(ds.records))
        if isinstance(layout, str):
            return _off(where, layout)
        mode, (w, h) = layout
        nbytes = len(ds.records) * w * h * (1 if mode == "L" else 3)
        if nbytes > max_bytes:
            return _off(where, f"{nbytes / 2**30:.1f} GiB decoded is over the {max_bytes / 2**30:.0f} GiB limit")
        build_decoded(ds.records, path, mode, (w, h), progress)
    ds.decoded = open_decoded(path, len(ds.records))
    verb = f"built in {time.perf_counter() - t0:.1f} s" if fresh else "reused"
    _logger.info("decode cache %s: %s %s (%d images of %s)", where, verb, path.name, len(ds.records),
                 "x".join(map(str, ds.decoded.shape[1:])))
    return True


def _off(where: str, why: str) -> bool:
    _logger.info("decode cache off for %s: %s; decoding images as usual", where, why)
    return False
