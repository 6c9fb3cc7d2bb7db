"""Speed suite: one JSON line per figure, for every registered model and the data pipeline.

Figures (``unit`` in brackets):

* ``train_step`` [images/s] — one supervised step (forward, cross-entropy, backward, AdamW step) on random
  images (+ random depth for RGB-D models) at each size; ``train_peak_memory`` [MiB] beside it;
* ``inference`` [images/s] — eval-mode forward under ``torch.inference_mode``; ``inference_peak_memory`` [MiB];
* ``data_load`` [images/s] — ``dataset.load(i)`` over FER2013 training images: decoding each file, or reading the
  decode-once cache (``decode_cache``);
* ``data_pipeline`` [images/s] — decode (or cache) + D3FER's weak and strong views (``d3fer_fer2013`` augmentation)
  through a DataLoader with 0 and 2 workers.

Sizes: ``paper`` (the model's ``model_info`` input size), then 48 and 112 px by default. A size a model cannot take
is a ``size_check`` line with ``skipped`` saying why; a model that resizes its input inside (ARM to 224, POSTER to 112) has a
``note`` saying so (seen by the input of its first convolution). A failed ``torch.compile`` is a line with ``error``.

Timing: ``--warmup`` untimed iterations, then ``--iters`` timed ones, CUDA synchronised around each; the value is
the median. Data figures time one pass after the first batch (worker start-up excluded). Peak memory: CUDA
``max_memory_allocated``, or on CPU the process's peak resident set since the measurement began (Linux VmHWM
reset through ``/proc/self/clear_refs``; ~1 GB of it is torch itself), with ``above_start_mib``: the rise over the
measurement (activations, gradients, optimiser state). DataLoader workers are other processes, not counted.

    python bench/suite.py --out bench/out/suite/results.jsonl                          # everything, defaults
    python bench/suite.py --device cuda --amp bf16 --channels-last --compile --batch 64
    python bench/suite.py --models resnet18 dsan --sizes 48 --iters 2 --warmup 1 --batch 2 --parts train infer
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (JsonLines, cpu_name, current_memory_mb, default_data_root, facts, median_rate,  # noqa: E402
                     peak_memory_mb, reset_peak_memory, time_iters)

PARTS = ("train", "infer", "data")
NUM_CLASSES = 7


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--amp", nargs="?", const="bf16", default="off", choices=("off", "bf16", "fp16"),
                   help="autocast dtype (--amp alone: bf16); fp16 training uses a GradScaler")
    p.add_argument("--channels-last", action="store_true", help="NHWC model and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (a failure is reported)")
    p.add_argument("--models", nargs="+", default=None, help="subset of the registered models (default: all)")
    p.add_argument("--sizes", nargs="+", default=["paper", "48", "112"], help="'paper' and/or pixel sizes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--data-root", default=default_data_root(), help="folder holding fer2013/ (data figures)")
    p.add_argument("--data-n", type=int, default=2000, help="FER2013 training images in the data figures")
    p.add_argument("--data-sizes", nargs="+", type=int, default=[48, 112, 224], help="transform output sizes")
    p.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="DataLoader workers (data_pipeline)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/suite/results.jsonl", help="JSON lines file (also printed)")
    args = p.parse_args(argv)
    for s in args.sizes:
        if s != "paper" and not (s.isdigit() and int(s) >= 8):
            p.error(f"--sizes: {s!r} is neither 'paper' nor a size in pixels >= 8")
    if min(args.batch, args.iters, args.data_n) < 1 or args.warmup < 0:
        p.error("--batch, --iters and --data-n must be >= 1 and --warmup >= 0")
    return args


# ------------------------------------------------------------------------------------------------------------ rows
class Rows:
    """Builds and emits rows with the fields every figure carries."""

    def __init__(self, args: argparse.Namespace, device: torch.device, emit: JsonLines):
        self.emit = emit
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        self.common = {"device": str(device), "device_name": name, "threads": torch.get_num_threads(),
                       "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile}

    def __call__(self, figure: str, model: str | None, size: int | None, batch: int | None, value: float | None,
                 unit: str | None, **extra: Any) -> dict:
        value = None if value is None else round(float(value), 3)
        return self.emit({"figure": figure, "model": model, "size": size, "batch": batch,
                          "device": self.common["device"], "value": value, "unit": unit, **facts(),
                          **{k: v for k, v in self.common.items() if k != "device"}, **extra})


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------------------------- models
def resolve_sizes(sizes: list[str], paper: int) -> list[int]:
    return list(dict.fromkeys(paper if s == "paper" else int(s) for s in sizes))


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def inputs(batch: int, size: int, modalities: tuple[str, ...], device: torch.device,
           channels_last: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=fmt)
    extra = {}
    if "depth" in modalities:
        extra["depth"] = torch.rand(batch, 1, size, size, generator=g).to(device).contiguous(memory_format=fmt)
    return x, extra, torch.arange(batch, device=device) % NUM_CLASSES


def largest_conv_input(model: torch.nn.Module, x: torch.Tensor, extra: dict) -> int | None:
    """Largest input side any convolution sees (eval, batch 1): tells an internal resize apart (ARM computes at 224
    px whatever it is given; POSTER's landmark stream alone runs at 112 px, its image stream at the input size)."""
    seen: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode():
            model.eval()(x[:1], **{k: v[:1] for k, v in extra.items()})
    finally:
        for hook in hooks:
            hook.remove()
    return max(seen) if seen else None


def train_step_fn(net: Callable, model: torch.nn.Module, x, extra, y, device, amp) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" and device.type == "cuda" else None

    def step() -> None:
        with autocast(device, amp):
            loss = F.cross_entropy(net(x, **extra), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer_fn(net: Callable, x, extra, device, amp) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode(), autocast(device, amp):
            net(x, **extra)

    return forward


def measure(rows: Rows, figure: str, model_name: str, size: int, batch: int, make: Callable[[], Callable],
            args: argparse.Namespace, device: torch.device, **extra: Any) -> None:
    """Time ``make()``'s callable and emit its images/s and peak-memory rows (or one error row)."""
    reset_peak_memory(device)
    start = current_memory_mb(device)
    try:
        times = time_iters(make(), device, args.warmup, args.iters)
    except Exception as e:  # noqa: BLE001 - a failing figure (compile, out of memory) is reported, not fatal
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows(figure, model_name, size, batch, None, "images/s", error=first_line(e), **extra)
        return
    peak = peak_memory_mb(device)
    above = None if start is None else round(peak - start, 1)
    rows(figure, model_name, size, batch, median_rate(batch, times), "images/s", iters=len(times),
         median_s=round(float(np.median(times)), 5), **extra)
    rows(f"{figure}_peak_memory", model_name, size, batch, peak, "MiB",
         memory="cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS (process)",
         above_start_mib=above, **extra)


def model_rows(name: str, args: argparse.Namespace, device: torch.device, rows: Rows) -> None:
    from ferkit.models import create_model, model_info

    info = model_info(name)
    torch.manual_seed(args.seed)
    model = create_model(name, num_classes=NUM_CLASSES).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: Callable = model
    if args.compile:
        try:
            net = torch.compile(model)
        except Exception as e:  # noqa: BLE001
            rows("compile", name, None, None, None, None, error=first_line(e))
            return
    for size in resolve_sizes(args.sizes, info.input_size[-1]):
        x, extra, y = inputs(args.batch, size, info.modalities, device, args.channels_last)
        try:
            seen = largest_conv_input(model, x, extra)
        except Exception as e:  # noqa: BLE001 - the size does not fit the architecture
            rows("size_check", name, size, args.batch, None, None, skipped=f"cannot take {size} px: {first_line(e)}")
            continue
        note = {"note": f"resizes its input to {seen} px inside"} if seen not in (None, size) else {}
        tags = {"paper_size": info.input_size[-1], **note}
        if "train" in args.parts:
            model.train()
            measure(rows, "train_step", name, size, args.batch,
                    lambda: train_step_fn(net, model, x, extra, y, device, args.amp), args, device, **tags)
        if "infer" in args.parts:
            model.eval()
            measure(rows, "inference", name, size, args.batch, lambda: infer_fn(net, x, extra, device, args.amp),
                    args, device, **tags)
    del model, net
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------------ data
def sampled(ds, n: int, seed: int):
    """A copy of ``ds`` holding ``n`` of its records drawn at random (sorted); no decode cache attached."""
    out = copy.copy(ds)
    pick = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    out.records = [ds.records[i] for i in pick]
    out.decoded = None
    return out


def load_rate(ds) -> float:
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds.load(i)
    return len(ds) / (time.perf_counter() - t0)


def loader_rate(loader) -> float:
    """Images/s of one pass, counted after the first batch (worker start-up and first-touch excluded)."""
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += len(batch["label"])
    return n / (time.perf_counter() - t0) if n else float("nan")


def data_rows(args: argparse.Namespace, rows: Rows) -> None:
    from torch.utils.data import DataLoader

    from ferkit.config import load_config
    from ferkit.data.adapters import build_dataset
    from ferkit.data.build import cache_dir
    from ferkit.data.cache import attach_decode_cache
    from ferkit.data.loader import SeededViews
    from ferkit.data.transforms import build_transform

    root = Path(args.data_root) / "fer2013"
    if not root.is_dir():
        rows("data_pipeline", None, None, args.batch, None, None, skipped=f"no FER2013 at {root} (set --data-root)")
        return
    plain = sampled(build_dataset("fer2013", root, "train"), args.data_n, args.seed)
    cached = copy.copy(plain)
    if not attach_decode_cache(cached, cache_dir() / "decoded"):
        cached = None
    augment = load_config("d3fer_fer2013", check=False).data.augment
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for label, ds in (("decode", plain), ("cache", cached)):
        if ds is None:
            rows("data_load", None, None, None, None, None, decode_cache=True, skipped="decode cache unavailable")
            continue
        tag = {"decode_cache": ds is cached, "images": len(ds), "dataset": "fer2013 train"}
        load_rate(ds)  # warm the page cache so decode and cache read the same way
        rows("data_load", None, 48, None, load_rate(ds), "images/s", **tag)
        for size in args.data_sizes:
            views = SeededViews(ds, {"image": build_transform("weak", size, mean, std, augment),
                                     "image_strong": build_transform("strong", size, mean, std, augment)},
                                seed=args.seed)
            for workers in args.workers:
                loader = DataLoader(views, batch_size=args.batch, num_workers=workers)
                rows("data_pipeline", None, size, args.batch, loader_rate(loader), "images/s", workers=workers,
                     views="weak+strong", **tag)


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ferkit.engine.trainer import resolve_device
    from ferkit.models import list_models

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    known = list_models()
    models = args.models or known
    unknown = [m for m in models if m not in known]
    if unknown:
        print(f"suite: unknown model {unknown[0]!r}; registered: {', '.join(known)}", file=sys.stderr)
        return 2
    with JsonLines(args.out) as emit:
        rows = Rows(args, device, emit)
        if {"train", "infer"} & set(args.parts):
            for name in models:
                model_rows(name, args, device, rows)
        if "data" in args.parts:
            data_rows(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
