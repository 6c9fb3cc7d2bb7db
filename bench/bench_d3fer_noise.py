"""Label-noise benchmark: plain supervised ResNet-18 vs D3FER under injected label noise (seed 000 §0.3 protocol).

For each dataset (the built-in synthetic faces and real FER2013 at 48 px) and each noise rate (default 0 / 20 / 40 %:
that fraction of training labels replaced by a random *different* class, test labels clean), the same ResNet-18 is
trained twice from the same preset (``d3fer_<dataset>``) under the same wall-clock budget: once with method
``supervised`` (CE on the preset's train augmentation) and once with ``d3fer`` (weak/strong channels, Query/Key
branches; tested with the Key branch). Reported: WA / UA of the *last* epoch's model on the whole test set (the usual
noisy-label protocol; nothing is selected on test), D3FER's Query-branch WA, and its last-epoch filtering precision /
recall and correction accuracy. The per-epoch curves are taken on a random ``--monitor-test`` subset of the test set
(an evaluation of the whole of FER2013's PublicTest costs ~30 s on one core, every epoch); the best monitored epoch is
printed too, marked as picked on test. The preset's exponential LR decay is compressed into the run's epochs (the
paper's x0.98 over 100 epochs), so the reported last epoch is not taken at the peak LR (``--keep-schedule`` keeps it).

Budget: ``--budget-min`` minutes of training per run, equal for both methods. A short calibration run measures each
method's seconds per training sample, and each run gets the epochs its budget allows (``--epochs`` overrides); the
trainer's time budget stops a run that overshoots. D3FER costs about 2.3x the baseline per sample (two Query views and
a Key forward), so it gets fewer epochs. Its warm-up is ``--warmup-fraction`` of its epochs, and its Key momentum is
scaled so that the Key branch averages over ~10 % of the post-warm-up steps (the paper's m = 0.999, a ~1,000-step
average, assumes ~17,000 steps; a short run with m = 0.999 would test a Key branch stuck near the warm-up weights).

Outputs in ``--out``: ``results.jsonl`` (one JSON line per run, also printed), ``table.md`` (printed), the runs under
``runs/``, and under ``plots/``: t-SNE of test features (baseline vs D3FER Key branch, one panel per noise level),
Grad-CAM of D3FER's Query vs Key branch on the same test images at every noise level, confusion matrices of every run,
and D3FER's filtering precision / recall / correction accuracy per epoch.

    python bench/bench_d3fer_noise.py --budget-min 20 --out bench/out/d3fer_noise
    python bench/bench_d3fer_noise.py --budget-min 0.2 --limit-train 256 --limit-test 128 --noise 0 0.4   # smoke
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ferkit.config import Config, load_config
from ferkit.data.base import FaceDataset
from ferkit.data.build import DataSplits, build_splits
from ferkit.data.transforms import build_transform
from ferkit.engine import Trainer
from ferkit.engine.trainer import input_spec
from ferkit.engine.evaluate import evaluate_predictions, predict_loader
from ferkit.models import model_info

from _common import JsonLines, budget_epochs, subset
from _common import fresh_dir
from _common import seconds_per_sample as warm_seconds_per_sample

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"synthetic": "d3fer_synthetic", "fer2013": "d3fer_fer2013"}
METHODS = ("supervised", "d3fer")
LABELS = {"supervised": "ResNet-18", "d3fer": "D3FER (Key)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.2, 0.4], help="label-noise rates")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--budget-min", type=float, default=10.0, help="training minutes per run (equal for both methods)")
    p.add_argument("--epochs", type=int, default=0, help="fixed epochs for every run (skips calibration)")
    p.add_argument("--max-epochs", type=int, default=60)
    p.add_argument("--warmup-fraction", type=float, default=0.3, help="D3FER warm-up as a fraction of its epochs")
    p.add_argument("--data-root", default=os.environ.get("FERKIT_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--out", default="bench/out/d3fer_noise")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=0, help="first N training samples only (smoke runs)")
    p.add_argument("--limit-test", type=int, default=0)
    p.add_argument("--monitor-test", type=int, default=1000,
                   help="per-epoch curves on a random subset of this many test images (0: the whole test set); the "
                        "reported figures are always the last epoch's model on the whole test set")
    p.add_argument("--keep-schedule", action="store_true",
                   help="keep the preset's per-epoch LR decay (default: compress the paper's 100-epoch decay into the "
                        "run's epochs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--tsne-points", type=int, default=1500)
    p.add_argument("--gradcam-images", type=int, default=7)
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------------
# configs and budget
# ------------------------------------------------------------------------------------------------------------------
def base_overrides(dataset: str, args: argparse.Namespace) -> list[str]:
    out = [f"seed={args.seed}", f"train.device={args.device}", f"train.threads={args.threads}",
           "train.progress=false", "train.tensorboard=false", f"data.limit_train={args.limit_train}",
           f"data.limit_test={args.limit_test}"]
    if dataset != "synthetic":
        out.append(f"data.root={Path(args.data_root) / dataset}")
    return out + list(args.set)


def run_config(dataset: str, method: str, noise: float, epochs: int, steps_per_epoch: int,
               args: argparse.Namespace) -> Config:
    ov = base_overrides(dataset, args) + [f"data.noise.rate={noise}", f"data.noise.seed={args.seed}",
                                          f"train.epochs={epochs}", f"train.time_budget_min={args.budget_min}",
                                          f"name=bench_{dataset}_{method}_noise{round(100 * noise)}"]
    if method == "d3fer":
        warm = max(1, min(round(args.warmup_fraction * epochs), epochs - 1)) if epochs >= 2 else 1
        ov += ["method.kwargs.warmup_fraction=null", f"method.kwargs.warmup_epochs={warm}",
               f"method.kwargs.momentum={budget_momentum((epochs - warm) * steps_per_epoch)}"]
    cfg = load_config(PRESETS[dataset], ov)
    if not args.keep_schedule:
        compress_schedule(cfg)
    if method == "supervised":  # same preset, the method swapped (overrides merge kwargs, so replace them here)
        cfg.method.name, cfg.method.kwargs = "supervised", {}
    return cfg


def compress_schedule(cfg: Config, paper_epochs: int = 100) -> None:
    """Exponential LR decay rescaled to the run's epochs so that the run ends at the LR the paper's schedule ends at
    (x0.98 per epoch over 100 epochs = x0.133): a budget run's last epoch, the one reported, is not taken at the peak
    LR, where the test accuracy of these short runs swings by several points from one epoch to the next."""
    o = cfg.optim
    if o.scheduler == "exponential" and cfg.train.epochs > 0:
        o.gamma = round(o.gamma ** (paper_epochs / cfg.train.epochs), 6)


def budget_momentum(post_warmup_steps: int, paper_m: float = 0.999) -> float:
    """Key momentum whose averaging window 1 / (1 - m) is ~10 % of the post-warm-up steps, capped at the paper's
    0.999 and floored at 0.9."""
    window = max(0.1 * post_warmup_steps, 10.0)
    return round(min(paper_m, max(0.9, 1.0 - 1.0 / window)), 5)


def calibrate(dataset: str, method: str, splits: DataSplits, args: argparse.Namespace, out: Path) -> float:
    """Seconds per training sample of ``method``: warm-epoch calibration over eight batches (data loading included;
    D3FER past its one warm-up epoch, so filtering and the queue are timed too)."""
    cfg = run_config(dataset, method, 0.0, 2, 1, args)
    return warm_seconds_per_sample(cfg, splits, out / "calibration" / f"{dataset}_{method}",
                                   8 * cfg.train.batch_size, cfg.train.eval_batch_size, args.seed)


# ------------------------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------------------------
def score_full_test(model: torch.nn.Module, trainer: Trainer, full_test: FaceDataset, loader) -> dict:
    """WA / UA / F1 (and the test subsets) of ``model`` on the whole test set (``loader``: over ``full_test``)."""
    pred = predict_loader(model, loader, trainer.device, flip_tta=trainer.cfg.train.flip_tta)
    return evaluate_predictions(pred, len(trainer.class_names), full_test.subsets())


def train_one(cfg: Config, run_dir: Path, splits: DataSplits, full_test: FaceDataset,
              want_features: bool) -> tuple[dict, Trainer, Any]:
    """Train under the budget (per-epoch curves on ``splits.test``), then score the last epoch on ``full_test``."""
    t0 = time.time()
    trainer = Trainer(cfg, fresh_dir(run_dir), splits=splits)
    trainer.fit()
    wall = time.time() - t0
    hist = trainer.state.history
    loader = trainer.eval_loader(full_test)
    test = score_full_test(trainer.method.inference_model(), trainer, full_test, loader)
    row = {"dataset": cfg.data.dataset, "method": cfg.method.name, "noise": cfg.data.noise.rate,
           "epochs_planned": cfg.train.epochs, "epochs_run": trainer.state.epoch, "batch_size": cfg.train.batch_size,
           "train_time_s": hist[-1]["time_s"], "wall_s": round(wall, 1), "wa": test["wa"], "ua": test["ua"],
           "f1": test["f1"], "n_test": test["n"], "lr_gamma": cfg.optim.gamma,
           "best_wa_on_monitor": max(r["test"]["wa"] for r in hist), "run_dir": str(run_dir)}
    row.update({f"wa_{name}": sub["wa"] for name, sub in test.get("subsets", {}).items()})
    row["confusion"] = test["confusion"]
    if cfg.method.name == "d3fer":
        m = trainer.method
        row.update(warmup_epochs=m.warmup_length, momentum=m.momentum)
        row["query_wa"] = score_full_test(m.model, trainer, full_test, loader)["wa"]
        last = next((r for r in reversed(hist) if "filter_precision" in r), {})
        for key in ("filter_precision", "filter_recall", "correction_acc", "selected_frac", "noisy_fixed_frac"):
            row[key] = last.get(key)
    feats = predict_loader(trainer.method.inference_model(), loader, trainer.device,
                           with_features=True) if want_features else None
    return row, trainer, feats


# ------------------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------------------
def gradcam_images(test: FaceDataset, n: int) -> list[dict]:
    """``n`` test samples taken round-robin over the classes: the same faces for every noise level."""
    by_class = [np.flatnonzero(test.targets == c) for c in range(test.num_classes)]
    order = [int(idx[r]) for r in range(max(map(len, by_class))) for idx in by_class if r < len(idx)]
    return [test.load(i) for i in order[:n]]


def cam_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Grad-CAM needs gradients through the activations: a CPU copy with gradients on (the Key branch has none)."""
    return copy.deepcopy(model).cpu().requires_grad_(True).eval()


