"""Adapters for the standard FER benchmarks (SPEC 2.2), each returning a :class:`FaceDataset` with an explicit,
ordered class list taken from :data:`ferkit.labels.LABEL_SPACES`.

Every adapter has the signature ``(root, split, *, skip_bad=False, **opts) -> FaceDataset`` and is registered in
:data:`ADAPTERS`; :func:`build_dataset` looks one up by name.

Bad input (SPEC 2.2) — a path in a list file that escapes the root, a missing or empty file, an unreadable image,
a label out of range, an unknown class folder, a malformed line — is a :class:`DataError` whose one-line message
starts with ``<file>:<line>:`` (or the image path) and says what is wrong. With ``skip_bad=True`` the entry is
left out instead and ``"<source>: <reason>"`` is appended to ``dataset.skipped`` (counted by ``describe()``).
All of that goes through one helper, :class:`BadEntries`. Entries that a dataset's *protocol* leaves out (FERPlus
ties / unknown / not-a-face, AffectNet none / uncertain / no-face / contempt in the 7-class variant) are not errors:
they are counted per reason in ``dataset.dropped``.

List and CSV files must be UTF-8 (a BOM is fine); another encoding (UTF-16, latin-1 bytes), NUL bytes or an empty
file is an error naming the file and line, whatever ``skip_bad`` says. An image listed twice (RAF-DB list, AffectNet
CSV, FERPlus image names) is a bad entry naming both lines; repeats in the RAF-DB pose lists are harmless, an
occlusion type given twice differently is not. FER2013's CSV rows are entries by position: its known duplicate
pictures are part of the published protocol and kept.

Existence (and non-emptiness) of every image file is checked when the index is built; whether it decodes is checked
then too when ``skip_bad=True`` (so bad images can be skipped), otherwise lazily by ``load()``, which raises a
:class:`DataError` naming the file.
"""
from __future__ import annotations

import csv
import inspect
import os
import re
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

import numpy as np

from ..labels import LABEL_SPACES, canonical_name
from .base import DataError, FaceDataset, FaceRecord, open_image, resolve_inside, text_problem

__all__ = [
    "ADAPTERS", "AdapterDataset", "BadEntries", "build_dataset", "known_datasets",
    "imagefolder", "fer2013", "ferplus", "rafdb", "affectnet", "ckplus", "jaffe", "sfew",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"})
# files that operating systems drop into folders; never data entries
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})

# generic split-folder spellings (case-insensitive); adapters with other conventions pass their own table
_SPLIT_DIRS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "publictest"),
    "test": ("test", "testing", "privatetest"),
}


# --------------------------------------------------------------------------------------------------------------
# the one "raise or skip" helper
# --------------------------------------------------------------------------------------------------------------
class BadEntries:
    """Turns a bad entry into a :class:`DataError` (default) or, with ``skip_bad``, into a recorded skip.

    Use :meth:`report` for a problem found by the adapter itself and ``with bad.entry(): ...`` around code that may
    raise :class:`DataError` (``resolve_inside``, ``open_image``, parsers): the rest of the block is abandoned and
    the message (already ``"<source>: <reason>"``) is recorded.
    """

    def __init__(self, skip_bad: bool):
        self.skip_bad = bool(skip_bad)
        self.skipped: list[str] = []

    def report(self, source: str, reason: str) -> None:
        """Raise ``DataError("<source>: <reason>")``, or record it when skipping."""
        self._handle(DataError(f"{source}: {reason}"))

    @contextmanager
    def entry(self) -> Iterator[None]:
        """Context for one entry: a :class:`DataError` inside is raised, or recorded and swallowed."""
        try:
            yield
        except DataError as e:
            self._handle(e)

    def _handle(self, error: DataError) -> None:
        if not self.skip_bad:
            raise error
        self.skipped.append(str(error))


def _fail(source: str, reason: str) -> NoReturn:
    raise DataError(f"{source}: {reason}")


# --------------------------------------------------------------------------------------------------------------
# the dataset type the adapters return
# --------------------------------------------------------------------------------------------------------------
class AdapterDataset(FaceDataset):
    """A :class:`FaceDataset` built by an adapter: file-backed or in-memory (FER2013 CSV pixels) images, protocol
    drops (``dropped``: reason -> count), robustness subsets from per-record flags, optional face-box cropping."""

    def __init__(self, name: str, records: Sequence[FaceRecord], class_names: Sequence[str], *, split: str,
                 root: str | Path | None, skipped: Sequence[str] = (), dropped: Mapping[str, int] | None = None,
                 subset_flags: Mapping[str, str] | None = None, sample_keys: Sequence[str] = (),
                 pixels: np.ndarray | None = None, crop_face: bool = False):
        self.name = name
        if not records:  # an empty dataset is always a mistake (wrong root, split or options)
            first = f" (first: {skipped[0]})" if skipped else ""
            raise DataError(f"{root}: no usable {name} samples for split {split!r}; {len(skipped)} bad entries "
                            f"skipped{first}; {sum((dropped or {}).values())} dropped by the protocol")
        super().__init__(records, class_names, split=split, root=root, skipped=list(skipped))
        self.dropped: dict[str, int] = dict(dropped or {})
        self.pixels = pixels  # (N, 48, 48) uint8 for in-memory records (meta["pixel_row"])
        self.crop_face = crop_face
        self._subset_flags = dict(subset_flags or {})  # subset name -> boolean meta key
        self.sample_keys = tuple(sample_keys)  # meta keys copied into every loaded sample
        self.decoded = None  # a cache.DecodedImages serving the images (data.decode_cache), None: decode files

    def subsets(self) -> dict[str, np.ndarray]:
        return {name: self.meta_column(key, False).astype(bool) for name, key in self._subset_flags.items()}

    def load(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        sample: dict[str, Any] = {"image": self._image(r, index), "label": r.label, "index": index}
        if "clean_label" in r.meta:  # labels from a noisy list: the clean one scores D3FER's label correction
            sample["true_label"] = r.meta["clean_label"]
        if r.subject is not None:
            sample["subject"] = r.subject
        for key in self.sample_keys:
            if key in r.meta:
                sample[key] = r.meta[key]
        landmarks = _landmarks(r)
        if landmarks is not None:
            if self.crop_face and "face_box" in r.meta:
                landmarks = landmarks - np.asarray(r.meta["face_box"][:2], dtype=np.float32)
            sample["landmarks"] = landmarks
        return sample

    def _image(self, r: FaceRecord, index: int):
        from PIL import Image

        if r.path is None:
            return Image.fromarray(self.pixels[r.meta["pixel_row"]], mode="L").convert("RGB")
        image = self.decoded.image(index) if self.decoded is not None else open_image(r.path, r.source)
        if self.crop_face and "face_box" in r.meta:
            x, y, w, h = r.meta["face_box"]
            image = image.crop((max(0, x), max(0, y), min(image.width, x + w), min(image.height, y + h)))
        return image

    def describe(self) -> str:
        text = super().describe()
        if self.dropped:
            text += ", dropped " + ", ".join(f"{n} {reason}" for reason, n in self.dropped.items())
        return text


def _landmarks(r: FaceRecord) -> np.ndarray | None:
    """68x2 float32 pixel landmarks from an AffectNet CSV string or an ``_lnd.npy`` file, if the record has any."""
    try:
        if "landmarks_str" in r.meta:
            values = np.array(r.meta["landmarks_str"].split(";"), dtype=np.float32)
        elif "landmarks_file" in r.meta:
            values = np.load(r.meta["landmarks_file"], allow_pickle=False).astype(np.float32)
        else:
            return None
        return values.reshape(-1, 2)
    except (ValueError, OSError) as e:
        _fail(r.source, f"bad landmarks ({e})")


# --------------------------------------------------------------------------------------------------------------
# small shared helpers
# --------------------------------------------------------------------------------------------------------------
def _as_path(root: str | Path | None, dataset: str) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"{dataset}: no dataset root given (data.root)")
    return Path(root).expanduser()


