"""Subject-wise (repeated) k-fold cross-validation: per-fold results saved as they finish, so an interrupted CV
resumes where it stopped (a fold cut off mid-training resumes from its own training state).

Output directory::

    rep000_fold00/ ... one ordinary run directory per fold (result.json written when the fold is done)
    cv_results.json  per-fold metrics, per-repeat means, final mean +- std, fold-averaged confusion matrix
    cv_report.md     the same as tables, with the averaged confusion matrix plot
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ferkit.config import Config
from ferkit.data.base import FaceDataset, Subset
from ferkit.data.build import DataSplits, build_dataset
from ferkit.data.splits import repeated_subject_kfold
from ferkit.engine.checkpoint import atomic_write_bytes
from ferkit.engine.metrics import normalize_confusion

__all__ = ["run_crossval", "summarize_folds", "register_cli"]

_logger = logging.getLogger("ferkit")


def run_crossval(cfg: Config, out_dir: str | Path, *, folds: int = 10, repeats: int = 1, split: str = "all",
                 dataset: FaceDataset | None = None, select: Callable[[FaceDataset], np.ndarray] | None = None,
                 keep_states: bool = False, fold_config: Callable[[Config, FaceDataset], Config] | None = None,
                 partitions: list[list[tuple[np.ndarray, np.ndarray]]] | None = None) -> dict[str, Any]:
    """Train and test one model per fold; ``select`` may restrict the pool (e.g. BU-3DFE's protocol subset).

    ``fold_config(cfg, train_part)`` adapts each fold's config to its training part (seed 002: z-score statistics
    of the training part only); ``partitions`` replaces the subject-wise folds (e.g. one 80/20 holdout)."""
    from ferkit.engine.trainer import Trainer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool = dataset if dataset is not None else build_dataset(cfg.data, split)
    if select is not None:
        pool = Subset(pool, np.flatnonzero(select(pool)), split)
    if pool.subjects is None:
        raise ValueError(f"{pool.name}: no subject ids, so subject-wise cross-validation is impossible")
    if partitions is None:
        partitions = repeated_subject_kfold(pool.subjects, folds, cfg.seed, pool.targets, repeats)
    results = []
    for r, partition in enumerate(partitions):
        for f, (train_idx, test_idx) in enumerate(partition):
            fold_dir = out / f"rep{r:03d}_fold{f:02d}"
            done = fold_dir / "result.json"
            if done.is_file():
                results.append(json.loads(done.read_text()))
                continue
            _check_disjoint(pool, train_idx, test_idx, fold_dir.name)
            splits = DataSplits(Subset(pool, train_idx, "train"), Subset(pool, test_idx, "test"))
            resume = (fold_dir / "checkpoints" / "state.pt").is_file()
            _logger.info("%s: %d train / %d test samples%s", fold_dir.name, len(train_idx), len(test_idx),
                         " (resuming)" if resume else "")
            fold_cfg = replace(cfg, name=f"{cfg.name}-{fold_dir.name}")
            if fold_config is not None:
                fold_cfg = fold_config(fold_cfg, splits.train)
            res = Trainer(fold_cfg, fold_dir, resume=resume, splits=splits).fit()["test"]
            row = {"repeat": r, "fold": f, "n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
                   **{k: res[k] for k in ("wa", "ua", "f1", "n", "confusion", "per_class")}}
            atomic_write_bytes(done, json.dumps(row).encode())
            if not keep_states:
                (fold_dir / "checkpoints" / "state.pt").unlink(missing_ok=True)
            results.append(row)
    summary = summarize_folds(results, pool.class_names)
    atomic_write_bytes(out / "cv_results.json", json.dumps(summary, indent=1).encode())
    _write_report(out, summary, pool.class_names, cfg)
    return summary


def _check_disjoint(pool: FaceDataset, train_idx: np.ndarray, test_idx: np.ndarray, where: str) -> None:
    subj = pool.subjects
    shared = set(subj[train_idx]) & set(subj[test_idx])
    if shared:  # a guard against any future change to the fold builder
        raise RuntimeError(f"{where}: subjects in both train and test: {sorted(shared)[:5]}")


def summarize_folds(rows: list[dict], class_names: list[str]) -> dict[str, Any]:
    """Mean +- std over folds (one repeat) or the mean of repetition means +- std over repeats (seed 002)."""
    repeats = sorted({r["repeat"] for r in rows})
    per_repeat = {m: [float(np.mean([r[m] for r in rows if r["repeat"] == k])) for k in repeats]
                  for m in ("wa", "ua", "f1")}
    spread_over = "folds" if len(repeats) == 1 else "repeats"
    stats = {}
    for m in ("wa", "ua", "f1"):
        values = [r[m] for r in rows] if spread_over == "folds" else per_repeat[m]
        stats[m] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    conf = np.mean([normalize_confusion(np.asarray(r["confusion"])) for r in rows], axis=0)
    return {"folds": rows, "per_repeat": per_repeat, "std_over": spread_over, "n_folds": len(rows),
            "class_names": class_names, "confusion_mean_normalized": conf.tolist(), **stats}


def _write_report(out: Path, s: dict, class_names: list[str], cfg: Config) -> None:
    from ferkit.analysis.plots import plot_confusion

    counts = np.sum([np.asarray(r["confusion"]) for r in s["folds"]], axis=0)
    plot_confusion(counts, class_names, out / "cv_confusion.png", title="all folds")
    lines = [f"# Cross-validation: {cfg.name}", "",
             f"{s['n_folds']} folds, subject-wise; mean ± std over {s['std_over']}", "",
             f"**WA {100 * s['wa']['mean']:.2f} ± {100 * s['wa']['std']:.2f} %**, "
             f"UA {100 * s['ua']['mean']:.2f} ± {100 * s['ua']['std']:.2f} %, "
             f"macro-F1 {100 * s['f1']['mean']:.2f} ± {100 * s['f1']['std']:.2f} %", "",
             "| repeat | fold | train | test | WA % | UA % |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['repeat']} | {r['fold']} | {r['n_train']} | {r['n_test']} | {100 * r['wa']:.2f} | "
              f"{100 * r['ua']:.2f} |" for r in s["folds"]]
    lines += ["", "![confusion summed over folds](cv_confusion.png)", ""]
    (out / "cv_report.md").write_text("\n".join(lines), encoding="utf-8")


# ------------------------------------------------------------------ CLI: ferkit cv
def register_cli(sub, commands) -> None:
    p = sub.add_parser("cv", help="subject-wise (repeated) k-fold cross-validation of a preset")
    p.add_argument("--config", "-c", required=True, help="preset name or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--protocol", default="subject_kfold",
                   choices=("subject_kfold", "bu3dfe", "fivefold", "holdout"),
                   help="evaluation protocol (ferkit.engine.protocols): subject_kfold (10 folds x 1), bu3dfe "
                        "(seed 002: no neutral, 2 highest intensities, 60 subjects, 10 folds x 100 repeats), "
                        "fivefold, holdout (80/20)")
    p.add_argument("--folds", type=int, default=None, help="folds (default: the protocol's)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions with new folds (default: the protocol's)")
    p.add_argument("--zscore", action=argparse.BooleanOptionalAction, default=None,
                   help="per-fold z-score statistics of the training part (default: on for the RGB-D protocols)")
    p.add_argument("--split", default="all", help="dataset split pooled for CV (default: all)")
    p.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    commands["cv"] = _cmd_cv


def _cmd_cv(args) -> int:
    from ferkit.config import load_config
    from ferkit.engine.protocols import run_protocol

    cfg = load_config(args.config, args.overrides)
    s = run_protocol(cfg, args.out, args.protocol, folds=args.folds, repeats=args.repeats, zscore=args.zscore,
                     split=args.split)
    print(f"{s['n_folds']} folds: WA {100 * s['wa']['mean']:.2f} ± {100 * s['wa']['std']:.2f} %  "
          f"UA {100 * s['ua']['mean']:.2f} ± {100 * s['ua']['std']:.2f} %  ({args.out}/cv_report.md)")
    return 0
