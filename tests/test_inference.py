"""Inference for people: face detection / alignment, the Predictor on crops and photos, bad inputs, `ferkit predict`
(folders, resume, JSON lines, annotation), `ferkit faces`, video.

Faces come from ferkit's synthetic renderer (both detectors find them, and they carry ground-truth landmarks);
JAFFE photos (real faces) are used when FERKIT_DATA has them.
"""
from __future__ import annotations

import csv
import json
import math
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ferkit.cli import main
from ferkit.engine.checkpoint import save_weights
from ferkit.inference import Predictor
from ferkit.inference.faces import (Face, HaarDetector, align_face, alignment_matrix, make_detector,
                                    mediapipe_available, transform_points, MESH_TO_IBUG68)
from ferkit.labels import class_names_for

needs_mediapipe = pytest.mark.skipif(not mediapipe_available(), reason="mediapipe not installed (ferkit[faces])")


# ------------------------------------------------------------------------------------------------------ helpers
def make_tiny_checkpoint(path: Path, size: int = 32, model: str = "resnet18", seed: int = 0) -> Path:
    """A randomly initialised checkpoint with full inference metadata (no training: faster, and inference must
    not care what the weights learnt)."""
    from ferkit.models import create_model

    torch.manual_seed(seed)
    names = class_names_for("fer2013")
    net = create_model(model, num_classes=len(names))
    meta = {"format": 1, "model": model, "model_kwargs": {}, "num_classes": len(names), "class_names": names,
            "input_size": [3, size, size], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "grayscale": False, "modalities": ["image"]}
    save_weights(path, net.state_dict(), meta)
    return path


def synthetic_faces(n: int, size: int = 160, seed: int = 0) -> list[dict]:
    """Near-frontal, unoccluded synthetic faces with ground-truth landmarks."""
    from ferkit.data.synthetic import SyntheticConfig, SyntheticFaces

    cfg = SyntheticConfig(size=size, num_subjects=max(1, n), samples_per_subject=1, occlusion_prob=0.0,
                          pose_max_yaw=15, pose_max_pitch=10, seed=seed)
    ds = SyntheticFaces("test", cfg)
    return [ds.load(i) for i in range(n)]


def haar_detected_faces(n: int, size: int = 160) -> list[Image.Image]:
    """The first ``n`` synthetic faces on which Haar finds exactly one face (deterministic)."""
    det, out = HaarDetector(), []
    for sample in synthetic_faces(3 * n, size):
        if len(det.detect(sample["image"])) == 1:
            out.append(sample["image"])
        if len(out) == n:
            return out
    raise AssertionError("too few synthetic faces found by Haar")


