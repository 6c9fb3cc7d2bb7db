"""RAF-DB / FERPlus benchmark pieces (issue 15): noisy label lists, FERPlus label modes and layouts, soft targets,
the trunk file, the scaled-geometry CPU presets, preset inheritance and the bf16 default."""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import shared_dataset
from ferkit.config import load_config
from ferkit.data.adapters import build_dataset
from ferkit.data.build import DataSplits
from ferkit.engine import Trainer
from ferkit.engine import trainer as trainer_module
from ferkit.engine.checkpoint import save_part, save_weights
from ferkit.labels import LABEL_SPACES
from ferkit.methods.supervised import Supervised
from ferkit.models import create_model
from test_data_adapters import RAF_LINES, assert_error, make_rafdb, write_image, write_text
from tiny import TinyFaces


# ------------------------------------------------------------------------------------------- RAF-DB noisy lists
def test_rafdb_noise_file_flips_against_the_clean_list(tmp_path):
    root = make_rafdb(tmp_path, RAF_LINES + ["train_00003.jpg 7", "train_00004.jpg 4"])
    # clean train labels (1-based): 5, 1, 7, 4 -> noisy: 5, 3, 7, 6 (images 2 and 4 flipped), listed out of order
    write_text(root / "EmoLabel" / "noise.txt", "train_00004.jpg 6\ntrain_00001.jpg 5\ntrain_00003.jpg 7\n"
                                                "train_00002.jpg 3\n")
    ds = build_dataset("rafdb", root, "train", noise_file="EmoLabel/noise.txt")
    assert ds.targets.tolist() == [4, 2, 6, 5]
    assert ds.clean_targets.tolist() == [4, 0, 6, 3]
    assert np.flatnonzero(ds.targets != ds.clean_targets).tolist() == [1, 3]
    assert (ds.load(1)["label"], ds.load(1)["true_label"]) == (2, 0)  # D3FER scores its corrections on true_label
    assert build_dataset("rafdb", root, "train").clean_targets is None


def test_rafdb_noise_file_errors_name_file_and_line(tmp_path):
    root = make_rafdb(tmp_path, RAF_LINES)
    write_text(root / "EmoLabel" / "other.txt", "train_00001.jpg 5\ntrain_09999.jpg 2\n")
    assert_error(lambda: build_dataset("rafdb", root, "train", noise_file="EmoLabel/other.txt"),
                 "other.txt:2", "train_09999.jpg", "not a training image")
    write_text(root / "EmoLabel" / "short.txt", "train_00001.jpg 5\n")
    assert_error(lambda: build_dataset("rafdb", root, "train", noise_file="EmoLabel/short.txt"),
                 "short.txt", "1 of 2 training images", "train_00002")
    write_text(root / "EmoLabel" / "bad.txt", "train_00001.jpg 5\ntrain_00002.jpg 9\n")
    assert_error(lambda: build_dataset("rafdb", root, "train", noise_file="EmoLabel/bad.txt"), "bad.txt:2", "label 9")
    assert_error(lambda: build_dataset("rafdb", root, "test", noise_file="EmoLabel/short.txt"), "training split")


