"""The ResNet-18 family under one wall-clock budget: the max-pooled baseline, DSAN (seed 001) and ARM (seed 003).

For each suite — (a) the built-in synthetic faces, (b) real FER2013 at 48 px from ``$FERKIT_DATA/fer2013`` (train =
Training, test = PublicTest) — every model trains from its own preset, ``<model>_<suite>`` (``resnet18_synthetic``,
``dsan_synthetic``, ``arm_synthetic``, ``resnet18_fer2013``, ...), on the same splits, for ``--budget-min`` minutes.
DSAN's presets are the baseline's with the model and method swapped; ARM's use its official recipe (Adam, exponential
decay 0.9, batch 256) and compute at 224 px inside the model, so it gets fewer epochs for the same time.

Budget: a short calibration run (a few batches) measures each model's seconds per training sample, and each run gets
the epochs its budget allows (``--epochs`` overrides), so every schedule runs to its end; when one epoch of the whole
training set does not fit (ARM on a CPU), one epoch over the random subset that does (``n_train`` in the row). The
trainer's time budget stops a run that overshoots. Reported per model: test WA / UA at the last epoch (nothing is
selected on the test split), epochs run, training time, parameters.

Output: one JSON line per run (stdout and ``<out>/results.jsonl``), then a markdown table (stdout and
``<out>/table.md``).

    python bench/bench_resnet_family.py --budget-min 20                              # the real run
    python bench/bench_resnet_family.py --budget-min 0.3 --limit-train 256 --limit-test 128   # smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from ferkit.config import Config, load_config
from ferkit.data.build import DataSplits, build_splits
from ferkit.engine import Trainer

from _common import JsonLines, budget_plan, subset
from _common import seconds_per_sample as calibrate

REPO = Path(__file__).resolve().parents[1]
MODELS = ("resnet18", "dsan", "arm")
SUITES = ("synthetic", "fer2013")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-min", type=float, default=10.0, help="training minutes per model and suite")
    p.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--epochs", type=int, default=0, help="fixed epochs for every run (skips calibration)")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--data-root", default=os.environ.get("FERKIT_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--out", default="bench/out/resnet_family")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=0, help="first N training samples only (smoke runs)")
    p.add_argument("--limit-test", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    return p.parse_args(argv)


def run_config(suite: str, model: str, args: argparse.Namespace, extra: list[str]) -> Config:
    ov = [f"seed={args.seed}", f"train.device={args.device}", f"train.threads={args.threads}", "train.progress=false",
          "train.tensorboard=false", f"data.limit_train={args.limit_train}", f"data.limit_test={args.limit_test}",
          f"name=bench_{suite}_{model}"]
    if suite != "synthetic":
        ov.append(f"data.root={Path(args.data_root) / suite}")
    return load_config(f"{model}_{suite}", ov + list(args.set) + extra)


def seconds_per_sample(suite: str, model: str, splits: DataSplits, args: argparse.Namespace, out: Path) -> float:
    """Warm-epoch calibration over four batches of at most 64 (see ``_common.seconds_per_sample``): ARM's batch of
    256 at 224 px would make eight of its own batches, twice, an 18-minute calibration on one CPU core."""
    cfg = run_config(suite, model, args, [])
    cfg.train.batch_size = min(cfg.train.batch_size, 64)
    return calibrate(cfg, splits, out / "calibration" / f"{suite}_{model}", 4 * cfg.train.batch_size, 64, args.seed)


def train_one(suite: str, model: str, epochs: int, n_train: int, splits: DataSplits, args: argparse.Namespace,
              out: Path) -> dict:
    cfg = run_config(suite, model, args, [f"train.epochs={epochs}", f"train.time_budget_min={args.budget_min}"])
    if n_train < len(splits.train):  # one epoch of the whole set does not fit the budget (ARM at 224 inside)
        splits = DataSplits(subset(splits.train, n_train, args.seed, "train"), splits.test)
    t0 = time.time()
    trainer = Trainer(cfg, out / "runs" / f"{suite}_{model}", splits=splits)
    result = trainer.fit()
    hist = trainer.state.history
    net = trainer.method.inference_model()
    return {"suite": suite, "model": model, "preset": f"{model}_{suite}", "n_train": len(splits.train),
            "n_test": len(splits.test), "input_size": trainer.spec["input_size"][-1], "epochs_planned": epochs,
            "epochs_run": trainer.state.epoch, "batch_size": cfg.train.batch_size,
            "train_time_s": hist[-1]["time_s"], "wall_s": round(time.time() - t0, 1),
            "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
            "wa": result["test"]["wa"], "ua": result["test"]["ua"], "f1": result["test"]["f1"],
            "device": str(trainer.device)}


def table(rows: list[dict], budget: float) -> str:
    lines = [f"Test WA / UA (%) at the last epoch, {budget:g} min of training per model.", "",
             "| suite | model | input | epochs | train samples | train min | params M | WA | UA |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['model']} | {r['input_size']} | {r['epochs_run']} | {r['n_train']} | "
                     f"{r['train_time_s'] / 60:.1f} | {r['params_m']:.2f} | {100 * r['wa']:.2f} | "
                     f"{100 * r['ua']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with JsonLines(out / "results.jsonl") as emit:  # one flushed line per run: a killed bench keeps what it measured
        for suite in args.suites:
            if suite != "synthetic" and not (Path(args.data_root) / suite).is_dir():
                print(f"# {suite}: skipped, no data at {Path(args.data_root) / suite} (set FERKIT_DATA)",
                      file=sys.stderr)
                continue
            cfg = run_config(suite, args.models[0], args, [])
            splits = build_splits(cfg.data, cfg.seed)  # the presets of one suite share their data
            for model in args.models:
                if args.epochs:
                    epochs, n_train = args.epochs, len(splits.train)
                else:
                    epochs, n_train = budget_plan(seconds_per_sample(suite, model, splits, args, out),
                                                  len(splits.train), args.budget_min, args.max_epochs)
                rows.append(emit(train_one(suite, model, epochs, n_train, splits, args, out)))
    md = table(rows, args.budget_min)
    (out / "table.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
