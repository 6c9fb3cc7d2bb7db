"""Pieces the bench scripts share: data-root default, run overrides, budget calibration, honest timing, peak memory
and JSON-line output. Import from a bench script as ``from _common import ...`` (``bench/`` is on ``sys.path`` when a
script in it runs) or as ``bench._common`` from the repository root.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

__all__ = [
    "REPO", "default_data_root", "run_overrides", "subset", "small_splits", "seconds_per_sample", "budget_epochs",
    "fresh_dir", "sync", "time_iters", "median_rate", "reset_peak_memory", "peak_memory_mb", "current_memory_mb",
    "cpu_name", "JsonLines", "facts", "write_readme_section",
]


# ------------------------------------------------------------------------------------------------------ data, runs
def default_data_root() -> str:
    """``$FERKIT_DATA``, else ``<repo>/../shared/data``."""
    return os.environ.get("FERKIT_DATA", str(REPO.parent / "shared" / "data"))


def run_overrides(*, seed: int, device: str, threads: int, name: str, limit_train: int = 0,
                  limit_test: int = 0, data_root: str | Path | None = None) -> list[str]:
    """The ``key=value`` overrides every bench run sets: quiet, no TensorBoard, the bench's device and threads."""
    ov = [f"seed={seed}", f"train.device={device}", f"train.threads={threads}", "train.progress=false",
          "train.tensorboard=false", f"data.limit_train={limit_train}", f"data.limit_test={limit_test}",
          f"name={name}"]
    return ov + ([f"data.root={data_root}"] if data_root is not None else [])


def subset(ds, n: int, seed: int, split: str):
    """``n`` records of ``ds`` drawn at random (sorted), as a :class:`~ferkit.data.base.Subset`."""
    from ferkit.data.base import Subset

    pick = np.sort(np.random.default_rng(seed).permutation(len(ds))[:min(n, len(ds))])
    return Subset(ds, pick, split)


def small_splits(splits, n_train: int, n_test: int, seed: int):
    """A few batches of ``splits.train`` and a small test set: what a calibration run trains on."""
    from ferkit.data.build import DataSplits

    return DataSplits(subset(splits.train, n_train, seed, "train"), subset(splits.test, n_test, seed, "test"))


def seconds_per_sample(cfg, splits, run_dir: Path, n_train: int, n_test: int, seed: int = 0) -> float:
    """Budget calibration -> training seconds per sample: two epochs over ``n_train`` samples, timed on the second.

    The first epoch pays one-off costs (DataLoader workers starting, allocator and kernel caches warming) that, over a
    few batches, can dwarf the training itself and would leave a budgeted run with a fraction of the epochs it can
    afford; the second epoch's time still includes its small evaluation and checkpoint write."""
    import copy

    from ferkit.engine import Trainer

    cfg = copy.deepcopy(cfg)
    cfg.train.epochs = 2
    small = small_splits(splits, n_train, n_test, seed)
    trainer = Trainer(cfg, fresh_dir(run_dir), splits=small)
    trainer.fit()
    first, second = (h["time_s"] for h in trainer.state.history[-2:])
    return (second - first) / len(small.train)


def budget_epochs(sec_per_sample: float, n_train: int, budget_min: float, max_epochs: int, min_epochs: int = 1,
                  overhead_s: float = 2.0) -> int:
    """Epochs that fit ``budget_min`` minutes (5 % slack plus ``overhead_s`` per epoch for evaluation and saving)."""
    per_epoch = sec_per_sample * n_train * 1.05 + overhead_s
    return int(min(max_epochs, max(min_epochs, math.floor(60 * budget_min / per_epoch))))


def budget_plan(sec_per_sample: float, n_train: int, budget_min: float, max_epochs: int, min_epochs: int = 1,
                overhead_s: float = 2.0) -> tuple[int, int]:
    """(epochs, training samples) for a budget: the whole set for the epochs that fit (:func:`budget_epochs`) or,
    when one epoch of it does not fit (ARM or POSTER on a CPU), one epoch over the random subset that does."""
    if sec_per_sample * n_train * 1.05 + overhead_s <= 60 * budget_min:
        return budget_epochs(sec_per_sample, n_train, budget_min, max_epochs, min_epochs, overhead_s), n_train
    return 1, max(1, min(n_train, int((60 * budget_min - overhead_s) / (sec_per_sample * 1.05))))


def fresh_dir(path: Path) -> Path:
    """``path`` emptied of an earlier run (the engine appends to an existing metrics.jsonl)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iters(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones (device synchronised around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median_rate(items_per_call: int, times: list[float]) -> float:
    """Items per second at the median call time."""
    return items_per_call / statistics.median(times)


# ---------------------------------------------------------------------------------------------------- peak memory
_STATUS = Path("/proc/self/status")


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so an earlier, bigger model's memory does not
    hide the next measurement's rise in resident set."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak: CUDA's allocator counter, or on Linux the process high-water mark (``clear_refs`` 5)
    after freed heap is returned to the OS. False when the CPU peak cannot be reset (then :func:`peak_memory_mb` is
    the process peak so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`: CUDA bytes allocated by torch, or the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def current_memory_mb(device: torch.device) -> float | None:
    """Now: CUDA bytes allocated by torch, or the process's resident set (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_mb("VmRSS")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's word for it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


# ---------------------------------------------------------------------------------------------------------- output
def facts() -> dict[str, str]:
    """Fields every row carries: date (UTC, ISO) and torch version."""
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__}


class JsonLines:
    """Print each row as one JSON line and append it to ``path`` (if given), flushed, so a killed bench keeps
    what it measured."""

    def __init__(self, path: str | Path | None, mode: str = "w", echo: bool = True):
        self.echo = echo
        self.file: TextIO | None = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, mode, encoding="utf-8")

    def __call__(self, row: dict) -> dict:
        line = json.dumps(row)
        if self.echo:
            print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        return row

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def __enter__(self) -> "JsonLines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_readme_section(marker: str, text: str, readme: Path = REPO / "README.md") -> None:
    """Replace what lies between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in README (atomically)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    content = readme.read_text(encoding="utf-8")
    if start not in content or end not in content:
        raise SystemExit(f"{readme}: markers {start} / {end} not found")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(f"{head}{start}\n{text}\n{end}{tail}", encoding="utf-8")
    os.replace(tmp, readme)
