"""Dataset adapters (SPEC 2.2), subject-wise splits and synthetic label noise (SPEC 2.3).

Tiny fake datasets in every supported format are written to ``tmp_path``; the ``realdata`` tests read the real
FER2013 / CK+48 / JAFFE copies at ``$FERKIT_DATA`` (default ``<repo>/../shared/data``) and skip when absent.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferkit.data.adapters import ADAPTERS, build_dataset
from ferkit.data.base import DataError, Subset
from ferkit.data.noise import inject_label_noise
from ferkit.data.splits import holdout_split, repeated_subject_kfold, subject_kfold
from ferkit.labels import LABEL_SPACES


# ------------------------------------------------------------------------------------------------ fixtures / writers
def write_image(path: Path, value: int = 128, size=(8, 8), mode: str = "L", fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(path, format=fmt)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def pixels(value: int) -> str:
    return " ".join([str(value)] * 2304)


def assert_error(fn, *fragments: str) -> str:
    """``fn()`` raises a one-line DataError containing every fragment."""
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------------------------------------ ImageFolder
@pytest.fixture
def folder_tree(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    for split in ("train", "test"):
        for cls in ("happy", "angry", "sad"):
            for i in range(2):
                write_image(root / split / cls / f"{cls}_{i}.png", 40 * i)
    write_image(root / "test" / "surprise" / "s.png")  # a class only in the test split
    write_text(root / "README.md", "not an entry")  # non-image files next to class folders are ignored
    return root


def test_imagefolder_sorted_class_names_shared_by_splits(folder_tree):
    train = build_dataset("imagefolder", folder_tree, "train")
    test = build_dataset("imagefolder", folder_tree, "test")
    assert train.class_names == test.class_names == ["angry", "happy", "sad", "surprise"]
    assert len(train) == 6 and len(test) == 7
    assert sorted(np.bincount(train.targets, minlength=4).tolist()) == [0, 2, 2, 2]
    sample = train.load(0)
    assert sample["image"].mode == "RGB" and sample["label"] == train.records[0].label


def test_imagefolder_explicit_classes_canonical_names(folder_tree):
    ds = build_dataset("imagefolder", folder_tree, "train", class_names="fer2013")
    assert ds.class_names == list(LABEL_SPACES["fer2013"])
    by_file = {Path(r.path).parent.name: r.label for r in ds.records}
    assert by_file == {"angry": 0, "happy": 3, "sad": 4}  # angry -> anger, happy -> happiness, sad -> sadness
    ds = build_dataset("imagefolder", folder_tree, "test", class_names=["sadness", "anger", "happiness", "surprise"])
    assert {Path(r.path).parent.name: r.label for r in ds.records}["sad"] == 0


def test_imagefolder_unknown_class_folder(folder_tree):
    assert_error(lambda: build_dataset("imagefolder", folder_tree, "test", class_names=["anger", "happiness",
                                                                                         "sadness"]),
                 "surprise", "unknown class folder")
    ds = build_dataset("imagefolder", folder_tree, "test", class_names=["anger", "happiness", "sadness"],
                       skip_bad=True)
    assert len(ds) == 6 and len(ds.skipped) == 1 and "surprise" in ds.skipped[0]
    assert "skipped 1 bad entries" in ds.describe()


def test_imagefolder_flat_layout_and_split_errors(tmp_path):
    for cls in ("b", "a"):
        write_image(tmp_path / cls / "x.png")
    ds = build_dataset("imagefolder", tmp_path, "all")
    assert ds.class_names == ["a", "b"] and len(ds) == 2
    assert len(build_dataset("imagefolder", tmp_path, "train")) == 2  # no split folders: the whole tree
    write_image(tmp_path / "other" / "train" / "a" / "x.png")
    assert_error(lambda: build_dataset("imagefolder", tmp_path / "other", "test"), "no folder for split 'test'")
    write_image(tmp_path / "other" / "fold1" / "a" / "y.png")  # a custom split folder name
    assert len(build_dataset("imagefolder", tmp_path / "other", "fold1")) == 1
    write_image(tmp_path / "other" / "fold1" / "stray.png")  # an image outside any class folder
    assert_error(lambda: build_dataset("imagefolder", tmp_path / "other", "fold1"), "stray.png",
                 "outside any class folder")
    (tmp_path / "empty_set").mkdir()
    (tmp_path / "empty_set" / "a").mkdir()
    assert_error(lambda: build_dataset("imagefolder", tmp_path / "empty_set", "all"), "no usable")


def test_imagefolder_bad_files(folder_tree):
    d = folder_tree / "train" / "happy"
    (d / "empty.png").write_bytes(b"")
    write_text(d / "notes.txt", "hello")
    write_text(d / "fake.jpg", "this is not a jpeg")
    truncated_jpeg(d / "cut.jpg")
    # index time, no skip_bad: the zero-byte file (cheap) is an error; so is a non-image extension
    assert_error(lambda: build_dataset("imagefolder", folder_tree, "train"), "empty.png", "0 bytes")
    (d / "empty.png").unlink()
    assert_error(lambda: build_dataset("imagefolder", folder_tree, "train"), "notes.txt", "not an image")
    (d / "notes.txt").unlink()
    # undecodable images are found lazily by load() ...
    ds = build_dataset("imagefolder", folder_tree, "train")
    names = [Path(r.path).name for r in ds.records]
    assert_error(lambda: ds.load(names.index("fake.jpg")), "fake.jpg", "unreadable")
    assert_error(lambda: ds.load(names.index("cut.jpg")), "cut.jpg", "unreadable")
    # ... or at index time with skip_bad, where they are skipped and listed
    (d / "empty.png").write_bytes(b"")
    ds = build_dataset("imagefolder", folder_tree, "train", skip_bad=True)
    assert len(ds) == 6 and len(ds.skipped) == 3
    assert {re.search(r"(\w+\.\w+):", s).group(1) for s in ds.skipped} == {"empty.png", "fake.jpg", "cut.jpg"}
    assert all(ds.load(i)["image"].size == (8, 8) for i in range(len(ds)))


def test_imagefolder_symlinks_outside_root_rejected(folder_tree, tmp_path):
    outside = write_image(tmp_path / "elsewhere" / "secret.png")
    link = folder_tree / "train" / "happy" / "link.png"
    link.symlink_to(outside)
    assert_error(lambda: build_dataset("imagefolder", folder_tree, "train"), "link.png", "escapes the dataset root")
    link.unlink()
    (folder_tree / "train" / "surprise").symlink_to(outside.parent, target_is_directory=True)
    assert_error(lambda: build_dataset("imagefolder", folder_tree, "train"), "surprise", "escapes")
    ds = build_dataset("imagefolder", folder_tree, "train", skip_bad=True)
    assert len(ds) == 6 and len(ds.skipped) == 1
    # a link that stays inside the root is fine
    (folder_tree / "train" / "surprise").unlink()
    (folder_tree / "train" / "sad" / "inside.png").symlink_to(folder_tree / "train" / "sad" / "sad_0.png")
    assert len(build_dataset("imagefolder", folder_tree, "train")) == 7


def test_imagefolder_subject_pattern(tmp_path):
    write_image(tmp_path / "a" / "subj01_x.png")
    write_image(tmp_path / "a" / "subj02_y.png")
    ds = build_dataset("imagefolder", tmp_path, "all", subject_pattern=r"^(subj\d+)_")
    assert ds.subjects.tolist() == ["subj01", "subj02"]
    write_image(tmp_path / "a" / "nobody.png")
    assert_error(lambda: build_dataset("imagefolder", tmp_path, "all", subject_pattern=r"^(subj\d+)_"),
                 "nobody.png", "subject")


# ------------------------------------------------------------------------------------------------ FER2013
def test_fer2013_image_folder_form(tmp_path):
    for split in ("train", "PublicTest"):
        for cls in ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"):
            write_image(tmp_path / split / cls / f"{split}_{cls}.jpg", fmt="JPEG")
    ds = build_dataset("fer2013", tmp_path, "train")
    assert ds.class_names == list(LABEL_SPACES["fer2013"])
    folder_label = {Path(r.path).parent.name: r.label for r in ds.records}
    assert folder_label == {"angry": 0, "disgust": 1, "fear": 2, "happy": 3, "sad": 4, "surprise": 5, "neutral": 6}
    assert len(build_dataset("fer2013", tmp_path, "val")) == 7  # val <- PublicTest folder
    assert_error(lambda: build_dataset("fer2013", tmp_path, "test"), "split 'test'")
    assert_error(lambda: build_dataset("fer2013", tmp_path, "holdout"), "unknown split 'holdout'")


def write_fer2013_csv(path: Path, rows: list[tuple]) -> Path:
    lines = ["emotion,pixels,Usage"] + [f"{e},{p},{u}" for e, p, u in rows]
    return write_text(path, "\n".join(lines) + "\n")


def test_fer2013_csv_form(tmp_path):
    rows = [(0, pixels(10), "Training"), (3, pixels(20), "Training"), (6, pixels(30), "PublicTest"),
            (5, pixels(40), "PrivateTest")]
    csv_path = write_fer2013_csv(tmp_path / "fer2013.csv", rows)
    for root in (tmp_path, csv_path):
        train = build_dataset("fer2013", root, "train")
        assert train.targets.tolist() == [0, 3] and train.records[0].path is None
    sample = train.load(1)
    assert sample["image"].size == (48, 48) and sample["image"].mode == "RGB"
    assert np.asarray(sample["image"]).max() == 20
    assert build_dataset("fer2013", tmp_path, "publictest").targets.tolist() == [6]
    assert build_dataset("fer2013", tmp_path, "test").targets.tolist() == [5]


@pytest.mark.parametrize("row, fragments", [
    ((9, pixels(1), "Training"), ["fer2013.csv:3", "label 9 out of range 0..6"]),
    ((1, " ".join(["1"] * 100), "Training"), ["fer2013.csv:3", "2304"]),
    ((1, pixels(1).replace("1", "x", 1), "Training"), ["fer2013.csv:3", "malformed pixels"]),
    ((1, pixels(300), "Training"), ["fer2013.csv:3", "0..255"]),
    ((1, pixels(1), "Train"), ["fer2013.csv:3", "unknown Usage"]),
    (("a", pixels(1), "Training"), ["fer2013.csv:3", "emotion"]),
])
def test_fer2013_csv_bad_rows(tmp_path, row, fragments):
    write_fer2013_csv(tmp_path / "fer2013.csv", [(0, pixels(1), "Training"), row])
    assert_error(lambda: build_dataset("fer2013", tmp_path, "train"), *fragments)
    ds = build_dataset("fer2013", tmp_path, "train", skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 1 and ds.skipped[0].startswith(f"{tmp_path / 'fer2013.csv'}:3:")


def test_fer2013_csv_malformed_line_and_header(tmp_path):
    write_text(tmp_path / "fer2013.csv", f"emotion,pixels,Usage\n0,{pixels(1)},Training\n1,{pixels(1)}\n")
    assert_error(lambda: build_dataset("fer2013", tmp_path, "train"), "fer2013.csv:3", "malformed line")
    write_text(tmp_path / "fer2013.csv", "emotion,Usage\n0,Training\n")
    assert_error(lambda: build_dataset("fer2013", tmp_path, "train"), "fer2013.csv:1", "missing column", "pixels")


# ------------------------------------------------------------------------------------------------ FERPlus
FERPLUS_HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
FERPLUS_ROWS = [  # (usage, name, 10 votes) -> expected outcome
    ("Training", "fer0000000.png", [4, 0, 0, 1, 3, 2, 0, 0, 0, 0]),  # neutral
    ("Training", "fer0000001.png", [0, 10, 0, 0, 0, 0, 0, 0, 0, 0]),  # happiness
    ("Training", "fer0000002.png", [5, 5, 0, 0, 0, 0, 0, 0, 0, 0]),  # tie -> dropped
    ("Training", "fer0000003.png", [1, 0, 0, 0, 0, 0, 0, 0, 9, 0]),  # unknown majority -> dropped
    ("Training", "fer0000004.png", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),  # NF -> dropped
    ("Training", "", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),  # removed image -> dropped
    ("PublicTest", "fer0000006.png", [0, 0, 0, 0, 0, 0, 0, 7, 3, 0]),  # contempt
    ("Training", "fer0000007.png", [0, 0, 6, 0, 0, 0, 4, 0, 0, 0]),  # surprise
]


def write_ferplus(root: Path, rows=FERPLUS_ROWS) -> Path:
    lines = [FERPLUS_HEADER] + [f"{u},{n}," + ",".join(map(str, v)) for u, n, v in rows]
    return write_text(root / "fer2013new.csv", "\n".join(lines) + "\n")


def test_ferplus_over_fer2013_pixels(tmp_path):
    write_ferplus(tmp_path)
    write_fer2013_csv(tmp_path / "fer2013.csv", [(0, pixels(i), u) for i, (u, _, _) in enumerate(FERPLUS_ROWS)])
    ds = build_dataset("ferplus", tmp_path, "train")
    assert ds.class_names == list(LABEL_SPACES["ferplus"])
    assert ds.targets.tolist() == [0, 1, 2]  # neutral, happiness, surprise
    assert ds.dropped == {"tie": 1, "unknown majority": 1, "not-a-face (NF) majority": 1, "no image name": 1}
    assert "dropped" in ds.describe() and not ds.skipped
    soft = ds.records[0].meta["soft_label"]
    np.testing.assert_allclose(soft, np.array([4, 0, 0, 1, 3, 2, 0, 0]) / 10, rtol=1e-6)
    sample = ds.load(2)
    assert np.asarray(sample["image"]).max() == 7  # pixels of the 8th fer2013.csv row
    np.testing.assert_allclose(sample["soft_label"], [0, 0, .6, 0, 0, 0, .4, 0], rtol=1e-6)
    val = build_dataset("ferplus", tmp_path, "val")
    assert val.targets.tolist() == [7]


def test_ferplus_official_rule_and_image_folder(tmp_path):
    write_ferplus(tmp_path)
    for usage, name, _ in FERPLUS_ROWS:
        if name:
            write_image(tmp_path / {"Training": "FER2013Train", "PublicTest": "FER2013Valid"}[usage] / name)
    ds = build_dataset("ferplus", tmp_path, "train", vote="official")
    # [4,0,0,1,3,2,..] (single vote removed: 4 of 9) and the 5/5 tie have no majority; 6 of 10 wins
    assert ds.targets.tolist() == [1, 2] and ds.dropped["no majority (official rule)"] == 2
    assert ds.load(0)["image"].size == (8, 8)
    (tmp_path / "FER2013Train" / "fer0000001.png").unlink()
    assert_error(lambda: build_dataset("ferplus", tmp_path, "train"), "fer2013new.csv:3", "not found")


def test_ferplus_bad_rows(tmp_path):
    rows = FERPLUS_ROWS[:2] + [("Training", "fer0000009.png", [0, "x", 0, 0, 0, 0, 0, 0, 0, 0])]
    write_ferplus(tmp_path, rows)
    write_fer2013_csv(tmp_path / "fer2013.csv", [(0, pixels(1), "Training")] * 3)
    assert_error(lambda: build_dataset("ferplus", tmp_path, "train"), "fer2013new.csv:4", "happiness vote count")
    ds = build_dataset("ferplus", tmp_path, "train", skip_bad=True)
    assert len(ds) == 2 and len(ds.skipped) == 1
    write_ferplus(tmp_path, FERPLUS_ROWS[:2])
    write_fer2013_csv(tmp_path / "fer2013.csv", [(0, pixels(1), "Training")])  # one row short
    assert_error(lambda: build_dataset("ferplus", tmp_path, "train"), "fer2013.csv", "1 data rows")
    write_fer2013_csv(tmp_path / "fer2013.csv", [(0, pixels(1), "Training"), (0, pixels(1), "PublicTest")])
    assert_error(lambda: build_dataset("ferplus", tmp_path, "train"), "fer2013new.csv:3", "Usage")


# ------------------------------------------------------------------------------------------------ RAF-DB
def make_rafdb(root: Path, entries: list[str]) -> Path:
    write_text(root / "EmoLabel" / "list_patition_label.txt", "\n".join(entries) + "\n")
    for line in entries:
        name = line.split()[0]
        if name.startswith(("train_", "test_")) and "/" not in name:
            write_image(root / "Image" / "aligned" / f"{name.rsplit('.', 1)[0]}_aligned.jpg", fmt="JPEG")
    return root


RAF_LINES = ["train_00001.jpg 5", "train_00002.jpg 1", "test_0001.jpg 7", "test_0002.jpg 4", "test_0003.jpg 2"]


def test_rafdb_labels_and_splits(tmp_path):
    make_rafdb(tmp_path, RAF_LINES)
    train = build_dataset("rafdb", tmp_path, "train")
    assert train.class_names == list(LABEL_SPACES["rafdb"])
    assert train.targets.tolist() == [4, 0]  # 1-based file labels -> 0-based
    assert train.records[0].source.endswith("list_patition_label.txt:1")
    assert Path(train.records[0].path).name == "train_00001_aligned.jpg"
    test = build_dataset("raf-db", tmp_path, "test")
    assert test.targets.tolist() == [6, 3, 1] and test.subsets() == {}
    assert len(build_dataset("rafdb", tmp_path, "all")) == 5


@pytest.mark.parametrize("line, fragments", [
    ("train_00003.jpg 9", ["list_patition_label.txt:6: label 9 out of range 1..7"]),
    ("train_00003.jpg 0", ["list_patition_label.txt:6: label 0 out of range 1..7"]),
    ("train_00003.jpg", ["list_patition_label.txt:6", "malformed line"]),
    ("train_00003.jpg five", ["list_patition_label.txt:6", "malformed label"]),
    ("train_00003.jpg 5", ["list_patition_label.txt:6", "not found", "train_00003_aligned.jpg"]),
    ("../x.jpg 3", ["list_patition_label.txt:6", "escapes the dataset root"]),
    ("../../../../etc/passwd 3", ["list_patition_label.txt:6", "escapes"]),
    ("/etc/passwd 3", ["list_patition_label.txt:6", "escapes"]),
    ("valid_0001.jpg 3", ["list_patition_label.txt:6", "split"]),
])
def test_rafdb_bad_lines(tmp_path, line, fragments):
    make_rafdb(tmp_path, RAF_LINES)
    with open(tmp_path / "EmoLabel" / "list_patition_label.txt", "a") as fh:
        fh.write(line + "\n")
    assert_error(lambda: build_dataset("rafdb", tmp_path, "train"), *fragments)
    ds = build_dataset("rafdb", tmp_path, "train", skip_bad=True)
    assert len(ds) == 2 and len(ds.skipped) == 1 and "list_patition_label.txt:6:" in ds.skipped[0]
    assert "skipped 1" in ds.describe()


def test_rafdb_unreadable_image(tmp_path):
    make_rafdb(tmp_path, RAF_LINES)
    truncated_jpeg(tmp_path / "Image" / "aligned" / "train_00002_aligned.jpg")
    ds = build_dataset("rafdb", tmp_path, "train")  # lazily checked ...
    assert_error(lambda: ds.load(1), "list_patition_label.txt:2", "unreadable image")
    ds = build_dataset("rafdb", tmp_path, "train", skip_bad=True)  # ... or skipped at index time
    assert len(ds) == 1 and "list_patition_label.txt:2" in ds.skipped[0]


def test_rafdb_occlusion_and_pose_subsets(tmp_path):
    make_rafdb(tmp_path, RAF_LINES)
    occ = write_text(tmp_path / "occlusion_list.txt", "test_0001_aligned 6 4\ntest_0003_aligned 1 2\n")
    p30 = write_text(tmp_path / "pose30.txt", "test_0002_aligned.jpg\ntest_0003_aligned.jpg\ntrain_00001.jpg\n")
    p45 = write_text(tmp_path / "pose45.txt", "test_0003_aligned\n")
    ds = build_dataset("rafdb", tmp_path, "test", occlusion_list="occlusion_list.txt", pose30_list=p30,
                       pose45_list=p45)
    masks = ds.subsets()
    assert {k: v.tolist() for k, v in masks.items()} == {"occluded": [True, False, True],
                                                         "pose>30": [False, True, True],
                                                         "pose>45": [False, False, True]}
    assert ds.load(0)["occlusion"] == 4 and ds.load(1)["occlusion"] == 0
    sub = Subset(ds, [2, 0], "test-sub")
    assert sub.subsets()["pose>45"].tolist() == [True, False]
    # an unknown name, a malformed line, a disagreeing label
    for text, frag in (("test_9999_aligned 1 2\n", "not in list_patition_label.txt"),
                       ("test_0001_aligned 6\n", "malformed line"),
                       ("test_0001_aligned 2 4\n", "disagrees")):
        write_text(occ, text)
        assert_error(lambda: build_dataset("rafdb", tmp_path, "test", occlusion_list=occ), "occlusion_list.txt:1",
                     frag)
    assert_error(lambda: build_dataset("rafdb", tmp_path, "test", pose30_list="missing.txt"), "missing.txt",
                 "not found")


# ------------------------------------------------------------------------------------------------ AffectNet
AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,"
                    "valence,arousal")


def make_affectnet_csv(root: Path, rows: list[tuple[str, int]], name: str = "training.csv") -> Path:
    lm = ";".join(f"{10 + i % 20}.5" for i in range(136))
    lines = [AFFECTNET_HEADER]
    for rel, expr in rows:
        lines.append(f'{rel},4,6,20,16,"{lm}",{expr},0.25,-0.5')
        write_image(root / "Manually_Annotated_Images" / rel, size=(32, 32), mode="RGB", fmt="JPEG")
    return write_text(root / name, "\n".join(lines) + "\n")


def test_affectnet_csv_drops_and_face_box(tmp_path):
    rows = [(f"1/img{e}.jpg", e) for e in range(11)]
    make_affectnet_csv(tmp_path, rows)
    ds8 = build_dataset("affectnet", tmp_path, "train")
    assert ds8.class_names == list(LABEL_SPACES["affectnet8"]) and ds8.targets.tolist() == list(range(8))
    assert ds8.dropped == {"none (8)": 1, "uncertain (9)": 1, "no-face (10)": 1}
    ds7 = build_dataset("affectnet7", tmp_path, "train", crop_face=True)
    assert ds7.class_names == list(LABEL_SPACES["affectnet7"]) and len(ds7) == 7
    assert ds7.dropped["contempt (7-class variant)"] == 1 and "dropped" in ds7.describe()
    rec = ds7.records[0]
    assert rec.meta["face_box"] == (4, 6, 20, 16) and rec.meta["valence"] == 0.25
    sample = ds7.load(0)
    assert sample["image"].size == (20, 16) and sample["landmarks"].shape == (68, 2)
    assert sample["landmarks"][0, 0] == pytest.approx(10.5 - 4) and sample["arousal"] == -0.5
    assert ds8.load(0)["image"].size == (32, 32)
    assert_error(lambda: build_dataset("affectnet", tmp_path, "train", num_classes=6), "7 or 8")


def test_affectnet_csv_bad_rows(tmp_path):
    make_affectnet_csv(tmp_path, [("1/a.jpg", 1), ("1/b.jpg", 11), ("1/c.jpg", 2)], "validation.csv")
    assert_error(lambda: build_dataset("affectnet", tmp_path, "test"), "validation.csv:3",
                 "expression 11 out of range 0..10")
    ds = build_dataset("affectnet", tmp_path, "val", skip_bad=True)
    assert len(ds) == 2 and ds.split == "val" and len(ds.skipped) == 1
    make_affectnet_csv(tmp_path, [("1/a.jpg", 1), ("../../x.jpg", 2)], "validation.csv")
    assert_error(lambda: build_dataset("affectnet", tmp_path, "test"), "validation.csv:3", "escapes")


def test_affectnet_npy_layout(tmp_path):
    split = tmp_path / "val_set"
    (split / "annotations").mkdir(parents=True)
    for i, code in enumerate([0, 7, 9, 3]):
        np.save(split / "annotations" / f"{i}_exp.npy", np.array(str(code)))
        np.save(split / "annotations" / f"{i}_val.npy", np.array("0.5"))
        write_image(split / "images" / f"{i}.jpg", fmt="JPEG")
    ds = build_dataset("affectnet", tmp_path, "test", num_classes=7)
    assert ds.targets.tolist() == [0, 3] and ds.dropped == {"contempt (7-class variant)": 1, "uncertain (9)": 1}
    assert ds.load(1)["valence"] == 0.5
    (split / "images" / "3.jpg").unlink()
    assert_error(lambda: build_dataset("affectnet", tmp_path, "test"), "3_exp.npy", "not found")


# ------------------------------------------------------------------------------------------------ CK+, JAFFE, SFEW
def test_ckplus_subjects_and_classes(tmp_path):
    for cls, subj in (("anger", "S005"), ("happy", "S010"), ("contempt", "S005"), ("sadness", "S011")):
        for frame in (11, 12):
            write_image(tmp_path / cls / f"{subj}_001_000000{frame}.png")
    write_text(tmp_path / "manifest.csv", "path\n")
    ds = build_dataset("ck+", tmp_path, "all")
    assert ds.class_names == list(LABEL_SPACES["ckplus"]) and len(ds) == 8
    assert sorted(set(ds.subjects)) == ["S005", "S010", "S011"]
    assert {(Path(r.path).parent.name, r.label) for r in ds.records} == {("anger", 0), ("contempt", 1),
                                                                        ("happy", 4), ("sadness", 5)}
    assert ds.records[0].meta["sequence"] == "S005_001"
    assert ds.load(0)["subject"] == "S005"
    write_image(tmp_path / "neutral" / "S012_001_00000001.png")
    assert build_dataset("ckplus", tmp_path, "all").class_names[-1] == "neutral"
    write_image(tmp_path / "anger" / "img_0001.png")
    assert_error(lambda: build_dataset("ckplus", tmp_path, "all"), "img_0001.png", "subject")
    assert_error(lambda: build_dataset("ckplus", tmp_path, "train"), "unknown split")


def test_jaffe_flat_and_folders(tmp_path):
    flat = tmp_path / "flat"
    for name in ("KA.AN1.39.tiff", "KL.HA2.160.tiff", "YM.NE3.51.tiff"):
        write_image(flat / name, size=(16, 16), fmt="TIFF")
    pal = Image.new("P", (16, 16), 3)
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.save(flat / "KA.SU1.36.tiff")
    ds = build_dataset("jaffe", flat, "all")
    assert ds.class_names == list(LABEL_SPACES["jaffe"])
    assert ds.targets.tolist() == [0, 6, 3, 4] and ds.subjects.tolist() == ["KA", "KA", "KL", "YM"]
    assert ds.load(1)["image"].mode == "RGB" and np.asarray(ds.load(1)["image"]).max() == 3
    nested = tmp_path / "nested"
    write_image(nested / "angry" / "KA.AN1.39.tiff", fmt="TIFF")
    write_image(nested / "happy" / "KM.HA1.4.tiff", fmt="TIFF")
    assert build_dataset("jaffe", nested, "all").targets.tolist() == [0, 3]
    write_image(nested / "sad" / "KM.HA2.5.tiff", fmt="TIFF")
    assert_error(lambda: build_dataset("jaffe", nested, "all"), "KM.HA2.5.tiff", "folder says")
    write_image(flat / "portrait.tiff", fmt="TIFF")
    assert_error(lambda: build_dataset("jaffe", flat, "all"), "portrait.tiff", "file name")
    write_image(flat / "KA.XX1.1.tiff", fmt="TIFF")
    assert len(build_dataset("jaffe", flat, "all", skip_bad=True).skipped) == 2


def test_sfew_capitalised_split_folders(tmp_path):
    for split in ("Train", "Val"):
        for cls in ("Angry", "Happy", "Surprise"):
            write_image(tmp_path / split / cls / "f.png")
    ds = build_dataset("sfew", tmp_path, "train")
    assert {Path(r.path).parent.name: r.label for r in ds.records} == {"Angry": 0, "Happy": 3, "Surprise": 6}
    assert len(build_dataset("sfew", tmp_path, "test")) == 3  # Val serves as test ...
    write_image(tmp_path / "Test" / "unlabelled.png")  # ... even next to SFEW's unlabelled Test folder
    assert [Path(r.path).parent.parent.name for r in build_dataset("sfew", tmp_path, "test").records] == ["Val"] * 3
    assert len(build_dataset("sfew", tmp_path, "all")) == 6


# ------------------------------------------------------------------------------------------------ registry
def test_build_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; known: .*rafdb"):
        build_dataset("mnist", tmp_path, "train")
    with pytest.raises(ValueError, match=r"has no option 'colour'"):
        build_dataset("rafdb", tmp_path, "train", colour=True)
    assert_error(lambda: build_dataset("rafdb", tmp_path / "nope", "train"), "nope", "not found")
    assert {"imagefolder", "fer2013", "ferplus", "rafdb", "affectnet", "ckplus", "jaffe", "sfew"} <= set(ADAPTERS)


# ------------------------------------------------------------------------------------------------ splits
def _subjects(n_subjects: int = 23, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 15, n_subjects)
    subjects = np.repeat([f"S{i:03d}" for i in range(n_subjects)], sizes)
    labels = rng.integers(0, 6, len(subjects))
    return subjects, labels


@pytest.mark.parametrize("with_labels", [False, True])
def test_subject_kfold_no_leakage_balanced_deterministic(with_labels):
    subjects, labels = _subjects()
    lab = labels if with_labels else None
    folds = subject_kfold(subjects, 5, seed=3, labels=lab)
    assert len(folds) == 5
    tests = np.concatenate([t for _, t in folds])
    assert sorted(tests.tolist()) == list(range(len(subjects)))  # every sample tested once
    for train, test in folds:
        assert not set(subjects[train]) & set(subjects[test])
        assert len(train) + len(test) == len(subjects)
    sizes = [len(t) for _, t in folds]
    assert max(sizes) - min(sizes) <= 2 * 14  # within what whole subjects (max 14 samples) allow
    again = subject_kfold(subjects, 5, seed=3, labels=lab)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again))
    other = subject_kfold(subjects, 5, seed=4, labels=lab)
    assert any(len(a[1]) != len(b[1]) or (a[1] != b[1]).any() for a, b in zip(folds, other))


def test_subject_kfold_balance_without_labels_is_tight():
    subjects = np.repeat(np.arange(40), 3)
    sizes = [len(t) for _, t in subject_kfold(subjects, 10, seed=0)]
    assert sizes == [12] * 10
    with pytest.raises(ValueError, match="k must be"):
        subject_kfold(subjects[:6], 3, seed=0)


def test_repeated_subject_kfold():
    subjects, labels = _subjects()
    reps = repeated_subject_kfold(subjects, 4, seed=0, labels=labels, repeats=3)
    assert len(reps) == 3 and all(len(r) == 4 for r in reps)
    assert any((a[1] != b[1]).any() if len(a[1]) == len(b[1]) else True for a, b in zip(reps[0], reps[1]))
    again = repeated_subject_kfold(subjects, 4, seed=0, labels=labels, repeats=3)
    assert all((a[1] == b[1]).all() for r1, r2 in zip(reps, again) for a, b in zip(r1, r2))


def test_holdout_split():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    train, val = holdout_split(labels, 0.2, seed=1)
    assert len(val) == 20 and len(train) == 80 and not set(train) & set(val)
    assert np.bincount(labels[val], minlength=4).tolist() == [10, 6, 3, 1]  # stratified
    assert (holdout_split(labels, 0.2, seed=1)[1] == val).all()
    train, val = holdout_split(37, 0.3, seed=0)
    assert len(val) == 11 and len(train) == 26
    subjects, _ = _subjects()
    train, val = holdout_split(len(subjects), 0.25, seed=0, groups=subjects)
    assert not set(subjects[train]) & set(subjects[val])
    assert abs(len(val) - 0.25 * len(subjects)) <= 14
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(10, 1.5, seed=0)


# ------------------------------------------------------------------------------------------------ noise
def test_inject_label_noise():
    labels = np.random.default_rng(0).integers(0, 7, 1000)
    original = labels.copy()
    noisy, flipped = inject_label_noise(labels, 0.3, 7, seed=5)
    assert len(flipped) == 300 and len(set(flipped.tolist())) == 300
    assert (noisy[flipped] != labels[flipped]).all()
    untouched = np.setdiff1d(np.arange(1000), flipped)
    assert (noisy[untouched] == labels[untouched]).all() and (labels == original).all()
    assert set(noisy[flipped].tolist()) == set(range(7))
    again, flipped2 = inject_label_noise(labels, 0.3, 7, seed=5)
    assert (again == noisy).all() and (flipped2 == flipped).all()
    assert not (inject_label_noise(labels, 0.3, 7, seed=6)[1] == flipped).all()
    assert len(inject_label_noise(labels[:7], 0.25, 7, seed=0)[1]) == 2  # round(1.75)
    assert len(inject_label_noise(labels, 0.0, 7, seed=0)[1]) == 0
    with pytest.raises(ValueError):
        inject_label_noise(labels, 1.2, 7, seed=0)


# ------------------------------------------------------------------------------------------------ real data
def real_root(name: str) -> Path:
    base = Path(os.environ.get("FERKIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not (base / name).is_dir():
        pytest.skip(f"real FER data not found at {base / name}; set FERKIT_DATA")
    return base / name


@pytest.mark.realdata
def test_real_fer2013():
    root = real_root("fer2013")
    train, val = build_dataset("fer2013", root, "train"), build_dataset("fer2013", root, "val")
    assert (len(train), len(val)) == (28709, 3589) and train.num_classes == 7
    assert train.class_names == list(LABEL_SPACES["fer2013"])
    assert np.bincount(train.targets).tolist() == [3995, 436, 4097, 7215, 4830, 3171, 4965]
    sample = val.load(0)
    assert sample["image"].size == (48, 48) and sample["label"] == 0


@pytest.mark.realdata
def test_real_ckplus48_subject_folds():
    ds = build_dataset("ckplus", real_root("ckplus48"), "all", skip_bad=True)
    assert len(ds) == 981 and not ds.skipped and len(set(ds.subjects)) == 118
    assert ds.class_names == list(LABEL_SPACES["ckplus"])
    for train, test in subject_kfold(ds.subjects, 10, seed=0, labels=ds.targets):
        assert not set(ds.subjects[train]) & set(ds.subjects[test])


@pytest.mark.realdata
def test_real_jaffe():
    ds = build_dataset("jaffe", real_root("jaffe"), "all", skip_bad=True)
    assert len(ds) == 213 and not ds.skipped and len(set(ds.subjects)) == 10
    assert ds.load(0)["image"].mode == "RGB"
