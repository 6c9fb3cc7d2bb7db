"""POSTER (seed 004, SPEC 3.4): structure, official weight formats, the frozen landmark stream, SAM training,
profile figures, landmark pretraining and the per-image evaluation listing."""
import copy
import json
import logging
import re
import time

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ferkit import create_model
from ferkit.analysis.profile import profile_model
from ferkit.config import OptimConfig, load_config
from ferkit.data.build import DataSplits
from ferkit.engine import Trainer
from ferkit.engine.checkpoint import save_weights
from ferkit.engine.optim import build_optimizer
from ferkit.methods import OptimizerSpec, build_method
from ferkit.methods.poster import poster_loss
from ferkit.models import CheckpointMismatchError
from ferkit.models.irse import BottleneckIR, IRBackbone, load_ir50
from ferkit.models.mobilefacenet import MobileFaceNet, load_mobilefacenet
from ferkit.models.poster import (OFFICIAL_RENAMES, POSTER_VARIANTS, CrossFusionAttention, CrossFusionBlock,
                                  PyramidCrossFusion)

from tiny import TinyFaces

# a reduced POSTER that runs in a fraction of a second: one pyramid level, 64-d tokens, one IR unit per stage
TINY = dict(depth=1, embed_dim=64, num_heads=4, ir_layers=(1, 1, 1), ir_channels=(8, 16, 32))


def _tiny(num_classes: int = 5, **kw):
    torch.manual_seed(0)
    return create_model("poster", num_classes=num_classes, **{**TINY, **kw})


def _batch(n: int = 4, size: int = 32, k: int = 5):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 3, size, size, generator=g), "label": torch.arange(n) % k}


class _Ctx:
    """The part of the engine's StepContext a manual-optimisation step uses."""

    def __init__(self, opt):
        self.opt = opt

    def backward(self, loss):
        loss.backward()

    def optimizer(self, name="model"):
        return self.opt

    def optimizer_step(self, closure=None):
        self.opt.step(closure) if closure is not None else self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _sam(method, lr=1e-3, rho=0.05):
    o = OptimConfig(name="sam_adam", lr=lr, weight_decay=0.0, sam_rho=rho)
    return build_optimizer(OptimizerSpec("model", [p for p in method.parameters() if p.requires_grad]), o)


# ----------------------------------------------------------------------------------------------------- structure
def test_forward_backward_tiny():
    model = _tiny().train()
    out = model(_batch()["image"])
    assert out.shape == (4, 5)
    out.sum().backward()
    assert model.head.weight.grad is not None and model.image_stream.body[0].res_layer[1].weight.grad is not None
    assert model.cross_fusion.pos_embed.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.landmark_stream.parameters())
    assert all(p.grad is None for p in model.image_stream.output_layer.parameters())  # built, never run
    assert model.eval().forward_features(_batch()["image"]).shape == (4, 64)
    bgr, rgb = _tiny(bgr_input=True).eval(), _tiny().eval()  # official weights were trained on cv2's BGR images
    x = _batch()["image"]
    torch.testing.assert_close(bgr(x), rgb(x.flip(1)))


def test_cross_fusion_attention_is_the_equation():
    """softmax(Q K^T / sqrt(d)) V with K, V projected from the context and Q the raw (normed) other stream."""
    torch.manual_seed(0)
    attn = CrossFusionAttention(dim=8, num_heads=2).eval()
    q, ctx = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    w, b = attn.kv.weight, attn.kv.bias
    k, v = (ctx @ w[:8].T + b[:8]), (ctx @ w[8:].T + b[8:])
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / 2.0, dim=-1)  # sqrt(4) = 2
        heads.append(a @ v[..., s])
    want = attn.proj(torch.cat(heads, -1))
    torch.testing.assert_close(attn(query=q, context=ctx), want)


