"""Every registered model: build, forward + backward on a tiny input, strict save/load round trip."""
import pytest
import torch
import torchvision

from ferkit import create_model, list_models, model_info
from ferkit.analysis.profile import profile_model
from ferkit.models import CheckpointMismatchError


def _tiny_input(name: str, batch: int = 2):
    info = model_info(name)
    size = max(32, min(info.input_size[-1], 64))
    x = torch.randn(batch, 3, size, size)
    extra = {"depth": torch.randn(batch, 1, size, size)} if "depth" in info.modalities else {}
    return x, extra


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_and_roundtrip(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    x, extra = _tiny_input(name)
    model.train()
    out = model(x, **extra)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert any(p.grad is not None for p in model.parameters())
    model.eval()
    feats = model.forward_features(x, **extra)
    assert feats.ndim == 2 and feats.shape[0] == 2
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    again = create_model(name, num_classes=5, pretrained=path)
    assert again.key_report.clean
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x, **extra), model(x, **extra))


def test_resnet18_matches_dsan_table1():
    row = profile_model("resnet18")
    assert abs(row["params_m"] - 11.18) / 11.18 < 0.005
    assert abs(row["macs_g"] - 1.81856) / 1.81856 < 0.005


def test_torchvision_and_msceleb_trunk_files(tmp_path):
    tv = torchvision.models.resnet18(weights=None).state_dict()  # ImageNet-format file (1000-class fc)
    torch.save(tv, tmp_path / "resnet18_imagenet.pth")
    m = create_model("resnet18", num_classes=7, pretrained=tmp_path / "resnet18_imagenet.pth")
    assert not m.key_report.missing and not m.key_report.unexpected
    assert set(m.key_report.new_classifier) == {"fc.weight", "fc.bias"}
    torch.testing.assert_close(m.features[0].weight, tv["conv1.weight"])
    torch.testing.assert_close(m.features[7][1].bn2.running_var, tv["layer4.1.bn2.running_var"])

    # DAN's MS-Celeb file: {'state_dict': torchvision keys}, here with a DataParallel prefix too
    ms = {"state_dict": {f"module.{k}": v for k, v in tv.items()}}
    torch.save(ms, tmp_path / "resnet18_msceleb.pth")
    m2 = create_model("resnet18", num_classes=7, pretrained=tmp_path / "resnet18_msceleb.pth")
    torch.testing.assert_close(m2.features[4][0].conv1.weight, tv["layer1.0.conv1.weight"])


def test_trunk_file_reports_the_fresh_head_as_missing(tmp_path):
    """A trunk-only file into a model with a head of its own (layers.resnet.trunk_checkpoint_filter): the head keys
    are reported as missing (``kept_fresh``: absent by design) and keep their initialisation; the strict load passes,
    but a trunk key missing from the file still fails it."""
    tv = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(tv, tmp_path / "trunk.pth")
    torch.manual_seed(0)
    fresh = create_model("arm", num_classes=7).state_dict()
    torch.manual_seed(0)
    m = create_model("arm", num_classes=7, pretrained=tmp_path / "trunk.pth")
    r = m.key_report
    head = [k for k in m.state_dict() if k.startswith("arm.") and not k.endswith("num_batches_tracked")]
    assert r.missing == r.kept_fresh == head and not r.unexpected and not r.shape_mismatch
    assert not r.clean and r.acceptable
    assert any("by design" in line and "arm.alpha" in line for line in r.lines())
    for k in head:
        torch.testing.assert_close(m.state_dict()[k], fresh[k])
    torch.testing.assert_close(m.features[0].weight, tv["conv1.weight"])

    del tv["layer1.0.conv1.weight"]
    torch.save(tv, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): features\.4\.0\.conv1\.weight"):
        create_model("arm", num_classes=7, pretrained=tmp_path / "partial.pth")
    r = create_model("arm", num_classes=7, pretrained=tmp_path / "partial.pth", strict=False).key_report
    assert r.missing == ["features.4.0.conv1.weight", *head] and r.kept_fresh == head and not r.acceptable


def test_mismatches_are_reported_not_dropped(tmp_path):
    state = create_model("resnet18", num_classes=7).state_dict()
    state["extra.weight"] = torch.zeros(3)
    state["features.0.weight"] = torch.zeros(64, 3, 3, 3)
    del state["features.1.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        create_model("resnet18", num_classes=7, pretrained=tmp_path / "bad.pth")
    msg = str(e.value)
    assert "extra.weight" in msg and "features.0.weight" in msg and "features.1.bias" in msg
    m = create_model("resnet18", num_classes=7, pretrained=tmp_path / "bad.pth", strict=False)
    r = m.key_report
    assert r.unexpected == ["extra.weight"] and r.missing == ["features.1.bias"]
    assert r.shape_mismatch[0][0] == "features.0.weight"


def test_unsafe_or_broken_weight_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointMismatchError, match="weights-only"):
        create_model("resnet18", pretrained=tmp_path / "evil.pth")
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointMismatchError, match="trunc.pth"):
        create_model("resnet18", pretrained=tmp_path / "trunc.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("resnet18", pretrained=tmp_path / "nope.pth")
