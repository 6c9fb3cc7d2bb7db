"""The built-in model and the offline weight registry (issue 16): names -> files -> models with their metadata,
predict / serve without a run directory, face crops recognised as crops, the synthetic-domain warning, cross-dataset
evaluation by class name."""
from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ferkit.cli import main
from ferkit.engine.checkpoint import read_metadata
from ferkit.engine.evaluate import ClassSelect
from ferkit.inference import Predictor
from ferkit.inference.cli import split_model_and_paths
from ferkit.inference.predictor import domain_warning, looks_like_crop
from ferkit.models import DEFAULT_WEIGHTS, create_model, list_weights, resolve_weights
from ferkit.models.weights import BUILTIN_DIR, WeightsNotFound
from test_inference import make_tiny_checkpoint

FER7 = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]


# ------------------------------------------------------------------------------------------- the shipped weights
def test_builtin_weights_file_metadata_and_output_shape():
    path = resolve_weights(DEFAULT_WEIGHTS)
    assert path.parent == BUILTIN_DIR and path.suffix == ".safetensors"
    assert path.stat().st_size < 25 * 2**20  # the package budget
    meta = read_metadata(path)
    assert meta["model"] == "resnet18" and meta["class_names"] == FER7 and meta["num_classes"] == 7
    assert meta["input_size"] == [3, 64, 64] and len(meta["mean"]) == 3 and len(meta["std"]) == 3
    card = meta["card"]
    assert "research" in card["licence"] and "make_builtin_model.py" in card["recipe"]
    assert (BUILTIN_DIR / "resnet18-fer7.md").is_file()
    model = create_model("resnet18", num_classes=7, pretrained=DEFAULT_WEIGHTS).eval()
    assert model.key_report.clean
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
    names = [w["name"] for w in list_weights()]
    assert DEFAULT_WEIGHTS in names


def test_predictor_from_pretrained_classifies_a_crop():
    pred = Predictor.from_pretrained()
    assert pred.class_names == FER7 and pred.faces == "auto" and pred.domain_warning is None
    rows = pred.predict(Image.new("RGB", (48, 48), (120, 110, 100)))[0]
    assert len(rows) == 1 and rows[0].source == "crop" and abs(sum(rows[0].probs.values()) - 1) < 1e-4


# ------------------------------------------------------------------------------------------- the registry
def test_user_weights_by_path_and_under_the_environment_folder(tmp_path, monkeypatch):
    own = make_tiny_checkpoint(tmp_path / "mine.safetensors")
    assert resolve_weights(own) == own
    monkeypatch.setenv("FERKIT_WEIGHTS", str(tmp_path))
    assert resolve_weights("mine") == own and resolve_weights("ferkit:mine") == own
    assert any(w["name"] == "ferkit:mine" and w["origin"] == "user" for w in list_weights())
    assert Predictor.from_pretrained("ferkit:mine").class_names == FER7
    with pytest.raises(WeightsNotFound, match="ferkit:nope: no built-in weights") as info:
        resolve_weights("ferkit:nope")
    assert "\n" not in str(info.value) and DEFAULT_WEIGHTS in str(info.value)
    monkeypatch.delenv("FERKIT_WEIGHTS")
    with pytest.raises(WeightsNotFound, match="weights file not found"):
        resolve_weights("mine")


def test_ferkit_models_lists_the_builtin_weights(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and DEFAULT_WEIGHTS in out and "built-in" in out


# ------------------------------------------------------------------------------------------- predict without a run
def test_predict_first_argument_is_a_model_only_when_it_names_one(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    photos = tmp_path / "photos"
    photos.mkdir()
    assert split_model_and_paths(str(run), [str(photos)]) == (str(run), [str(photos)])
    assert split_model_and_paths("ferkit:resnet18-fer7", ["a.jpg"]) == ("ferkit:resnet18-fer7", ["a.jpg"])
    assert split_model_and_paths(str(photos), ["b.jpg"]) == (DEFAULT_WEIGHTS, [str(photos), "b.jpg"])
    assert split_model_and_paths("a.jpg", []) == (DEFAULT_WEIGHTS, ["a.jpg"])


def test_cli_predict_with_no_run_dir_uses_the_builtin_model(tmp_path, capsys):
    for i in range(3):
        Image.fromarray(np.full((48, 48), 60 * i + 40, np.uint8)).save(tmp_path / f"crop{i}.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(tmp_path / "crop0.png"), str(tmp_path / "crop1.png"), str(tmp_path / "crop2.png"),
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out, newline="")))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"} and {r["source"] for r in rows} == {"crop"}
    assert {r["label"] for r in rows} <= set(FER7)
    err = capsys.readouterr().err
    assert "3 images, 0 faces detected in 0, 3 taken as face crops, 0 without a face" in err


# ------------------------------------------------------------------------------------------- crops vs photos
class CountingDetector:
    name = "counting"

    def __init__(self):
        self.calls = 0

    def detect(self, image):
        self.calls += 1
        return []


