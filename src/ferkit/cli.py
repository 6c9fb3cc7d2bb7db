"""``ferkit`` command line: train, eval, predict, profile, synth, presets.

Every command validates its inputs before doing any work; errors are one line (``ferkit: error: ...``), exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

__all__ = ["main"]

_log = logging.getLogger("ferkit")
DEFAULT_PRESET = "resnet18_synthetic"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help=f"preset name or YAML path (default: {DEFAULT_PRESET})")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=3e-4")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ferkit", description="Facial expression recognition toolkit")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=False)

    p = sub.add_parser("train", help="train a model (default: ResNet-18 on the built-in synthetic faces)")
    _add_config_args(p)
    p.add_argument("--run-dir", default=None, help="run directory (default: <output_dir>/<name>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled objects in the resumed state")
    p.add_argument("--skip-bad", action="store_true", help="skip bad dataset entries (counted) instead of failing")

    p = sub.add_parser("eval", help="evaluate a checkpoint / run on a dataset split")
    p.add_argument("checkpoint", help="run directory or .safetensors checkpoint")
    _add_config_args(p)
    p.add_argument("--split", default=None, help="split to evaluate (default: data.test_split)")
    p.add_argument("--flip-tta", action="store_true")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--per-image", action="store_true",
                   help="also list every image (file, true / predicted label and emotion) and print the confusion "
                        "matrix (POSTER's test script, seed 004 §3.3)")

    p = sub.add_parser("predict", help="classify the faces in photos, folders, videos or a webcam")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="run directory, .safetensors checkpoint or weights name (ferkit:resnet18-fer7); optional: "
                        "without one the built-in model is used")
    p.add_argument("paths", nargs="*", help="image files or folders (recursive)")
    p.add_argument("--out", default=None, help="output .csv or .jsonl (default: CSV on stdout)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("profile", help="parameters and MACs vs the papers' figures")
    p.add_argument("models", nargs="*", help="model names (default: all registered)")
    p.add_argument("--input-size", type=int, default=None, help="profile at this size instead of the paper's")
    p.add_argument("--num-classes", type=int, default=7)

    p = sub.add_parser("synth", help="write the built-in synthetic face set to disk")
    p.add_argument("out", help="output directory")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--subjects", type=int, default=20, help="subjects per split")
    p.add_argument("--per-subject", type=int, default=20)
    p.add_argument("--classes", type=int, default=7, choices=(7, 8))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contact-sheet", action="store_true", help="also write contact_sheet.png")

    sub.add_parser("presets", help="list the configuration presets")
    sub.add_parser("models", help="list the registered models")
    for module in _extensions():
        module.register_cli(sub, COMMANDS)
    return ap


# Modules that add sub-commands: each defines ``register_cli(subparsers, commands)`` which adds its parser(s) and
# puts ``name -> handler(args) -> int`` into ``commands``. A listed module that does not exist (yet) is skipped.
_EXTENSION_MODULES = (
    "ferkit.engine.crossval",  # ferkit cv
    "ferkit.analysis.cli",  # ferkit analyze / compare / data stats
    "ferkit.inference.cli",  # ferkit faces / export / serve (predict on photos & video extends `predict`)
    "ferkit.tune",  # ferkit tune
    "ferkit.models.landmarks",  # ferkit landmarks pretrain
    "ferkit.data.rgbd",  # RGB-D dataset tools
)


def _extensions():
    import importlib
    import importlib.util

    for name in _EXTENSION_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            module = importlib.import_module(name)
            if hasattr(module, "register_cli"):
                yield module


# ------------------------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from ferkit.config import load_config
    from ferkit.engine import Trainer

    overrides = list(args.overrides) + (["data.skip_bad=true"] if args.skip_bad else [])
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise SystemExit(f"ferkit: error: --resume {run_dir}: no config.yaml (not a ferkit run directory)")
        from ferkit.config import run_config

        cfg = run_config(run_dir, overrides)
    else:
        cfg = load_config(args.config or DEFAULT_PRESET, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.output_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume), trust_checkpoint=args.trust_checkpoint)
    result = trainer.fit()
    if trainer.dist.is_main and "test" in result:
        t = result["test"]
        print(f"test WA {100 * t['wa']:.2f}  UA {100 * t['ua']:.2f}  macro-F1 {100 * t['f1']:.2f}  "
              f"(n={t['n']}, {result['epochs_run']} epochs)  run: {run_dir}")
        for name, row in (t.get("subsets") or {}).items():
            print(f"  {name:<20} n={row['n']:<5} WA {100 * row['wa']:.2f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ferkit.config import config_from_dict, load_config
    from ferkit.data.build import build_dataset
    from ferkit.data.loader import SeededViews, make_eval_loader
    from ferkit.data.transforms import build_transform
    from ferkit.engine.evaluate import evaluate_predictions, predict_loader, subset_table
    from ferkit.inference.predictor import load_checkpoint_model

    model, meta = load_checkpoint_model(args.checkpoint)
    overrides = list(args.overrides) + (["data.skip_bad=true"] if args.skip_bad else [])
    if args.config:
        cfg = load_config(args.config, overrides)
    else:
        from ferkit.config import _merge, parse_overrides

        cfg = config_from_dict(_merge(meta["config"], parse_overrides(overrides)) if overrides else meta["config"])
    ds = build_dataset(cfg.data, args.split or cfg.data.test_split)
    if ds.class_names != meta["class_names"]:
        model, ds = _cross_dataset(model, meta, ds)
    tf = build_transform("eval", meta["input_size"][-1], meta["mean"], meta["std"], cfg.data.augment,
                         grayscale=meta.get("grayscale", False))
    loader = make_eval_loader(SeededViews(ds, {"image": tf}), cfg.train.eval_batch_size, cfg.data.num_workers)
    import torch

    pred = predict_loader(model, loader, torch.device("cpu"), flip_tta=args.flip_tta)
    m = evaluate_predictions(pred, len(ds.class_names), ds.subsets())
    rows = _per_image_rows(pred, ds) if args.per_image else None
    if args.json:
        print(json.dumps({**m, "per_image": rows} if rows is not None else m))
    else:
        print(f"{ds.describe()}\nWA {100 * m['wa']:.2f}  UA {100 * m['ua']:.2f}  macro-F1 {100 * m['f1']:.2f}")
        print(subset_table(m))
        if rows is not None:
            print(_per_image_text(rows, m["confusion"], ds.class_names))
    return 0


def _cross_dataset(model, meta: dict, ds):
    """Score a model on a dataset with other class names: outputs mapped onto the dataset's classes by name
    (:func:`ferkit.labels.label_map`); samples of classes the model lacks (contempt for a 7-class model) are left
    out, said in one line."""
    from ferkit.data.mixture import Mixture
    from ferkit.engine.evaluate import ClassSelect
    from ferkit.labels import label_map

    try:
        mapping = label_map(ds.class_names, meta["class_names"])  # dataset index -> model output
    except KeyError as e:
        raise SystemExit(f"ferkit: error: cross-dataset evaluation: {e.args[0]}") from None
    kept = [i for i in range(len(ds.class_names)) if i in mapping]
    if not kept:
        raise SystemExit(f"ferkit: error: {ds.name} has no class the model knows ({meta['class_names']})")
    lacking = [n for i, n in enumerate(ds.class_names) if i not in mapping]
    print(f"cross-dataset evaluation: the model's classes {meta['class_names']} mapped by name onto the dataset's "
          f"{ds.class_names}" + (f"; samples of {lacking} left out (the model has no such class)" if lacking else ""))
    if lacking:
        ds = Mixture([ds], [ds.class_names[i] for i in kept], ds.split)
    return ClassSelect(model, [mapping[i] for i in kept]), ds


def _per_image_rows(pred, ds) -> list[dict]:
    """One row per evaluated image: file, true / predicted label index and emotion name."""
    names = ds.class_names
    out = []
    for i, y, p in zip(pred.indices.tolist(), pred.labels.tolist(), pred.preds.tolist()):
        r = ds.records[i]
        out.append({"file": Path(r.path).name if r.path else r.source, "label": y, "pred": p,
                    "true_emotion": names[y], "pred_emotion": names[p]})
    return out


def _per_image_text(rows: list[dict], confusion: list[list[int]], names: list[str]) -> str:
    lines = ["file\ttrue label\tpredicted label\ttrue emotion\tpredicted emotion"]
    lines += [f"{r['file']}\t{r['label']}\t{r['pred']}\t{r['true_emotion']}\t{r['pred_emotion']}" for r in rows]
    width = max(len(n) for n in names)
    lines.append("confusion matrix (rows: true, columns: predicted; counts | row-normalised)")
    lines.append(" " * width + " " + " ".join(f"{n[:5]:>5}" for n in names))
    for name, row in zip(names, confusion):
        total = max(sum(row), 1)
        lines.append(f"{name:>{width}} " + " ".join(f"{c:5d}" for c in row) + " | "
                     + " ".join(f"{c / total:5.2f}" for c in row))
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> int:
    # photos, folders, videos, webcam; the options are added by ferkit.inference.cli.register_cli
    from ferkit.inference.cli import predict_command

    return predict_command(args)


def cmd_profile(args: argparse.Namespace) -> int:
    from ferkit.analysis.profile import profile_table

    print(profile_table(args.models or None, input_size=args.input_size, num_classes=args.num_classes))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ferkit.data.synthetic import SyntheticConfig, contact_sheet, write_synthetic

    cfg = SyntheticConfig(size=args.size, num_classes=args.classes, num_subjects=args.subjects,
                          samples_per_subject=args.per_subject, seed=args.seed)
    out = write_synthetic(args.out, cfg, workers=2)
    if args.contact_sheet:
        contact_sheet(Path(out) / "contact_sheet.png", cfg)
    print(f"wrote {out}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from ferkit.config import list_presets

    print("\n".join(list_presets()))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ferkit.models import list_models, list_weights

    print("architectures:\n  " + "\n  ".join(list_models()))
    weights = list_weights()
    print("\nweights (model.pretrained=NAME, ferkit predict/serve/export/eval NAME):")
    for w in weights:
        classes = len(w["classes"] or [])
        print(f"  {w['name']:<28} {w['origin']:<8} {w['model']}, {classes} classes, "
              f"{(w['input_size'] or ['?'])[-1]} px, {w['mb']} MB  {w['summary']}")
    if not weights:
        print("  none")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "profile": cmd_profile,
            "synth": cmd_synth, "presets": cmd_presets, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.command is None:
        args = _parser().parse_args(["train", *(argv or [])])
    from ferkit.config import ConfigError
    from ferkit.data.base import DataError
    from ferkit.engine.checkpoint import CheckpointError
    from ferkit.engine.trainer import TrainingError
    from ferkit.models.registry import CheckpointMismatchError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, CheckpointError, TrainingError, CheckpointMismatchError) as e:
        print(f"ferkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ferkit: interrupted (resume with: ferkit train --resume RUN_DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