def blank_image(size: int = 160) -> Image.Image:
    ramp = np.tile(np.linspace(0, 255, size).astype(np.uint8), (size, 1))
    return Image.fromarray(ramp).convert("RGB")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """3 faces (one in a sub-folder), a blank picture, a corrupt JPEG."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, im in enumerate(haar_detected_faces(3)):
        im.save(root / ("sub" if i == 2 else ".") / f"face{i}.png")
    blank_image().save(root / "blank.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)  # JPEG magic, then nothing
    return root


# ------------------------------------------------------------------------------------------------------ alignment
def test_alignment_levels_the_eyes_and_centres_the_box():
    face = Face(box=(40, 50, 120, 130), eyes=((60, 80), (100, 100)))  # eye line tilted by atan(20/40)
    m = alignment_matrix(face, size=64, margin=0.25)
    eyes = transform_points(face.eyes, m)
    assert eyes[0, 1] == pytest.approx(eyes[1, 1], abs=1e-9)  # level
    assert eyes[0, 0] < eyes[1, 0]  # not mirrored
    assert transform_points([(80, 90)], m)[0] == pytest.approx((32, 32))  # box centre -> crop centre
    # uniform scale: box side 80 * (1 + 2 * 0.25) = 120 source pixels -> 64 crop pixels
    assert math.hypot(m[0, 0], m[0, 1]) == pytest.approx(64 / 120)
    # eye distance scales by the same factor
    assert np.linalg.norm(eyes[1] - eyes[0]) == pytest.approx(math.hypot(40, 20) * 64 / 120)


def test_align_face_crop_content_and_antialiased_downscale():
    """A white square on black: the crop shows it where the matrix says, also through the shrink-first path."""
    arr = np.zeros((1000, 1000, 3), np.uint8)
    arr[400:600, 400:600] = 255
    face = Face(box=(300, 300, 700, 700))  # no eyes: upright crop
    crop = np.asarray(align_face(arr, face, 40, margin=0.0).image)  # scale 0.1 -> area-averaged first
    assert crop.shape == (40, 40, 3)
    assert crop[20, 20].min() == 255 and crop[2, 2].max() == 0  # square centre white, corner black
    assert crop[:, :, 0].mean() == pytest.approx(255 * 0.25, rel=0.05)  # 200^2 of 400^2 is white


def test_mesh_to_ibug_table_is_68_points_of_the_mesh():
    assert len(MESH_TO_IBUG68) == 68
    assert all(0 <= v < 468 for pts in MESH_TO_IBUG68 for v in pts)


# ------------------------------------------------------------------------------------------------------ detectors
def test_haar_finds_synthetic_faces_and_their_eyes():
    samples = synthetic_faces(8)
    det = HaarDetector()
    found = [det.detect(s["image"]) for s in samples]
    assert sum(bool(f) for f in found) >= 6
    for s, faces in zip(samples, found):
        if not faces:
            continue
        gt = np.asarray(s["landmarks"])
        x0, y0, x1, y1 = faces[0].box
        nose = gt[30]
        assert x0 < nose[0] < x1 and y0 < nose[1] < y1  # the box is on the face
    assert det.detect(blank_image()) == []


@needs_mediapipe
def test_mediapipe_mesh_landmarks_match_synthetic_ground_truth():
    """iBUG-68 from the face mesh vs the renderer's landmarks: NME (inter-ocular) < 0.1; eyes and mouth < 0.05.
    (Measured on 30 faces: 0.057 overall, eyes 0.022, mouth 0.023, jaw 0.125 — MediaPipe's jaw is a contour.)"""
    from ferkit.inference.faces import FaceMeshLandmarks

    mesh = FaceMeshLandmarks()
    errs = []
    for s in synthetic_faces(6, size=224):
        lm = mesh.detect68(s["image"])
        assert lm is not None and lm.shape == (68, 2)
        gt = np.asarray(s["landmarks"])
        errs.append(np.linalg.norm(lm - gt, axis=1) / np.linalg.norm(gt[36] - gt[45]))
    errs = np.mean(errs, axis=0)
    assert errs.mean() < 0.1
    assert errs[36:48].mean() < 0.05 and errs[48:68].mean() < 0.05
    assert mesh.detect68(blank_image()) is None


@needs_mediapipe
def test_mediapipe_detector_boxes_eyes_and_landmarks():
    det = make_detector("mediapipe", landmarks=True)
    s = synthetic_faces(1, size=224)[0]
    faces = det.detect(s["image"])
    assert len(faces) == 1 and 0.5 <= faces[0].score <= 1
    gt = np.asarray(s["landmarks"])
    (lx, ly), (rx, ry) = faces[0].eyes
    iod = np.linalg.norm(gt[36:42].mean(0) - gt[42:48].mean(0))
    assert np.linalg.norm((lx - gt[36:42, 0].mean(), ly - gt[36:42, 1].mean())) < 0.1 * iod
    assert faces[0].landmarks.shape == (68, 2)
    assert det.detect(blank_image()) == []


def test_detectors_on_real_photos(real_data_root):
    """JAFFE (real 256x256 photos, one face each; every 10th of 213): Haar and MediaPipe find a face in all."""
    files = sorted((real_data_root / "jaffe").rglob("*.tiff"))
    if not files:
        pytest.skip("no JAFFE photos under FERKIT_DATA/jaffe")
    backends = ["haar"] + (["mediapipe"] if mediapipe_available() else [])
    for backend in backends:
        det = make_detector(backend)
        hits = sum(len(det.detect(Image.open(f).convert("RGB"))) >= 1 for f in files[::10])
        assert hits == len(files[::10]), backend


def test_missing_or_wrong_mediapipe_says_how_to_install(monkeypatch):
    from ferkit.inference.faces import FaceBackendError

    monkeypatch.setitem(sys.modules, "mediapipe", None)  # `import mediapipe` raises ImportError
    with pytest.raises(FaceBackendError, match=r'pip install -e "\.\[faces\]"') as missing:
        make_detector("mediapipe")
    assert "numpy<2" in str(missing.value) and "--detector haar" in str(missing.value)
    monkeypatch.setitem(sys.modules, "mediapipe", types.SimpleNamespace(__version__="1.2.2"))  # no solutions API
    with pytest.raises(FaceBackendError, match="mediapipe 1.2.2 has no face solutions.*0.10.21"):
        make_detector("mediapipe")


# ------------------------------------------------------------------------------------------------------ predictor
def test_predictor_on_crops_is_batch_invariant(ckpt):
    faces = [s["image"] for s in synthetic_faces(5, size=48)]
    one = Predictor.from_checkpoint(ckpt, batch_size=1)
    many = Predictor.from_checkpoint(ckpt, batch_size=4)
    a = [r[0] for r in one.predict(faces)]
    b = [r[0] for r in many.predict(faces)]
    for x, y in zip(a, b):
        assert x.label == y.label and x.box == (0, 0, 48, 48) and x.face is None
        np.testing.assert_allclose(list(x.probs.values()), list(y.probs.values()), atol=1e-5)
        assert sum(x.probs.values()) == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(one.predict_images(faces), [list(p.probs.values()) for p in a], atol=1e-6)


def test_predictor_runs_conv_nets_channels_last_with_unchanged_answers(ckpt, tmp_path):
    from ferkit.inference.predictor import load_checkpoint_model

    pred = Predictor.from_checkpoint(ckpt)
    assert pred.memory_format == torch.channels_last
    faces = [s["image"] for s in synthetic_faces(3, size=48)]
    batch = torch.stack([pred.preprocess(im) for im in faces])
    reference, _ = load_checkpoint_model(ckpt)  # NCHW, autograd on: the plain PyTorch answer
    expected = reference(batch).softmax(1).detach().numpy()
    np.testing.assert_allclose(pred.predict_images(faces), expected, atol=1e-5)
    # one path, as a user's loop passes it, is one input (not a sequence of characters)
    faces[0].save(tmp_path / "one.png")
    (single,) = pred.predict(str(tmp_path / "one.png"))
    np.testing.assert_allclose(list(single[0].probs.values()), expected[0], atol=1e-5)
    assert [len(r) for r in pred.predict([tmp_path / "one.png", faces[1]])] == [1, 1]


def test_predictor_detects_and_reports_every_bad_input(ckpt, photo_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "fake.png").write_text("<html>not a png</html>")
    pred = Predictor.from_checkpoint(ckpt, faces="detect", detector="haar", batch_size=2)
    from ferkit.inference.predictor import iter_image_files

    paths = [*iter_image_files([photo_dir]), tmp_path / "notes.txt", tmp_path / "fake.png", tmp_path / "gone.png"]
    rows = {Path(r.path).name: r for r in pred.predict_paths(paths)}
    assert {k: v.status for k, v in rows.items()} == {
        "blank.png": "no_face", "broken.jpg": "unreadable", "face0.png": "ok", "face1.png": "ok", "face2.png": "ok",
        "notes.txt": "unsupported", "fake.png": "unreadable", "gone.png": "unreadable"}
    assert "no face" in rows["blank.png"].error and "not found" in rows["gone.png"].error
    assert "unsupported format '.txt'" in rows["notes.txt"].error
    ok = rows["face0.png"]
    assert ok.label in pred.class_names and ok.face == 0 and ok.score is not None
    x0, y0, x1, y1 = ok.box
    assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 160
    # a face read from a path, an array and a PIL image: the same answer
    im = Image.open(photo_dir / "face0.png").convert("RGB")
    per_input = pred.predict([photo_dir / "face0.png", np.asarray(im), im])
    for r in per_input[1:]:
        np.testing.assert_allclose(list(r[0].probs.values()), list(per_input[0][0].probs.values()), atol=1e-5)


def test_predictor_refuses_rgbd_checkpoints(ckpt):
    from ferkit.engine.checkpoint import CheckpointError, load_weights
    from ferkit.models import create_model

    state, meta = load_weights(ckpt)
    with pytest.raises(CheckpointError, match="depth"):
        Predictor(create_model("resnet18", num_classes=7), {**meta, "modalities": ["image", "depth"]})


def test_predict_frame(ckpt, photo_dir):
    pd = pytest.importorskip("pandas")
    pred = Predictor.from_checkpoint(ckpt, faces="detect", detector="haar")
    df = pred.predict_frame(sorted(photo_dir.rglob("*.*")))
    assert isinstance(df, pd.DataFrame) and len(df) == 5
    assert (df["status"] == "ok").sum() == 3
    ok = df[df["status"] == "ok"]
    np.testing.assert_allclose(ok[[f"p_{c}" for c in pred.class_names]].sum(axis=1), 1, atol=1e-4)


# ------------------------------------------------------------------------------------------------------ CLI
def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_predict_folder_resumes_and_annotates(ckpt, photo_dir, tmp_path):
    out, ann = tmp_path / "pred.csv", tmp_path / "annotated"
    args = ["predict", str(ckpt), str(photo_dir), "--out", str(out), "--faces", "detect", "--detector", "haar",
            "--batch-size", "2", "--annotate", str(ann)]
    assert main(args) == 0
    rows = _csv(out)
    assert len(rows) == 5 and sum(r["status"] == "ok" for r in rows) == 3
    assert (ann / "sub" / "face2.jpg").is_file() and (ann / "blank.jpg").is_file()
    assert not (ann / "broken.jpg").exists()
    # annotation draws the box: the annotated picture differs from the source along the box edge
    src = np.asarray(Image.open(photo_dir / "face0.png").convert("RGB"), dtype=np.int16)
    drawn = np.asarray(Image.open(ann / "face0.jpg"), dtype=np.int16)
    r = next(r for r in rows if r["path"].endswith("face0.png"))
    y1, xs = int(r["y1"]), slice(int(r["x0"]), int(r["x1"]))
    assert np.abs(drawn[y1, xs] - src[y1, xs]).mean() > 30
    # resume: cut the output after two images (and a torn line), rerun, the rest is appended once
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:10])
    assert main(args) == 0
    again = _csv(out)
    assert sorted(r["path"] for r in again) == sorted(r["path"] for r in rows)
    assert main(args) == 0 and len(_csv(out)) == 5  # nothing new to do


