"""Faults and bad input (issue 9): a process killed while writing a checkpoint, a full or read-only disk during a save
or before a run, pickled objects in a training state, and config / list files that are in another encoding, empty,
or list an entry twice. (NaN-loss stop/skip and SIGKILL-resume are in test_engine.py and test_resume.py.)"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from ferkit.cli import main
from ferkit.config import ConfigError, load_config
from ferkit.data.adapters import build_dataset
from ferkit.engine import Trainer, TrainingError
from ferkit.engine import checkpoint as ckpt
from ferkit.engine.checkpoint import CheckpointError, load_state, load_weights, save_state, save_weights
from ferkit.inference.predictor import resolve_checkpoint

from test_data_adapters import (FERPLUS_ROWS, RAF_LINES, assert_error, make_affectnet_csv, make_rafdb, pixels,
                                write_fer2013_csv, write_ferplus, write_text)
from tiny import write_imagefolder


# ------------------------------------------------------------------------------------------------------ helpers
def _weights(version: int) -> dict[str, torch.Tensor]:  # (repeated in _KILLED_WRITER)
    return {"w": torch.full((128, 128), float(version)), "b": torch.arange(16.0) + version}  # 64 KiB: > one buffer


def _save(kind: str, path: Path, version: int) -> None:
    if kind == "weights":
        save_weights(path, _weights(version), {"version": version})
    else:
        save_state(path, {"model": _weights(version), "epoch": version})


def _saved_version(kind: str, path: Path) -> int:
    """The version a checkpoint holds, after checking that it loads whole."""
    if kind == "weights":
        state, meta = load_weights(path)
    else:
        loaded = load_state(path)
        state, meta = loaded["model"], {"version": loaded["epoch"]}
    version = meta["version"]
    for k, v in _weights(version).items():
        assert torch.equal(state[k], v), k
    return version


def _temps(path: Path) -> list[Path]:
    """The temporary files of atomic writes of ``path``."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


NAMES = {"weights": "last.safetensors", "state": "state.pt"}

# saves version 1, then starts saving version 2 through a file that writes half of the bytes, tells the parent
# ("HALF" on stdout) and waits to be SIGKILLed: the kill lands mid-write, every time. (Only torch and the
# checkpoint module are imported: _weights / _save are repeated here to keep the start fast.)
_KILLED_WRITER = r"""
import os, sys, time
import torch
from ferkit.engine.checkpoint import save_state, save_weights

kind, path = sys.argv[1], sys.argv[2]


def save(version):
    weights = {"w": torch.full((128, 128), float(version)), "b": torch.arange(16.0) + version}
    if kind == "weights":
        save_weights(path, weights, {"version": version})
    else:
        save_state(path, {"model": weights, "epoch": version})


class HalfThenWait:
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        print("HALF", flush=True)
        time.sleep(600)


save(1)
real_fdopen = os.fdopen
os.fdopen = lambda fd, *a, **k: HalfThenWait(real_fdopen(fd, *a, **k))
save(2)
"""


def _kill_mid_write(kind: str, path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, kind, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "HALF", f"writer did not reach the second save: {proc.stderr.read()[-2000:]}"
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _refuse_writes(monkeypatch, root: Path, code: int) -> None:
    """Make every create / write-open and mkdir under ``root`` fail with ``code`` (EROFS, EACCES), as a read-only
    or forbidden folder does. (Tests run as root, so chmod would not stop anything.)"""
    real_open, real_mkdir = os.open, os.mkdir
    inside = lambda p: os.path.abspath(os.fsdecode(p)).startswith(str(root))  # noqa: E731

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def _one_line(text: str) -> str:
    text = text.strip()
    assert text and "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------------------ a. SIGKILL
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["weights", "state"])
def test_sigkill_mid_write_leaves_the_previous_checkpoint(tmp_path, kind):
    path = tmp_path / "run" / "checkpoints" / NAMES[kind]
    _kill_mid_write(kind, path)
    assert _saved_version(kind, path) == 1  # the old file, whole
    (partial,) = _temps(path)  # the killed write's half file sits beside it, under a name nothing loads
    assert 0 < partial.stat().st_size < 64 * 1024
    if kind == "weights":
        assert resolve_checkpoint(tmp_path / "run") == path
    # the next save cleans leftovers of killed writes (a recent temporary file may be another writer's: kept)
    old = time.time() - ckpt.STALE_TEMP_S - 60
    os.utime(partial, (old, old))
    fresh = path.parent / f".{path.name}.inflight.tmp"
    fresh.write_bytes(b"x")
    _save(kind, path, 3)
    assert _saved_version(kind, path) == 3
    assert _temps(path) == [fresh]