def write_plots(dataset: str, rows: list[dict], feats: dict, cams: dict, cam_images: list[dict],
                class_names: list[str], cfg: Config, plots: Path, args: argparse.Namespace) -> list[str]:
    """Confusion matrices, filtering curves, t-SNE grid (baseline vs Key branch per noise level), Grad-CAM grid."""
    from ferkit.analysis.d3fer_plots import plot_filtering_curves
    from ferkit.analysis.plots import plot_confusion

    written = []
    for row in rows:
        tag = f"{row['method']}_noise{round(100 * row['noise'])}"
        title = f"{LABELS[row['method']]}, {round(100 * row['noise'])} % noise"
        written.append(str(plot_confusion(np.asarray(row["confusion"]), class_names,
                                          plots / f"confusion_{dataset}_{tag}.png", title=title)))
    histories = {f"{round(100 * r['noise'])} % noise": [json.loads(x) for x in
                                                        Path(r["run_dir"], "metrics.jsonl").read_text().splitlines()]
                 for r in rows if r["method"] == "d3fer"}
    written.append(str(plot_filtering_curves(histories, plots / f"filtering_{dataset}.png", title=f"D3FER, {dataset}")))
    try:
        from ferkit.analysis.tsne import plot_tsne_grid

        panels = [(f"{LABELS[m]}, {round(100 * nz)} % noise", p.features, p.labels)
                  for m in METHODS for nz in args.noise if (p := feats.get((m, nz))) is not None]
        written.append(str(plot_tsne_grid(panels, class_names, plots / f"tsne_{dataset}.png",
                                          max_points=args.tsne_points, cols=len(args.noise))))
    except ImportError as e:
        print(f"# t-SNE skipped: {e}", file=sys.stderr)
    try:
        from ferkit.analysis.gradcam import gradcam_grid

        spec = input_spec(cfg)  # the evaluation preprocessing of the runs
        tf = build_transform("eval", spec["input_size"][-1], spec["mean"], spec["std"], cfg.data.augment,
                             grayscale=cfg.data.grayscale)
        layer = model_info(cfg.model.name).gradcam_layer
        written.append(str(gradcam_grid(cams, cam_images, tf, plots / f"gradcam_{dataset}.png",
                                        {name: layer for name in cams}, class_names=class_names)))
    except ImportError as e:
        print(f"# Grad-CAM skipped: {e}", file=sys.stderr)
    return written