def test_cli_predict_jsonl_with_crops(ckpt, tmp_path):
    for i, s in enumerate(synthetic_faces(3, size=40)):
        s["image"].save(tmp_path / f"c{i}.png")
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(ckpt), str(tmp_path), "--faces", "none", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["c0.png", "c1.png", "c2.png"]
    assert all(r["status"] == "ok" and [r["x0"], r["y0"], r["x1"], r["y1"]] == [0, 0, 40, 40] for r in rows)


def test_cli_faces_aligns_a_dataset_and_resumes(photo_dir, tmp_path):
    out = tmp_path / "crops"
    args = ["faces", str(photo_dir), str(out), "--size", "48", "--detector", "haar"]
    assert main(args) == 0
    manifest, missing = _csv(out / "manifest.csv"), _csv(out / "no_face.csv")
    assert sorted(r["source"] for r in manifest) == ["face0.png", "face1.png", "sub/face2.png"]
    assert {r["source"]: r["status"] for r in missing} == {"blank.png": "no_face", "broken.jpg": "unreadable"}
    crop = Image.open(out / manifest[-1]["crop"])
    assert crop.size == (48, 48) and manifest[-1]["crop"] == "sub/face2_f0.png"
    assert main(args) == 0  # resumed: nothing repeated
    assert len(_csv(out / "manifest.csv")) == 3 and len(_csv(out / "no_face.csv")) == 2