# ------------------------------------------------------------------------------------------- b. full or read-only disk
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("kind", ["weights", "state"])
def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, kind):
    path = tmp_path / "checkpoints" / NAMES[kind]
    _save(kind, path, 1)
    real_mkstemp, made = tempfile.mkstemp, []

    def mkstemp_on_full_disk(*args, **kwargs):  # the temporary file is created, its writes go to /dev/full
        fd, tmp = real_mkstemp(*args, **kwargs)
        os.close(fd)
        made.append(Path(tmp))
        return os.open("/dev/full", os.O_WRONLY), tmp

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_on_full_disk)
    with pytest.raises(CheckpointError) as info:
        _save(kind, path, 2)
    msg = _one_line(str(info.value))
    assert str(path) in msg and os.strerror(errno.ENOSPC) in msg
    monkeypatch.undo()
    assert made and not made[0].exists() and _temps(path) == []
    assert _saved_version(kind, path) == 1


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("kind", ["weights", "state"])
def test_read_only_checkpoint_folder_is_a_clear_error(tmp_path, monkeypatch, kind, code):
    path = tmp_path / "checkpoints" / NAMES[kind]
    _save(kind, path, 1)
    _refuse_writes(monkeypatch, path.parent, code)
    with pytest.raises(CheckpointError) as info:
        _save(kind, path, 2)
    msg = _one_line(str(info.value))
    assert str(path) in msg and os.strerror(code) in msg
    monkeypatch.undo()
    assert _saved_version(kind, path) == 1 and _temps(path) == []


def _no_data(*args, **kwargs):
    raise AssertionError("data was built before the output directory was checked")


@pytest.mark.parametrize("existing", [True, False])
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_run_dir_fails_before_training(tmp_path, monkeypatch, code, existing):
    run_dir = tmp_path / "out" / "run"
    if existing:
        run_dir.mkdir(parents=True)
    monkeypatch.setattr("ferkit.engine.trainer.build_splits", _no_data)
    _refuse_writes(monkeypatch, tmp_path / "out", code)
    cfg = load_config("resnet18_synthetic", ["train.epochs=1", "train.progress=false", "train.tensorboard=false"])
    with pytest.raises(TrainingError) as info:
        Trainer(cfg, run_dir)
    msg = _one_line(str(info.value))
    assert str(run_dir) in msg and "not writable" in msg and os.strerror(code) in msg


