"""Analysis and reports: every figure and table on a tiny run, with values checked where they can be computed."""
import csv
import functools
import importlib.util
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from ferkit.analysis import data_stats, gradcam, model_views, tables, tsne
from ferkit.analysis.analyze import analyze_run, compare_runs, pick_examples
from ferkit.cli import main
from ferkit.config import AugmentConfig, load_config
from ferkit.data.base import FaceRecord
from ferkit.data.transforms import build_transform
from ferkit.engine import Trainer
from ferkit.engine.crossval import summarize_folds
from ferkit.models import list_models

from tiny import TinyFaces, write_imagefolder

PAPER_MODELS = ("resnet18", "dsan", "arm", "poster_small", "rgbd_cmsa")  # poster_small: POSTER with 4 levels
needs_gradcam = pytest.mark.skipif(importlib.util.find_spec("pytorch_grad_cam") is None,
                                   reason="grad-cam not installed (pip install 'ferkit[analysis]')")


def _png(path) -> tuple[int, int]:
    """A valid, non-empty PNG: PIL opens and decodes it."""
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def _report_images(report: Path) -> list[Path]:
    import re

    return [report.parent / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-epoch ResNet-18 run on an on-disk image folder (so `ferkit analyze` can rebuild its test split)."""
    root = write_imagefolder(tmp_path_factory.mktemp("data"), sizes=(("train", 32, 0), ("test", 24, 1)), size=32)
    cfg = load_config("resnet18_synthetic", [
        "data.dataset=imagefolder", f"data.root={root}", "data.input_size=32", "train.epochs=2",
        "train.batch_size=16", "train.progress=false", "train.tensorboard=false", "data.augment.hflip=false",
        "optim.lr=0.003", "name=tiny"])
    run = tmp_path_factory.mktemp("runs") / "tiny"
    Trainer(cfg, run).fit()
    return run


# ------------------------------------------------------------------ whole-run analyses
@needs_gradcam
def test_analyze_writes_report_with_every_plot(tiny_run):
    report = analyze_run(tiny_run, tsne=True, gradcam=True, num_images=4)
    text = report.read_text()
    for section in ("## Training curves", "## Confusion matrix (test)", "t-SNE", "Grad-CAM", "## Per-class accuracy"):
        assert section in text
    images = _report_images(report)
    assert {p.name for p in images} >= {"curves.png", "confusion.png", "per_class.png", "tsne.png", "gradcam.png"}
    for p in images:
        w, h = _png(p)
        assert w > 100 and h > 100
    with np.load(tiny_run / "analysis" / "test_features.npz") as z:
        assert z["features"].shape == (24, 512) and sorted(set(z["labels"].tolist())) == [0, 1, 2, 3]


def test_cli_analyze_and_compare(tiny_run, tmp_path):
    assert main(["analyze", str(tiny_run), "--no-views"]) == 0
    other = tmp_path / "tiny2"
    shutil.copytree(tiny_run, other)
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_run), str(other), "--out", str(out), "--tsne"]) == 0
    md = (out / "compare.md").read_text()
    assert "`tiny`" in md and "`tiny2`" in md and "Robustness" not in md  # image folders have no subsets
    _png(out / "compare.png")
    _png(out / "compare_tsne.png")
    assert main(["compare", str(tmp_path / "nope")]) == 2


def test_pick_examples_covers_classes_then_mistakes():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 0, 0])
    # correct ones first (class 0 at 0, class 1 at 2; class 2 has none), then mistakes (class 0 at 1, class 2 at 4)
    assert pick_examples(labels, preds, 10, 3) == [0, 2, 1, 4]
    assert pick_examples(labels, None, 2, 3) == [0, 2]


# ------------------------------------------------------------------ t-SNE
def test_tsne_separates_clusters_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    feats = rng.normal(size=(90, 16)) * 0.3 + np.eye(3, 16)[labels] * 5  # three far-apart clusters
    emb = tsne.tsne_embed(feats, seed=0)
    d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() > 0.95  # 1-NN in the embedding keeps the class
    path = tsne.plot_tsne_grid([("a", feats, labels), ("b", feats[:40], labels[:40])], ["x", "y", "z"],
                               tmp_path / "t.png")
    w, h = _png(path)
    assert w > h  # two panels side by side


def test_subsample_per_class_is_stratified():
    labels = np.array([0] * 90 + [1] * 9 + [2])
    keep = tsne.subsample_per_class(labels, 20, seed=0)
    counts = np.bincount(labels[keep], minlength=3)
    assert counts.tolist() == [18, 2, 1] and len(set(keep.tolist())) == len(keep)


# ------------------------------------------------------------------ Grad-CAM
def test_reshape_transforms_rebuild_the_grid():
    b, c = 2, 3
    grid = torch.arange(b * c * 4, dtype=torch.float32).reshape(b, c, 2, 2)
    tokens = grid.flatten(2).transpose(1, 2)  # (B, 4, C) row-major positions
    with_cls = torch.cat([torch.full((b, 1, c), -1.0), tokens], dim=1)
    assert torch.equal(gradcam.reshape_transform("tokens")(with_cls), grid)  # leading cls token dropped
    fused = torch.cat([with_cls, with_cls * 10], dim=1)  # two streams of 5 tokens
    assert torch.equal(gradcam.reshape_transform("tokens[6:10]")(fused), grid * 10)
    assert torch.equal(gradcam.reshape_transform("bhwc")(grid.permute(0, 2, 3, 1)), grid)
    assert gradcam.reshape_transform(None) is None
    with pytest.raises(ValueError):
        gradcam.reshape_transform("patches")


class _Bright(nn.Module):
    """Evidence for class 1 = brightness, max-pooled: Grad-CAM must point at the bright patch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        nn.init.constant_(self.conv.weight, 1 / 27)
        nn.init.zeros_(self.conv.bias)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).amax(dim=(2, 3)))


