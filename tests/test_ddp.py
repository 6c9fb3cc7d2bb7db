"""Real multi-process DDP (torchrun, gloo on CPU): 2 processes x batch 8 == 1 process x batch 16."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import write_imagefolder

TINY_CLI = str(Path(__file__).with_name("tiny_cli.py"))  # ferkit's CLI + the smooth test model ``tiny_smooth``

COMMON = ["data.dataset=imagefolder", "data.train_split=train", "data.test_split=test", "data.input_size=32",
          "train.epochs=2", "train.progress=false", "train.tensorboard=false", "train.threads=1"]
RESNET = [  # batch-independent normalisation: per-process BatchNorm statistics (no SyncBatchNorm on CPU) would differ
    # from the single process's by construction, and BN frozen at its initial statistics leaves a from-scratch
    # ResNet unnormalised and so ill-conditioned that 1e-7 reduction-order differences grow to 1e-4
    "model.kwargs.norm=group",
    "optim.name=sgd", "optim.lr=0.001", "optim.scheduler=exponential", "optim.gamma=0.9"]  # a stable LR (a
# diverging run amplifies float reduction-order noise from 1e-7 to 1e-2)


def _single_and_ddp(tmp_path, overrides, entry=("-m", "ferkit")):
    """Train one config as 1 process x batch 16 and as 2 gloo processes x batch 8 (the same global batch); return
    (single, ddp), each (last.safetensors weights, metrics.jsonl records). ``entry``: the CLI, as python arguments."""
    data = write_imagefolder(tmp_path / "data", size=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = [sys.executable, *entry, "train", "--run-dir", str(tmp_path / "single"), f"data.root={data}",
              *COMMON, *overrides, "train.batch_size=16"]
    out = subprocess.run(single, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry,
           "train", "--run-dir", str(tmp_path / "ddp"), f"data.root={data}", *COMMON, *overrides, "train.batch_size=8"]
    out = subprocess.run(ddp, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return tuple((load_file(str(tmp_path / run / "checkpoints" / "last.safetensors")),
                  [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()])
                 for run in ("single", "ddp"))


@pytest.mark.timeout(600)
def test_two_process_ddp_matches_single_process(tmp_path):
    (a, la), (b, lb) = _single_and_ddp(tmp_path, RESNET)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert len(la) == len(lb) == 2
    for ra, rb in zip(la, lb):  # train loss all-reduced over ranks = the single process's average
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["test"]["wa"] == ra["test"]["wa"]


@pytest.mark.timeout(600)
def test_sam_under_ddp_matches_single_process(tmp_path):
    """POSTER's recipe (method ``poster``: manual optimisation; ``sam_adam``: pytorch-optimizer's SAM over Adam) under
    2 processes: both backward passes of a SAM step go through the trainer's gradient all-reduce, the one at w (its
    gradients set the ascent e(w)) and the one at w + e(w) (Adam applies those), so 8 steps of 2 x 8 == 8 steps of 16.
    Without the sync before the ascent (or the one in the closure), epoch losses differ by ~1e-4..1e-2 relative and
    weights by ~7e-3; with both, by ~1e-7 and ~2e-7. The model is tests/tiny_cli.py's ``tiny_smooth``: POSTER's own
    network is far too heavy for a CPU test, and a ReLU network turns float noise into O(1e-2) differences through
    SAM's ascent (see there)."""
    (a, la), (b, lb) = _single_and_ddp(tmp_path, ["model.name=tiny_smooth", "method.name=poster",
                                                  "optim.name=sam_adam", "optim.lr=0.001", "optim.weight_decay=0",
                                                  "optim.sam_rho=0.05"], entry=(TINY_CLI,))
    assert len(la) == len(lb) == 2
    for ra, rb in zip(la, lb):
        for key in ("train_loss", "train_sam_loss"):  # the loss at w, and at the ascent point w + e(w)
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6)


@pytest.mark.timeout(900)
def test_ddp_run_stopped_after_an_epoch_and_resumed_ends_like_the_uninterrupted_one(tmp_path):
    """2 processes: a run stopped after epoch 1 and continued with ``--resume`` (still 2 processes) ends with the
    weights and metrics of the uninterrupted 2-process run: rank 0's checkpoint (weights, optimiser, scheduler,
    epoch, sampler position) is what every rank restores."""
    data = write_imagefolder(tmp_path / "data", size=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [f"data.root={data}", *COMMON, "model.name=tiny_smooth", "optim.name=adam", "optim.lr=0.001",
            "optim.scheduler=exponential", "optim.gamma=0.9",  # a schedule that does not depend on train.epochs
            "train.batch_size=8"]

    def torchrun(*args: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TINY_CLI,
               "train", *args]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

    torchrun("--run-dir", str(tmp_path / "full"), *base)
    torchrun("--run-dir", str(tmp_path / "part"), *base, "train.epochs=1")
    torchrun("--resume", str(tmp_path / "part"), "train.epochs=2")
    full, part = (load_file(str(tmp_path / run / "checkpoints" / "last.safetensors")) for run in ("full", "part"))
    for k in full:
        torch.testing.assert_close(part[k], full[k], rtol=1e-5, atol=1e-6)
    logs = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("full", "part")]
    assert [r["epoch"] for r in logs[1]] == [1, 2]
    for ra, rb in zip(*logs):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-6)
        assert rb["test"]["wa"] == ra["test"]["wa"]
