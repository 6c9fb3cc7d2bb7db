"""report.md of a run: headline metrics, robustness subsets (DSAN Table 4 layout), per-class accuracy, curves and
confusion matrices; ``ferkit analyze`` regenerates it with extra sections (t-SNE, Grad-CAM, model views)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ferkit.engine.evaluate import subset_table
from .plots import plot_confusion, plot_curves, plot_per_class

__all__ = ["write_run_report"]


def _metrics_row(label: str, m: dict[str, Any]) -> str:
    return f"| {label} | {m.get('n', '-')} | {100 * m['wa']:.2f} | {100 * m['ua']:.2f} | {100 * m['f1']:.2f} |"


def write_run_report(run_dir: Path, test: dict[str, Any], history: Sequence[dict], class_names: Sequence[str],
                     cfg: Any, *, selected_on: str, best_epoch: int, extra_sections: Sequence[str] = ()) -> Path:
    """Write ``plots/{curves,confusion,per_class}.png`` and ``report.md``; ``extra_sections`` are markdown blocks
    appended under "Analysis" (``ferkit analyze``)."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plot_curves(history, plots / "curves.png")
    plot_confusion(np.asarray(test["confusion"]), class_names, plots / "confusion.png", title="test")
    plot_per_class(test["per_class"], class_names, plots / "per_class.png", title="test per-class accuracy")
    rows = [_metrics_row("test (last epoch)", test)]
    best = next((r for r in history if r.get("epoch") == best_epoch), None)
    if best is not None and best_epoch != history[-1].get("epoch"):
        for split in ("val", "test"):
            if split in best:
                rows.append(_metrics_row(f"{split} (best epoch {best_epoch})", best[split]))
    elif best is not None and "val" in best:
        rows.append(_metrics_row(f"val (best epoch {best_epoch})", best["val"]))
    lines = [
        f"# {cfg.name}", "",
        f"model `{cfg.model.name}`, method `{cfg.method.name}`, dataset `{cfg.data.dataset}`, "
        f"{len(history)} epochs, seed {cfg.seed}", "",
        "| split | n | WA % | UA % | macro-F1 % |", "|---|---:|---:|---:|---:|", *rows, "",
        f"Best checkpoint: epoch {best_epoch}, selected on the **{selected_on}** split"
        + (" (no validation split was configured, so the best epoch was picked on test: treat its figure as optimistic)"
           if selected_on == "test" else "") + ".", "",
    ]
    table = subset_table(test)
    if table:
        lines += ["## Robustness subsets (test)", "", table, ""]
    lines += ["## Per-class accuracy (test)", "",
              "| " + " | ".join(class_names) + " |", "|" + "---:|" * len(class_names),
              "| " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in test["per_class"]) + " |", "",
              "![per-class](plots/per_class.png)", "",
              "## Training curves", "", "![curves](plots/curves.png)", "",
              "## Confusion matrix (test)", "", "![confusion](plots/confusion.png)", ""]
    if extra_sections:
        lines += ["## Analysis", ""] + [s.rstrip() + "\n" for s in extra_sections]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