@needs_gradcam
def test_gradcam_points_at_the_evidence():
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 20:28, 4:12] = 1.0  # bright patch, bottom left
    model = _Bright()
    cams, probs = gradcam.compute_cams(model, x, model.conv, targets=[1])
    assert cams.shape == (1, 32, 32) and probs.shape == (1, 2)
    r, c = np.unravel_index(cams[0].argmax(), cams[0].shape)
    assert 19 <= r <= 28 and 3 <= c <= 12
    assert cams[0][:10, 20:].max() < 0.05  # nothing far from the patch


@functools.lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    """One seeded instance per paper model, shared by the tests (building POSTER takes seconds on CPU)."""
    from ferkit.models import create_model

    if name not in list_models():
        pytest.skip(f"{name} is not registered")
    torch.manual_seed(0)
    return create_model(name, num_classes=4).eval()


@needs_gradcam
@pytest.mark.parametrize("name", PAPER_MODELS)
def test_gradcam_grid_for_each_paper_model(name, tmp_path):
    model = _model(name)
    samples = [_rgbd_sample(i) for i in range(2)]
    tf = build_transform("eval", 64, (0.5,) * 3, (0.5,) * 3, AugmentConfig())
    layer, reshape = gradcam.resolve_target_layer(model)
    x, extra = gradcam._prepare(tf, samples[0])
    extra = {k: v for k, v in extra.items() if k in gradcam.extra_modalities(model)}
    cams, probs = gradcam.compute_cams(model, x, layer, reshape=reshape, extra=extra)
    assert cams.shape == (1, 64, 64) and np.isfinite(cams).all() and 0 <= cams.min() <= cams.max() <= 1 + 1e-6
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    path = gradcam.gradcam_grid({name: model}, samples[1:], tf, tmp_path / "g.png", class_names=list("abcd"))
    w, h = _png(path)
    assert w > 200 and h > 200


@needs_gradcam
def test_gradcam_through_vit_tokens():
    """A token layer (rgbd_cmsa's ViT encoder: cls + 2x2 tokens at 64 px) through the "tokens" reshape. The block
    before the last is used: only the cls token of the last block reaches the head, so its patch tokens get no
    gradient."""
    model = _model("rgbd_cmsa")
    x, depth = torch.randn(1, 3, 64, 64), torch.randn(1, 1, 64, 64)
    cams, _ = gradcam.compute_cams(model, x, model.blocks[-2], reshape=gradcam.reshape_transform("tokens"),
                                   extra={"depth": depth})
    assert cams.shape == (1, 64, 64) and np.isfinite(cams).all() and cams.max() > 0


def _rgbd_sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    depth = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    return {"image": Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
            "depth": Image.fromarray(depth, "F"), "label": i % 4}