def test_trainer_records_the_flips_of_a_noise_file(tmp_path):
    root = make_rafdb(tmp_path / "raf", RAF_LINES + ["train_00003.jpg 7", "train_00004.jpg 4"])
    write_text(root / "EmoLabel" / "noise.txt", "train_00001.jpg 5\ntrain_00002.jpg 3\ntrain_00003.jpg 7\n"
                                                "train_00004.jpg 6\n")
    cfg = load_config("resnet18_rafdb_cpu", [f"data.root={root}", "model.pretrained=null", "data.decode_cache=false",
                                             "data.noise.file=EmoLabel/noise.txt", "data.num_workers=0",
                                             "train.epochs=1", "train.batch_size=2", "data.input_size=32",
                                             "train.progress=false", "train.tensorboard=false"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.noisy_indices.tolist() == [1, 3]
    sample = trainer.train_views[(0, 3)]
    assert (sample["label"], sample["true_label"]) == (5, 3)  # the noisy list's label, and the clean one
    record = (tmp_path / "run" / "noise.json").read_text()
    assert '"file": "EmoLabel/noise.txt"' in record and '"flipped_indices": [1, 3]' in record and '"rate": 0.5' in record


def test_noise_file_and_rate_are_exclusive():
    with pytest.raises(Exception, match="data.noise.file"):
        load_config("resnet18_synthetic", ["data.noise.file=x.txt", "data.noise.rate=0.2"])


# ------------------------------------------------------------------------------------------- FERPlus
# (image name, votes: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF)
FERPLUS_GENERATED = [
    ("fer0000000.png", (4, 0, 0, 1, 3, 2, 0, 0, 0, 0)),  # neutral (4 of 10)
    ("fer0000001.png", (0, 9, 0, 0, 0, 0, 0, 1, 0, 0)),  # happiness; 1 contempt vote (an outlier in probability mode)
    ("fer0000002.png", (0, 0, 0, 0, 0, 0, 0, 6, 4, 0)),  # contempt: kept with 8 classes, dropped with 7
    ("fer0000003.png", (5, 5, 0, 0, 0, 0, 0, 0, 0, 0)),  # tie: dropped in majority mode, [.5, .5] in probability
    ("fer0000004.png", (0, 0, 0, 0, 0, 0, 0, 0, 8, 2)),  # unknown: dropped in every mode
    ("fer0000005.png", (0, 0, 3, 0, 0, 0, 7, 0, 0, 0)),  # fear 7 / surprise 3
]


def write_ferplus_generated(root, folder="FER2013Train", rows=FERPLUS_GENERATED):
    lines = []
    for name, votes in rows:
        write_image(root / folder / name, size=(48, 48), fmt="PNG")
        lines.append(f'{name},"(0, 0, 48, 48)",' + ",".join(map(str, votes)))
    write_text(root / folder / "label.csv", "\n".join(lines) + "\n")
    return root


def test_ferplus_generated_layout_majority_8_and_7(tmp_path):
    write_ferplus_generated(tmp_path)
    ds = build_dataset("ferplus", tmp_path, "train")
    assert ds.class_names == list(LABEL_SPACES["ferplus"])
    assert [r.meta["image_name"] for r in ds.records] == ["fer0000000.png", "fer0000001.png", "fer0000002.png",
                                                           "fer0000005.png"]
    assert ds.targets.tolist() == [0, 1, 7, 6]
    assert ds.dropped == {"tie": 1, "unknown majority": 1}
    seven = build_dataset("ferplus", tmp_path, "train", classes=7)
    assert seven.class_names == list(LABEL_SPACES["ferplus"][:7]) and seven.targets.tolist() == [0, 1, 6]
    assert seven.dropped["contempt (7-class set)"] == 1
    assert len(seven.load(0)["soft_label"]) == 7


def test_ferplus_probability_mode_soft_targets(tmp_path):
    write_ferplus_generated(tmp_path)
    ds = build_dataset("ferplus", tmp_path, "train", label_mode="probability")
    names = [r.meta["image_name"] for r in ds.records]
    assert "fer0000003.png" in names and "fer0000004.png" not in names  # a tie is a distribution; unknown is not
    soft = {r.meta["image_name"]: r.meta["soft_label"] for r in ds.records}
    np.testing.assert_allclose(soft["fer0000001.png"], [0, 1, 0, 0, 0, 0, 0, 0])  # the single contempt vote dropped
    np.testing.assert_allclose(soft["fer0000003.png"], [0.5, 0.5, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(soft["fer0000005.png"], [0, 0, 0.3, 0, 0, 0, 0.7, 0], rtol=1e-6)
    for s in soft.values():
        assert abs(float(np.sum(s)) - 1) < 1e-6
    sample = ds.load(names.index("fer0000005.png"))
    assert sample["label"] == 6 and np.allclose(sample["soft_label"], soft["fer0000005.png"])


def test_probability_mode_trains_on_the_vote_distribution(tmp_path):
    write_ferplus_generated(tmp_path)
    write_ferplus_generated(tmp_path, "FER2013Valid")
    cfg = load_config("resnet18_ferplus_trunk", [f"data.root={tmp_path}", "data.decode_cache=false",
                                                 "data.options.label_mode=probability", "method.kwargs.soft_targets=true",
                                                 "method.kwargs.label_smoothing=0", "data.num_workers=0",
                                                 "train.epochs=1", "train.batch_size=5", "data.input_size=32",
                                                 "train.progress=false", "train.tensorboard=false"])
    trainer = Trainer(cfg, tmp_path / "run")
    batch = next(iter(trainer.train_loader))
    assert batch["soft_label"].shape == (5, 8)
    torch.testing.assert_close(batch["soft_label"].sum(1), torch.ones(5))
    assert trainer.fit()["epochs_run"] == 1


def test_ferplus_generated_layout_errors(tmp_path):
    write_ferplus_generated(tmp_path)
    with open(tmp_path / "FER2013Train" / "label.csv", "a") as f:
        f.write('fer0000009.png,"(0, 0, 48, 48)",1,2,3\n')
    assert_error(lambda: build_dataset("ferplus", tmp_path, "train"), "label.csv:7", "5 fields, expected 12")
    assert len(build_dataset("ferplus", tmp_path, "train", skip_bad=True)) == 4
    assert_error(lambda: build_dataset("ferplus", tmp_path, "train", label_mode="soft"), "label_mode")
    assert_error(lambda: build_dataset("ferplus", tmp_path, "train", classes=6), "classes")


def test_soft_target_cross_entropy_matches_the_distribution():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    method = Supervised(model, soft_targets=True)
    x = torch.randn(4, 3, 2, 2)
    soft = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5], [0, 0, 1.0]])
    out = method.training_step({"image": x, "label": soft.argmax(1), "soft_label": soft}, None)
    expected = -(soft * F.log_softmax(model(x), 1)).sum(1).mean()
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="soft labels"):
        method.training_step({"image": x, "label": soft.argmax(1)}, None)