@pytest.mark.parametrize("size, crop", [((48, 48), True), ((100, 100), True), ((143, 181), True),
                                        ((192, 160), True), ((256, 256), False), ((640, 480), False),
                                        ((180, 60), False)])
def test_crop_sized_images_are_recognised(size, crop):
    assert looks_like_crop(size) is crop


def test_auto_mode_takes_crops_whole_and_detects_photos(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "t.safetensors")
    det = CountingDetector()
    pred = Predictor.from_checkpoint(ckpt, faces="auto", detector=det)
    small, photo = Image.new("RGB", (100, 100)), Image.new("RGB", (400, 300))
    crop_rows, photo_rows = pred.predict([small, photo])
    assert det.calls == 1  # only the photo went to the detector
    assert crop_rows[0].source == "crop" and crop_rows[0].status == "ok" and crop_rows[0].box == (0, 0, 100, 100)
    assert photo_rows[0].status == "no_face" and photo_rows[0].source is None
    assert pred.summary() == "2 images, 0 faces detected in 0, 1 taken as face crops, 1 without a face"
    detect_only = Predictor.from_checkpoint(ckpt, faces="detect", detector=CountingDetector())
    assert detect_only.predict(small)[0][0].status == "no_face"  # detect mode never guesses


# ------------------------------------------------------------------------------------------- domain warning
def test_a_synthetic_model_warns_on_predict_and_serve(tmp_path, caplog):
    ckpt = make_tiny_checkpoint(tmp_path / "t.safetensors")
    assert domain_warning({"dataset": "rafdb"}) is None
    model = create_model("resnet18", num_classes=7)
    meta = {**read_metadata(ckpt), "dataset": "synthetic"}
    with caplog.at_level(logging.WARNING, logger="ferkit"):
        pred = Predictor(model, meta)
    assert "synthetic faces" in pred.domain_warning and "synthetic faces" in caplog.text
    from ferkit.inference.serve import PredictService, ServeConfig

    service = PredictService(pred, ServeConfig())
    assert "synthetic" in service.info()["warning"]
    assert "synthetic" in service.predict(Image.new("RGB", (48, 48)))["warning"]


# ------------------------------------------------------------------------------------------- cross-dataset eval
def test_class_select_reorders_outputs_by_name():
    net = torch.nn.Linear(2, 3)
    picked = ClassSelect(net, [2, 0])
    x = torch.randn(4, 2)
    torch.testing.assert_close(picked(x), net(x)[:, [2, 0]])


def test_cli_eval_across_datasets_maps_classes_by_name(tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "t.safetensors")  # 7 classes in FER2013 order
    for folder, n in (("happy", 3), ("sad", 2), ("contempt", 4)):
        (tmp_path / "data" / "test" / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (20 * i, 90, 40)).save(tmp_path / "data" / "test" / folder / f"{i}.png")
    assert main(["eval", str(ckpt), "data.dataset=imagefolder", f"data.root={tmp_path / 'data'}",
                 "--config", "resnet18_synthetic", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "cross-dataset evaluation" in out[0] and "['contempt'] left out" in out[0]
    import json

    metrics = json.loads(out[-1])
    assert metrics["n"] == 5 and len(metrics["per_class"]) == 2  # happy + sad; the 4 contempt images left out


def test_predict_shows_progress_on_a_terminal_only(monkeypatch):
    import sys

    from ferkit.inference import cli as inference_cli

    items = [1, 2, 3]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert inference_cli._progress(items, 3, "images") is items  # logs and pipes stay clean
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = inference_cli._progress(items, 3, "images")
    assert bar is not items and list(bar) == items and bar.total == 3
    assert inference_cli._progress(items, 1, "images", enabled=False) is items


def test_mixture_maps_every_part_into_one_label_space(tmp_path):
    from ferkit.data.mixture import build_mixture

    for part, folders in (("a", ("happy", "sad")), ("b", ("contempt", "sadness", "happiness"))):
        for folder in folders:
            (tmp_path / part / "train" / folder).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / part / "train" / folder / "0.png")
    parts = [{"dataset": "imagefolder", "root": str(tmp_path / "a"), "splits": {"train": "train"}},
             {"dataset": "imagefolder", "root": str(tmp_path / "b"), "splits": {"train": "train", "test": "train"}}]
    mix = build_mixture(parts, "fer2013", "train")
    assert mix.class_names == FER7 and len(mix) == 4  # b's contempt has no place in the 7 classes: left out
    assert sorted(mix.targets.tolist()) == [3, 3, 4, 4]  # happiness, sadness in FER2013 order
    assert mix.dropped == {"imagefolder: contempt (not in the target classes)": 1}
    assert set(mix.subsets()) == {"part=imagefolder"}  # one mask per part name (both parts are image folders)
    assert [mix.load(i)["label"] for i in range(4)] == mix.targets.tolist()
    assert len(build_mixture(parts, "fer2013", "test")) == 2  # only part b has a test split