def test_cli_train_into_read_only_folder_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ferkit.engine.trainer.build_splits", _no_data)
    _refuse_writes(monkeypatch, tmp_path / "ro", errno.EROFS)
    run_dir = tmp_path / "ro" / "run"
    assert main(["train", "--run-dir", str(run_dir), "train.epochs=1", "train.tensorboard=false"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("ferkit: error:") and str(run_dir) in err and "not writable" in err


# ------------------------------------------------------------------------------------------------------ c. pickles
class _RunsCode:
    """Unpickling this calls os.mkdir(marker): what a malicious checkpoint could do with any function."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_load_state_refuses_pickled_objects_unless_trusted(tmp_path):
    path, marker = tmp_path / "state.pt", tmp_path / "pwned"
    save_state(path, {"model": _weights(1), "epoch": 1})
    assert load_state(path)["epoch"] == 1  # tensors, dicts and numbers need no trust
    save_state(path, {"model": _weights(1), "epoch": 1, "payload": _RunsCode(marker)})
    with pytest.raises(CheckpointError) as info:
        load_state(path)
    msg = _one_line(str(info.value))
    assert str(path) in msg and "--trust-checkpoint" in msg
    assert not marker.exists(), "the pickled call ran without trust"
    load_state(path, trust=True)
    assert marker.is_dir()  # with trust the pickle runs: why it is off by default


@pytest.mark.timeout(600)
def test_cli_resume_with_foreign_objects_needs_trust_checkpoint(tmp_path, capsys):
    data = write_imagefolder(tmp_path / "data", sizes=(("train", 16, 0), ("test", 8, 1)), size=32)
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), f"data.root={data}", "data.dataset=imagefolder",
                 "data.train_split=train", "data.test_split=test", "data.input_size=32", "train.epochs=1",
                 "train.batch_size=8", "train.progress=false", "train.tensorboard=false", "train.threads=1"]) == 0
    state_path = run / "checkpoints" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    state["note"] = Fraction(1, 3)  # an object torch's safe loader does not allow
    torch.save(state, state_path)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(state_path) in err and "--trust-checkpoint" in err
    assert main(["train", "--resume", str(run), "--trust-checkpoint"]) == 0


# ------------------------------------------------------------------------------------------------------ d. configs
def _config_error(path: Path, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    msg = _one_line(str(info.value))
    for frag in (str(path), *fragments):
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


def test_config_in_another_encoding_names_file_and_line(tmp_path):
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_text("name: x\noptim: {lr: 0.01}\n", encoding="utf-16")  # with a byte-order mark
    _config_error(utf16, "UTF-16", "save the file as UTF-8")
    nobom = tmp_path / "nobom.yaml"
    nobom.write_bytes("name: x\n".encode("utf-16-le"))
    _config_error(nobom, f"{nobom}:1:", "NUL")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: x\nseed: 1\nnotes: caf\xe9\n".encode("latin-1"))
    _config_error(latin, f"{latin}:3:", "not UTF-8", "0xe9")
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("name: bom\n".encode("utf-8-sig"))  # UTF-8 with a mark is UTF-8
    assert load_config(str(bom)).name == "bom"


def test_config_comments_only_is_empty(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# nothing here\n\n")
    _config_error(path, "empty config file")


def test_config_duplicate_keys_name_both_lines(tmp_path):
    top = tmp_path / "top.yaml"
    top.write_text("name: a\nseed: 1\nname: b\n")
    _config_error(top, f"{top}:3:", "duplicate key 'name'", "line 1")
    nested = tmp_path / "nested.yaml"
    nested.write_text("name: a\noptim:\n  lr: 0.1\n  gamma: 0.5\n  lr: 0.2\n")
    _config_error(nested, f"{nested}:5:", "duplicate key 'lr'", "line 3")
    same_name_elsewhere = tmp_path / "ok.yaml"  # one key in two mappings is no duplicate
    same_name_elsewhere.write_text("name: a\noptim: {name: sgd}\nmethod: {name: supervised}\n")
    assert load_config(str(same_name_elsewhere)).optim.name == "sgd"


def test_resume_with_damaged_run_config_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: a\nname: b\n")
    assert main(["train", "--resume", str(run)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"{run / 'config.yaml'}:2:" in err and "duplicate key" in err


# ------------------------------------------------------------------------------------------------------ d. list files
def _raf_list(root: Path) -> Path:
    return root / "EmoLabel" / "list_patition_label.txt"


@pytest.mark.parametrize("skip_bad", [False, True])  # a file-level problem is an error even when skipping entries
def test_list_file_encodings_and_empty_files(tmp_path, skip_bad):
    make_rafdb(tmp_path, RAF_LINES)
    raf = _raf_list(tmp_path)
    build = lambda: build_dataset("rafdb", tmp_path, "train", skip_bad=skip_bad)  # noqa: E731
    raf.write_text("\n".join(RAF_LINES) + "\n", encoding="utf-16")
    assert_error(build, str(raf), "UTF-16", "UTF-8")
    raf.write_bytes(("\n".join(RAF_LINES) + "\n").encode("utf-16-le"))
    assert_error(build, f"{raf}:1:", "NUL")
    raf.write_bytes("train_00001.jpg 5\ntrain_0000\xe9.jpg 1\n".encode("latin-1"))
    assert_error(build, f"{raf}:2:", "not UTF-8", "0xe9")
    raf.write_bytes(b"")
    assert_error(build, str(raf), "empty file")

    make_affectnet_csv(tmp_path, [("1/a.jpg", 1), ("1/b.jpg", 2)])
    csv_path = tmp_path / "training.csv"
    text = csv_path.read_text()
    csv_path.write_bytes(text.encode("utf-16"))
    assert_error(lambda: build_dataset("affectnet", tmp_path, "train", skip_bad=skip_bad), str(csv_path), "UTF-16")
    lines = text.splitlines(keepends=True)
    csv_path.write_bytes("".join(lines[:2]).encode() + lines[2].replace("1/b.jpg", "1/\xe9.jpg").encode("latin-1"))
    assert_error(lambda: build_dataset("affectnet", tmp_path, "train", skip_bad=skip_bad), f"{csv_path}:3:",
                 "not UTF-8")
    csv_path.write_bytes(b"")
    assert_error(lambda: build_dataset("affectnet", tmp_path, "train", skip_bad=skip_bad), str(csv_path),
                 "empty file")
    fer = write_fer2013_csv(tmp_path / "fer" / "fer2013.csv", [(0, pixels(1), "Training")])
    fer.write_bytes(b"")
    assert_error(lambda: build_dataset("fer2013", fer, "train", skip_bad=skip_bad), str(fer), "empty file")


def test_duplicate_list_entries_name_both_lines(tmp_path):
    make_rafdb(tmp_path, RAF_LINES + ["train_00001_aligned.jpg 3"])  # line 6: the same image as line 1
    raf = _raf_list(tmp_path)
    assert_error(lambda: build_dataset("rafdb", tmp_path, "test"), f"{raf}:6:", "duplicate image 'train_00001'",
                 "line 1")
    ds = build_dataset("rafdb", tmp_path, "train", skip_bad=True)  # the first stays, the repeat is a counted skip
    assert ds.targets.tolist() == [4, 0] and len(ds.skipped) == 1 and f"{raf}:6:" in ds.skipped[0]

    make_affectnet_csv(tmp_path, [("1/a.jpg", 1), ("1/b.jpg", 2), ("1/a.jpg", 3)])
    assert_error(lambda: build_dataset("affectnet", tmp_path, "train"), "training.csv:4:",
                 "duplicate image '1/a.jpg'", "line 2")
    assert build_dataset("affectnet", tmp_path, "train", skip_bad=True).targets.tolist() == [1, 2]

    rows = FERPLUS_ROWS[:2] + [("Training", FERPLUS_ROWS[0][1], FERPLUS_ROWS[0][2])]
    write_ferplus(tmp_path / "fp", rows)
    write_fer2013_csv(tmp_path / "fp" / "fer2013.csv", [(0, pixels(1), "Training")] * 3)
    assert_error(lambda: build_dataset("ferplus", tmp_path / "fp", "train"), "fer2013new.csv:4:",
                 "duplicate image name", "line 2")


def test_harmless_repeats_are_kept(tmp_path):
    # FER2013 rows are entries by position; the real file has duplicate pictures and its protocol keeps them
    fer = write_fer2013_csv(tmp_path / "fer2013.csv", [(3, pixels(5), "Training")] * 2)
    assert build_dataset("fer2013", fer, "train").targets.tolist() == [3, 3]
    # a pose list naming an image twice says the same thing twice
    make_rafdb(tmp_path / "raf", RAF_LINES)
    write_text(tmp_path / "raf" / "pose30.txt", "test_0001_aligned\ntest_0001_aligned\n")
    ds = build_dataset("rafdb", tmp_path / "raf", "test", pose30_list="pose30.txt")
    assert ds.subsets()["pose>30"].tolist() == [True, False, False]


def test_occlusion_list_giving_two_types_names_both_lines(tmp_path):
    make_rafdb(tmp_path, RAF_LINES)
    occ = write_text(tmp_path / "occlusion_list.txt", "test_0001_aligned 6 4\ntest_0003_aligned 1 2\n"
                                                      "test_0001_aligned 6 4\ntest_0001_aligned 6 5\n")
    assert_error(lambda: build_dataset("rafdb", tmp_path, "test", occlusion_list=occ), f"{occ}:4:",
                 "occlusion type 5", "line 1 (type 4)")
