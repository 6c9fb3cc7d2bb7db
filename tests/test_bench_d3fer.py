"""bench/bench_d3fer_noise.py and bench/d3fer_filter_probe.py: the budget LR compression and the filter probe's
scores, against hand computation."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ferkit.config import load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_d3fer_noise  # noqa: E402
import d3fer_filter_probe  # noqa: E402


def test_schedule_compressed_to_the_papers_overall_decay():
    cfg = load_config("d3fer_fer2013", ["train.epochs=5"])
    bench_d3fer_noise.compress_schedule(cfg)
    assert cfg.optim.gamma ** 5 == pytest.approx(0.98 ** 100, rel=1e-4)  # x0.133 over the run, as over 100 epochs
    cos = load_config("resnet18_synthetic", ["train.epochs=5"])
    gamma = cos.optim.gamma
    bench_d3fer_noise.compress_schedule(cos)  # not an exponential schedule: left alone
    assert cos.optim.gamma == gamma


def test_filter_probe_scores_by_hand():
    # p̄ of five samples; given labels y and true labels t (samples 1, 3, 4 are flipped)
    conf = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]])
    y, t = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 0, 1, 2, 2])
    s = d3fer_filter_probe.filter_scores(conf, y, t)
    # τ_0 = (0.7 + 0.1) / 2, τ_1 = (0.3 + 0.8 + 0.7) / 3, τ_2 (no entry) = mean p̄[y] = 2.6 / 5; τ_glob = 3.6 / 5
    assert s["tau_class_mean"] == pytest.approx((0.4 + 0.6 + 0.52) / 3)
    assert s["tau_global"] == pytest.approx(0.72)
    # clean: samples 0, 2, 4 (4 is flipped); corrected: sample 3 (0.8 >= 0.72, argmax 2 = its true label)
    assert s["selected_frac"] == pytest.approx(0.6)
    assert s["filter_precision"] == pytest.approx(2 / 3) and s["filter_recall"] == pytest.approx(1.0)
    assert s["corrected_frac"] == pytest.approx(0.2) and s["correction_acc"] == pytest.approx(1.0)
    assert s["clean_rate"] == pytest.approx(0.4) and s["random_correction_acc"] == pytest.approx(0.5)
    assert s["agreement"] == pytest.approx(0.6) and s["true_train_acc"] == pytest.approx(0.8)
