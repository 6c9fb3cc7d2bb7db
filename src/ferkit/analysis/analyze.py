"""``ferkit analyze`` and ``ferkit compare``: the analyses of finished runs, written into their reports.

``analyze_run`` reloads a run (config.yaml, metrics.jsonl, a checkpoint), rebuilds its test split with the eval
transform the checkpoint records, and regenerates report.md with the extra sections asked for: t-SNE of the
penultimate features (also saved as ``analysis/test_features.npz`` so ``compare`` can put runs side by side),
Grad-CAM overlays and the model's own views. ``compare_runs`` writes one markdown page over several runs (or
cross-validation directories) with the headline, robustness and noise tables and a combined plot.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .tables import (RunRecord, best_epoch, cv_summary_table, cv_table, headline_table, load_cv, load_run,
                     noise_metrics, noise_table, robustness_table)

__all__ = ["analyze_run", "compare_runs", "extract_features", "pick_examples", "FEATURES_FILE"]

_logger = logging.getLogger("ferkit")
FEATURES_FILE = "analysis/test_features.npz"


@dataclass
class Features:
    features: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,)
    preds: np.ndarray  # (N,)
    indices: np.ndarray  # (N,) dataset indices


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device | str = "cpu") -> Features:
    """Penultimate features (``forward_features``), labels and predictions over a loader, passing a model only the
    extra modalities its registry entry declares."""
    from ferkit.engine.evaluate import model_inputs

    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats, labels, preds, idx = [], [], [], []
    for batch in loader:
        x, extra = model_inputs(batch, model)
        x, extra = x.to(device), {k: v.to(device) for k, v in extra.items()}
        f = model.forward_features(x, **extra)
        feats.append(f.float().cpu())
        preds.append(model.forward_head(f).argmax(1).cpu() if hasattr(model, "forward_head")
                     else model(x, **extra).argmax(1).cpu())
        labels.append(torch.as_tensor(batch["label"]))
        idx.append(torch.as_tensor(batch["index"]))
    model.train(was_training)
    return Features(torch.cat(feats).numpy(), torch.cat(labels).numpy(), torch.cat(preds).numpy(),
                    torch.cat(idx).numpy())


def pick_examples(labels: np.ndarray, preds: np.ndarray | None, num: int, num_classes: int) -> list[int]:
    """Up to ``num`` test positions for Grad-CAM: one per class in turn (first correct, then first wrong one of each
    class), so the grid shows every class and some mistakes."""
    order: list[int] = []
    for want_correct in (True, False):
        for c in range(num_classes):
            cand = np.flatnonzero(labels == c)
            if preds is not None:
                cand = cand[(preds[cand] == c) == want_correct]
            cand = [int(i) for i in cand if int(i) not in order]
            if cand:
                order.append(cand[0])
        if preds is None:
            break
    return order[:num]


def _run_config(run: RunRecord):
    from ferkit.config import config_from_dict

    data = {k: v for k, v in run.config.items() if k != "_run"}
    return config_from_dict(data)


def analyze_run(run_dir: str | Path, *, tsne: bool = False, gradcam: bool = False, views: bool = True,
                checkpoint: str = "last", dataset=None, num_images: int = 6, cam_method: str = "gradcam",
                cam_layer: str | None = None, device: str = "cpu", max_points: int = 3000,
                batch_size: int | None = None) -> Path:
    """Regenerate ``report.md`` of a finished run with the asked-for analyses; returns its path.

    ``checkpoint``: ``last`` (the model the report's test figures come from) or ``best``. ``dataset``: the test
    split to use instead of rebuilding it from the run's config (runs trained on a dataset object). ``cam_layer``:
    Grad-CAM target layer instead of the registry's (a dotted module path; e.g. an earlier stage for small inputs).
    """
    from ferkit.data.build import build_splits
    from ferkit.data.loader import SeededViews, make_eval_loader
    from ferkit.data.transforms import build_transform
    from ferkit.inference.predictor import load_checkpoint_model
    from .model_views import ViewContext, model_views
    from .report import write_run_report

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    if not run.history:
        raise ValueError(f"{run_dir}: metrics.jsonl has no finished epoch to report")
    cfg = _run_config(run)
    ckpt = run_dir / "checkpoints" / f"{checkpoint}.safetensors"
    model, meta = load_checkpoint_model(ckpt, device)
    class_names = list(meta["class_names"])
    test_ds = dataset if dataset is not None else build_splits(cfg.data, cfg.seed).test
    dm, ds_ = meta.get("depth_mean_std") or (cfg.data.depth_mean, cfg.data.depth_std)
    tf = build_transform("eval", int(meta["input_size"][-1]), meta["mean"], meta["std"], cfg.data.augment,
                         grayscale=bool(meta.get("grayscale", False)), depth_mean_std=(dm, ds_))
    loader = make_eval_loader(SeededViews(test_ds, {"image": tf}), batch_size or cfg.train.eval_batch_size, 0)
    plots = run_dir / "plots"
    sections = [f"Analyses of the **{checkpoint}** checkpoint (epoch {meta.get('epoch', '?')}) on the test split "
                f"({len(test_ds)} images)."]
    feats = None
    if tsne or gradcam:
        feats = extract_features(model, loader, device)
    if tsne:
        sections.append(_tsne_section(run, feats, class_names, plots, max_points))
    if gradcam:
        sections.append(_gradcam_section(model, meta, test_ds, feats, tf, class_names, plots, num_images,
                                         cam_method, cam_layer))
    if views:
        samples = [test_ds.load(i) for i in _view_indices(test_ds, 4)]
        ctx = ViewContext(plots, loader=loader, samples=samples, transform=tf, class_names=class_names,
                          history=run.history, device=torch.device(device))
        sections += [v.markdown() for v in model_views(model, ctx, meta["model"])]
    best = best_epoch(run)
    return write_run_report(run_dir, run.test, run.history, class_names, cfg, selected_on=run.select_split,
                            best_epoch=int(best.get("epoch", len(run.history))), extra_sections=sections)


def _view_indices(test_ds, num: int) -> list[int]:
    """Dataset indices of the first test image of each class, up to ``num``."""
    return pick_examples(test_ds.targets, None, num, test_ds.num_classes)


def _tsne_section(run: RunRecord, feats: Features, class_names: Sequence[str], plots: Path, max_points: int) -> str:
    from .tsne import plot_tsne_grid

    out = run.path / FEATURES_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, features=feats.features, labels=feats.labels, preds=feats.preds, indices=feats.indices)
    plot_tsne_grid([(f"{run.name}: true class", feats.features, feats.labels),
                    (f"{run.name}: predicted class", feats.features, feats.preds)],
                   class_names, plots / "tsne.png", max_points=max_points)
    return ("### t-SNE of the penultimate features (test)\n\n"
            f"`forward_features` ({feats.features.shape[1]}-d) of {len(feats.labels)} test images, coloured by true "
            f"class (left) and predicted class (right); features saved in `{FEATURES_FILE}`.\n\n"
            "![t-SNE](plots/tsne.png)\n")


def _gradcam_section(model: nn.Module, meta: dict, test_ds, feats: Features, tf, class_names: Sequence[str],
                     plots: Path, num_images: int, cam_method: str, cam_layer: str | None) -> str:
    from ferkit.models import model_info
    from .gradcam import gradcam_grid

    picks = pick_examples(feats.labels, feats.preds, num_images, len(class_names))
    samples = [test_ds.load(int(feats.indices[i])) for i in picks]
    name = meta["model"]
    layer = cam_layer or model_info(name).gradcam_layer
    gradcam_grid({name: model}, samples, tf, plots / "gradcam.png", {name: layer}, class_names=class_names,
                 method=cam_method)
    return (f"### Grad-CAM ({cam_method}, target layer `{layer}`)\n\n"
            "One test image per class where the model is right, then ones where it is wrong; each cell gives the "
            "predicted class and its probability, the map explains that prediction.\n\n"
            "![Grad-CAM](plots/gradcam.png)\n")


# ------------------------------------------------------------------ compare
def compare_runs(paths: Sequence[str | Path], out_dir: str | Path, *, tsne: bool = False,
                 max_points: int = 2000) -> Path:
    """``compare.md`` + ``compare.png`` (+ ``compare_tsne.png``) in ``out_dir`` over run and CV directories."""
    from .plots import plot_run_comparison

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cv_dirs = [Path(p) for p in paths if (Path(p) / "cv_results.json").is_file()]
    runs = [load_run(p) for p in paths if Path(p) not in cv_dirs]
    lines = ["# Run comparison", ""]
    if runs:
        lines += ["## Headline metrics (test split, last epoch)", "", headline_table(runs), ""]
        plot_run_comparison([(r.name, r.history) for r in runs], out / "compare.png")
        lines += ["![comparison](compare.png)", ""]
        if any((r.test.get("subsets") or {}) for r in runs):
            lines += ["## Robustness subsets (DSAN Table 4 layout)", "", robustness_table(runs), ""]
        if any(_has_noise(r) for r in runs):
            lines += ["## Label-noise protocol", "", noise_table(runs), ""]
        if tsne:
            lines += _compare_tsne(runs, out, max_points)
    if cv_dirs:
        cvs = {p.name: load_cv(p) for p in cv_dirs}
        lines += ["## Cross-validation", "", cv_summary_table(cvs), ""]
        for title, cv in cvs.items():
            lines += [f"### {title}", "", cv_table(cv), ""]
    md = out / "compare.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return md


def _has_noise(run: RunRecord) -> bool:
    logged = any(v is not None for rec in run.history for v in noise_metrics(rec).values())
    return run.noise_rate > 0 or logged


def _compare_tsne(runs: Sequence[RunRecord], out: Path, max_points: int) -> list[str]:
    from .tsne import plot_tsne_grid

    panels, missing = [], []
    for r in runs:
        f = r.path / FEATURES_FILE
        if f.is_file():
            with np.load(f) as z:
                panels.append((r.name, z["features"], z["labels"]))
        else:
            missing.append(r.name)
    lines = ["## t-SNE of test features", ""]
    if panels:
        names = runs[0].class_names or [str(i) for i in range(int(max(p[2].max() for p in panels)) + 1)]
        plot_tsne_grid(panels, names, out / "compare_tsne.png", max_points=max_points)
        lines += ["![t-SNE](compare_tsne.png)", ""]
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        lines += [f"No saved features (run `ferkit analyze RUN --tsne` first): {names}", ""]
    return lines