# ------------------------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = ["| dataset | noise % | epochs ResNet-18 / D3FER | ResNet-18 WA % | D3FER WA % | margin | D3FER Query WA % "
             "| filter P / R % | correction acc % |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["dataset"], r["noise"], r["method"]): r for r in rows}
    for ds, nz in dict.fromkeys((r["dataset"], r["noise"]) for r in rows):
        b, d = by.get((ds, nz, "supervised")), by.get((ds, nz, "d3fer"))
        if b is None or d is None:
            continue
        pr = "-" if d.get("filter_precision") is None else \
            f"{100 * d['filter_precision']:.1f} / {100 * d['filter_recall']:.1f}"
        ca = "-" if d.get("correction_acc") is None else f"{100 * d['correction_acc']:.1f}"
        lines.append(f"| {ds} | {round(100 * nz)} | {b['epochs_run']} / {d['epochs_run']} | {100 * b['wa']:.2f} | "
                     f"{100 * d['wa']:.2f} | {100 * (d['wa'] - b['wa']):+.2f} | {100 * d['query_wa']:.2f} | {pr} | "
                     f"{ca} |")
    return "\n".join(lines)


def bench_dataset(dataset: str, args: argparse.Namespace, out: Path, emit: JsonLines) -> list[dict]:
    probe = load_config(PRESETS[dataset], base_overrides(dataset, args))
    if dataset != "synthetic" and not Path(probe.data.root).is_dir():
        print(f"# {dataset}: no data at {probe.data.root}; skipped (set --data-root or FERKIT_DATA)", file=sys.stderr)
        return []
    splits = build_splits(probe.data, probe.seed)
    full_test = splits.test
    if args.monitor_test and args.monitor_test < len(full_test):  # per-epoch curves on a subset, figures on all
        splits = DataSplits(splits.train, subset(full_test, args.monitor_test, args.seed, "test"), splits.val)
    n_train, batch = len(splits.train), probe.train.batch_size
    steps = math.ceil(n_train / batch)
    epochs = {}
    for method in args.methods:
        if args.epochs:
            epochs[method] = args.epochs
        else:
            spp = calibrate(dataset, method, splits, args, out)
            epochs[method] = budget_epochs(spp, n_train, args.budget_min, args.max_epochs, min_epochs=2)
            print(json.dumps({"dataset": dataset, "method": method, "calibration_s_per_sample": round(spp, 6),
                              "epochs": epochs[method]}), flush=True)
    rows, feats, cams = [], {}, {}
    plots = not args.no_plots
    for noise in args.noise:
        for method in args.methods:
            cfg = run_config(dataset, method, noise, epochs[method], steps, args)
            run_dir = out / "runs" / f"{dataset}_{method}_noise{round(100 * noise)}"
            row, trainer, pred = train_one(cfg, run_dir, splits, full_test, want_features=plots)
            rows.append(emit(row))
            if plots:
                feats[(method, noise)] = pred
                if method == "d3fer":
                    cams[f"Query {round(100 * noise)}%"] = cam_copy(trainer.method.model)
                    cams[f"Key {round(100 * noise)}%"] = cam_copy(trainer.method.key_model)
    if plots and rows:
        images = gradcam_images(full_test, args.gradcam_images)
        for path in write_plots(dataset, rows, feats, cams, images, splits.train.class_names, probe, out / "plots",
                                args):
            print(f"# wrote {path}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with JsonLines(out / "results.jsonl") as emit:  # flushed per run: a killed bench keeps what it measured
        for dataset in args.datasets:
            rows += bench_dataset(dataset, args, out, emit)
    text = table(rows)
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
