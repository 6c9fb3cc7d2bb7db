"""POSTER (seed 004) benchmarks: training speed, accuracy against the ResNet-18 baseline, and what the landmark
stream's pretraining is worth.

1. ``speed``: training steps per second on random 224x224 batches (``--speed-batch``, default 8) for POSTER large
   and small: the SAM step of the recipe (two forward/backward passes) and a plain single-pass Adam step, as
   images/s. Reported on the device used (CPU by default here).
2. ``baseline``: test WA / UA on the built-in synthetic faces, ``poster_synthetic`` vs ``resnet18_synthetic``, each
   with ``--budget-min`` minutes of training. A short calibration (one epoch over a few batches) measures each run's
   seconds per training sample; a run gets the epochs its budget allows and, when even one epoch over the whole
   training set does not fit (POSTER on a CPU), one epoch over a random subset that does (``n_train`` in the row).
3. ``landmarks``: ``ferkit landmarks pretrain`` on the synthetic ground truth for ``--budget-min`` minutes (test NME
   reported), then POSTER with that landmark stream vs a random frozen one, same data, schedule and seed.

Output: one JSON line per measurement (stdout and ``<out>/results.jsonl``), then a markdown table (stdout and
``<out>/table.md``).

    python bench/bench_poster.py --budget-min 20                     # the real run (hours of CPU for POSTER)
    python bench/bench_poster.py --budget-min 0.2 --quick             # smoke test: tiny sets, batch 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ferkit import create_model
from ferkit.config import Config, OptimConfig, load_config
from ferkit.data.build import DataSplits, build_splits
from ferkit.engine import Trainer
from ferkit.engine.optim import build_optimizer
from ferkit.engine.trainer import resolve_device
from ferkit.methods import OptimizerSpec, build_method

from _common import JsonLines, budget_plan
from _common import seconds_per_sample as calibrate
from _common import subset

PARTS = ("speed", "baseline", "landmarks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-min", type=float, default=10.0, help="training minutes per run (and for pretraining)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--model", default="poster", help="POSTER variant for parts 2 and 3 (poster, poster_small, ...)")
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--speed-steps", type=int, default=3, help="timed steps per speed row (after one warm-up)")
    p.add_argument("--max-epochs", type=int, default=50)
    p.add_argument("--out", default="bench/out/poster")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 train / 1 test subjects x 8 samples, speed batch 2, one timed step")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------ 1. speed
def _step_rate(model_name: str, optim: str, batch: int, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    method = build_method("poster", create_model(model_name, num_classes=7)).to(device).train()
    spec = OptimizerSpec("model", [p for p in method.parameters() if p.requires_grad])
    opt = build_optimizer(spec, OptimConfig(name=optim, lr=4e-5, weight_decay=0.0))

    class Ctx:  # what the engine's StepContext gives a manual-optimisation step
        def backward(self, loss):
            loss.backward()

        def optimizer(self, name="model"):
            return opt

        def optimizer_step(self, closure=None):
            opt.step(closure) if closure is not None else opt.step()
            opt.zero_grad(set_to_none=True)

    data = {"image": torch.randn(batch, 3, 224, 224, device=device), "label": torch.arange(batch, device=device) % 7}
    method.training_step(data, Ctx())  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        method.training_step(data, Ctx())
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed_rows(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    rows = []
    for name in ("poster", "poster_small"):
        for optim, what in (("sam_adam", "SAM step (2 passes)"), ("adam", "plain Adam step")):
            rate = _step_rate(name, optim, args.speed_batch, args.speed_steps, device)
            rows.append({"part": "speed", "model": name, "step": what, "batch": args.speed_batch, "input": 224,
                         "images_per_s": round(rate, 3), "device": str(device), "threads": args.threads})
    return rows


# ------------------------------------------------------------------------------------------ 2./3. budgeted runs
def run_config(preset: str, args: argparse.Namespace, extra: list[str]) -> Config:
    ov = [f"seed={args.seed}", f"train.device={args.device}", f"train.threads={args.threads}", "train.progress=false",
          "train.tensorboard=false", f"name=bench_{preset}"]
    if preset.startswith("poster"):
        ov.append(f"model.name={args.model}")
    if args.quick:
        ov += ["data.synthetic.train_subjects=2", "data.synthetic.test_subjects=1",
               "data.synthetic.samples_per_subject=8", "train.batch_size=4", "train.eval_batch_size=8"]
    return load_config(preset, ov + extra)


def seconds_per_sample(preset: str, splits: DataSplits, args: argparse.Namespace, out: Path,
                       extra: list[str]) -> float:
    """Warm-epoch calibration over two batches of the training set (see ``_common.seconds_per_sample``)."""
    cfg = run_config(preset, args, extra)
    return calibrate(cfg, splits, out / "calibration" / preset, 2 * cfg.train.batch_size, 16, args.seed)


def train_one(preset: str, label: str, epochs: int, n_train: int, splits: DataSplits, args: argparse.Namespace,
              out: Path, extra: list[str] | None = None) -> dict:
    cfg = run_config(preset, args, [f"train.epochs={epochs}", f"train.time_budget_min={args.budget_min}",
                                    *(extra or [])])
    train = splits.train if n_train >= len(splits.train) else subset(splits.train, n_train, args.seed, "train")
    t0 = time.time()
    trainer = Trainer(cfg, out / "runs" / label, splits=DataSplits(train, splits.test))
    result = trainer.fit()
    net = trainer.method.inference_model()
    return {"part": "", "run": label, "preset": preset, "model": cfg.model.name, "n_train": len(train),
            "n_test": len(splits.test), "input_size": trainer.spec["input_size"][-1], "epochs_run": trainer.state.epoch,
            "batch_size": cfg.train.batch_size, "train_time_s": trainer.state.history[-1]["time_s"],
            "wall_s": round(time.time() - t0, 1),
            "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
            "wa": result["test"]["wa"], "ua": result["test"]["ua"], "device": str(trainer.device)}


def baseline_rows(splits: DataSplits, args: argparse.Namespace, out: Path) -> list[dict]:
    rows = []
    for preset in ("resnet18_synthetic", "poster_synthetic"):
        epochs, n = budget_plan(seconds_per_sample(preset, splits, args, out, []), len(splits.train),
                                args.budget_min, args.max_epochs)
        rows.append({**train_one(preset, preset, epochs, n, splits, args, out), "part": "baseline"})
    return rows


def landmark_rows(splits: DataSplits, args: argparse.Namespace, out: Path) -> list[dict]:
    from ferkit.models.landmarks import LandmarkPretrainConfig, pretrain_landmarks

    syn = run_config("poster_synthetic", args, []).data.synthetic
    lm_path = out / "landmarks_synthetic.safetensors"
    lm = pretrain_landmarks(LandmarkPretrainConfig(
        out=str(lm_path), epochs=args.max_epochs, train_subjects=syn.train_subjects,
        test_subjects=syn.test_subjects, samples_per_subject=syn.samples_per_subject, seed=args.seed,
        time_budget_min=args.budget_min, device=args.device, batch_size=8 if args.quick else 64))
    rows = [{"part": "landmarks", "run": "landmark pretraining", "test_nme": round(lm["test_nme"], 4),
             "test_nme_untrained": round(lm["test_nme_untrained"], 4), "epochs_run": lm["epochs"]}]
    epochs, n = budget_plan(seconds_per_sample("poster_synthetic", splits, args, out, []), len(splits.train),
                            args.budget_min, args.max_epochs)
    for label, extra in (("poster, random frozen landmarks", []),
                         ("poster, pretrained landmarks", [f"method.kwargs.landmark_weights={lm_path}"])):
        rows.append({**train_one("poster_synthetic", label.replace(", ", "_").replace(" ", "_"), epochs, n, splits,
                                 args, out, extra), "part": "landmarks", "run": label})
    return rows


def table(rows: list[dict], budget: float) -> str:
    lines = [f"Speed: training images/s on random 224 px batches. Runs: test WA / UA (%) after {budget:g} min of "
             f"training each, on the synthetic faces.", "",
             "| part | run | model | batch | input | epochs | train samples | train min | WA | UA | images/s | NME |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def g(r: dict, k: str, fmt: str = "") -> str:
        v = r.get(k)
        return "-" if v is None else format(v, fmt)

    for r in rows:
        wa = f"{100 * r['wa']:.2f}" if "wa" in r else "-"
        ua = f"{100 * r['ua']:.2f}" if "ua" in r else "-"
        mins = f"{r['train_time_s'] / 60:.1f}" if "train_time_s" in r else "-"
        lines.append(f"| {r['part']} | {r.get('run', r.get('step', ''))} | {g(r, 'model')} | "
                     f"{g(r, 'batch', '') if 'batch' in r else g(r, 'batch_size')} | "
                     f"{g(r, 'input') if 'input' in r else g(r, 'input_size')} | {g(r, 'epochs_run')} | "
                     f"{g(r, 'n_train')} | {mins} | {wa} | {ua} | {g(r, 'images_per_s')} | {g(r, 'test_nme')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.speed_batch, args.speed_steps, args.max_epochs = 2, 1, 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with JsonLines(out / "results.jsonl") as log:  # flushed per row: a killed bench keeps what it measured
        def emit(new: list[dict]) -> None:
            rows.extend(log(r) for r in new)

        if "speed" in args.parts:
            emit(speed_rows(args))
        if {"baseline", "landmarks"} & set(args.parts):
            cfg = run_config("poster_synthetic", args, [])
            splits = build_splits(cfg.data, cfg.seed)  # resnet18_synthetic and poster_synthetic share their data
            if "baseline" in args.parts:
                emit(baseline_rows(splits, args, out))
            if "landmarks" in args.parts:
                emit(landmark_rows(splits, args, out))
    md = table(rows, args.budget_min)
    (out / "table.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
