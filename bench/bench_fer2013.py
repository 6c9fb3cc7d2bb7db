"""FER2013 from scratch under a wall-clock budget: train a preset on Training, report PublicTest WA / UA.

    python bench/bench_fer2013.py --budget-min 60 [--config resnet18_fer2013] [key=value ...]

The number of epochs is fitted to the budget before training (a timed probe of a few training batches plus one
evaluation pass), so schedules such as one-cycle anneal fully instead of being cut off. Reports the last epoch's
PublicTest WA/UA (no checkpoint picking on the test split) and the same with horizontal-flip test-time augmentation.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from ferkit.config import load_config
from ferkit.engine import Trainer
from ferkit.engine.evaluate import evaluate_predictions, predict_loader


def fit_epochs(trainer: Trainer, budget_s: float, probe_batches: int = 12) -> tuple[int, float]:
    """Seconds per epoch from a probe on a throw-away copy of the state, and the epochs that fit the budget."""
    import copy

    state = copy.deepcopy(trainer.method.state_dict())
    opt_states = {n: copy.deepcopy(o.state_dict()) for n, o in trainer.optimizers.items()}
    trainer.method.train()
    it = iter(trainer.train_loader)
    next(it)  # warm-up batch (allocations)
    t0 = time.time()
    for _ in range(probe_batches):
        batch = trainer._to_device(next(it))
        out = trainer.method.training_step(batch, None)
        out.loss.backward()
        for o in trainer.optimizers.values():
            o.step()
            o.zero_grad(set_to_none=True)
    per_batch = (time.time() - t0) / probe_batches
    t0 = time.time()
    trainer.predict("test")
    eval_s = time.time() - t0
    trainer.method.load_state_dict(state)
    for n, o in trainer.optimizers.items():
        o.load_state_dict(opt_states[n])
    epoch_s = per_batch * len(trainer.train_loader) + eval_s
    return max(1, int(0.93 * budget_s / epoch_s)), epoch_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-min", type=float, default=60.0)
    ap.add_argument("--config", default="resnet18_fer2013")
    ap.add_argument("--out", default="bench/out/fer2013")
    ap.add_argument("--max-epochs", type=int, default=0, help="cap on the fitted epochs (0: none)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = os.environ.get("FERKIT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    overrides = [f"data.root={root}/fer2013", "train.progress=false", *args.overrides]
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    start = time.time()
    probe = Trainer(cfg, run_dir / "probe")
    epochs, epoch_s = fit_epochs(probe, 60 * args.budget_min - (time.time() - start))
    if args.max_epochs:
        epochs = min(epochs, args.max_epochs)
    print(f"probe: {epoch_s:.0f} s per epoch -> {epochs} epochs in {args.budget_min:g} min", flush=True)
    cfg = load_config(args.config, overrides + [f"train.epochs={epochs}",
                                                f"train.time_budget_min={args.budget_min - (time.time() - start) / 60}"])
    trainer = Trainer(cfg, run_dir / "run", splits=probe.splits)
    result = trainer.fit()
    test = result["test"]
    tta = evaluate_predictions(predict_loader(trainer.method.inference_model(), trainer.eval_loaders["test"],
                                              trainer.device, flip_tta=True), len(trainer.class_names))
    row = {"bench": "fer2013_publictest", "config": args.config, "model": cfg.model.name,
           "epochs": result["epochs_run"], "minutes": round((time.time() - start) / 60, 1),
           "threads": torch.get_num_threads(), "wa": round(100 * test["wa"], 2), "ua": round(100 * test["ua"], 2),
           "wa_flip_tta": round(100 * tta["wa"], 2), "ua_flip_tta": round(100 * tta["ua"], 2),
           "run_dir": str(run_dir / "run")}
    print(json.dumps(row))
    print(f"| {cfg.model.name} | {row['epochs']} | {row['minutes']} | {row['wa']} | {row['ua']} | "
          f"{row['wa_flip_tta']} | {row['ua_flip_tta']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
