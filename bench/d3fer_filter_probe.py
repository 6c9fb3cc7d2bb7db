"""Probe D3FER's sample filter on trained models: how informative would it be with this model as the Query branch?

For each run directory (a ``supervised`` or ``d3fer`` run with injected label noise, e.g. from
``bench_d3fer_noise.py``), the run's model (D3FER: its Query branch) predicts the weak and strong views of every
training image (eval mode, the run's own noisy labels and augmentation); SPEC 3.5's rules are then applied with the
whole training set as the queue: per-class dynamic thresholds τ_c, the global correction bar τ_glob, sample
filtering and label correction. Scored against the recorded flipped indices: filtering precision / recall, the
fraction corrected and the correction accuracy, next to the model's agreement with the given labels and its accuracy
on the true training labels. A filter whose precision is the clean rate (1 - noise) carries no signal; a correction
accuracy near 1 / (K - 1) is a random relabelling.

    python bench/d3fer_filter_probe.py bench/out/d3fer_grid_fer2013/runs/fer2013_*_noise40 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from ferkit.config import run_config
from ferkit.engine import Trainer
from ferkit.engine.checkpoint import load_state
from ferkit.methods.d3fer import class_thresholds, filter_and_correct, global_threshold

from _common import JsonLines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (config.yaml + checkpoints/state.pt)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON-lines file to append the rows to")
    return p.parse_args(argv)


def probe_trainer(run: Path, threads: int, scratch: Path) -> tuple[Trainer, str]:
    """A D3FER trainer over the run's data and noise (weak + strong views) holding the run's (Query) model, and the
    method the run was trained with."""
    cfg = run_config(run, [f"train.threads={threads}", "train.progress=false", "train.tensorboard=false"])
    if cfg.data.noise.rate <= 0 and not cfg.data.noise.file:
        raise SystemExit(f"{run}: no label noise in this run (data.noise.rate = 0, no data.noise.file); "
                         "nothing to score the filter on")
    trained = cfg.method.name
    cfg.method.name, cfg.method.kwargs = "d3fer", {}
    trainer = Trainer(cfg, scratch)
    weights = {k[len("model."):]: v for k, v in load_state(run / "checkpoints" / "state.pt")["method"].items()
               if k.startswith("model.")}
    trainer.method.model.load_state_dict(weights)
    return trainer, trained


@torch.no_grad()
def training_confidences(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p̄ = (p^W + p^S) / 2 of the model over one epoch of the training loader, in dataset order, the given labels,
    and which samples the epoch visited (a loader that drops its last partial batch leaves a few out)."""
    model = trainer.method.model.eval()
    n = len(trainer.splits.train)
    conf, labels = torch.zeros(n, len(trainer.class_names)), torch.zeros(n, dtype=torch.long)
    seen = torch.zeros(n, dtype=torch.bool)
    for batch in trainer.train_loader:
        x_w, x_s = batch["image"].to(trainer.device), batch["image_strong"].to(trainer.device)
        p = (model(x_w).float().softmax(1) + model(x_s).float().softmax(1)) / 2
        conf[batch["index"]] = p.cpu()
        labels[batch["index"]] = batch["label"]
        seen[batch["index"]] = True
    return conf, labels, seen


def filter_scores(conf: torch.Tensor, labels: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """SPEC 3.5 filtering and correction with the whole set as the queue, scored against the true labels."""
    k = conf.shape[1]
    tau_c, tau_g = class_thresholds(conf, labels, k), global_threshold(conf)
    sel = filter_and_correct(conf, labels, tau_c, tau_g)
    clean_true = labels == true
    n_clean_sel = int(sel.clean.sum())
    n_corr = int(sel.corrected.sum())
    return {
        "clean_rate": float(clean_true.float().mean()),
        "agreement": float((conf.argmax(1) == labels).float().mean()),
        "true_train_acc": float((conf.argmax(1) == true).float().mean()),
        "tau_class_mean": float(tau_c.mean()), "tau_global": float(tau_g),
        "selected_frac": n_clean_sel / len(labels),
        "filter_precision": float((sel.clean & clean_true).sum()) / max(n_clean_sel, 1),
        "filter_recall": float((sel.clean & clean_true).sum()) / max(int(clean_true.sum()), 1),
        "corrected_frac": n_corr / len(labels),
        "correction_acc": float((sel.corrected & (sel.target == true)).sum()) / max(n_corr, 1),
        "random_correction_acc": 1.0 / (k - 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with JsonLines(args.out, mode="a") as emit:
        for run in args.runs:
            with tempfile.TemporaryDirectory() as scratch:
                trainer, trained = probe_trainer(run, args.threads, Path(scratch) / "probe")
                conf, labels, seen = training_confidences(trainer)
                clean = trainer.splits.train.clean_targets  # a noisy label list: the dataset's labels are noisy
                true = torch.as_tensor(trainer.splits.train.targets if clean is None else clean, dtype=torch.long)
                noise = len(trainer.noisy_indices) / len(trainer.train_labels)
                rows.append(emit({"run": str(run), "method": trained, "noise": noise,
                                  "n_train": int(seen.sum()), **filter_scores(conf[seen], labels[seen], true[seen])}))
    print("| run | model | noise % | agreement % | true train acc % | filter P / R % (clean rate) | corrected % | "
          "correction acc % (random) |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {Path(r['run']).name} | {r['method']} | {round(100 * r['noise'])} | {100 * r['agreement']:.1f} | "
              f"{100 * r['true_train_acc']:.1f} | {100 * r['filter_precision']:.1f} / {100 * r['filter_recall']:.1f} "
              f"({100 * r['clean_rate']:.1f}) | {100 * r['corrected_frac']:.1f} | {100 * r['correction_acc']:.1f} "
              f"({100 * r['random_correction_acc']:.1f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