@needs_gradcam
def test_gradcam_needs_depth_for_rgbd(tmp_path):
    tf = build_transform("eval", 64, (0.5,) * 3, (0.5,) * 3, AugmentConfig())
    with pytest.raises(ValueError, match="depth"):
        gradcam.gradcam_grid({"m": _model("rgbd_cmsa")}, [_rgbd_sample(0)["image"]], tf, tmp_path / "g.png")


# ------------------------------------------------------------------ model views
def _ctx(tmp_path, n=8):
    ds = TinyFaces(n, k=4, size=64)
    tf = build_transform("eval", 64, (0.5,) * 3, (0.5,) * 3, AugmentConfig())
    samples = [{**ds.load(i), "depth": _rgbd_sample(i)["depth"]} for i in range(3)]  # RGB-D views need depth
    batches = [{k: torch.stack([tf(dict(s))[k] for s in samples]) if k in ("image", "depth")
                else torch.tensor([s[k] for s in samples]) for k in ("image", "depth", "label", "index")}]
    return model_views.ViewContext(tmp_path, loader=batches, samples=samples, transform=tf,
                                   class_names=ds.class_names, history=[{"epoch": 1, "p_a_zero": 0.4}])


@pytest.mark.parametrize("name", ["dsan", "arm", "poster_small", "rgbd_cmsa"])
def test_model_views_draw(name, tmp_path):
    views = model_views.model_views(_model(name), _ctx(tmp_path))
    assert views and all(v.image for v in views), [v.text for v in views]
    for v in views:
        _png(tmp_path / Path(v.image).name)
        assert v.markdown().startswith("### ")


def test_no_views_for_the_baseline(tmp_path):
    assert model_views.model_views(_model("resnet18"), _ctx(tmp_path)) == []
    assert model_views.has_views("poster_base") and not model_views.has_views("resnet18")


def test_dsan_p_a_zero_matches_the_model():
    model = _model("dsan")
    from ferkit.models.dsan import p_a_zero

    x = torch.randn(4, 3, 64, 64)
    stats = model_views.dsan_attention_stats(model, [(x, {}, torch.arange(4))])
    with torch.no_grad():
        out = model.forward_branches(x)
    assert np.isclose((stats["a"] == 0).mean(), float(p_a_zero(out.attention)))
    assert np.allclose(stats["b"], out.local_weights.numpy(), atol=1e-6)


def test_arm_perception_frequency_by_hand():
    arm = _model("arm").arm
    freq = model_views._perception_frequency(arm, 32)
    # 11 windows of 32 at stride 8 on a 112 side: a corner pixel is seen once, the interior 4 x 4 = 16 times
    assert freq.shape == (112, 112) and freq[0, 0] == 1 and freq[56, 56] == 16 and freq[0, 56] == 4
    assert freq.sum() == 11 * 11 * 32 * 32


def test_poster_attention_reproduces_the_module():
    if "poster_small" not in list_models():
        pytest.skip("poster is not registered")
    from ferkit.models.poster import CrossFusionAttention

    torch.manual_seed(0)
    attn = CrossFusionAttention(16, num_heads=4).eval()
    q, ctx = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    probs = model_views._attention_probs(attn, q, ctx)  # (B, h, Nq, N)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 5))
    v = attn.kv(ctx).reshape(2, 5, 2, 4, 4)[:, :, 1].transpose(1, 2)
    mixed = (probs @ v).transpose(1, 2).reshape(2, 5, 16)
    assert torch.allclose(attn.proj(mixed), attn(query=q, context=ctx), atol=1e-5)


def test_poster_mean_token_maps_sum_to_at_most_one():
    maps = model_views.poster_mean_token_attention(_model("poster_small"), torch.randn(2, 3, 64, 64))
    assert maps.shape == (4, 2, 7, 7)
    assert (maps >= 0).all() and (maps.sum((-1, -2)) < 1).all()  # the rest goes to the landmark mean token


def test_rgbd_masks_match_the_model(tmp_path):
    model = _model("rgbd_cmsa")
    x, depth = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 64)
    with model_views.CaptureOutputs({"rgb": model.rgb_attention, "depth": model.depth_attention}) as rec:
        with torch.no_grad():
            model(x, depth=depth)
    ref = model.attention_maps(x, depth)
    assert torch.allclose(rec["rgb"][0], ref["rgb"]) and torch.allclose(rec["depth"][0], ref["depth"])