def test_cli_errors_are_one_line(ckpt, tmp_path, capsys):
    assert main(["predict", str(ckpt)]) == 2
    assert "nothing to predict" in capsys.readouterr().err
    assert main(["faces", str(tmp_path / "absent"), str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ video
def _write_video(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> None:
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()


def test_video_per_frame_csv_and_annotated_mp4(ckpt, tmp_path):
    face = np.asarray(haar_detected_faces(1)[0])
    frames = [face] * 4 + [np.asarray(blank_image())] * 3  # 7 frames: a face, then none
    _write_video(tmp_path / "clip.mp4", frames)
    assert main(["predict", str(ckpt), str(tmp_path / "clip.mp4"), "--detector", "haar", "--stride", "2",
                 "--annotate", str(tmp_path / "ann")]) == 0
    rows = _csv(tmp_path / "ann" / "clip.frames.csv")
    assert [int(r["frame"]) for r in rows] == [0, 2, 4, 6]
    assert [r["status"] for r in rows] == ["ok", "ok", "no_face", "no_face"]
    assert float(rows[1]["time_s"]) == pytest.approx(2 / 5.0)
    cap = cv2.VideoCapture(str(tmp_path / "ann" / "clip.mp4"))
    n, first = 0, None
    while True:
        ok, f = cap.read()
        if not ok:
            break
        first = f if first is None else first
        n += 1
    assert n == 7 and first.shape[:2] == face.shape[:2]
    # the first frame carries a drawn box: it differs from the source along the box's top edge
    x0, y0, x1 = int(rows[0]["x0"]), int(rows[0]["y0"]), int(rows[0]["x1"])
    src_row = face[y0, x0:x1].astype(int)
    assert np.abs(cv2.cvtColor(first, cv2.COLOR_BGR2RGB)[y0, x0:x1].astype(int) - src_row).mean() > 30


def test_video_that_cannot_be_opened_is_an_error(ckpt, tmp_path, capsys):
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    assert main(["predict", str(ckpt), str(tmp_path / "bad.mp4"), "--detector", "haar",
                 "--frames-dir", str(tmp_path)]) == 2
    assert "cannot open video" in capsys.readouterr().err


@needs_mediapipe
def test_cli_predict_landmarks_in_json_lines(ckpt, photo_dir, tmp_path):
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(ckpt), str(photo_dir / "face0.png"), "--landmarks", "--out", str(out)]) == 0
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    pts = np.asarray(row["landmarks"])
    assert pts.shape == (68, 2)
    assert row["x0"] - 10 <= pts[:, 0].min() and pts[:, 0].max() <= row["x1"] + 10  # on the detected face


def test_cli_landmarks_need_mediapipe(ckpt, photo_dir, capsys):
    assert main(["predict", str(ckpt), str(photo_dir), "--landmarks", "--detector", "haar"]) == 2
    assert "--landmarks needs the mediapipe detector" in capsys.readouterr().err
