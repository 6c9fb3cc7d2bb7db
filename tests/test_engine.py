import json

import numpy as np
import pytest
import torch

from ferkit.config import load_config
from ferkit.data.build import DataSplits
from ferkit.engine import Trainer, TrainingError
from ferkit.engine.checkpoint import read_metadata
from ferkit.inference import Predictor

from tiny import TinyFaces


def _cfg(*overrides):
    return load_config("resnet18_synthetic", ["train.epochs=2", "train.batch_size=16", "data.input_size=32",
                                              "train.progress=false", "train.tensorboard=false", *overrides])


def _splits():
    return DataSplits(TinyFaces(64, seed=0), TinyFaces(32, seed=1, split="test"))


def test_train_writes_a_complete_run(tmp_path):
    result = Trainer(_cfg(), tmp_path / "run", splits=_splits()).fit()
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "report.md", "test_predictions.csv", "plots/curves.png",
              "plots/confusion.png", "checkpoints/last.safetensors", "checkpoints/best.safetensors",
              "checkpoints/state.pt"):
        assert (run / f).is_file(), f
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert 0 <= result["test"]["wa"] <= 1 and "occluded" in result["test"]["subsets"]
    meta = read_metadata(run / "checkpoints" / "best.safetensors")
    assert meta["class_names"] == ["c0", "c1", "c2", "c3"] and meta["input_size"] == [3, 32, 32]
    assert meta["selected_on"] == "test"
    assert "picked on test" in (run / "report.md").read_text()
    # the checkpoint alone is enough for inference
    pred = Predictor.from_run(run)
    probs = pred.predict_images([TinyFaces(4).load(i)["image"] for i in range(4)])
    assert probs.shape == (4, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_learns_the_tiny_task(tmp_path):
    cfg = _cfg("train.epochs=5", "optim.lr=0.003", "data.augment.hflip=false")  # flips swap the quadrant classes
    result = Trainer(cfg, tmp_path / "run", splits=_splits()).fit()
    assert result["test"]["wa"] > 0.6  # chance is 0.25


def test_grad_accumulation_matches_full_batch(tmp_path):
    """Same samples, batch 16 x 1 vs batch 8 x 2 accumulation (BN batch statistics of 16 vs 8 samples differ, so
    BN runs on its running statistics: train.freeze_bn)."""
    outs = []
    for bs, acc in ((16, 1), (8, 2)):
        cfg = _cfg("train.epochs=1", f"train.batch_size={bs}", f"train.accum_steps={acc}", "optim.scheduler=none",
                   "data.augment.hflip=false", "data.augment.crop_padding=0", "optim.name=sgd", "optim.momentum=0.0",
                   "optim.weight_decay=0.0", "train.freeze_bn=true")
        tr = Trainer(cfg, tmp_path / f"r{bs}", splits=_splits())
        tr.fit()
        outs.append(tr.method.model.fc.weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_with_the_step_or_skips(tmp_path):
    cfg = _cfg("optim.lr=1e30", "optim.name=sgd", "train.epochs=3")
    with pytest.raises(TrainingError, match=r"non-finite loss .* at epoch \d+, step \d+"):
        Trainer(cfg, tmp_path / "a", splits=_splits()).fit()
    cfg = _cfg("optim.lr=1e30", "optim.name=sgd", "train.epochs=1", "train.nan_policy=skip")
    Trainer(cfg, tmp_path / "b", splits=_splits()).fit()  # completes, skipping bad batches


def test_sam_closure_gradients_are_clipped_like_the_first_pass():
    """SAM applies the closure's (second-pass) gradients, so train.clip_grad must clip those, not only the first."""
    from ferkit.engine.trainer import _clipping

    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 100.0 * w.sum()
        loss.backward()  # gradient norm 200
        return loss

    loss = _clipping(closure, opt, max_norm=1.0)()
    assert loss.item() == 400.0
    assert w.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