# ------------------------------------------------------------------ tables
def _fake_run(root: Path, name: str, records: list[dict], **cfg) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {"name": name, "model": {"name": cfg.get("model", "resnet18")},
              "method": {"name": cfg.get("method", "supervised")}, "data": {"dataset": "rafdb",
              "noise": {"rate": cfg.get("noise", 0.0)}}, "train": {"select_metric": "wa"},
              "_run": {"select_split": cfg.get("select", "test"), "classes": ["a", "b"]}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{truncated")
    return run


def _rec(epoch, wa, ua=0.5, subsets=None, **extra):
    test = {"n": 100, "wa": wa, "ua": ua, "f1": ua}
    if subsets is not None:
        test["subsets"] = subsets
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "test": test, "lr": {"model": 0.1}, **extra}


def test_robustness_table_dsan_layout(tmp_path):
    sub_a = {"occluded": {"n": 10, "wa": 0.8, "ua": 0.7}, "pose>30": {"n": 20, "wa": 0.85, "ua": 0.8}}
    sub_b = {"occluded": {"n": 10, "wa": 0.9, "ua": 0.7}, "pose>30": {"n": 20, "wa": 0.75, "ua": 0.8},
             "pose>45": {"n": 5, "wa": 0.6, "ua": 0.6}}
    runs = tables.load_runs([_fake_run(tmp_path, "a", [_rec(1, 0.5), _rec(2, 0.88, subsets=sub_a)]),
                             _fake_run(tmp_path, "b", [_rec(1, 0.91, subsets=sub_b)], model="dsan")])
    lines = tables.robustness_table(runs).splitlines()
    assert lines[0] == "| run (WA %) | all | Occlusion n=10 | Pose (>30) n=20 | Pose (>45) |"
    assert lines[2] == "| `a` (resnet18) | 88.00 | 80.00 | 85.00 | - |"
    assert lines[3] == "| `b` (dsan) | 91.00 | 90.00 | 75.00 | 60.00 (n=5) |"


def test_headline_table_and_best_epoch(tmp_path):
    run = tables.load_run(_fake_run(tmp_path, "r", [_rec(1, 0.5), _rec(2, 0.7), _rec(3, 0.7), _rec(4, 0.6)]))
    assert len(run.history) == 4  # the truncated last line is ignored
    assert tables.best_epoch(run)["epoch"] == 2  # first maximum, as the trainer keeps strictly better epochs
    row = tables.headline_table([run]).splitlines()[2]
    assert row.startswith("| `r` | resnet18 | supervised | rafdb | 4 | 60.00 |") and "| 2 (test) | 70.00 |" in row


def test_noise_table_reads_d3fer_keys_and_tolerates_missing(tmp_path):
    d3 = [_rec(1, 0.5), _rec(2, 0.6, filter_precision=0.95, filter_recall=0.8, correction_acc=0.7), _rec(3, 0.62)]
    runs = tables.load_runs([_fake_run(tmp_path, "d3", d3, method="d3fer", noise=0.3),
                             _fake_run(tmp_path, "ce", [_rec(1, 0.55)], noise=0.1)])
    lines = tables.noise_table(runs).splitlines()
    assert lines[2] == "| `ce` | supervised | 10 | 55.00 | 50.00 | - | - | - |"
    assert lines[3] == "| `d3` | d3fer | 30 | 62.00 | 50.00 | 95.00 | 80.00 | 70.00 |"  # last epoch that logged them
    assert tables.noise_metrics({"train_filter_recall": 0.5})["recall"] == 0.5


def test_cv_tables_from_crossval_layout(tmp_path):
    folds = [{"repeat": 0, "fold": f, "n_train": 8, "n_test": 2, "wa": wa, "ua": wa, "f1": wa, "n": 2,
              "confusion": [[1, 0], [0, 1]], "per_class": [1.0, 1.0]} for f, wa in enumerate((0.6, 0.8))]
    cv = summarize_folds(folds, ["a", "b"])
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "cv_results.json").write_text(json.dumps(cv))
    text = tables.cv_table(tables.load_cv(tmp_path / "cv"))
    assert "| 0 | 1 | 8 | 2 | 80.00 |" in text and "70.00 ± 10.00" in text  # mean 0.7, population std 0.1
    assert "70.00 ± 10.00" in tables.cv_summary_table({"cv": cv})
    md = compare_runs([tmp_path / "cv"], tmp_path / "out").read_text()
    assert "## Cross-validation" in md and "70.00 ± 10.00" in md