def _require_dir(root: str | Path | None, dataset: str) -> Path:
    root = _as_path(root, dataset)
    if not root.is_dir():
        _fail(str(root), f"{dataset} dataset root not found (or not a folder)")
    return root


def _find_child(parent: Path, names: Sequence[str], *, want_dir: bool = True) -> Path | None:
    """The first of ``names`` (case-insensitive) that exists in ``parent``."""
    if not parent.is_dir():
        return None
    children = {c.name.lower(): c for c in parent.iterdir() if c.is_dir() == want_dir}
    return next((children[n.lower()] for n in names if n.lower() in children), None)


def _canonical_split(split: str, table: Mapping[str, Sequence[str]], dataset: str) -> str:
    """Map a requested split (or one of its aliases) onto a key of ``table``."""
    key = str(split).strip().lower()
    for canon, aliases in table.items():
        if key == canon or key in (a.lower() for a in aliases):
            return canon
    raise DataError(f"{dataset}: unknown split {split!r}; known: {', '.join(table)}")


def _opt_file(root: Path, value: str | Path | None, defaults: Sequence[str], what: str) -> Path:
    """An option naming a file (absolute, relative to the CWD or to ``root``) or the first existing default."""
    candidates = [Path(value).expanduser(), root / value] if value is not None else [root / d for d in defaults]
    for c in candidates:
        if c.is_file():
            return c
    shown = value if value is not None else " or ".join(str(root / d) for d in defaults)
    raise DataError(f"{shown}: {what} not found")


def _checked_file(containment: Path, rel: str | Path, source: str) -> Path:
    """``containment/rel`` resolved, inside ``containment``, existing and non-empty — or a DataError."""
    return _existing(resolve_inside(containment, str(rel), source), source)


def _existing(p: Path, source: str) -> Path:
    """``p`` if it is an existing, non-empty file — or a DataError (a cheap ``stat``, done at index time)."""
    try:
        size = p.stat().st_size
    except OSError:
        _fail(source, f"image file not found: {p}")
    if not p.is_file():
        _fail(source, f"not a file: {p}")
    if size == 0:
        _fail(source, f"empty image file (0 bytes): {p}")
    return p


def _keep_readable(records: list[FaceRecord], bad: BadEntries) -> list[FaceRecord]:
    """With ``skip_bad``, decode every file-backed image now (open_image: header + full load) and skip the ones
    that fail; otherwise return ``records`` unchanged (images are then checked lazily by ``load``)."""
    if not bad.skip_bad:
        return records

    def problem(r: FaceRecord) -> str | None:
        if r.path is None:
            return None
        try:
            open_image(r.path, r.source)
        except DataError as e:
            return str(e)
        return None

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decoding releases the GIL
        problems = list(pool.map(problem, records, chunksize=64))
    kept = []
    for r, msg in zip(records, problems):
        with bad.entry():
            if msg is not None:
                raise DataError(msg)
            kept.append(r)
    return kept


def _int_field(text: str, source: str, what: str) -> int:
    try:
        value = float(text.strip())
    except ValueError:
        _fail(source, f"malformed {what} {text.strip()!r} (expected an integer)")
    if not value.is_integer():
        _fail(source, f"malformed {what} {text.strip()!r} (expected an integer)")
    return int(value)


def _check_range(value: int, lo: int, hi: int, source: str, what: str = "label") -> int:
    if not lo <= value <= hi:
        _fail(source, f"{what} {value} out of range {lo}..{hi}")
    return value


def _csv_rows(path: Path, required: Sequence[str], bad: BadEntries) -> Iterator[tuple[int, str, dict[str, str]]]:
    """Data rows of a CSV file as ``(row_index, "<path>:<line>", {column: value})``.

    ``row_index`` counts every non-blank data row (also malformed ones), so rows stay aligned with a parallel file
    (FERPlus over FER2013). A row with the wrong number of fields is a bad entry; an empty file or one that is not
    UTF-8 is an error naming the file (and line).
    """
    _require_content(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                _fail(f"{path}:1", f"missing column(s) {', '.join(missing)} (header: {','.join(header) or 'empty'})")
            row_index = 0
            for fields in reader:
                if not any(f.strip() for f in fields):
                    continue
                source = f"{path}:{reader.line_num}"
                index, row_index = row_index, row_index + 1
                if len(fields) != len(header):
                    bad.report(source, f"malformed line: {len(fields)} fields, expected {len(header)}")
                    continue
                yield index, source, dict(zip(header, fields))
        except UnicodeDecodeError:
            raise DataError(text_problem(path) or f"{path}: not UTF-8 text") from None
        except csv.Error as e:
            problem = text_problem(path) if "NUL" in str(e) else None
            raise DataError(problem or f"{path}:{reader.line_num + 1}: malformed CSV ({e})") from None


def _text_lines(path: Path) -> Iterator[tuple[str, list[str]]]:
    """Non-blank lines of a whitespace-separated list file as ``("<path>:<line>", fields)``; an empty file or one
    that is not UTF-8 text is an error naming the file (and line)."""
    _require_content(path)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, 1):
                if "\x00" in line:
                    raise DataError(text_problem(path) or f"{path}:{lineno}: NUL byte in text")
                fields = line.split()
                if fields:
                    yield f"{path}:{lineno}", fields
    except UnicodeDecodeError:
        raise DataError(text_problem(path) or f"{path}: not UTF-8 text") from None


def _require_content(path: Path) -> None:
    if path.stat().st_size == 0:
        _fail(str(path), "empty file (0 bytes)")


class _FirstSeen:
    """Where each key of a list file was first seen: a repeat is a bad entry naming both lines."""

    def __init__(self, what: str):
        self.what = what
        self.first: dict[str, str] = {}

    def check(self, key: str, source: str) -> None:
        if key in self.first:
            _fail(source, f"duplicate {self.what} {key!r} (first on line {self.first[key].rpartition(':')[2]})")
        self.first[key] = source


# --------------------------------------------------------------------------------------------------------------
# class folders
# --------------------------------------------------------------------------------------------------------------
def _class_key(name: str) -> str:
    """Comparison key of a class name: its canonical expression name, or the lower-cased name for other sets."""
    try:
        return canonical_name(name)
    except KeyError:
        return name.strip().lower()