# ------------------------------------------------------------------------------------------- trunk and presets
@pytest.mark.parametrize("name, kwargs", [("resnet18", {}), ("dsan", {}),
                                          ("arm", {"img_size": 64, "kernel_size": 12, "stride": 2})])
def test_trunk_file_fills_every_resnet18_model(tmp_path, name, kwargs):
    source = create_model("resnet18", num_classes=8)
    save_weights(tmp_path / "best.safetensors", source.state_dict(), {"model": "resnet18"})
    meta = save_part(tmp_path / "best.safetensors", tmp_path / "trunk.safetensors", "features.", trunk_of="resnet18")
    assert meta["part_prefix"] == "features." and meta["trunk_of"] == "resnet18"
    model = create_model(name, num_classes=7, pretrained=tmp_path / "trunk.safetensors", **kwargs)
    for k, v in source.state_dict().items():
        if k.startswith("features."):
            torch.testing.assert_close(model.state_dict()[k], v)
    assert model.key_report.acceptable and not model.key_report.unexpected


def test_cpu_presets_scaled_geometry_shapes():
    for preset, dim in (("arm_rafdb_cpu", 121), ("dsan_rafdb_cpu", 128 + 128), ("resnet18_rafdb_cpu", 512)):
        cfg = load_config(preset, check=False)
        assert cfg.data.input_size == 64 and cfg.model.pretrained.endswith("trunk.safetensors")
        model = create_model(cfg.model.name, num_classes=7, **cfg.model.kwargs).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert model.forward_features(x).shape == (2, dim), preset
            assert model(x).shape == (2, 7)
    arm = create_model("arm", img_size=64, kernel_size=12, stride=2)
    assert arm.img_size == 64 and arm.fc.in_features == 121  # the paper's 121-d representation, no resize to 224