# ------------------------------------------------------------------ dataset statistics
def test_split_stats_counts_subjects_and_in_memory_duplicates(tmp_path):
    ds = TinyFaces(12, k=4, size=16)
    ds.images[5] = ds.images[1].copy()  # plant a duplicate (labels 1 and 1)
    ds.images[6] = ds.images[0].copy()  # and one with a conflicting label (0 vs 2)
    s = data_stats.split_stats(ds)
    assert s.counts.tolist() == [3, 3, 3, 3] and s.hashed_on == "pixels"
    # subjects s{i % 5}: class 0 = items 0, 4, 8 -> s0, s4, s3; class 1 = 1, 5, 9 -> s1, s0, s4
    assert s.subjects_per_class.tolist() == [3, 3, 3, 3] and s.num_subjects == 5
    assert s.sizes == {(16, 16): 12}
    dups = data_stats.find_duplicates([s])
    assert sorted(sorted(src for _, src, _ in g) for g in dups) == [["tiny:0", "tiny:6"], ["tiny:1", "tiny:5"]]
    md = data_stats.stats_markdown([s], dups)
    assert "2 groups of identical images" in md and "1 groups with conflicting labels" in md


def test_data_stats_cli_on_an_image_folder(tmp_path):
    root = write_imagefolder(tmp_path / "d", sizes=(("train", 8, 0), ("test", 4, 1)), size=16)
    leaked = next((root / "test").rglob("*.png"))
    shutil.copy(leaked, root / "train" / leaked.parent.name / "leak.png")  # a test image also in train
    out = tmp_path / "stats"
    assert main(["data", "stats", "imagefolder", str(root), "--out", str(out)]) == 0
    md = (out / "stats.md").read_text()
    assert "md5 of file bytes" in md and "**1 groups shared between splits**" in md
    assert "| **total** | 9 | 4 |" in md
    _png(out / "class_distribution.png")
    assert main(["data", "stats", "imagefolder"]) == 2


def test_data_stats_with_a_preset(tmp_path):
    root = write_imagefolder(tmp_path / "d", sizes=(("train", 8, 0), ("test", 4, 1)), size=16)
    assert main(["data", "stats", "--config", "resnet18_synthetic", "data.dataset=imagefolder",
                 f"data.root={root}", "--no-hash", "--out", str(tmp_path / "o")]) == 0
    assert "| c0 | 2 | 1 |" in (tmp_path / "o" / "stats.md").read_text()


def test_data_stats_on_real_ckplus_match_its_manifest(real_data_root):
    from ferkit.data.adapters import build_dataset

    ds = build_dataset("ckplus", real_data_root / "ckplus48", "all")
    (s,) = data_stats.dataset_stats({"all": ds})[0]
    rows = list(csv.DictReader(open(real_data_root / "ckplus48" / "manifest.csv")))
    subjects, groups = defaultdict(set), defaultdict(int)
    for r in rows:
        subjects[r["label"]].add(r["subject"])
        groups[r["md5"]] += 1
    assert s.n == len(rows) and s.num_subjects == len({r["subject"] for r in rows})
    assert sorted(s.subjects_per_class.tolist()) == sorted(len(v) for v in subjects.values())
    assert len(data_stats.find_duplicates([s])) == sum(1 for n in groups.values() if n > 1)


def test_records_are_read_not_decoded_for_sizes(tmp_path):
    """File-backed sizes come from the header; a record pointing at a file is hashed on its bytes."""
    from ferkit.data.base import FaceDataset

    p = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(p)
    ds = FaceDataset([FaceRecord(str(p), 0, str(p))], ["x"], split="train", root=tmp_path)
    s = data_stats.split_stats(ds)
    import hashlib

    assert s.sizes == {(40, 30): 1} and s.hashes == [hashlib.md5(p.read_bytes()).hexdigest()]
    assert s.sources == ["a.png"] and math.isclose(s.counts.sum(), 1)