def test_block_takes_keys_values_from_its_own_stream_queries_from_the_other():
    """With all image tokens equal, the image half's attention is uniform over identical values, so its output
    cannot depend on the landmark tokens (they only give queries); the landmark half does depend on them."""
    torch.manual_seed(0)
    block = CrossFusionBlock(dim=8, tokens_per_stream=3, num_heads=2, token_mixer=False).eval()
    img = torch.randn(1, 1, 8).expand(1, 3, 8)
    lm_a, lm_b = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    out_a, out_b = block(torch.cat((img, lm_a), 1)), block(torch.cat((img, lm_b), 1))
    torch.testing.assert_close(out_a[:, :3], out_b[:, :3])
    assert not torch.allclose(out_a[:, 3:], out_b[:, 3:])
    # and the reverse: varied image tokens change the image half
    out_c = block(torch.cat((torch.randn(1, 3, 8), lm_a), 1))
    assert not torch.allclose(out_a[:, :3], out_c[:, :3])


def test_pyramid_scales_levels_and_variants():
    fuse = PyramidCrossFusion(embed_dim=512, depth=1)
    assert fuse.downsample_m(torch.zeros(2, 100, 512)).shape == (2, 100, 256)
    assert fuse.downsample_s(torch.zeros(2, 100, 512)).shape == (2, 100, 128)
    level = fuse.blocks[0]
    assert [tuple(b.attn_img.kv.weight.shape) for b in (level.block_l, level.block_m, level.block_s)] == \
        [(1024, 512), (512, 256), (256, 128)]
    assert level.block_l.conv is not None and fuse(torch.randn(2, 49, 512), torch.randn(2, 49, 512)).shape == (2, 512)
    assert {v: POSTER_VARIANTS[v]["depth"] for v in ("small", "base", "large")} == {"small": 4, "base": 6, "large": 8}
    affect = create_model("poster_affectnet", **{k: v for k, v in TINY.items() if k != "depth"})
    assert len(affect.cross_fusion.blocks) == 8 and not any(".conv." in k for k in affect.cross_fusion.state_dict())


