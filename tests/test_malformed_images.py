"""Malformed and unusual image files (issue 9) through the one shared decoder (``ferkit.data.base.open_image``):
dataset loading with and without ``skip_bad``, ``Predictor`` / ``ferkit predict`` over a folder (a row per bad file,
the rest of the batch goes on), and ``ferkit serve``'s upload decoding.

The corpus is written with Pillow into ``tmp_path``; the "huge" pictures are PNG headers that declare the size over
a few bytes of data, so nothing big is ever allocated unless the decoder (wrongly) tries to decode them.
"""
from __future__ import annotations

import csv
import functools
import io
import struct
import warnings
import zlib
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from ferkit.cli import main
from ferkit.data.adapters import build_dataset
from ferkit.data.base import DataError, ImageTooLarge, open_image
from ferkit.inference import Predictor
from ferkit.inference.predictor import iter_image_files
from ferkit.inference.serve import PredictService, RequestError

from test_inference import make_tiny_checkpoint

GREY16 = np.array([[0, 257 * 50], [257 * 100, 257 * 128]], dtype=np.uint16)  # a dark 16-bit picture


# ------------------------------------------------------------------------------------------------------ corpus
def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header for a ``width`` x ``height`` grey picture followed by a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _palette_with_transparency() -> bytes:
    """8x8 palette picture: left half index 0 (green, declared transparent), right half index 1 (red)."""
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 255, 0, 200, 10, 10] + [0] * 762)
    im.paste(0, (0, 0, 4, 8))
    return _encoded(im, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


# file name -> (bytes, reason fragment for the bad ones / None for the ones that must load)
@functools.lru_cache(maxsize=1)
def corpus() -> dict[str, tuple[bytes, str | None]]:
    jpeg, png = _encoded(_noise(64, 64), "JPEG"), _encoded(_noise(64, 64, 1), "PNG")
    return {
        "good.png": (_encoded(_noise(40, 40, 2), "PNG"), None),
        "png_named.jpg": (png, None),  # the content decides the format, not the name
        "cmyk.jpg": (_encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), None),
        "grey16.png": (_encoded(Image.fromarray(GREY16), "PNG"), None),
        "palette_alpha.png": (_palette_with_transparency(), None),
        "animated.gif": (_animated_gif(), None),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "unreadable image"),
        "truncated.png": (png[: len(png) * 3 // 5], "unreadable image"),
        "empty.png": (b"", "unreadable image"),
        "text.png": (b"this is a note, not a picture\n", "cannot identify image"),
        "bomb.png": (_png_declaring(30000, 30000), "decompression bomb"),
        "huge.png": (_png_declaring(9000, 9000), "9000x9000"),
    }


BAD = {name for name, (_, why) in corpus().items() if why is not None}


def write_corpus(folder: Path, skip: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in corpus().items():
        if name not in skip:
            (folder / name).write_bytes(data)
    return folder


def check_decoded(name: str, image: Image.Image) -> None:
    """What each loadable file must decode to (RGB)."""
    assert image.mode == "RGB", name
    px = np.asarray(image).astype(int)
    if name == "cmyk.jpg":
        assert px[8, 8, 0] > 200 and px[8, 8, 1:].max() < 60, px[8, 8]  # CMYK (0, 255, 255, 0) is red
    elif name == "grey16.png":  # value / 257, neither clipped at 255 nor stretched to the full range
        np.testing.assert_array_equal(px[..., 0], [[0, 50], [100, 128]])
    elif name == "palette_alpha.png":
        assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[0, 7]) == (200, 10, 10)
    elif name == "animated.gif":
        assert tuple(px[0, 0]) == (255, 0, 0)  # the first frame
    elif name == "png_named.jpg":
        assert image.size == (64, 64)


# ------------------------------------------------------------------------------------------------------ the decoder
@pytest.mark.parametrize("name", sorted(corpus()))
def test_open_image_on_every_file(tmp_path, name):
    data, why = corpus()[name]
    path = tmp_path / name
    path.write_bytes(data)
    if why is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. PIL's "palette images with transparency" warning
            check_decoded(name, open_image(path))
        return
    with pytest.raises(DataError) as info:
        open_image(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and why in msg
    if name in ("bomb.png", "huge.png"):
        assert isinstance(info.value, ImageTooLarge)  # refused from the header, never decoded


def test_large_jpeg_is_decoded_reduced(tmp_path, monkeypatch):
    path = tmp_path / "large.jpg"
    Image.new("RGB", (2400, 1600), (90, 120, 150)).save(path, quality=80)
    decoded = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    image = open_image(path, max_side=256)
    assert set(decoded) == {(300, 200)}  # draft: DCT scaling by 1/8 while decoding, not 2400x1600 then a resize
    assert image.size == (256, 171)
    assert open_image(path, max_side=None).size == (2400, 1600)


def test_pixel_limit_applies_after_the_jpeg_reduction(tmp_path):
    path = tmp_path / "wide.jpg"
    Image.new("L", (4000, 1000), 128).save(path)
    with pytest.raises(ImageTooLarge, match="4000x1000 = 4.0 MP"):
        open_image(path, max_side=None, max_pixels=1_000_000)
    assert open_image(path, max_side=1000, max_pixels=1_000_000).size == (1000, 250)


# ------------------------------------------------------------------------------------------------------ datasets
@pytest.fixture
def dataset_root(tmp_path) -> Path:
    root = tmp_path / "faces"
    write_corpus(root / "happy", skip=("empty.png",))
    (root / "sad").mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(root / "sad" / "plain.png")
    return root


def test_dataset_without_skip_bad_fails_on_each_bad_file_naming_it(dataset_root):
    ds = build_dataset("imagefolder", dataset_root, "all")
    assert len(ds) == len(corpus()) - 1 + 1  # all but empty.png, and sad/plain.png: decoding is lazy
    for i, r in enumerate(ds.records):
        name = Path(r.path).name
        if name in BAD:
            with pytest.raises(DataError) as info:
                ds.load(i)
            assert "\n" not in str(info.value) and name in str(info.value)
            assert corpus()[name][1] in str(info.value)
        else:
            sample = ds.load(i)
            if name in corpus():
                check_decoded(name, sample["image"])
    (dataset_root / "happy" / "empty.png").write_bytes(b"")  # empty files are refused when the index is built
    with pytest.raises(DataError, match=r"empty\.png.*0 bytes"):
        build_dataset("imagefolder", dataset_root, "all")


def test_dataset_with_skip_bad_lists_every_bad_file(dataset_root):
    (dataset_root / "happy" / "empty.png").write_bytes(b"")
    ds = build_dataset("imagefolder", dataset_root, "all", skip_bad=True)
    skipped = {Path(s.split(": ", 1)[0]).name for s in ds.skipped}
    assert skipped == BAD
    assert f"skipped {len(BAD)} bad entries" in ds.describe()
    names = [Path(r.path).name for r in ds.records]
    assert sorted(names) == sorted((set(corpus()) - BAD) | {"plain.png"})
    for i, name in enumerate(names):
        if name in corpus():
            check_decoded(name, ds.load(i)["image"])


# ------------------------------------------------------------------------------------------------------ prediction
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_predictor_gives_a_row_per_bad_file_and_goes_on(ckpt, tmp_path):
    folder = write_corpus(tmp_path / "photos")
    pred = Predictor.from_checkpoint(ckpt, faces="none", batch_size=2)  # bad files fall inside batches
    rows = list(pred.predict_paths(iter_image_files([folder])))
    assert sorted(Path(r.path).name for r in rows) == sorted(corpus())  # one row each, none lost
    for r in rows:
        name = Path(r.path).name
        if name in BAD:
            assert r.status == "unreadable" and r.label is None and corpus()[name][1] in r.error, (name, r.error)
        else:
            assert r.status == "ok" and r.error is None and r.label in pred.class_names, name
            assert sum(r.probs.values()) == pytest.approx(1, abs=1e-5)
    # a 16-bit picture given as a PIL image is converted as its file is
    im16 = Image.fromarray(GREY16)
    from_file, from_image = pred.predict([folder / "grey16.png", im16])
    np.testing.assert_allclose(list(from_file[0].probs.values()), list(from_image[0].probs.values()), atol=1e-6)


def test_cli_predict_folder_writes_why_for_each_bad_file(ckpt, tmp_path):
    folder = write_corpus(tmp_path / "photos")
    out = tmp_path / "pred.csv"
    assert main(["predict", str(ckpt), str(folder), "--faces", "none", "--batch-size", "3", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert set(rows) == set(corpus())
    for name, r in rows.items():
        if name in BAD:
            assert r["status"] == "unreadable" and corpus()[name][1] in r["error"] and "\n" not in r["error"]
        else:
            assert r["status"] == "ok" and r["label"] and not r["error"]


# ------------------------------------------------------------------------------------------------------ serve
def test_serve_decodes_uploads_with_the_shared_decoder(ckpt):
    service = PredictService(Predictor.from_checkpoint(ckpt, faces="none"))
    for name in ("grey16.png", "palette_alpha.png", "animated.gif", "cmyk.jpg"):
        check_decoded(name, service.decode(corpus()[name][0]))
    for name, status in (("bomb.png", HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
                         ("huge.png", HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
                         ("truncated.png", HTTPStatus.BAD_REQUEST), ("truncated.jpg", HTTPStatus.BAD_REQUEST)):
        with pytest.raises(RequestError) as info:
            service.decode(corpus()[name][0])
        assert info.value.status == status and "\n" not in info.value.message, name


@pytest.mark.parametrize("orientation, size, top_left", [(1, (40, 20), "red"), (6, (20, 40), "red"),
                                                         (3, (40, 20), "blue"), (8, (20, 40), "blue")])
def test_exif_orientation_is_applied(tmp_path, orientation, size, top_left):
    """A phone photo stored sideways with an Orientation tag comes back upright (stored: left half red, right half
    blue; 6 = turn 90° clockwise to display, so the stored left edge is the top; 8 = counter-clockwise)."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    im = open_image(path)
    assert im.size == size
    r, _, b = im.getpixel((1, 1))
    assert (r > 200 and b < 60) if top_left == "red" else (b > 200 and r < 60)
