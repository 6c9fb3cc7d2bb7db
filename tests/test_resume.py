"""SIGKILL during training, then --resume: the final metrics and weights equal an uninterrupted run's."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import write_imagefolder

OVERRIDES = ["data.dataset=imagefolder", "data.train_split=train", "data.test_split=test", "data.input_size=48",
             "train.epochs=3", "train.batch_size=8", "train.checkpoint_every_steps=3", "train.progress=false",
             "train.tensorboard=false", "train.threads=1", "optim.scheduler=exponential", "optim.gamma=0.8",
             "model.kwargs.drop_rate=0.3"]  # dropout: the restored RNG state matters


def _train_cmd(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ferkit", "train", "--run-dir", str(run_dir), f"data.root={data_root}", *OVERRIDES,
            *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.timeout(600)
def test_sigkill_mid_epoch_then_resume_is_identical(tmp_path):
    data = tmp_path / "data"
    write_imagefolder(data)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_train_cmd(ref, data), check=True, env=_env(), capture_output=True, timeout=300)

    proc = subprocess.Popen(_train_cmd(cut, data), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = cut / "checkpoints" / "state.pt"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    saved = torch.load(state, weights_only=True)["train_state"]
    assert saved["position"] > 0 and saved["epoch"] == 0, "expected a mid-epoch state at the kill"

    out = subprocess.run([sys.executable, "-m", "ferkit", "train", "--resume", str(cut)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]

    a = load_file(str(ref / "checkpoints" / "last.safetensors"))
    b = load_file(str(cut / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref_log = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    cut_log = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["test"]["wa"] for r in ref_log] == [r["test"]["wa"] for r in cut_log]
    assert [round(r["train_loss"], 6) for r in ref_log] == [round(r["train_loss"], 6) for r in cut_log]