def test_child_preset_with_another_method_drops_the_base_kwargs():
    base = load_config("resnet18_rafdb_cpu", check=False)
    d3fer = load_config("d3fer_rafdb_cpu_noise30", check=False)
    assert base.method.kwargs == {"label_smoothing": 0.1}
    assert "label_smoothing" not in d3fer.method.kwargs and d3fer.method.kwargs["momentum"] == 0.95
    assert d3fer.data.noise.file == "EmoLabel/noise03.txt" and d3fer.data.input_size == 64
    assert load_config("dsan_rafdb_cpu", check=False).method.kwargs["label_smoothing"] == 0.1  # restated


# ------------------------------------------------------------------------------------------- bf16 default
@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "off")])
def test_amp_auto_is_bf16_on_native_bf16_cpus_and_logged(tmp_path, monkeypatch, caplog, native, expected):
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: native)
    assert trainer_module.resolve_amp("auto", torch.device("cpu")) == expected
    assert trainer_module.resolve_amp("off", torch.device("cpu")) == "off"
    assert trainer_module.resolve_amp("auto", torch.device("cuda")) == "fp16"
    cfg = load_config("resnet18_synthetic", ["train.epochs=1", "data.input_size=32", "train.progress=false",
                                             "train.tensorboard=false"])
    with caplog.at_level(logging.INFO, logger="ferkit"):
        trainer = Trainer(cfg, tmp_path / "run", splits=DataSplits(TinyFaces(16), TinyFaces(8, split="test")))
    assert trainer.amp_dtype == (torch.bfloat16 if native else None)
    assert f"train.amp=auto -> {expected} on cpu" in caplog.text


def test_native_bf16_detection_can_be_forced(monkeypatch):
    monkeypatch.setenv("FERKIT_CPU_BF16", "1")
    assert trainer_module.cpu_has_native_bf16()
    monkeypatch.setenv("FERKIT_CPU_BF16", "0")
    assert not trainer_module.cpu_has_native_bf16()


# ------------------------------------------------------------------------------------------- real data
def test_real_rafdb_counts_and_standard_noise_files():
    root = shared_dataset("rafdb")
    train, test = build_dataset("rafdb", root, "train"), build_dataset("rafdb", root, "test")
    assert (len(train), len(test)) == (12271, 3068)  # SOURCE.md
    assert np.bincount(train.targets).tolist() == [1290, 281, 717, 4772, 1982, 705, 2524]
    for name, flips in (("noise01.txt", 1241), ("noise02.txt", 2498), ("noise03.txt", 3722)):
        noisy = build_dataset("rafdb", root, "train", noise_file=f"EmoLabel/{name}")
        assert int((noisy.targets != noisy.clean_targets).sum()) == flips, name


def test_real_ferplus_generated_layout_counts():
    root = shared_dataset("ferplus")
    for split, rows in (("train", 28558), ("valid", 3579)):  # SOURCE.md: rows of each label.csv
        ds = build_dataset("ferplus", root, split)
        assert len(ds) + sum(ds.dropped.values()) == rows, split


def test_data_stats_report_noisy_lists_and_protocol_drops(tmp_path):
    from ferkit.analysis.data_stats import split_stats, stats_markdown

    root = make_rafdb(tmp_path / "raf", RAF_LINES)
    write_text(root / "EmoLabel" / "noise.txt", "train_00001.jpg 5\ntrain_00002.jpg 3\n")
    noisy = split_stats(build_dataset("rafdb", root, "train", noise_file="EmoLabel/noise.txt"), hash_images=False)
    assert noisy.flipped == 1 and "1 of 2 (50.00 %) differ from the clean list" in stats_markdown([noisy])
    write_ferplus_generated(tmp_path / "fp")
    votes = split_stats(build_dataset("ferplus", tmp_path / "fp", "train"), hash_images=False)
    assert "6 rows, 2 left out by the protocol (1 tie, 1 unknown majority)" in stats_markdown([votes])


def test_noise_file_on_a_dataset_without_lists_is_one_line():
    from ferkit.data.build import build_splits

    cfg = load_config("resnet18_fer2013", ["data.noise.file=x.txt"])
    with pytest.raises(ValueError, match="data.noise.file: dataset 'fer2013' has no published noisy label lists"):
        build_splits(cfg.data)
