"""Decode-once image cache (data.decode_cache): exact samples, invalidation, atomic builds, DataLoader workers."""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ferkit.config import ConfigError, load_config
from ferkit.data import cache as cache_mod
from ferkit.data.adapters import build_dataset as build_adapter
from ferkit.data.build import build_dataset
from ferkit.data.cache import attach_decode_cache

CLASSES = ("angry", "happy")


def write_set(root: Path, n: int = 6, size=(20, 24), mode: str = "L", fmt: str = "JPEG") -> list[Path]:
    """``root/train/<class>/<i>.<ext>``: noisy images (so JPEG decoding is really exercised)."""
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    paths = []
    for c in CLASSES:
        for i in range(n):
            p = root / "train" / c / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(p, format=fmt)
            paths.append(p)
    return paths


def dataset(root: Path):
    return build_adapter("imagefolder", root, "train", class_names=list(CLASSES))


def cached(root: Path, cache_root: Path):
    ds = dataset(root)
    assert attach_decode_cache(ds, cache_root)
    return ds


def assert_same_samples(a, b) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a.load(i), b.load(i)
        assert (x["image"].mode, x["image"].size) == (y["image"].mode, y["image"].size)
        assert x["image"].tobytes() == y["image"].tobytes(), f"sample {i} differs"
        assert x["label"] == y["label"]


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("RGB", "JPEG"), ("RGB", "PNG")])
def test_cached_samples_are_byte_identical(tmp_path, mode, fmt):
    write_set(tmp_path / "data", mode=mode, fmt=fmt)
    ds = cached(tmp_path / "data", tmp_path / "cache")
    assert ds.decoded.mode == ("L" if mode == "L" else "RGB")
    assert ds.decoded.array.shape[:3] == (12, 24, 20)
    assert_same_samples(ds, dataset(tmp_path / "data"))


def test_config_key_builds_and_reuses_cache(tmp_path, monkeypatch, caplog):
    write_set(tmp_path / "data")
    monkeypatch.setenv("FERKIT_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={tmp_path / 'data'}", "data.decode_cache=true",
                             "data.options.class_names=[angry, happy]"])
    with caplog.at_level(logging.INFO, logger="ferkit"):
        first = build_dataset(cfg.data, "train")
        second = build_dataset(cfg.data, "train")
    assert first.decoded is not None and first.decoded.path == second.decoded.path
    assert [m for m in caplog.messages if "decode cache" in m][-1].split(": ")[1].startswith("reused")
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npy"))) == 1
    assert_same_samples(second, dataset(tmp_path / "data"))


def test_decode_cache_config_is_validated():
    with pytest.raises(ConfigError, match="data.decode_cache"):
        load_config(None, ["data.decode_cache=true"])  # the synthetic set
    with pytest.raises(ConfigError, match="data.decode_cache: must be true or false"):
        load_config(None, ["data.decode_cache=maybe"])


def test_changed_file_invalidates(tmp_path):
    paths = write_set(tmp_path / "data")
    old = cached(tmp_path / "data", tmp_path / "cache")
    Image.new("L", (20, 24), 7).save(paths[3], format="JPEG")
    st = paths[3].stat()
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a clearly newer mtime on any filesystem
    new = cached(tmp_path / "data", tmp_path / "cache")
    assert new.decoded.path != old.decoded.path
    assert np.all(np.asarray(new.load(3)["image"]) == 7)
    assert_same_samples(new, dataset(tmp_path / "data"))


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    write_set(tmp_path / "data")
    real, calls = cache_mod.open_image, []

    def dies_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "open_image", dies_midway)
    with pytest.raises(RuntimeError, match="killed"):
        cached(tmp_path / "data", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npy")), "a half-built cache was published"
    assert not list((tmp_path / "cache").glob("*.tmp")), "the temporary file was left behind"
    monkeypatch.setattr(cache_mod, "open_image", real)
    ds = cached(tmp_path / "data", tmp_path / "cache")
    assert_same_samples(ds, dataset(tmp_path / "data"))


def test_killed_builder_leftover_is_ignored_and_cleaned(tmp_path):
    write_set(tmp_path / "data")
    path = Path(cached(tmp_path / "data", tmp_path / "cache").decoded.path)
    path.unlink()
    stale = path.with_name(path.name + ".999-dead.tmp")  # what a SIGKILLed build leaves: a partial file
    stale.write_bytes(b"\x93NUMPY garbage")
    os.utime(stale, (0, 0))
    ds = cached(tmp_path / "data", tmp_path / "cache")
    assert Path(ds.decoded.path) == path and not stale.exists()
    assert_same_samples(ds, dataset(tmp_path / "data"))


def test_mixed_sizes_fall_back_with_a_log_line(tmp_path, caplog):
    paths = write_set(tmp_path / "data")
    Image.new("L", (30, 30), 1).save(paths[0], format="JPEG")
    ds = dataset(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="ferkit"):
        assert not attach_decode_cache(ds, tmp_path / "cache")
    assert any("decode cache off" in m and "differ in size" in m for m in caplog.messages)
    assert ds.decoded is None and ds.load(0)["image"].size == (30, 30)


class _Pixels(Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return np.asarray(self.ds.load(i)["image"])


def test_works_with_two_workers(tmp_path):
    write_set(tmp_path / "data")
    ds = cached(tmp_path / "data", tmp_path / "cache")
    ds.load(0)  # the parent has the map open: workers must still get a picklable, lazily mapped cache
    blob = pickle.dumps(ds.decoded)
    assert len(blob) < 1000 and pickle.loads(blob)._array is None
    loader = DataLoader(_Pixels(ds), batch_size=4, num_workers=2)
    got = np.concatenate([b.numpy() for b in loader])
    want = np.stack([np.asarray(dataset(tmp_path / "data").load(i)["image"]) for i in range(len(ds))])
    assert np.array_equal(got, want)