class _ClassIndex:
    """Ordered class names and the lookup of folder names / name codes onto their indices."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self._index = {_class_key(n): i for i, n in enumerate(self.names)}

    def lookup(self, name: str, source: str, what: str = "class folder") -> int:
        i = self._index.get(_class_key(name))
        if i is None:
            _fail(source, f"unknown {what} {name!r}; known classes: {', '.join(self.names)}")
        return i


@dataclass
class _NameInfo:
    """What a dataset encodes in its file names."""
    subject: str | None = None
    label_name: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


NameParser = Callable[[Path], _NameInfo]


def _is_candidate(name: str) -> bool:
    return not name.startswith(".") and name.lower() not in _SYSTEM_FILES


def _sorted_entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if _is_candidate(e.name)), key=lambda e: e.name)


def _file_record(entry: os.DirEntry, real_dir: Path, root: Path, classes: _ClassIndex, folder_label: int | None,
                 parse_name: NameParser | None) -> FaceRecord:
    """One file found in a folder tree -> a record (or a DataError naming the file).

    ``real_dir`` is the resolved folder (already known to be inside ``root``): a plain file there is inside too,
    so only symbolic links pay for a full :func:`resolve_inside` (this keeps 30k-file folders fast)."""
    path = Path(entry.path)
    source = str(path)
    if entry.is_dir(follow_symlinks=False):
        _fail(source, "unexpected sub-folder (expected image files here)")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        _fail(source, f"not an image file (extension {path.suffix or 'none'!r})")
    if entry.is_symlink():
        resolved = _checked_file(root, path.relative_to(root), source)
    else:
        resolved = real_dir / entry.name
        if entry.stat(follow_symlinks=False).st_size == 0:
            _fail(source, f"empty image file (0 bytes): {resolved}")
    info = parse_name(path) if parse_name else _NameInfo()
    label = folder_label
    if info.label_name is not None:
        from_name = classes.lookup(info.label_name, source, "expression code")
        if folder_label is not None and from_name != folder_label:
            _fail(source, f"file name says {classes.names[from_name]!r} but the folder says "
                          f"{classes.names[folder_label]!r}")
        label = from_name
    if label is None:
        _fail(source, "no label: neither a class folder nor a label in the file name")
    return FaceRecord(path=str(resolved), label=label, source=source, subject=info.subject, meta=info.meta)


def _scan_tree(base: Path, root: Path, classes: _ClassIndex, bad: BadEntries, *,
               parse_name: NameParser | None = None, flat: bool = False) -> list[FaceRecord]:
    """Records of ``base/<class>/*`` (and, with ``flat``, of label-carrying images directly in ``base``).

    Non-image files directly in ``base`` (README, manifest.csv ...) are not entries and are ignored; images there
    are bad entries unless ``flat``; everything inside a class folder is an entry (a non-image file there is a bad entry). ``root`` is the containment root: a class
    folder or file that is a link to somewhere outside it is a bad entry.
    """
    records: list[FaceRecord] = []
    real_base = resolve_inside(root, str(base.relative_to(root)), str(base))
    for child in _sorted_entries(base):
        if child.is_dir():
            with bad.entry():
                label = classes.lookup(child.name, child.path)
                real_dir = resolve_inside(root, str(Path(child.path).relative_to(root)), child.path)
                for f in _sorted_entries(Path(child.path)):
                    with bad.entry():
                        records.append(_file_record(f, real_dir, root, classes, label, parse_name))
        elif Path(child.name).suffix.lower() in IMAGE_EXTENSIONS:
            with bad.entry():
                if not flat:
                    _fail(child.path, "image outside any class folder (expected <class>/<image>)")
                records.append(_file_record(child, real_base, root, classes, None, parse_name))
    return records


def _split_bases(root: Path, split: str, table: Mapping[str, Sequence[str]], dataset: str) -> list[Path]:
    """The folder(s) holding the class folders of ``split``: the first folder named in ``table[split]``
    (case-insensitive; a split name not in the table is taken literally when that folder exists), every split
    folder for ``split="all"``, or ``root`` itself when it has no split folders at all."""
    present = {canon: d for canon, names in table.items() if (d := _find_child(root, names))}
    key = str(split).strip().lower()
    if key in ("all", ""):
        return list(dict.fromkeys(present.values())) or [root]  # dict: SFEW maps two splits to one folder
    literal = _find_child(root, (key,))
    if literal is not None and key not in table and key not in {n.lower() for v in table.values() for n in v}:
        return [literal]  # a custom split folder name (imagefolder: fold1/, holdout/ ...)
    canon = _canonical_split(split, table, dataset)
    if canon in present:
        return [present[canon]]
    if present:
        raise DataError(f"{root}: no folder for split {split!r} of {dataset} "
                        f"(looked for {', '.join(table[canon])}; found {', '.join(d.name for d in present.values())})")
    return [root]


def _folder_names(bases: Sequence[Path]) -> list[str]:
    return sorted({c.name for b in bases for c in _sorted_entries(b) if c.is_dir()})


def _folder_dataset(name: str, root: Path, split: str, class_names: Sequence[str], bad: BadEntries, *,
                    bases: Sequence[Path] | None = None, split_table: Mapping[str, Sequence[str]] = _SPLIT_DIRS,
                    parse_name: NameParser | None = None, flat: bool = False) -> AdapterDataset:
    """The shared body of every class-folder adapter."""
    if bases is None:
        bases = _split_bases(root, split, split_table, name)
    classes = _ClassIndex(class_names)
    records = [r for b in bases for r in _scan_tree(b, root, classes, bad, parse_name=parse_name, flat=flat)]
    records = _keep_readable(records, bad)
    return AdapterDataset(name, records, classes.names, split=split, root=root, skipped=bad.skipped)


# --------------------------------------------------------------------------------------------------------------
# ImageFolder, SFEW
# --------------------------------------------------------------------------------------------------------------
def imagefolder(root: str | Path, split: str = "all", *, skip_bad: bool = False,
                class_names: Sequence[str] | str | None = None, subject_pattern: str | None = None,
                name: str = "imagefolder") -> AdapterDataset:
    """Any ``<root>/<split>/<class>/*`` tree (or ``<root>/<class>/*`` when there are no split folders).

    ``class_names``: the ordered classes — a list, or the name of a label space (``"rafdb"``); folder names are
    matched through :func:`canonical_name` (``angry`` = ``anger``), other names case-insensitively. Default: the
    sorted folder names of *all* split folders (so train and test agree on the order). An unknown folder is a bad
    entry. ``subject_pattern``: a regex whose first group (or whole match) on the file stem is the subject id.
    """
    root = _require_dir(root, name)
    bases = _split_bases(root, split, _SPLIT_DIRS, name)
    if isinstance(class_names, str):
        if class_names not in LABEL_SPACES:
            raise DataError(f"{name}: unknown label space {class_names!r}; known: {', '.join(LABEL_SPACES)}")
        class_names = LABEL_SPACES[class_names]
    if class_names is None:
        class_names = _folder_names(_split_bases(root, "all", _SPLIT_DIRS, name))
        if not class_names:
            raise DataError(f"{root}: no class folders found")
    parse_name = partial(_subject_from_pattern, re.compile(subject_pattern)) if subject_pattern else None
    return _folder_dataset(name, root, split, class_names, BadEntries(skip_bad), bases=bases, parse_name=parse_name)


def _subject_from_pattern(pattern: re.Pattern, path: Path) -> _NameInfo:
    m = pattern.search(path.stem)
    if m is None:
        _fail(str(path), f"cannot read the subject from the file name (pattern {pattern.pattern!r})")
    return _NameInfo(subject=m.group(1) if pattern.groups else m.group(0))


# SFEW publishes no class order; its folders (Angry ... Surprise) sorted alphabetically give the JAFFE order,
# which is what ImageFolder-based SFEW code uses.
_SFEW_SPACE = "jaffe"
# SFEW's Test labels are not public, so Val serves as the test split (as in the SFEW literature).
_SFEW_SPLITS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("val",)}


def sfew(root: str | Path, split: str, *, skip_bad: bool = False) -> AdapterDataset:
    """SFEW 2.0: ``<root>/{Train,Val}/<Class>/*`` (``test`` = Val, whose labels are the public ones)."""
    root = _require_dir(root, "sfew")
    bases = _split_bases(root, split, _SFEW_SPLITS, "sfew")
    return _folder_dataset("sfew", root, split, LABEL_SPACES[_SFEW_SPACE], BadEntries(skip_bad), bases=bases)


# --------------------------------------------------------------------------------------------------------------
# CK+ and JAFFE (subjects from file names)
# --------------------------------------------------------------------------------------------------------------
_CK_NAME = re.compile(r"^(S\d+)_(\d+)_(\d+)$", re.IGNORECASE)


def _ck_name(path: Path) -> _NameInfo:
    m = _CK_NAME.match(path.stem)
    if m is None:
        _fail(str(path), "cannot read the subject from the file name (expected S<subject>_<sequence>_<frame>, "
                         "e.g. S005_001_00000011.png)")
    subject = m.group(1).upper()
    return _NameInfo(subject=subject, meta={"sequence": f"{subject}_{m.group(2)}", "frame": int(m.group(3))})


def ckplus(root: str | Path, split: str = "all", *, skip_bad: bool = False) -> AdapterDataset:
    """CK+ (CK+48-style crops): ``<root>/<class>/S005_001_00000011.png``; subject ``S005`` from the name.

    Classes: LABEL_SPACES["ckplus"]; when a ``neutral`` folder exists, ``neutral`` is appended as the last class.
    There is no official split: ``split`` must be ``all`` (use :func:`ferkit.data.splits.subject_kfold`).
    """
    root = _require_dir(root, "ckplus")
    _canonical_split(split, {"all": ()}, "ckplus")
    class_names = list(LABEL_SPACES["ckplus"])
    if any(_class_key(n) == "neutral" for n in _folder_names([root])):
        class_names.append("neutral")
    return _folder_dataset("ckplus", root, split, class_names, BadEntries(skip_bad), bases=[root],
                           parse_name=_ck_name)


_JAFFE_NAME = re.compile(r"^([A-Za-z]{2})\.([A-Za-z]{2})(\d*)\.(\d+)$")


def _jaffe_name(path: Path) -> _NameInfo:
    m = _JAFFE_NAME.match(path.stem)
    if m is None:
        _fail(str(path), "cannot read subject and expression from the file name (expected e.g. KA.AN1.39.tiff)")
    return _NameInfo(subject=m.group(1).upper(), label_name=m.group(2).upper(),
                     meta={"take": int(m.group(3) or 0), "image_id": int(m.group(4))})


def jaffe(root: str | Path, split: str = "all", *, skip_bad: bool = False) -> AdapterDataset:
    """JAFFE: ``<root>/<class>/KA.AN1.39.tiff`` or flat ``<root>/*.tiff``. The label is the 2-letter code in the
    name (AN DI FE HA NE SA SU; a class folder that disagrees is a bad entry), the subject the prefix (KA, KL ...).
    No official split: ``split`` must be ``all``."""
    root = _require_dir(root, "jaffe")
    _canonical_split(split, {"all": ()}, "jaffe")
    return _folder_dataset("jaffe", root, split, LABEL_SPACES["jaffe"], BadEntries(skip_bad), bases=[root],
                           parse_name=_jaffe_name, flat=True)


# --------------------------------------------------------------------------------------------------------------
# FER2013 (image folders or the original CSV)
# --------------------------------------------------------------------------------------------------------------
_FER_USAGE = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}
# split -> its aliases, which are also the folder names looked for (case-insensitive), in order
_FER_SPLITS = {"train": ("train", "training"), "val": ("val", "valid", "publictest", "validation"),
               "test": ("test", "privatetest")}


def _parse_pixels(text: str, source: str) -> np.ndarray:
    """FER2013 ``pixels``: 2304 space-separated ints 0..255 -> (48, 48) uint8."""
    try:
        with warnings.catch_warnings():  # numpy < 2.? only warns about unparsable text: make that an error too
            warnings.simplefilter("error", DeprecationWarning)
            values = np.fromstring(text, dtype=np.int64, sep=" ")  # 4x faster than split() + np.array
    except (ValueError, DeprecationWarning):
        _fail(source, "malformed pixels: non-integer value")
    if values.size != 48 * 48:
        _fail(source, f"malformed pixels: {values.size} values, expected 2304 (48x48)")
    if values.min() < 0 or values.max() > 255:
        _fail(source, f"malformed pixels: values must be 0..255 (got {values.min()}..{values.max()})")
    return values.astype(np.uint8).reshape(48, 48)


def _fer2013_csv_path(root: Path) -> Path | None:
    if root.is_file():
        return root
    return root / "fer2013.csv" if (root / "fer2013.csv").is_file() else None


def _pixel_dataset(name: str, root: Path, split: str, class_names: Sequence[str], bad: BadEntries,
                   records: list[FaceRecord], pixels: list[np.ndarray], **kw: Any) -> AdapterDataset:
    """An in-memory dataset of FER2013 pixel rows (``record.meta["pixel_row"]`` indexes ``pixels``)."""
    for i, r in enumerate(records):
        r.meta["pixel_row"] = i
    array = np.stack(pixels) if pixels else np.zeros((0, 48, 48), np.uint8)
    return AdapterDataset(name, records, class_names, split=split, root=root, skipped=bad.skipped, pixels=array,
                          **kw)


def _fer2013_from_csv(csv_path: Path, split: str, bad: BadEntries) -> AdapterDataset:
    usage = _FER_USAGE[_canonical_split(split, _FER_SPLITS, "fer2013")]
    known = set(_FER_USAGE.values())
    k = len(LABEL_SPACES["fer2013"])
    records, pixels = [], []
    for row_index, source, row in _csv_rows(csv_path, ("emotion", "pixels", "Usage"), bad):
        with bad.entry():
            if row["Usage"].strip() not in known:
                _fail(source, f"unknown Usage {row['Usage']!r} (expected {', '.join(sorted(known))})")
            if row["Usage"].strip() != usage:
                continue
            label = _check_range(_int_field(row["emotion"], source, "emotion"), 0, k - 1, source)
            pixels.append(_parse_pixels(row["pixels"], source))
            records.append(FaceRecord(path=None, label=label, source=source, meta={"row": row_index}))
    return _pixel_dataset("fer2013", csv_path.parent, split, LABEL_SPACES["fer2013"], bad, records, pixels)


def fer2013(root: str | Path, split: str, *, skip_bad: bool = False) -> AdapterDataset:
    """FER2013 in either published form, detected automatically:

    * the original ``fer2013.csv`` (``root`` is that file or a folder holding it): columns emotion, pixels, Usage;
      splits train = Training, val (alias publictest) = PublicTest, test (alias privatetest) = PrivateTest;
      images held in memory as 48x48 grey;
    * the image-folder release ``<root>/{train,val,test}/<class>/*.jpg`` (angry, disgust, ... folders).

    Classes in FER2013 order (LABEL_SPACES["fer2013"]).
    """
    bad = BadEntries(skip_bad)
    path = _as_path(root, "fer2013")
    csv_path = _fer2013_csv_path(path)
    if csv_path is not None:
        return _fer2013_from_csv(csv_path, split, bad)
    root = _require_dir(path, "fer2013")
    return _folder_dataset("fer2013", root, split, LABEL_SPACES["fer2013"], bad, split_table=_FER_SPLITS)


# --------------------------------------------------------------------------------------------------------------
# FERPlus
# --------------------------------------------------------------------------------------------------------------
_FERPLUS_VOTES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
                  "unknown", "NF")
# folders written by Microsoft's generate_training_data.py
_FERPLUS_DIRS = {"Training": "FER2013Train", "PublicTest": "FER2013Valid", "PrivateTest": "FER2013Test"}


_FERPLUS_MODES = ("majority", "probability")


def _ferplus_vote(votes: np.ndarray, rule: str = "plurality", mode: str = "majority",
                  classes: int = 8) -> tuple[int | None, str, np.ndarray]:
    """(label or None, drop reason, soft label over the ``classes`` emotions) from the 10 vote counts.

    ``mode="majority"`` (Barsoum et al. 2016's majority voting, what most FER papers use) with ``rule``:
    ``plurality`` (default): the most-voted of the 10 columns; a tie for the top, an unknown or NF top, or no votes
    drop the row. ``official``: single votes removed as outliers first, then the top must hold more than half of the
    remaining votes. ``classes=7`` (EAC's 7-class FERPlus) also drops rows whose winner is contempt.

    ``mode="probability"`` (the paper's probability / cross-entropy training): single votes removed as outliers
    (as the official ``ferplus.py`` does), the target is the distribution of the remaining emotion votes (contempt
    left out and the rest renormalised with ``classes=7``); rows whose top is unknown / NF or that keep no emotion
    vote are dropped; the hard label (for metrics) is the distribution's argmax, the first on a tie. ferkit's
    reading: the official code also truncates the distribution to its top 3 emotions covering 75 % of the votes;
    ferkit keeps the whole distribution after outlier removal, which is the plain "probability" of the paper's text.
    """
    votes = votes.astype(np.float64)
    if rule == "official" or mode == "probability":
        votes = np.where(votes <= 1.0, 0.0, votes)
    emotions = votes[:classes]
    soft = (emotions / emotions.sum() if emotions.sum() > 0 else emotions).astype(np.float32)
    total, top = votes.sum(), votes.max()
    if total <= 0:
        return None, "no votes", soft
    winners = np.flatnonzero(votes == top)
    if mode == "probability":
        if winners[0] >= 8:
            return None, "unknown / NF majority", soft
        if emotions.sum() <= 0:
            return None, "no emotion votes", soft
        return int(np.argmax(soft)), "", soft
    if rule == "official" and top <= 0.5 * total:
        return None, "no majority (official rule)", soft
    if len(winners) > 1:
        return None, "tie", soft
    if winners[0] == 8:
        return None, "unknown majority", soft
    if winners[0] == 9:
        return None, "not-a-face (NF) majority", soft
    if winners[0] >= classes:
        return None, "contempt (7-class set)", soft
    return int(winners[0]), "", soft


def _ferplus_label_rows(path: Path, bad: BadEntries) -> Iterator[tuple[str, str, np.ndarray]]:
    """Rows of a generated-layout ``label.csv`` (no header: ``fer0000000.png,"(0, 0, 48, 48)",v1..v10``) as
    ``("<path>:<line>", image name, 10 vote counts)``; malformed rows are bad entries naming file and line."""
    _require_content(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            for fields in reader:
                if not any(f.strip() for f in fields):
                    continue
                source, parsed = f"{path}:{reader.line_num}", None
                with bad.entry():
                    if len(fields) != 12:
                        _fail(source, f"malformed line: {len(fields)} fields, expected 12 "
                                      "(image name, face box, 10 vote counts)")
                    counts = np.array([_int_field(v, source, f"{c} vote count")
                                       for v, c in zip(fields[2:], _FERPLUS_VOTES)])
                    if counts.min() < 0:
                        _fail(source, "negative vote count")
                    parsed = (source, fields[0].strip(), counts)
                if parsed is not None:
                    yield parsed
        except UnicodeDecodeError:
            raise DataError(text_problem(path) or f"{path}: not UTF-8 text") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num + 1}: malformed CSV ({e})") from None


def _ferplus_pixels(fer_csv: Path, wanted: dict[int, FaceRecord], bad: BadEntries) -> dict[int, np.ndarray]:
    """Pixels of the FER2013 rows ``wanted`` (row index -> FERPlus record), read in one pass over fer2013.csv.

    A row whose pixels are malformed or whose Usage disagrees is a bad entry; fer2013.csv having fewer rows than
    fer2013new.csv refers to is always an error (the files do not belong together)."""
    found: dict[int, np.ndarray] = {}
    rows = 0
    for row_index, source, row in _csv_rows(fer_csv, ("pixels", "Usage"), bad):
        rows = row_index + 1
        record = wanted.get(row_index)
        if record is None:
            continue
        with bad.entry():
            if row["Usage"].strip() != record.meta["usage"]:
                _fail(record.source, f"Usage {record.meta['usage']!r} differs from {source} ({row['Usage']!r}); "
                                     "the two files must list the same rows in the same order")
            found[row_index] = _parse_pixels(row["pixels"], source)
    beyond = [r for i, r in wanted.items() if i >= rows]
    if beyond:
        raise DataError(f"{fer_csv}: has {rows} data rows, but {beyond[0].source} refers to row "
                        f"{beyond[0].meta['row'] + 1} (fer2013new.csv and fer2013.csv must list the same rows)")
    return found


def ferplus(root: str | Path, split: str, *, skip_bad: bool = False, labels_csv: str | Path | None = None,
            fer2013_csv: str | Path | None = None, image_dir: str | Path | None = None,
            vote: str = "plurality", label_mode: str = "majority", classes: int = 8) -> AdapterDataset:
    """FERPlus in either published form:

    * the generated-image layout of Microsoft's ``generate_training_data.py``: ``<root>/FER2013{Train,Valid,Test}/``
      with the PNGs and a header-less ``label.csv`` (image name, face box, 10 vote counts); used when ``root`` holds
      no ``fer2013new.csv`` (and no ``labels_csv`` is given);
    * ``fer2013new.csv`` (Usage, Image name, 8 emotion vote counts, unknown, NF) over FER2013: images from
      ``fer2013.csv`` (``fer2013_csv=`` or ``<root>/fer2013.csv``; same row order) when present, else from an image
      folder (``image_dir=``, default ``root``; ``FER2013Train|Valid|Test/<Image name>`` or ``<Image name>``).

    Labels (:func:`_ferplus_vote`): ``label_mode="majority"`` (``vote="plurality"|"official"``) or
    ``"probability"`` (soft targets; train with ``method.kwargs.soft_targets=true``); ``classes=8`` (with
    contempt) or ``7`` (EAC's set, contempt dropped). Dropped rows are counted by reason in ``dataset.dropped``.
    ``record.meta["soft_label"]`` (and ``sample["soft_label"]``) holds the vote distribution over the classes.
    """
    if vote not in ("plurality", "official"):
        raise DataError(f"ferplus: unknown vote rule {vote!r}; known: plurality, official")
    if label_mode not in _FERPLUS_MODES:
        raise DataError(f"ferplus: unknown label_mode {label_mode!r}; known: {', '.join(_FERPLUS_MODES)}")
    if classes not in (7, 8):
        raise DataError(f"ferplus: classes must be 8 (with contempt) or 7 (without), got {classes!r}")
    rule = dict(rule=vote, mode=label_mode, classes=classes)
    class_names = LABEL_SPACES["ferplus"][:classes]
    path = _as_path(root, "ferplus")
    root = path.parent if path.is_file() else _require_dir(path, "ferplus")
    usage = _FER_USAGE[_canonical_split(split, _FER_SPLITS, "ferplus")]
    if not path.is_file() and labels_csv is None and fer2013_csv is None and not (root / "fer2013new.csv").is_file():
        generated = _find_child(root, (_FERPLUS_DIRS[usage],))
        if generated is not None and (generated / "label.csv").is_file():
            return _ferplus_generated(root, generated, split, class_names, rule, BadEntries(skip_bad))
    labels_path = path if path.is_file() else _opt_file(root, labels_csv, ("fer2013new.csv",), "FERPlus labels")
    pixel_csv = None
    if image_dir is None:
        pixel_csv = (_opt_file(root, fer2013_csv, (), "fer2013.csv") if fer2013_csv is not None
                     else _fer2013_csv_path(root))
    bad, dropped = BadEntries(skip_bad), Counter()
    wanted: dict[int, FaceRecord] = {}
    seen = _FirstSeen("image name")
    for row_index, source, row in _csv_rows(labels_path, ("Usage", "Image name", *_FERPLUS_VOTES), bad):
        with bad.entry():
            if row["Usage"].strip() != usage:
                continue
            counts = np.array([_int_field(row[c], source, f"{c} vote count") for c in _FERPLUS_VOTES])
            if counts.min() < 0:
                _fail(source, "negative vote count")
            label, reason, soft = _ferplus_vote(counts, **rule)
            if not row["Image name"].strip():
                reason = "no image name"
            if reason:
                dropped[reason] += 1
                continue
            seen.check(row["Image name"].strip(), source)
            meta = {"soft_label": soft, "usage": usage, "row": row_index, "image_name": row["Image name"].strip()}
            wanted[row_index] = FaceRecord(path=None, label=label, source=source, meta=meta)
    common = dict(dropped=dict(dropped), sample_keys=("soft_label",))
    if pixel_csv is not None:
        pixels = _ferplus_pixels(pixel_csv, wanted, bad)
        kept = [i for i in wanted if i in pixels]
        return _pixel_dataset("ferplus", root, split, class_names, bad, [wanted[i] for i in kept],
                              [pixels[i] for i in kept], **common)
    images = Path(image_dir).expanduser() if image_dir is not None else root
    sub = _find_child(images, (_FERPLUS_DIRS[usage],)) or images
    records = []
    for r in wanted.values():
        with bad.entry():
            r.path = str(_checked_file(sub, r.meta["image_name"], r.source))
            records.append(r)
    records = _keep_readable(records, bad)
    return AdapterDataset("ferplus", records, class_names, split=split, root=root, skipped=bad.skipped, **common)


def _ferplus_generated(root: Path, folder: Path, split: str, class_names: Sequence[str], rule: dict[str, Any],
                       bad: BadEntries) -> AdapterDataset:
    """The generated-image layout: ``folder/label.csv`` rows over ``folder/<image name>``."""
    dropped: Counter = Counter()
    seen = _FirstSeen("image name")
    records = []
    for source, name, counts in _ferplus_label_rows(folder / "label.csv", bad):
        with bad.entry():
            label, reason, soft = _ferplus_vote(counts, **rule)
            if reason:
                dropped[reason] += 1
                continue
            seen.check(name, source)
            path = _checked_file(folder, name, source)
            records.append(FaceRecord(path=str(path), label=label, source=source,
                                      meta={"soft_label": soft, "image_name": name}))
    records = _keep_readable(records, bad)
    return AdapterDataset("ferplus", records, class_names, split=split, root=root, skipped=bad.skipped,
                          dropped=dict(dropped), sample_keys=("soft_label",))


# --------------------------------------------------------------------------------------------------------------
# RAF-DB
# --------------------------------------------------------------------------------------------------------------
_RAF_SPLITS = {"train": (), "test": ()}
# robustness list option -> (subset name returned by subsets(), boolean meta flag)
_RAF_LISTS = {"occlusion": ("occluded", "occluded"), "pose30": ("pose>30", "pose30"), "pose45": ("pose>45", "pose45")}


def _raf_stem(name: str) -> str:
    """``test_0003_aligned.jpg`` / ``test_0003.jpg`` / ``test_0003_aligned`` -> ``test_0003``."""
    stem = name.rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    return stem[: -len("_aligned")] if stem.endswith("_aligned") else stem


def _raf_aligned_name(name: str) -> str:
    """``train_00001.jpg`` -> ``train_00001_aligned.jpg``, keeping any folder part (so ``../`` is still seen)."""
    head, _, base = name.rpartition("/")
    stem = base.rsplit(".", 1)[0] if "." in base else base
    stem = stem if stem.endswith("_aligned") else f"{stem}_aligned"
    return f"{head}/{stem}.jpg" if head or name.startswith("/") else f"{stem}.jpg"


def _raf_entry(fields: list[str], source: str) -> tuple[str, int]:
    """``train_00001.jpg 5`` -> (name, 0-based label)."""
    if len(fields) != 2:
        _fail(source, f"malformed line {' '.join(fields)!r} (expected '<image name> <label 1..7>')")
    label = _check_range(_int_field(fields[1], source, "label"), 1, 7, source)
    return fields[0], label - 1


def _raf_flags(records: list[FaceRecord], all_stems: set[str], bad: BadEntries, lists: Mapping[str, Path | None],
               list_file: Path) -> dict[str, str]:
    """Mark records listed in the occlusion / pose lists; returns {subset name: meta flag} for the lists given.

    A name listed twice is harmless (membership), unless the occlusion list gives it two different types."""
    by_stem = {r.meta["stem"]: r for r in records}
    occlusion_first: dict[str, tuple[str, int]] = {}  # stem -> (source, type) of its first occlusion line
    given = {kind: path for kind, path in lists.items() if path is not None}
    for r in records:
        r.meta.update({_RAF_LISTS[kind][1]: False for kind in given})
        if "occlusion" in given:
            r.meta["occlusion"] = 0
    for kind, path in given.items():
        flag = _RAF_LISTS[kind][1]
        for source, fields in _text_lines(path):
            with bad.entry():
                stem = _raf_stem(fields[0])
                if stem not in all_stems:
                    _fail(source, f"{fields[0]!r} is not in {list_file.name}")
                record = by_stem.get(stem)
                if kind == "occlusion":
                    if len(fields) != 3:
                        _fail(source, f"malformed line {' '.join(fields)!r} "
                                      "(expected '<name> <0-based label> <occlusion type>')")
                    label = _check_range(_int_field(fields[1], source, "label"), 0, 6, source)
                    occ_type = _int_field(fields[2], source, "occlusion type")
                    first, first_type = occlusion_first.setdefault(stem, (source, occ_type))
                    if first_type != occ_type:
                        _fail(source, f"occlusion type {occ_type} of {fields[0]!r} disagrees with line "
                                      f"{first.rpartition(':')[2]} (type {first_type})")
                    if record is not None and label != record.label:
                        _fail(source, f"label {label} (0-based) disagrees with {record.source} "
                                      f"(label {record.label + 1}, 1-based)")
                    if record is not None:
                        record.meta["occlusion"] = occ_type
                if record is not None:  # names of the other split are valid but do not apply
                    record.meta[flag] = True
    return {_RAF_LISTS[kind][0]: _RAF_LISTS[kind][1] for kind in given}


def _raf_noisy_labels(records: list[FaceRecord], path: Path, bad: BadEntries) -> None:
    """Replace the training labels by those of a noisy list; ``meta["clean_label"]`` keeps the clean one. The list
    must name every training image once and nothing else (a list of another release would flip silently)."""
    by_stem = {r.meta["stem"]: r for r in records}
    seen = _FirstSeen("image")
    for source, fields in _text_lines(path):
        with bad.entry():
            name, label = _raf_entry(fields, source)
            stem = _raf_stem(name)
            seen.check(stem, source)
            record = by_stem.get(stem)
            if record is None:
                _fail(source, f"{name!r} is not a training image of the clean list")
            record.meta["clean_label"] = record.label
            record.label = label
    unlisted = [r for r in records if "clean_label" not in r.meta]
    if unlisted:
        raise DataError(f"{path}: lists {len(records) - len(unlisted)} of {len(records)} training images; "
                        f"missing {unlisted[0].meta['stem']!r} (and {len(unlisted) - 1} more)")


def rafdb(root: str | Path, split: str, *, skip_bad: bool = False, list_file: str | Path | None = None,
          aligned: bool = True, occlusion_list: str | Path | None = None, pose30_list: str | Path | None = None,
          pose45_list: str | Path | None = None, noise_file: str | Path | None = None) -> AdapterDataset:
    """RAF-DB basic: ``EmoLabel/list_patition_label.txt`` (``train_00001.jpg 5``, labels 1..7 -> 0..6 in
    LABEL_SPACES["rafdb"] order), images ``Image/aligned/<stem>_aligned.jpg`` (``aligned=False``:
    ``Image/original/<name>``). Splits ``train``, ``test`` (or ``all``).

    Robustness lists (paths absolute or relative to ``root``): ``occlusion_list`` in the RAN format
    (``test_0003_aligned 3 4`` = name, 0-based label, occlusion type), ``pose30_list`` / ``pose45_list`` (one name
    per line). :meth:`subsets` then returns the boolean masks ``occluded``, ``pose>30``, ``pose>45``;
    ``sample["occlusion"]`` holds the occlusion type (0 = not listed).

    ``noise_file`` (training split only; e.g. ``EmoLabel/noise03.txt``, the noisy-label lists EAC, SCN and RUL train
    on, same line format): its labels replace the clean ones; it must list exactly the training images. Each record
    keeps its clean label in ``meta["clean_label"]`` (``FaceDataset.clean_targets``), so the flipped samples are known.
    """
    root = _require_dir(root, "rafdb")
    want = None if str(split).strip().lower() == "all" else _canonical_split(split, _RAF_SPLITS, "rafdb")
    labels_path = _opt_file(root, list_file, ("EmoLabel/list_patition_label.txt", "list_patition_label.txt"),
                            "RAF-DB label list")
    lists = {"occlusion": occlusion_list, "pose30": pose30_list, "pose45": pose45_list}
    lists = {k: (_opt_file(root, v, (), f"RAF-DB {k} list") if v is not None else None) for k, v in lists.items()}
    image_dir = root / "Image" / ("aligned" if aligned else "original")
    bad = BadEntries(skip_bad)
    records: list[FaceRecord] = []
    all_stems: set[str] = set()
    seen = _FirstSeen("image")
    for source, fields in _text_lines(labels_path):
        with bad.entry():
            name, label = _raf_entry(fields, source)
            rel = _raf_aligned_name(name) if aligned else name
            path = resolve_inside(image_dir, rel, source)  # rejects ../ and absolute names in the list (and links)
            stem = _raf_stem(name)
            seen.check(stem, source)
            entry_split = stem.split("_", 1)[0].lower()
            if entry_split not in _RAF_SPLITS:
                _fail(source, f"cannot tell the split of {name!r} (names start with train_ or test_)")
            all_stems.add(stem)
            if want is not None and entry_split != want:
                continue
            records.append(FaceRecord(path=str(_existing(path, source)), label=label, source=source,
                                      meta={"stem": stem}))
    if noise_file is not None:
        if want != "train":
            raise DataError(f"rafdb: noise_file replaces training labels; split {split!r} is not the training split")
        _raf_noisy_labels(records, _opt_file(root, noise_file, (), "RAF-DB noisy label list"), bad)
    flags = _raf_flags(records, all_stems, bad, lists, labels_path) if any(lists.values()) else {}
    records = _keep_readable(records, bad)
    return AdapterDataset("rafdb", records, LABEL_SPACES["rafdb"], split=split, root=root, skipped=bad.skipped,
                          subset_flags=flags, sample_keys=("occlusion",) if lists["occlusion"] else ())


# --------------------------------------------------------------------------------------------------------------
# AffectNet
# --------------------------------------------------------------------------------------------------------------
# expression codes 8..10 are not expressions: dropped (SPEC 2.1)
_AFFECTNET_DROP = {8: "none (8)", 9: "uncertain (9)", 10: "no-face (10)"}
_AFFECTNET_CSV = {"train": "training.csv", "test": "validation.csv"}
# validation is AffectNet's test split (the official test set is not public)
_AFFECTNET_SPLITS = {"train": ("train_set", "train", "training"), "test": ("val_set", "val", "validation", "test")}
_AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                      "facial_landmarks", "expression", "valence", "arousal")


def _affectnet_label(code: int, num_classes: int, source: str, dropped: Counter) -> int | None:
    """Expression code -> label, or None (counted in ``dropped``) for 8/9/10 and, in 7 classes, contempt."""
    _check_range(code, 0, 10, source, "expression")
    if code in _AFFECTNET_DROP:
        dropped[_AFFECTNET_DROP[code]] += 1
        return None
    if code == 7 and num_classes == 7:
        dropped["contempt (7-class variant)"] += 1
        return None
    return code


def _float_field(text: str, source: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        _fail(source, f"malformed {what} {text!r} (expected a number)")


def _affectnet_csv_record(row: dict[str, str], source: str, label: int, images: Path,
                          crop_face: bool) -> FaceRecord:
    box = tuple(_int_field(row[c], source, c) for c in ("face_x", "face_y", "face_width", "face_height"))
    if crop_face and (box[2] <= 0 or box[3] <= 0):
        _fail(source, f"empty face box {box}")
    meta: dict[str, Any] = {"face_box": box, "valence": _float_field(row["valence"], source, "valence"),
                            "arousal": _float_field(row["arousal"], source, "arousal")}
    landmarks = row["facial_landmarks"].strip().strip(";")
    if landmarks:
        if landmarks.count(";") != 135:
            _fail(source, f"malformed facial_landmarks ({landmarks.count(';') + 1} values, expected 136)")
        meta["landmarks_str"] = landmarks
    path = _checked_file(images, row["subDirectory_filePath"].strip(), source)
    return FaceRecord(path=str(path), label=label, source=source, meta=meta)


def _affectnet_from_csv(root: Path, split: str, bad: BadEntries, dropped: Counter, num_classes: int,
                        crop_face: bool, csv_file: str | Path | None, image_dir: str | Path | None) -> list[FaceRecord]:
    name = _AFFECTNET_CSV[split]
    csv_path = _opt_file(root, csv_file, (name, f"Manually_Annotated_file_lists/{name}"), f"AffectNet {name}")
    images = (Path(image_dir).expanduser() if image_dir is not None else
              next((d for d in (root / "Manually_Annotated_Images",
                                root / "Manually_Annotated" / "Manually_Annotated_Images") if d.is_dir()), root))
    records = []
    seen = _FirstSeen("image")
    for _, source, row in _csv_rows(csv_path, _AFFECTNET_COLUMNS, bad):
        with bad.entry():
            seen.check(row["subDirectory_filePath"].strip(), source)
            label = _affectnet_label(_int_field(row["expression"], source, "expression"), num_classes, source,
                                     dropped)
            if label is not None:
                records.append(_affectnet_csv_record(row, source, label, images, crop_face))
    return records


def _npy_scalar(path: Path, source: str) -> str:
    try:
        return str(np.load(path, allow_pickle=False).item())
    except (OSError, ValueError) as e:
        _fail(source, f"unreadable annotation ({e.__class__.__name__}: {e})")


def _affectnet_from_npy(split_dir: Path, bad: BadEntries, dropped: Counter, num_classes: int) -> list[FaceRecord]:
    """The newer layout: ``<split>/images/<id>.jpg`` + ``<split>/annotations/<id>_exp.npy`` (+ _val, _aro, _lnd)."""
    annotations, images = split_dir / "annotations", split_dir / "images"
    records = []
    for exp in sorted(annotations.glob("*_exp.npy")):
        source = str(exp)
        with bad.entry():
            code = _int_field(_npy_scalar(exp, source), source, "expression")
            label = _affectnet_label(code, num_classes, source, dropped)
            if label is None:
                continue
            ident = exp.name[: -len("_exp.npy")]
            meta: dict[str, Any] = {"id": ident}
            for key, suffix in (("valence", "_val.npy"), ("arousal", "_aro.npy")):
                if (annotations / f"{ident}{suffix}").is_file():
                    meta[key] = float(_npy_scalar(annotations / f"{ident}{suffix}", source))
            if (annotations / f"{ident}_lnd.npy").is_file():
                meta["landmarks_file"] = str(annotations / f"{ident}_lnd.npy")
            path = _checked_file(images, f"{ident}.jpg", source)
            records.append(FaceRecord(path=str(path), label=label, source=source, meta=meta))
    return records


def affectnet(root: str | Path, split: str, *, skip_bad: bool = False, num_classes: int = 8,
              crop_face: bool = False, csv_file: str | Path | None = None,
              image_dir: str | Path | None = None) -> AdapterDataset:
    """AffectNet, 7 or 8 classes (LABEL_SPACES["affectnet7"/"affectnet8"]); ``validation`` is the test split.

    Layouts: ``training.csv`` / ``validation.csv`` (in ``root`` or ``root/Manually_Annotated_file_lists``;
    ``csv_file=`` to name one) over ``Manually_Annotated_Images`` (or ``image_dir=``), with the face box in
    ``meta["face_box"]`` (x, y, w, h) — cropped at load with ``crop_face=True`` — and valence / arousal /
    landmarks; or the newer ``{train_set,val_set}/images/<id>.jpg`` + ``annotations/<id>_exp.npy``.
    Expression 8/9/10 (none / uncertain / no-face) and, for 7 classes, contempt (7) are dropped and counted.
    """
    if num_classes not in (7, 8):
        raise DataError(f"affectnet: num_classes must be 7 or 8, got {num_classes!r}")
    root = _require_dir(root, "affectnet")
    canon = _canonical_split(split, _AFFECTNET_SPLITS, "affectnet")
    bad, dropped = BadEntries(skip_bad), Counter()
    split_dir = _find_child(root, _AFFECTNET_SPLITS[canon])
    if split_dir is not None and (split_dir / "annotations").is_dir():
        records = _affectnet_from_npy(split_dir, bad, dropped, num_classes)
    else:
        records = _affectnet_from_csv(root, canon, bad, dropped, num_classes, crop_face, csv_file, image_dir)
    records = _keep_readable(records, bad)
    sample_keys = ("valence", "arousal") if records and "valence" in records[0].meta else ()
    return AdapterDataset(f"affectnet{num_classes}", records, LABEL_SPACES[f"affectnet{num_classes}"],
                          split=split, root=root, skipped=bad.skipped, dropped=dict(dropped),
                          sample_keys=sample_keys, crop_face=crop_face)


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------
ADAPTERS: dict[str, Callable[..., FaceDataset]] = {
    "imagefolder": imagefolder,
    "fer2013": fer2013,
    "ferplus": ferplus,
    "rafdb": rafdb,
    "affectnet": affectnet,
    "affectnet7": partial(affectnet, num_classes=7),
    "affectnet8": partial(affectnet, num_classes=8),
    "ckplus": ckplus,
    "jaffe": jaffe,
    "sfew": sfew,
    # "synthetic": the built-in faces (ferkit.data.synthetic, SPEC 2.4) are registered here by the lead, e.g.
    #   ADAPTERS["synthetic"] = synthetic_dataset   (same signature: (root, split, *, skip_bad=False, **opts))
}

# other common spellings of the dataset names
_ALIASES = {"raf-db": "rafdb", "raf_db": "rafdb", "raf": "rafdb", "ck+": "ckplus", "ck+48": "ckplus",
            "ckplus48": "ckplus", "fer+": "ferplus", "fer_plus": "ferplus", "fer-2013": "fer2013",
            "image_folder": "imagefolder", "folder": "imagefolder", "sfew2": "sfew"}


def known_datasets() -> list[str]:
    """The registered dataset names (aliases not included)."""
    return sorted(ADAPTERS)


def adapters_with_option(option: str) -> list[str]:
    """The datasets whose adapter takes ``option`` (e.g. ``noise_file``: the published noisy label lists)."""
    return sorted(n for n, b in ADAPTERS.items() if option in (_options(b) or []))


def canonical_dataset(name: str) -> str:
    """A dataset name with the common spellings (``raf-db``, ``ck+48``) mapped onto the registered one."""
    key = str(name).strip().lower()
    return _ALIASES.get(key, key)


def _options(builder: Callable[..., Any]) -> list[str] | None:
    """Keyword options a builder accepts beyond (root, split, skip_bad); None if it takes ``**opts``."""
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in ("root", "split", "skip_bad") and p.kind is not p.VAR_POSITIONAL]


def build_dataset(name: str, root: str | Path | None, split: str, *, skip_bad: bool = False,
                  **opts: Any) -> FaceDataset:
    """Build dataset ``name`` (see :data:`ADAPTERS`); unknown names or options are one-line ``ValueError``s."""
    key = canonical_dataset(name)
    builder = ADAPTERS.get(key)
    if builder is None:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known_datasets())}")
    allowed = _options(builder)
    unknown = [k for k in opts if allowed is not None and k not in allowed]
    if unknown:
        raise ValueError(f"dataset {key!r} has no option {unknown[0]!r}; options: {', '.join(allowed) or 'none'}")
    return builder(root, split, skip_bad=skip_bad, **opts)
