"""Seed 002 (RGB + depth): LANet attention, the rgbd_cmsa model and its ablations, Savchenko weight loading, paired
augmentation, the RGB-D readers on files written here in the published formats, the protocols and per-fold z-score.
"""
import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ferkit.config import load_config
from ferkit.data.base import DataError, FaceDataset, FaceRecord
from ferkit.layers import MultiLANet
from ferkit.models import CheckpointMismatchError, create_model

SMALL = {"embed_dim": 32, "num_heads": 2, "head_hidden": 16, "img_size": 64}


# ----------------------------------------------------------------------------------------------------- model
def test_lanet_mask_is_the_max_of_s_sigmoid_maps():
    torch.manual_seed(0)
    att = MultiLANet(16, num_maps=4, reduction=8).eval()
    x = torch.randn(2, 16, 5, 5)
    maps, mask = att.attention_maps(x), att(x)
    assert maps.shape == (2, 4, 5, 5) and mask.shape == (2, 1, 5, 5)
    assert torch.equal(mask, maps.max(dim=1, keepdim=True).values)
    assert ((maps > 0) & (maps < 1)).all()
    lanet = att.maps[0]  # Conv1x1(C -> C/r) + BN + ReLU + Conv1x1(-> 1) + BN + Sigmoid (SPEC 3.6)
    assert lanet.conv1.weight.shape == (2, 16, 1, 1) and lanet.conv2.weight.shape == (1, 2, 1, 1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("rgbd_cmsa", num_classes=6, **SMALL)


def test_forward_backward_and_cross_modality_masks(model):
    x, d = torch.randn(2, 3, 64, 64), torch.rand(2, 1, 64, 64)
    model.train()
    logits = model(x, depth=d)
    assert logits.shape == (2, 6) and model.forward_features(x, depth=d).shape == (2, 32)
    logits.sum().backward()
    for name in ("rgb_backbone.conv_stem.weight", "depth_backbone.conv_stem.weight", "rgb_attention.maps.3.conv1.weight",
                 "depth_attention.maps.0.conv2.weight", "token_proj.weight", "pos_embed", "head.fc2.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    model.zero_grad()
    model.eval()
    x_rgb, x_depth = model.stream_features(x, d)
    assert x_rgb.shape == x_depth.shape == (2, 352, 2, 2)  # 64 px / 32; 9x9 at 260 px
    masks = model.attention_maps(x, depth=d)
    assert {k: tuple(v.shape) for k, v in masks.items()} == {"rgb": (2, 1, 2, 2), "depth": (2, 1, 2, 2),
                                                            "fused": (2, 1, 2, 2)}
    torch.testing.assert_close(masks["fused"], (masks["rgb"] + masks["depth"]) / 2)
    torch.testing.assert_close(model.fuse(x_rgb, x_depth), x_rgb * masks["fused"])  # masks act on RGB features
    with pytest.raises(ValueError, match="depth"):
        model(x)
    with pytest.raises(ValueError, match="depth must be"):
        model(x, depth=torch.rand(2, 1, 32, 32))


def test_parameter_groups_split_backbones_from_fusion(model):
    groups = model.param_groups()
    n_backbone = sum(p.numel() for m in (model.rgb_backbone, model.depth_backbone) for p in m.parameters())
    assert sum(p.numel() for p in groups["backbones"]) == n_backbone == 2 * 7_202_562  # EfficientNet-B2 trunk
    assert sum(p.numel() for p in groups["fusion"]) + n_backbone == sum(p.numel() for p in model.parameters())


def test_ablation_switches():
    x, d = torch.randn(1, 3, 64, 64), torch.rand(1, 1, 64, 64)
    rgb_only = create_model("rgbd_cmsa", num_classes=6, use_depth=False, **SMALL).eval()
    assert rgb_only.depth_backbone is None and rgb_only.depth_attention is None
    assert rgb_only(x).shape == rgb_only(x, depth=d).shape == (1, 6)  # depth ignored
    summed = create_model("rgbd_cmsa", num_classes=6, fusion="sum", **SMALL).eval()
    assert summed.rgb_attention is None and summed.attention_maps(x, depth=d) == {}
    xr, xd = summed.stream_features(x, d)
    torch.testing.assert_close(summed.fuse(xr, xd), xr + xd)  # Eq. 8
    pooled = create_model("rgbd_cmsa", num_classes=6, head="avgpool", **SMALL).eval()
    assert pooled.num_features == 352 and not hasattr(pooled, "blocks")
    torch.testing.assert_close(pooled.forward_features(x, d), pooled.fuse(*pooled.stream_features(x, d)).mean((2, 3)))
    with pytest.raises(ValueError, match="needs use_depth"):
        create_model("rgbd_cmsa", fusion="sum", use_depth=False)
    with pytest.raises(ValueError, match="head must be"):
        create_model("rgbd_cmsa", head="gap")


def test_position_embedding_follows_the_input_grid(model):
    model.eval()
    assert model.pos_embed.shape == (1, 2 * 2 + 1, 32)  # img_size 64 -> 2x2 tokens + cls
    assert model(torch.randn(1, 3, 96, 96), depth=torch.rand(1, 1, 96, 96)).shape == (1, 6)  # 3x3, resampled


def _savchenko_file(tmp_path: Path) -> tuple[Path, dict]:
    """A state dict in the layout of state_vggface2_enet2.pt: timm tf_efficientnet_b2 with classifier=Identity."""
    import timm

    torch.manual_seed(1)
    src = timm.create_model("tf_efficientnet_b2", pretrained=False)
    src.classifier = torch.nn.Identity()
    state = {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    path = tmp_path / "state_vggface2_enet2.pt"
    torch.save(state, path)
    return path, state


def test_savchenko_face_weights_fill_both_streams(tmp_path):
    path, state = _savchenko_file(tmp_path)
    assert not any(k.startswith("classifier.") for k in state) and "conv_head.weight" in state
    m = create_model("rgbd_cmsa", num_classes=7, pretrained=path, **SMALL)
    assert m.key_report.acceptable and not m.key_report.unexpected and not m.key_report.shape_mismatch
    own = m.state_dict()
    for key in ("conv_stem.weight", "blocks.6.1.conv_pwl.weight", "blocks.3.0.bn1.running_mean"):
        assert torch.equal(own[f"rgb_backbone.{key}"], state[key]) and torch.equal(own[f"depth_backbone.{key}"], state[key])
    rep = m.face_weights_report
    assert rep["dropped_after_last_irb"] == ["bn2.bias", "bn2.num_batches_tracked", "bn2.running_mean",
                                             "bn2.running_var", "bn2.weight", "conv_head.weight"]
    assert rep["trunk_tensors"] == len(state) - 6 and "pos_embed" in rep["fusion_initialised_afresh"]
    reported_fresh = m.key_report.kept_fresh + m.key_report.new_classifier  # BatchNorm step counters: not reported
    assert sorted(reported_fresh) == sorted(k for k in rep["fusion_initialised_afresh"]
                                            if not k.endswith("num_batches_tracked"))
    rgb_only = create_model("rgbd_cmsa", use_depth=False, pretrained=path, **SMALL)
    assert rgb_only.face_weights_report["streams"] == ["rgb_backbone"]
    # a trunk key missing, or a foreign one, is named (strict)
    broken = dict(state)
    broken.pop("blocks.2.1.conv_dw.weight")
    broken["blocks.9.0.extra"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.2\.1\.conv_dw\.weight.*|.*blocks\.9\.0\.extra"):
        create_model("rgbd_cmsa", pretrained=tmp_path / "broken.pt", **SMALL)
    # a ferkit checkpoint of the model itself loads as is
    torch.save(m.state_dict(), tmp_path / "own.pt")
    again = create_model("rgbd_cmsa", num_classes=7, pretrained=tmp_path / "own.pt", **SMALL)
    assert torch.equal(again.state_dict()["head.fc2.weight"], own["head.fc2.weight"])


class _StubNet(torch.nn.Module):
    """Fixed features, linear head: the recipe's loss can be computed by hand."""

    num_classes, num_features = 3, 2

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(1, 1)  # stands in for the streams
        self.fc = torch.nn.Linear(2, 3)

    def param_groups(self):
        return {"backbones": list(self.backbone.parameters()), "fusion": list(self.fc.parameters())}

    def forward_features(self, x, depth=None):
        return x[:, :2, 0, 0]

    def forward_head(self, feat):
        return self.fc(feat)


def test_recipe_loss_is_weighted_ce_plus_centre_plus_island():
    import torch.nn.functional as F

    from ferkit.config import OptimConfig
    from ferkit.engine.optim import build_optimizer, build_scheduler
    from ferkit.methods import build_method

    torch.manual_seed(0)
    # the Cai et al. reading, by name (the default is Eq. 5 as printed: tests/test_fidelity.py)
    method = build_method("rgbd", _StubNet(), lambda_centre=0.01, lambda_island=10.0, eq5="cai")
    method.set_epoch_context(class_counts=np.array([4, 2, 2]))  # w = N / (K n_c) = [2/3, 4/3, 4/3]
    x = torch.randn(4, 3, 1, 1)
    y = torch.tensor([0, 1, 2, 0])
    out = method.training_step({"image": x, "label": y}, None)
    feat, c = x[:, :2, 0, 0], method.centres.centres.detach()
    ce = F.cross_entropy(method.model.fc(feat), y, weight=torch.tensor([2 / 3, 4 / 3, 4 / 3]))
    centre = ((feat - c[y]) ** 2).sum(1).mean() / 2  # Eq. 4 (batch mean)
    cn = F.normalize(c, dim=1)
    island = sum(float(cn[j] @ cn[k]) + 1 for j in range(3) for k in range(3) if j != k)  # Eq. 6
    # Cai et al.'s island loss: L = CE + λ1 (L_C + λ2 L_I)
    assert float(out.loss.detach()) == pytest.approx(float(ce) + 0.01 * (float(centre) + 10.0 * island), rel=1e-5)
    out.loss.backward()  # the centres step on ∂(L_C + λ2 L_I)/∂c, not scaled down by λ1
    c_ref = c.clone().requires_grad_(True)
    cn_ref = F.normalize(c_ref, dim=1)
    off = ~torch.eye(3, dtype=torch.bool)
    (((feat - c_ref[y]) ** 2).sum(1).mean() / 2 + 10.0 * ((cn_ref @ cn_ref.t())[off] + 1).sum()).backward()
    torch.testing.assert_close(method.centres.centres.grad, c_ref.grad)
    assert float(out.logs["island"]) == pytest.approx(island, rel=1e-5)
    specs = {s.name: s for s in method.optimizer_specs()}
    assert list(specs) == ["backbones", "fusion", "centres"] and specs["centres"].overrides["lr"] == 0.5
    o = OptimConfig(name="adamw", scheduler="onecycle", max_lr={"backbones": 1e-4, "fusion": 1e-3}, min_lr=1e-6)
    peaks = {}
    for name in ("backbones", "fusion"):  # Table III: separate One-Cycle peaks, common floor 1e-6
        opt = build_optimizer(specs[name], o)
        sched = build_scheduler(opt, specs[name], o, epochs=1, steps_per_epoch=10)
        lrs = []
        for _ in range(10):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        peaks[name] = (max(lrs), lrs[-1])  # the last step runs at the floor
    assert peaks["backbones"][0] == pytest.approx(1e-4, rel=0.05) and peaks["fusion"][0] == pytest.approx(1e-3, rel=0.05)
    assert peaks["backbones"][1] == pytest.approx(1e-6, rel=1e-3) and peaks["fusion"][1] == pytest.approx(1e-6, rel=1e-3)
    assert build_method("rgbd", _StubNet(), loss="ce").centres is None


# ----------------------------------------------------------------------------------------------------- augmentation
def _pattern_sample(size: int = 32) -> dict:
    """RGB whose red channel equals depth * 255 (depth on a 1/255 grid), so geometry can be compared exactly."""
    rng = np.random.default_rng(0)
    levels = rng.integers(1, 256, (size, size))
    rgb = np.stack([levels, np.full_like(levels, 128), np.full_like(levels, 64)], -1).astype(np.uint8)
    return {"image": Image.fromarray(rgb), "depth": Image.fromarray((levels / 255).astype(np.float32), "F"),
            "label": 0, "index": 0}


def _run(tf, seed: int) -> dict:
    torch.manual_seed(seed)
    return tf(_pattern_sample())


def test_paired_augmentation_same_geometry_and_no_jitter_on_depth():
    from ferkit.config import AugmentConfig
    from ferkit.data.transforms import build_transform

    mean, std = [0.0] * 3, [1.0] * 3
    geo = AugmentConfig(hflip=True, crop_padding=0, rotation=10, erasing=1.0)
    tf = build_transform("train", 32, mean, std, geo, depth_mean_std=(0.0, 1.0))
    flipped = erased = 0
    source = _pattern_sample()["depth"]
    for seed in range(12):
        out = _run(tf, seed)
        red, depth = out["image"][0], out["depth"][0]
        torch.testing.assert_close(red, depth, atol=1e-6, rtol=0)  # same flip, rotation and erased rectangle
        erased += int(((red == 0) & (depth == 0)).sum() > 20)
        ref = torch.from_numpy(np.asarray(source))
        flipped += int((depth - ref.flip(-1)).abs().mean() < (depth - ref).abs().mean())
    assert erased == 12 and 0 < flipped < 12
    # colour jitter changes RGB only: depth is the same as without jitter, for the same geometric draw
    jit = AugmentConfig(hflip=True, crop_padding=0, rotation=10, color_jitter=0.9)
    plain = AugmentConfig(hflip=True, crop_padding=0, rotation=10)
    for seed in range(3):
        a = _run(build_transform("train", 32, mean, std, jit, depth_mean_std=(0.0, 1.0)), seed)
        b = _run(build_transform("train", 32, mean, std, plain, depth_mean_std=(0.0, 1.0)), seed)
        assert torch.equal(a["depth"], b["depth"])
        assert not torch.allclose(a["image"], b["image"])


# ----------------------------------------------------------------------------------------------------- readers
def _write_wrl(path: Path, vertices: np.ndarray, faces: list[list[int]]) -> None:
    pts = ",\n".join(" ".join(f"{c:g}" for c in v) for v in vertices)
    idx = ", ".join(", ".join(str(i) for i in f) + ", -1" for f in faces)
    path.write_text("#VRML V2.0 utf8\n# BU-3DFE style mesh\nTransform { children [ Shape {\n"
                    "  appearance Appearance { texture ImageTexture { url \"x_F3D.bmp\" } }\n"
                    "  geometry IndexedFaceSet {\n    creaseAngle 3.0\n"
                    f"    coord Coordinate {{ point [\n{pts}\n    ] }}\n"
                    "    texCoord TextureCoordinate { point [ 0 0, 1 0, 1 1, 0 1, 0.5 0.5 ] }\n"
                    f"    coordIndex [ {idx} ]\n    texCoordIndex [ 0, 1, 4, -1 ]\n  }}\n}} ] }}\n")


PYRAMID = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0], [0, 0, 1]], float)  # apex towards the viewer


def _bu3dfe_tree(root: Path, subjects=("F0001", "M0002")) -> None:
    for subject in subjects:
        folder = root / "Subjects" / subject
        folder.mkdir(parents=True)
        for name in ("AN03WH", "NE00WH", "SU04WH"):
            Image.new("RGB", (9, 9), (90, 60, 30)).save(folder / f"{subject}_{name}_F2D.bmp")
            _write_wrl(folder / f"{subject}_{name}_F3D.wrl", PYRAMID, [[0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])


def test_wrl_mesh_renders_a_zbuffer_depth_map(tmp_path):
    from ferkit.data.rgbd import DEPTH_FLOOR, mesh_depth_map, read_wrl

    _write_wrl(tmp_path / "m.wrl", PYRAMID, [[0, 1, 4], [1, 2, 3, 4], [3, 0, 4]])  # a quad: fan-triangulated
    v, f = read_wrl(tmp_path / "m.wrl")
    assert v.shape == (5, 3) and f.tolist() == [[0, 1, 4], [1, 2, 3], [1, 3, 4], [3, 0, 4]]
    _write_wrl(tmp_path / "p.wrl", PYRAMID, [[0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
    depth = mesh_depth_map(*read_wrl(tmp_path / "p.wrl"), 9, 9, margin=0.0)  # x, y in [-1, 1] -> pixels 0..8
    # z = 1 - max(|x|, |y|) on the pyramid; face depth mapped to [floor, 1]: d = floor + (1 - floor) * z
    expect = lambda z: DEPTH_FLOOR + (1 - DEPTH_FLOOR) * z  # noqa: E731
    assert depth[4, 4] == pytest.approx(1.0)
    assert depth[4, 6] == pytest.approx(expect(0.5), abs=1e-6)  # x = 0.5
    assert depth[1, 4] == pytest.approx(expect(0.25), abs=1e-6)  # y = 0.75
    assert depth[0, 0] == pytest.approx(DEPTH_FLOOR)
    # y up in the mesh, down in the image: a plane rising towards +y is closest in the top rows
    plane = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 1], [-1, 1, 1]], float)
    _write_wrl(tmp_path / "q.wrl", plane, [[0, 1, 2, 3]])
    tilt = mesh_depth_map(*read_wrl(tmp_path / "q.wrl"), 9, 9, margin=0.0)
    assert tilt[0].mean() == pytest.approx(1.0) and tilt[-1].mean() == pytest.approx(DEPTH_FLOOR)
    (tmp_path / "bad.wrl").write_text("#VRML V2.0 utf8\nShape { geometry IndexedFaceSet { coord Coordinate "
                                      "{ point [ 0 0 0, 1 0 0 ] } coordIndex [ 0, 1, 5, -1 ] } }")
    with pytest.raises(DataError, match=r"bad\.wrl: coordIndex refers to vertex 5"):
        read_wrl(tmp_path / "bad.wrl")


def test_bu3dfe_reader(tmp_path):
    from ferkit.data.rgbd import bu3dfe

    _bu3dfe_tree(tmp_path)
    ds = bu3dfe(tmp_path, "all", depth_cache=False)
    assert len(ds) == 6 and ds.class_names == ["anger", "disgust", "fear", "happiness", "neutral", "sadness",
                                               "surprise"]
    assert sorted(set(ds.subjects)) == ["F0001", "M0002"]
    assert sorted(ds.meta_column("intensity").tolist()) == [0, 0, 3, 3, 4, 4]
    s = ds.load(0)
    assert s["image"].size == (9, 9) and s["depth"].mode == "F" and s["depth"].size == (9, 9)
    assert s["subject"] == "F0001" and s["label"] == 0 and s["intensity"] == 3  # F0001_AN03WH
    assert np.asarray(s["depth"]).max() == pytest.approx(1.0)
    six = bu3dfe(tmp_path, "all", exclude=["neutral"], depth_cache=False)
    assert six.num_classes == 6 and len(six) == 4 and six.dropped == {"class neutral excluded": 2}
    (tmp_path / "Subjects" / "M0002" / "M0002_SU04WH_F3D.wrl").unlink()
    with pytest.raises(DataError, match=r"M0002_SU04WH_F2D\.bmp: 3D mesh \(\.wrl\) not found"):
        bu3dfe(tmp_path, "all")
    assert len(bu3dfe(tmp_path, "all", skip_bad=True).skipped) == 1


def _write_bnt(path: Path, nrows: int, ncols: int, points: np.ndarray, zmin: float) -> None:
    """Bosphorus .bnt: uint16 nrows, ncols; float64 zmin; uint16 len + name; uint32 5N; N x 5 float64 by column."""
    name = path.with_suffix(".png").name.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<HHdH", nrows, ncols, zmin, len(name)) + name)
        f.write(struct.pack("<I", points.size))
        f.write(points.T.astype("<f8").tobytes())  # column-major, as MATLAB's fread(fid, [N 5], 'float64')


def _scan(nrows: int = 5, ncols: int = 6) -> tuple[np.ndarray, float]:
    """Row-major grid, u left->right, v (and y) bottom->top; z grows with u; last column is background."""
    zmin = -1e9
    r, c = np.meshgrid(np.arange(nrows), np.arange(ncols), indexing="ij")
    u, v = (c + 0.5) / ncols, 1 - (r + 0.5) / nrows  # first row at the top of the image
    x, y, z = c.astype(float), (nrows - 1 - r).astype(float), 10.0 + c
    pts = np.stack([x, y, z, u, v], -1).reshape(-1, 5)
    pts[(c == ncols - 1).ravel(), 2] = zmin
    return pts, zmin


def test_bnt_scan_renders_in_the_rgb_frame(tmp_path):
    from ferkit.data.rgbd import DEPTH_FLOOR, bnt_depth_map, read_bnt

    pts, zmin = _scan()
    _write_bnt(tmp_path / "bs000_E_ANGER_0.bnt", 5, 6, pts, zmin)
    scan = read_bnt(tmp_path / "bs000_E_ANGER_0.bnt")
    assert (scan.nrows, scan.ncols, scan.zmin, scan.image_name) == (5, 6, zmin, "bs000_E_ANGER_0.png")
    np.testing.assert_array_equal(scan.points, pts)
    assert scan.valid.sum() == 25
    depth = bnt_depth_map(scan, 10, 12)  # grid columns 0..4 land on pixel x = u * 12 - 0.5 = 0.5 .. 8.5
    # pixel column x lies at grid column c = (x + 0.5) / 2 - 0.5, z = 10 + c; rendered pixels 1..8 hold
    # c = 0.25 .. 3.75, which the normalisation maps onto [floor, 1]
    for col in (1, 2, 5, 8):
        c = (col + 0.5) / 2 - 0.5
        assert depth[5, col] == pytest.approx(DEPTH_FLOOR + (1 - DEPTH_FLOOR) * (c - 0.25) / 3.5, abs=1e-6)
    assert depth[:, 10:].max() == 0 and depth[5, 8] > depth[5, 2]  # background column; closer to the right
    assert (depth[1:9, 1:9] > 0).all() and depth[:, 0].max() == 0 and depth[0].max() == 0
    raw = (tmp_path / "bs000_E_ANGER_0.bnt").read_bytes()
    (tmp_path / "cut.bnt").write_bytes(raw[:-8])
    with pytest.raises(DataError, match=r"cut\.bnt: \.bnt file truncated"):
        read_bnt(tmp_path / "cut.bnt")


def test_bosphorus_reader_maps_table_one_action_units(tmp_path):
    from ferkit.data.rgbd import bosphorus

    pts, zmin = _scan()
    for subject in ("bs000", "bs001"):
        folder = tmp_path / subject
        folder.mkdir()
        for stem in ("E_ANGER_0", "N_N_0", "LFAU_12_0", "UFAU_1_0", "LFAU_10_0", "YR_R10_0", "O_EYE_0"):
            Image.new("RGB", (12, 10)).save(folder / f"{subject}_{stem}.png")
            _write_bnt(folder / f"{subject}_{stem}.bnt", 5, 6, pts, zmin)
    ds = bosphorus(tmp_path, "all", depth_cache=False)
    got = sorted((r.subject, r.meta["code"], ds.class_names[r.label]) for r in ds.records)[:4]
    assert got == [("bs000", "E_ANGER", "anger"), ("bs000", "LFAU_12", "happiness"), ("bs000", "N_N", "neutral"),
                   ("bs000", "UFAU_1", "fear")]
    assert len(ds) == 8 and ds.dropped == {"pose / occlusion / unmapped action unit": 6}
    assert len(bosphorus(tmp_path, "all", use_aus=False)) == 4
    assert ds.load(0)["depth"].size == (12, 10) and ds.load(0)["intensity"] == -1


def _cald_tree(root: Path) -> None:
    for part, ids in (("CalD3r", ("001", "002")), ("MenD3s", ("01", "02"))):
        for emotion in ("Anger", "Surprise"):
            for sub in ("RGB", "DEPTH"):
                (root / part / emotion / sub).mkdir(parents=True)
            for i in ids:
                stem = f"aligned_F_{i}_c1_{emotion.lower()}"
                Image.new("RGB", (8, 6), (10, 20, 30)).save(root / part / emotion / "RGB" / f"{stem}_Color.png")
                depth = np.zeros((6, 8), np.uint16)
                depth[1:5, 2:6] = [[600, 700, 800, 900]] * 4  # mm, larger = farther; 0 = no data
                cv2.imwrite(str(root / part / emotion / "DEPTH" / f"{stem}_Depth.png"), depth)


def test_cald3rmend3s_reader_inverts_sensor_depth(tmp_path):
    from ferkit.data.rgbd import DEPTH_FLOOR, cald3rmend3s

    _cald_tree(tmp_path)
    ds = cald3rmend3s(tmp_path, "all")
    assert len(ds) == 8 and sorted(set(ds.subjects)) == ["CalD3r:F001", "CalD3r:F002", "MenD3s:F01", "MenD3s:F02"]
    d = np.asarray(ds.load(0)["depth"])
    assert d.shape == (6, 8) and d[0].max() == 0  # no data -> background
    np.testing.assert_allclose(d[2, 2:6], [1.0, DEPTH_FLOOR + (1 - DEPTH_FLOOR) * 2 / 3,
                                           DEPTH_FLOOR + (1 - DEPTH_FLOOR) / 3, DEPTH_FLOOR], atol=1e-6)
    six = cald3rmend3s(tmp_path, "all", exclude=["surprise"])
    assert six.class_names == ["anger", "disgust", "fear", "happiness", "neutral", "sadness"] and len(six) == 4
    wrong = tmp_path / "CalD3r" / "Anger" / "RGB" / "aligned_F_003_c1_fear_Color.png"
    Image.new("RGB", (8, 6)).save(wrong)
    with pytest.raises(DataError, match="aligned_F_003_c1_fear_Color.png: label 'fear' in the name contradicts"):
        cald3rmend3s(tmp_path, "all")


def test_merged_set_prefixes_subjects_and_splits_by_subject(tmp_path):
    from ferkit.data.build import build_dataset

    _bu3dfe_tree(tmp_path / "BU3DFE", subjects=("F0001", "M0002", "F0003"))
    _cald_tree(tmp_path / "CalD3rMenD3s")
    pts, zmin = _scan()
    (tmp_path / "Bosphorus" / "bs000").mkdir(parents=True)
    for stem in ("E_ANGER_0", "E_HAPPY_0"):
        Image.new("RGB", (12, 10)).save(tmp_path / "Bosphorus" / "bs000" / f"bs000_{stem}.png")
        _write_bnt(tmp_path / "Bosphorus" / "bs000" / f"bs000_{stem}.bnt", 5, 6, pts, zmin)
    cfg = load_config("rgbd_merged", [f"data.root={tmp_path}"])
    full = build_dataset(cfg.data, "all")
    assert len(full) == 9 + 2 + 8 and full.name == "rgbd_merged"
    assert {s.split("/")[0] for s in full.subjects} == {"bu3dfe", "bosphorus", "cald3rmend3s"}
    train, test = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    assert len(train) + len(test) == len(full) and not set(train.subjects) & set(test.subjects)
    assert 0.1 < len(test) / len(full) < 0.35
    with pytest.raises(ValueError, match="has no option 'frame'"):
        build_dataset(load_config("rgbd_merged", [f"data.root={tmp_path}", "data.options={frame: 1}"]).data, "all")


# ----------------------------------------------------------------------------------------------------- protocols
class TinyRGBD(FaceDataset):
    """In-memory RGB-D faces: per-subject constant brightness, depth a ramp; subjects, intensities."""

    name = "tiny_rgbd"

    def __init__(self, n_subjects=6, per_subject=8, size=16, k=7, with_pixels=True):
        records, self.rgb, self.depth = [], [], []
        for s in range(n_subjects):
            for j in range(per_subject):
                label = (s + j) % k
                level = 0 if label == 4 else 1 + j % 4  # class 4 = neutral (bu3dfe order)
                records.append(FaceRecord(None, label, f"tiny:{s}:{j}", subject=f"S{s:03d}",
                                          meta={"intensity": level}))
                if with_pixels:
                    value = 20 * (s + 1) + label
                    img = np.full((size, size, 3), value, np.uint8)
                    img[: size // 2, :, label % 3] = 250  # a class cue
                    self.rgb.append(img)
                    self.depth.append(np.linspace(0, (s + 1) / n_subjects, size * size, dtype=np.float32)
                                      .reshape(size, size))
        super().__init__(records, ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"][:k],
                         split="all", modalities=("image", "depth"))

    def load(self, i):
        r = self.records[i]
        return {"image": Image.fromarray(self.rgb[i]), "depth": Image.fromarray(self.depth[i], "F"),
                "label": r.label, "index": i, "subject": r.subject, "intensity": r.meta["intensity"]}


def test_bu3dfe_protocol_selection_counts():
    from ferkit.engine.protocols import bu3dfe_protocol_pool

    full = TinyRGBD(n_subjects=100, per_subject=25, with_pixels=False)  # BU-3DFE: 100 x (6 x 4 + neutral) = 2500
    for r in full.records:  # exactly the BU-3DFE design: per subject 6 expressions x levels 1..4 + 1 neutral
        i = int(r.source.split(":")[2])
        r.label, r.meta["intensity"] = (4, 0) if i == 24 else ([0, 1, 2, 3, 5, 6][i // 4], 1 + i % 4)
    pool = bu3dfe_protocol_pool(full, seed=0)
    assert len(pool) == 720 and len(set(pool.subjects)) == 60  # the paper's 720 samples
    assert pool.class_names == ["anger", "disgust", "fear", "happiness", "sadness", "surprise"]
    assert np.bincount(pool.targets).tolist() == [120] * 6
    assert set(pool.meta_column("intensity").tolist()) == {3, 4}
    assert set(bu3dfe_protocol_pool(full, seed=0).subjects) == set(pool.subjects)
    assert set(bu3dfe_protocol_pool(full, seed=1).subjects) != set(pool.subjects)
    with pytest.raises(ValueError, match="100 subjects .* draws 120"):
        bu3dfe_protocol_pool(full, num_subjects=120)


def _stats_by_hand(ds: FaceDataset, idx) -> tuple[np.ndarray, float]:
    rgb = np.stack([ds.rgb[i] for i in idx]).astype(np.float64) / 255
    depth = np.stack([ds.depth[i] for i in idx]).astype(np.float64)
    return rgb.reshape(-1, 3).mean(0), depth.mean()


def test_per_fold_zscore_uses_the_training_part_only(tmp_path, monkeypatch):
    import ferkit.engine.trainer as trainer_mod
    from ferkit.engine.crossval import run_crossval
    from ferkit.engine.protocols import zscore_fold_config

    ds = TinyRGBD()
    cfg = load_config("rgbd_synthetic", ["data.input_size=16", "model.kwargs.img_size=16"])
    seen = []

    class FakeTrainer:  # records each fold's config and training subjects instead of training
        def __init__(self, cfg, run_dir, resume=False, splits=None, **kw):
            seen.append((cfg, splits))

        def fit(self):
            k = 7
            return {"test": {"wa": 0.5, "ua": 0.5, "f1": 0.5, "n": 1, "confusion": np.eye(k).tolist(),
                             "per_class": [0.5] * k}}

    monkeypatch.setattr(trainer_mod, "Trainer", FakeTrainer)
    run_crossval(cfg, tmp_path / "cv", folds=3, dataset=ds, fold_config=zscore_fold_config)
    assert len(seen) == 3
    for fold_cfg, splits in seen:
        mean, d_mean = _stats_by_hand(ds, splits.train.indices)
        np.testing.assert_allclose(fold_cfg.data.mean, mean, atol=1e-9)
        assert fold_cfg.data.depth_mean == pytest.approx(d_mean, abs=1e-9)
        all_mean, _ = _stats_by_hand(ds, range(len(ds)))
        assert abs(fold_cfg.data.mean[0] - all_mean[0]) > 1e-3  # differs from the statistics of the whole pool
        rgb = np.stack([ds.rgb[i] for i in splits.train.indices]).astype(np.float64) / 255
        np.testing.assert_allclose(fold_cfg.data.std, rgb.reshape(-1, 3).std(0), rtol=1e-6)


@pytest.fixture
def no_run_reports(monkeypatch):
    """Per-fold report.md plots cost seconds each on the CI CPU; the protocols are what is tested here."""
    import ferkit.analysis.report as report

    monkeypatch.setattr(report, "write_run_report", lambda *a, **k: None)


def test_interrupted_cv_resumes_where_it_stopped(tmp_path, monkeypatch, no_run_reports):
    from ferkit.engine import trainer as trainer_mod
    from ferkit.engine.protocols import run_protocol

    cfg = load_config("resnet18_synthetic", ["train.epochs=1", "train.batch_size=16", "data.input_size=16",
                                             "train.progress=false", "train.tensorboard=false"])
    ds = TinyRGBD(per_subject=6)
    real_fit, calls, armed = trainer_mod.Trainer.fit, [], [True]

    def fit(self):
        calls.append(self.run_dir.name)
        if len(calls) == 2 and armed[0]:
            armed[0] = False
            raise KeyboardInterrupt  # the machine goes down during the second fold
        return real_fit(self)

    monkeypatch.setattr(trainer_mod.Trainer, "fit", fit)
    with pytest.raises(KeyboardInterrupt):
        run_protocol(cfg, tmp_path / "cv", "subject_kfold", folds=2, dataset=ds)
    assert (tmp_path / "cv" / "rep000_fold00" / "result.json").is_file()
    assert not (tmp_path / "cv" / "rep000_fold01" / "result.json").exists()
    calls.clear()
    summary = run_protocol(cfg, tmp_path / "cv", "subject_kfold", folds=2, dataset=ds)
    assert calls == ["rep000_fold01"]  # fold 0 is not trained again
    assert summary["n_folds"] == 2 and [r["fold"] for r in summary["folds"]] == [0, 1]
    assert np.asarray(summary["confusion_mean_normalized"]).shape == (7, 7)
    assert json.loads((tmp_path / "cv" / "protocol.json").read_text())["folds"] == 2
    with pytest.raises(ValueError, match="another protocol setting"):
        run_protocol(cfg, tmp_path / "cv", "subject_kfold", folds=3, dataset=ds)


def test_holdout_protocol_trains_the_rgbd_network_end_to_end(tmp_path, no_run_reports):
    """One 80/20 subject-disjoint fold: rgbd_cmsa + island-loss recipe, depth through loader, trainer and eval."""
    from ferkit.engine.protocols import run_protocol

    cfg = load_config("rgbd_synthetic", ["train.epochs=1", "train.batch_size=8", "train.accum_steps=2",
                                         "data.input_size=32", "model.kwargs.img_size=32", "model.kwargs.embed_dim=32",
                                         "model.kwargs.num_heads=2", "train.progress=false",
                                         "train.tensorboard=false", "train.eval_batch_size=32"])
    ds = TinyRGBD(n_subjects=5, per_subject=5)
    s = run_protocol(cfg, tmp_path / "holdout", "holdout", dataset=ds)
    assert s["n_folds"] == 1 and 0 <= s["wa"]["mean"] <= 1
    fold = tmp_path / "holdout" / "rep000_fold00"
    run_cfg = yaml.safe_load((fold / "config.yaml").read_text())
    assert run_cfg["data"]["mean"] != [0.485, 0.456, 0.406] and run_cfg["data"]["depth_mean"] != 0.5  # z-scored
    log = [json.loads(x) for x in (fold / "metrics.jsonl").read_text().splitlines()]
    assert {"train_ce", "train_centre", "train_island"} <= set(log[0]) and set(log[0]["lr"]) == {
        "backbones", "fusion", "centres"}
    record = json.loads((tmp_path / "holdout" / "protocol.json").read_text())
    assert record["protocol"] == "holdout" and record["zscore"] is True
