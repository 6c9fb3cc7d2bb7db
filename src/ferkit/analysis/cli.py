"""Sub-commands ``ferkit analyze RUN_DIR``, ``ferkit compare RUN_DIR...`` and ``ferkit data stats``.

``ferkit data`` is a command group: other modules add their own ``ferkit data <name>`` through
:func:`data_subcommands` (call it from their ``register_cli``) instead of registering a second ``data`` parser.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

__all__ = ["register_cli", "data_subcommands"]

_DATA_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {}


def register_cli(sub, commands) -> None:
    p = sub.add_parser("analyze", help="regenerate a run's report.md with t-SNE, Grad-CAM and model views")
    p.add_argument("run_dir", help="run directory (config.yaml, metrics.jsonl, checkpoints/)")
    p.add_argument("--tsne", action="store_true", help="t-SNE of the test set's penultimate features")
    p.add_argument("--gradcam", action="store_true", help="Grad-CAM overlays of test images")
    p.add_argument("--all", action="store_true", help="every analysis")
    p.add_argument("--no-views", action="store_true", help="skip the model-specific views (DSAN, ARM, POSTER, RGB-D)")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="last (default: the model behind the report's test figures) or best")
    p.add_argument("--images", type=int, default=6, help="Grad-CAM images (one per class, then mistakes)")
    p.add_argument("--cam", default="gradcam", help="CAM method: gradcam, gradcam++, hirescam, xgradcam, layercam, "
                                                     "eigencam")
    p.add_argument("--layer", default=None, help="Grad-CAM target layer (dotted path; default: the model's registry "
                                                 "entry)")
    p.add_argument("--max-points", type=int, default=3000, help="t-SNE points per panel (stratified subsample)")
    p.add_argument("--device", default="cpu")
    commands["analyze"] = _cmd_analyze

    p = sub.add_parser("compare", help="one table and plot over several runs (and CV directories)")
    p.add_argument("runs", nargs="+", help="run directories and/or cross-validation output directories")
    p.add_argument("--out", default="compare", help="output directory for compare.md / compare.png")
    p.add_argument("--tsne", action="store_true", help="t-SNE panels side by side (needs `ferkit analyze --tsne`)")
    commands["compare"] = _cmd_compare

    p = data_subcommands(sub, commands).add_parser(
        "stats", help="class distribution per split, subjects, image sizes, duplicates (md5)",
        description="ferkit data stats --config PRESET [key=value ...]  |  ferkit data stats DATASET ROOT")
    p.add_argument("target", nargs="*", metavar="DATASET ROOT | key=value",
                   help="a dataset name and its root, or (with --config) config overrides")
    p.add_argument("--config", "-c", default=None, help="preset name or YAML path: its train / val / test splits")
    p.add_argument("--splits", default=None, help="comma-separated splits (default: train,test, + val if any)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="adapter option (repeatable)")
    p.add_argument("--out", default=None, help="write stats.md and class_distribution.png there")
    p.add_argument("--no-hash", action="store_true", help="skip duplicate detection (no file hashing)")
    _DATA_HANDLERS["stats"] = _cmd_data_stats


def data_subcommands(sub, commands) -> argparse._SubParsersAction:
    """The ``ferkit data`` group's sub-parsers, created on first use; add a parser and put its handler in
    ``ferkit.analysis.cli._DATA_HANDLERS[name]`` (or use :func:`add_data_command`)."""
    if "data" not in sub.choices:
        p = sub.add_parser("data", help="dataset tools (ferkit data stats, ...)")
        p.set_defaults(_data_group=p.add_subparsers(dest="data_command"))
        commands["data"] = _cmd_data
    return sub.choices["data"].get_default("_data_group")


def add_data_command(name: str, handler: Callable[[argparse.Namespace], int]) -> None:
    _DATA_HANDLERS[name] = handler


def _cmd_data(args: argparse.Namespace) -> int:
    handler = _DATA_HANDLERS.get(getattr(args, "data_command", None) or "")
    if handler is None:
        print(f"ferkit: error: ferkit data needs a sub-command: {', '.join(sorted(_DATA_HANDLERS))}", file=sys.stderr)
        return 2
    return handler(args)


# ------------------------------------------------------------------ handlers
def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze_run

    run = Path(args.run_dir)
    if not (run / "config.yaml").is_file():
        print(f"ferkit: error: {run}: not a ferkit run directory (no config.yaml)", file=sys.stderr)
        return 2
    out = analyze_run(run, tsne=args.tsne or args.all, gradcam=args.gradcam or args.all, views=not args.no_views,
                      checkpoint=args.checkpoint, num_images=args.images, cam_method=args.cam, cam_layer=args.layer,
                      device=args.device, max_points=args.max_points)
    print(f"wrote {out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .analyze import compare_runs

    bad = [r for r in args.runs if not ((Path(r) / "config.yaml").is_file() or (Path(r) / "cv_results.json").is_file())]
    if bad:
        print(f"ferkit: error: {bad[0]}: neither a run directory (config.yaml) nor a CV directory (cv_results.json)",
              file=sys.stderr)
        return 2
    out = compare_runs(args.runs, args.out, tsne=args.tsne)
    print(out.read_text(encoding="utf-8"))
    print(f"wrote {out}")
    return 0


def _parse_options(items: list[str]) -> dict[str, object]:
    import yaml

    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        opts[key] = yaml.safe_load(value)
    return opts


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from .data_stats import dataset_stats

    try:
        splits, title = _stats_splits(args)
    except ValueError as e:
        print(f"ferkit: error: {e}", file=sys.stderr)
        return 2
    _, md = dataset_stats(splits, args.out, title=title, hash_images=not args.no_hash)
    print(md)
    if args.out:
        print(f"wrote {Path(args.out) / 'stats.md'} and {Path(args.out) / 'class_distribution.png'}")
    return 0


def _stats_splits(args: argparse.Namespace) -> tuple[dict, str]:
    """Named splits from a preset (``--config``) or from ``DATASET ROOT``."""
    wanted = args.splits.split(",") if args.splits else None
    if args.config:
        from ferkit.config import load_config
        from ferkit.data.build import build_dataset

        cfg = load_config(args.config, list(args.target))
        d = cfg.data
        names = {"train": d.train_split, "test": d.test_split, **({"val": d.val_split} if d.val_split else {})}
        names = {k: names.get(k, k) for k in (wanted or names)}
        return ({k: build_dataset(d, v, train=k == "train") for k, v in names.items()},  # train reads noise.file
                f"{cfg.name} ({d.dataset})")
    if len(args.target) != 2:
        raise ValueError("ferkit data stats: give --config PRESET or DATASET ROOT")
    from ferkit.data.adapters import build_dataset as build_adapter

    name, root = args.target
    opts = _parse_options(args.option)
    splits, errors = {}, []
    for split in wanted or ("train", "val", "test"):
        try:
            splits[split] = build_adapter(name, root, split, **opts)
        except (ValueError, OSError) as e:  # a split the dataset lacks: skipped unless asked for by name
            if wanted:
                raise ValueError(f"{name} split {split!r}: {e}") from None
            errors.append(str(e))
    if not splits:  # sets without split folders (CK+, JAFFE) have one pool, "all"
        try:
            splits["all"] = build_adapter(name, root, "all", **opts)
        except (ValueError, OSError) as e:
            raise ValueError(f"{name} at {root}: no split could be read ({errors[0] if errors else e})") from None
    return splits, f"{name} ({root})"