# ------------------------------------------------------------------------------------------------------- profile
def _level_params(c: int, tokens: int = 100) -> int:
    """Hand count of one pyramid level: per block 4 LayerNorms (2C each), kv (2C^2 + 2C) and proj (C^2 + C) twice,
    two MLPs C -> 2C -> C, the Conv1d(100, 100, 1) mixer; plus two ConvTranspose1d(100, 100, 2)."""
    def block(d: int) -> int:
        norms, kv, proj, mlp = 4 * 2 * d, 2 * d * d + 2 * d, d * d + d, (d * 2 * d + 2 * d) + (2 * d * d + d)
        return norms + 2 * (kv + proj + mlp) + tokens * tokens + tokens
    return block(c) + block(c // 2) + block(c // 4) + 2 * (tokens * tokens * 2 + tokens)


def _count(name: str) -> tuple[int, int]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        m = create_model(name)
    return sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_profile_matches_spec():
    row = profile_model("poster")  # large, 224x224, one forward under the flop counter
    assert (round(row["params_m"], 2), round(row["trainable_m"], 2)) == (71.85, 70.84)
    assert abs(row["macs_g"] - 7.90) / 7.90 < 0.006  # SPEC 3.4: 7.90 G
    assert abs(2 * row["macs_g"] - 15.7) / 15.7 < 0.002  # POSTER paper: 15.7 GFLOPs
    total, trainable = _count("poster")
    assert total - trainable == 1_007_248  # the frozen MobileFaceNet (incl. its GDC landmark head)
    small, base, affect = _count("poster_small")[0], _count("poster_base")[0], _count("poster_affectnet")[0]
    assert total - small == 4 * _level_params(512) and base - small == 2 * _level_params(512)
    assert total - affect == 8 * 3 * (100 * 100 + 100)  # the per-block Conv1d token mixers
    with torch.device("meta"):
        out_layer = create_model("poster").image_stream.output_layer
    assert sum(p.numel() for p in out_layer.parameters()) == 512 * 7 * 7 * 512 + 512 + 2 * 512 + 2 * 512  # 12.85 M


# ------------------------------------------------------------------------------------- official weight formats
def _official_keys(state: dict) -> dict:
    inverse = [(new, old) for old, new in OFFICIAL_RENAMES]
    out = {}
    for k, v in state.items():
        for new, old in inverse:
            if k.startswith(new):
                k = old + k[len(new):]
                break
        out[k] = v
    return out


def test_official_rafdb_checkpoint_loads(tmp_path, caplog):
    src = _tiny(num_classes=7).eval()
    official = {"module." + k: v for k, v in _official_keys(src.state_dict()).items()}
    assert "module.pyramid_fuse.blocks.0.block_l.attn_img.kv.weight" in official
    assert "module.se_block.linear1.weight" in official and "module.head.linear.bias" in official
    official["module.pyramid_fuse.cls_token"] = torch.zeros(1, 1, 64)  # defined, unused in the official model
    torch.save({"iter": 42, "model_state_dict": official, "optimizer_state_dict": {"state": {}, "param_groups": []}},
               tmp_path / "rafdb_best.pth")
    with caplog.at_level(logging.INFO):
        model = create_model("poster", num_classes=7, pretrained=tmp_path / "rafdb_best.pth", **TINY)
    assert model.key_report.clean and "cls_token" in caplog.text
    x = _batch()["image"]
    torch.testing.assert_close(model.eval()(x), src(x))

    official["module.pyramid_fuse.extra.weight"] = torch.zeros(3)  # anything else is reported, never dropped
    del official["module.ir_layer.bias"]
    torch.save({"iter": 1, "model_state_dict": official}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="cross_fusion.extra.weight"):
        create_model("poster", num_classes=7, pretrained=tmp_path / "bad.pth", **TINY)
    loose = create_model("poster", num_classes=7, pretrained=tmp_path / "bad.pth", strict=False, **TINY)
    assert loose.key_report.unexpected == ["cross_fusion.extra.weight"]
    assert loose.key_report.missing == ["image_proj.bias"]


def test_ir50_file_with_fourth_stage_and_output_layer(tmp_path, caplog):
    torch.manual_seed(0)
    ours = IRBackbone((1, 1, 1), (8, 16, 32))
    source = IRBackbone((1, 1, 1), (8, 16, 32))
    state = dict(source.state_dict())  # input_layer.*, body.0-2.*, output_layer.* as face.evoLVe names them
    for n, unit in enumerate((BottleneckIR(32, 64, 2), BottleneckIR(64, 64, 1)), start=3):  # the 4th stage
        state.update({f"body.{n}.{k}": v for k, v in unit.state_dict().items()})
    assert "output_layer.3.weight" in state and "body.3.shortcut_layer.0.weight" in state
    torch.save(state, tmp_path / "ir50.pth")
    with caplog.at_level(logging.INFO):
        report = load_ir50(ours, tmp_path / "ir50.pth", strict=True)
    assert report.clean and "[3, 4]" in caplog.text
    torch.testing.assert_close(ours.body[2].res_layer[3].weight, source.body[2].res_layer[3].weight)
    torch.testing.assert_close(ours.output_layer[3].weight, source.output_layer[3].weight)

    state["body.0.res_layer.1.weight"] = torch.zeros(8, 8, 1, 1)
    del state["input_layer.1.running_var"]
    state["fc.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad_ir50.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        load_ir50(ours, tmp_path / "bad_ir50.pth", strict=True)
    assert all(k in str(e.value) for k in ("body.0.res_layer.1.weight", "input_layer.1.running_var", "fc.weight"))
    report = load_ir50(ours, tmp_path / "bad_ir50.pth", strict=False)
    assert report.missing == ["input_layer.1.running_var"] and report.unexpected == ["fc.weight"]
    assert report.shape_mismatch[0][0] == "body.0.res_layer.1.weight"


def test_mobilefacenet_tar_file(tmp_path):
    torch.manual_seed(0)
    source, ours = MobileFaceNet(), MobileFaceNet()
    keys = source.state_dict().keys()
    assert {"conv1.conv.weight", "conv_3.model.3.conv_dw.prelu.weight", "conv_6_sep.bn.running_mean",
            "output_layer.conv_6_dw.conv.weight", "output_layer.linear.weight", "output_layer.bn.bias"} <= set(keys)
    torch.save({"epoch": 3, "state_dict": source.state_dict()}, tmp_path / "mobilefacenet_model_best.pth.tar")
    assert load_mobilefacenet(ours, tmp_path / "mobilefacenet_model_best.pth.tar").clean
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(ours.eval()(x), source.eval()(x))
    assert ours.forward_features(x).shape == (2, 512, 7, 7) and ours(x).shape == (2, 136)

    narrow = MobileFaceNet(feature_dim=64)  # conv_6_sep and the GDC head do not fit
    with pytest.raises(CheckpointMismatchError, match="conv_6_sep.conv.weight"):
        load_mobilefacenet(narrow, tmp_path / "mobilefacenet_model_best.pth.tar")
    report = load_mobilefacenet(narrow, tmp_path / "mobilefacenet_model_best.pth.tar", strict=False)
    assert {k for k, _, _ in report.shape_mismatch} >= {"conv_6_sep.conv.weight", "output_layer.linear.weight"}


def test_method_loads_backbone_files(tmp_path):
    torch.manual_seed(3)
    lm = MobileFaceNet(feature_dim=64)
    ir = IRBackbone((1, 1, 1), (8, 16, 32))
    torch.save({"state_dict": lm.state_dict()}, tmp_path / "lm.pth.tar")
    torch.save(ir.state_dict(), tmp_path / "ir50.pth")
    method = build_method("poster", _tiny(), image_weights=str(tmp_path / "ir50.pth"),
                          landmark_weights=str(tmp_path / "lm.pth.tar"))
    torch.testing.assert_close(method.model.landmark_stream.conv_6_sep.conv.weight, lm.conv_6_sep.conv.weight)
    torch.testing.assert_close(method.model.image_stream.input_layer[0].weight, ir.input_layer[0].weight)
    from ferkit.config import ConfigError

    with pytest.raises(ConfigError, match="landmark_weights"):
        build_method("poster", _tiny(), landmark_weights=str(tmp_path / "absent.pth"))


# ------------------------------------------------------------------------------------------- frozen landmarks
def test_landmark_stream_frozen_and_its_bn_statistics_fixed():
    method = build_method("poster", _tiny())
    method.train()
    assert method.model.training and not method.model.landmark_stream.training
    lm_before = copy.deepcopy(method.model.landmark_stream.state_dict())
    ir_bn = method.model.image_stream.input_layer[1]
    ir_mean = ir_bn.running_mean.clone()
    opt = _sam(method)
    method.training_step(_batch(), _Ctx(opt))
    for k, v in method.model.landmark_stream.state_dict().items():
        torch.testing.assert_close(v, lm_before[k], msg=k)  # weights and BatchNorm statistics alike
    assert not torch.allclose(ir_bn.running_mean, ir_mean)  # the trainable stream's BN did run in train mode


# ------------------------------------------------------------------------------------------------ SAM training
def test_sam_step_is_the_two_pass_update():
    """One SAM-Adam step by hand: g1 at w, e = rho g1 / ||g1||, g2 at w + e, Adam's first step from w with g2."""
    lr, rho = 1e-3, 0.05
    method = build_method("poster", _tiny())
    method.train()
    batch = _batch()
    manual = copy.deepcopy(method.model)
    used = [p for p in manual.parameters() if p.requires_grad]  # incl. IR's output_layer: no gradient, no update

    def grads(m):
        loss = poster_loss(m(batch["image"]), batch["label"])[0]
        return torch.autograd.grad(loss, used, allow_unused=True)

    g1 = grads(manual)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g1 if g is not None))
    with torch.no_grad():
        w0 = [p.clone() for p in used]
        for p, g in zip(used, g1):
            if g is not None:
                p.add_(rho * g / (norm + 1e-12))
    g2 = grads(manual)
    want = [w - lr * g / (g.abs() + 1e-8) if g is not None else w for w, g in zip(w0, g2)]  # Adam step 1

    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    out = method.training_step(batch, _Ctx(_sam(method, lr, rho)))
    assert "sam_loss" in out.logs and float(out.logs["sam_loss"]) != float(out.loss)
    got = [p for p in method.model.parameters() if p.requires_grad]
    checked = 0
    for w, p, g in zip(want, got, g2):
        # Adam's first step is lr * sign(g): compare where g is signal, not float noise on a zero gradient (a BN
        # bias right before another BN has gradient ~1e-8 either way)
        keep = g.abs() > 1e-6 if g is not None else torch.ones_like(w, dtype=torch.bool)
        torch.testing.assert_close(p.detach()[keep], w[keep], atol=lr * 1e-3, rtol=0)
        checked += int(keep.sum())
    assert checked > 0.9 * sum(p.numel() for p in got)
    changed = [n for n, p in method.model.named_parameters() if not torch.equal(p, before[n])]
    assert "head.weight" in changed and not any(n.startswith("landmark_stream") for n in changed)


def test_sam_training_lowers_the_loss_on_a_fixed_batch():
    method = build_method("poster", _tiny())
    method.train()
    opt, batch = _sam(method, lr=1e-3), _batch(5)
    losses = [float(method.training_step(batch, _Ctx(opt)).loss) for _ in range(5)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_poster_loss_is_ce_plus_two_label_smoothing():
    logits, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    logp = torch.log_softmax(logits, 1)
    lsce = 0.8 * -logp[0, 0] + 0.2 * -logp[0].mean()  # official LabelSmoothingCrossEntropy(0.2)
    total, ce, ls = poster_loss(logits, y)
    torch.testing.assert_close(ls, lsce)
    torch.testing.assert_close(total, -logp[0, 0] + 2 * lsce)


def test_engine_runs_poster_with_sam(tmp_path):
    """The engine's manual-optimisation path: ctx.optimizer_step(closure) drives pytorch-optimizer's SAM."""
    kw = [f"model.kwargs.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in TINY.items()]
    cfg = load_config("poster_synthetic", ["train.epochs=1", "train.batch_size=8", "data.input_size=32",
                                           "train.progress=false", "train.tensorboard=false", *kw])
    splits = DataSplits(TinyFaces(16, seed=0), TinyFaces(8, seed=1, split="test"))
    trainer = Trainer(cfg, tmp_path / "run", splits=splits)
    head = trainer.method.model.head.weight.detach().clone()
    logs = trainer._train_epoch(0, time.time())  # one epoch of the loop, without fit()'s report and plots
    assert trainer.state.global_step == 2 and not torch.equal(head, trainer.method.model.head.weight)
    assert type(trainer.optimizers["model"]).__name__ == "SAM" and {"train_ce", "train_sam_loss"} <= set(logs)


# ---------------------------------------------------------------------------------------- landmark pretraining
def test_landmark_pretraining_writes_a_loadable_checkpoint(tmp_path):
    import argparse

    from ferkit.engine.checkpoint import read_metadata
    from ferkit.models.landmarks import register_cli

    parser, commands = argparse.ArgumentParser(prog="ferkit"), {}
    register_cli(parser.add_subparsers(dest="command"), commands)
    out = tmp_path / "lm.safetensors"
    args = parser.parse_args(["landmarks", "pretrain", "--out", str(out), "--epochs", "6", "--batch-size", "4",
                              "--train-subjects", "1", "--test-subjects", "1", "--samples-per-subject", "4",
                              "--rotation", "0", "--crop-padding", "0"])  # the same 4 faces every epoch
    assert commands[args.command](args) == 0
    meta = read_metadata(out)
    assert meta["format"] == "ferkit-landmarks" and meta["epochs"] == 6
    l1 = [h["train_l1"] for h in meta["history"]]
    assert l1[-1] < 0.6 * l1[0], l1  # it fits them
    assert meta["test_nme"] < 0.3  # mean-shape start: a random head scores ~1.7 here
    assert load_mobilefacenet(MobileFaceNet(), out).clean


def test_landmark_training_views_are_not_flipped():
    """A flip would move the points without swapping the left / right indices (36 = image-left eye corner)."""
    from ferkit.models.landmarks import LandmarkPretrainConfig, _datasets, _loaders

    cfg = LandmarkPretrainConfig(out="unused.safetensors", train_subjects=2, test_subjects=1, samples_per_subject=8,
                                 batch_size=16)
    train, test = _datasets(cfg)
    _, loader, _ = _loaders(cfg, train, test)
    pts = next(iter(loader))["landmarks"]
    assert (pts[:, 36, 0] < pts[:, 45, 0]).all()


def test_folder_landmarks_counts_images_without_a_face(tmp_path):
    from ferkit.models.landmarks import FolderLandmarks

    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / f"f{i}.png")
    points = np.stack([np.linspace(5, 35, 68), np.linspace(8, 30, 68)], 1)
    detect = lambda im: None if np.asarray(im).mean() == 0 else points  # noqa: E731  (first image: "no face")
    ds = FolderLandmarks(tmp_path, detect)
    assert len(ds) == 2 and len(ds.skipped) == 1 and "f0.png" in ds.skipped[0]
    np.testing.assert_allclose(ds.load(0)["landmarks"], points)


def test_mediapipe_source_labels_a_folder_like_the_ground_truth(tmp_path):
    """The real-image path: MediaPipe face mesh -> iBUG-68 on face crops in a folder (here rendered faces, so the
    renderer's landmarks are the reference)."""
    faces = pytest.importorskip("ferkit.inference.faces", reason="ferkit.inference.faces is not available")
    from ferkit.data.synthetic import SyntheticConfig, SyntheticFaces
    from ferkit.models.landmarks import LandmarkPretrainConfig, _datasets, landmark_nme

    try:
        faces.FaceMeshLandmarks()
    except Exception as e:  # mediapipe missing or broken
        pytest.skip(f"MediaPipe face mesh unavailable: {e}")
    ds = SyntheticFaces("test", SyntheticConfig(num_subjects=1, samples_per_subject=6, occlusion_prob=0.0, seed=3))
    truth = {}
    for i in range(len(ds)):
        sample = ds.load(i)
        sample["image"].save(tmp_path / f"face_{i}.png")
        truth[f"face_{i}.png"] = torch.as_tensor(sample["landmarks"])
    cfg = LandmarkPretrainConfig(out="unused.safetensors", source="mediapipe", images=str(tmp_path), holdout=0.34)
    train, test = _datasets(cfg)
    assert len(train) + len(test) + len(train.base.skipped) == 6 and len(test) == 2
    for sub in (train, test):
        for j in range(len(sub)):
            got = torch.as_tensor(sub.load(j)["landmarks"])
            ref = truth[Path(sub.records[j].path).name]
            assert float(landmark_nme((got / 112).reshape(1, -1), ref[None], 112)) < 0.2


# ------------------------------------------------------------------------------------------- per-image listing
def test_eval_per_image_lists_files_and_confusion(tmp_path, capsys):
    from ferkit.cli import main

    tiny = TinyFaces(24, size=32)
    for split, idx in (("train", range(16)), ("test", range(16, 24))):
        for i in idx:
            d = tmp_path / "data" / split / tiny.class_names[tiny.records[i].label]
            d.mkdir(parents=True, exist_ok=True)
            tiny.load(i)["image"].save(d / f"img_{i:03d}.png")
    cfg = load_config("resnet18_synthetic", ["data.input_size=32", "data.dataset=imagefolder",
                                             f"data.root={tmp_path / 'data'}", "train.tensorboard=false"])
    trainer = Trainer(cfg, tmp_path / "run")  # an untrained checkpoint is enough for the listing
    save_weights(tmp_path / "w.safetensors", trainer.method.inference_model().state_dict(), trainer.weights_metadata())
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "w.safetensors"), "--per-image"]) == 0
    text = capsys.readouterr().out
    rows = [line.split("\t") for line in text.splitlines() if line.startswith("img_")]
    assert len(rows) == 8 and all(len(r) == 5 for r in rows)
    assert {r[0] for r in rows} == {f"img_{i:03d}.png" for i in range(16, 24)}
    assert all(r[3] == tiny.class_names[int(r[1])] and r[4] == tiny.class_names[int(r[2])] for r in rows)
    matrix = [line for line in text.splitlines() if re.match(r"c\d ", line)]
    assert len(matrix) == 4 and sum(int(c) for line in matrix for c in line.split("|")[0].split()[1:]) == 8
