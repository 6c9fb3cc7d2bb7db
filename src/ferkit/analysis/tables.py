"""Markdown tables over finished runs: headline metrics, robustness subsets side by side (DSAN Table 4 layout),
cross-validation (per fold, mean ± std), and the label-noise protocol (WA and noise-detection precision / recall per
noise rate, seed 000).

A run directory is read, never written: ``config.yaml`` (resolved config + ``_run`` block) and ``metrics.jsonl`` (one
record per epoch; the last record's ``test`` holds the final test metrics and ``test.subsets`` the robustness
subsets). Every table tolerates missing keys: an absent value prints as ``-``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

__all__ = ["RunRecord", "load_run", "load_runs", "best_epoch", "headline_table", "robustness_table",
           "cv_table", "cv_summary_table", "load_cv", "noise_table", "noise_metrics", "ROBUSTNESS_SUBSETS"]

# DSAN Table 4 columns: subset name in ``test.subsets`` -> column title
ROBUSTNESS_SUBSETS = {"occluded": "Occlusion", "pose>30": "Pose (>30)", "pose>45": "Pose (>45)"}


@dataclass
class RunRecord:
    """What the tables need from one run directory."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def test(self) -> dict[str, Any]:
        return self.last.get("test") or {}

    def cfg(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def noise_rate(self) -> float:
        """Fraction of flipped training labels: synthetic (``data.noise.rate``) or, for a noisy label list
        (``data.noise.file``), the fraction the run measured against the clean list (``noise.json``)."""
        rate = float(self.cfg("data.noise.rate", 0.0) or 0.0)
        if rate > 0 or not self.cfg("data.noise.file"):
            return rate
        try:
            return float(json.loads((self.path / "noise.json").read_text(encoding="utf-8"))["rate"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    @property
    def class_names(self) -> list[str]:
        return list(self.cfg("_run.classes") or [])

    @property
    def select_split(self) -> str:
        return self.cfg("_run.select_split") or ("val" if "val" in self.last else "test")


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a run directory's config.yaml and metrics.jsonl (a truncated last line, from a killed run, is ignored)."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path}: no config.yaml (not a ferkit run directory)")
    config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    history = []
    log = path / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return RunRecord(path, config, history)


def load_runs(run_dirs: Iterable[str | Path]) -> list[RunRecord]:
    return [load_run(p) for p in run_dirs]


def best_epoch(run: RunRecord) -> dict[str, Any]:
    """The record the trainer picked as best: the first maximum of ``train.select_metric`` on the selection split
    (the trainer keeps an epoch only when it is strictly better)."""
    split, metric = run.select_split, run.cfg("train.select_metric", "wa")
    best, best_val = {}, None
    for rec in run.history:
        value = -rec.get("train_loss", np.inf) if metric == "loss" else (rec.get(split) or {}).get(metric)
        if value is not None and (best_val is None or value > best_val):
            best, best_val = rec, value
    return best


def _pct(v: Any, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * float(v):.{digits}f}"


def _md(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_table(runs: Sequence[RunRecord]) -> str:
    """One row per run: what it is, how long it ran, final test WA / UA / macro-F1, and the best epoch's figures."""
    rows = []
    for r in runs:
        best = best_epoch(r)
        sel = r.select_split
        rows.append([f"`{r.name}`", r.cfg("model.name", "-"), r.cfg("method.name", "-"), r.cfg("data.dataset", "-"),
                     len(r.history), _pct(r.test.get("wa")), _pct(r.test.get("ua")), _pct(r.test.get("f1")),
                     f"{best.get('epoch', '-')} ({sel})", _pct((best.get(sel) or {}).get("wa")),
                     _pct((best.get("test") or {}).get("wa"))])
    return _md(["run", "model", "method", "dataset", "epochs", "test WA %", "test UA %", "test F1 %",
                "best epoch (on)", "best: sel. WA %", "best: test WA %"], rows,
               ["---", "---", "---", "---"] + ["---:"] * 7)


def robustness_table(runs: Sequence[RunRecord], subsets: dict[str, str] | None = None, metric: str = "wa") -> str:
    """DSAN Table 4 layout: one row per run, the whole test set then Occlusion / Pose (>30) / Pose (>45) accuracy.
    Subset sizes go in the header when all runs share them, else beside each value."""
    subsets = subsets or ROBUSTNESS_SUBSETS
    sizes = {k: {(r.test.get("subsets") or {}).get(k, {}).get("n") for r in runs} for k in subsets}
    header = [f"run ({metric.upper()} %)", "all"]
    for key, title in subsets.items():
        ns = sizes[key] - {None}
        header.append(f"{title} n={ns.pop()}" if len(ns) == 1 and None not in sizes[key] else title)
    rows = []
    for r in runs:
        row = [f"`{r.name}` ({r.cfg('model.name', '-')})", _pct(r.test.get(metric))]
        for key in subsets:
            cell = (r.test.get("subsets") or {}).get(key)
            shared = len(sizes[key] - {None}) == 1 and None not in sizes[key]
            row.append("-" if not cell else _pct(cell.get(metric)) + ("" if shared else f" (n={cell.get('n')})"))
        rows.append(row)
    return _md(header, rows)


# ------------------------------------------------------------------ cross-validation (engine/crossval.py layout)
def load_cv(path: str | Path) -> dict[str, Any]:
    """cv_results.json of a CV output directory (or the file itself)."""
    p = Path(path)
    p = p / "cv_results.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no cv_results.json")
    return json.loads(p.read_text(encoding="utf-8"))


def _mean_std(stat: dict | None) -> str:
    if not stat:
        return "-"
    return f"{_pct(stat.get('mean'))} ± {_pct(stat.get('std'))}"


def cv_table(cv: dict[str, Any]) -> str:
    """Per-fold rows, then per-repeat means (repeated CV) and the final mean ± std (over folds, or over repeats)."""
    rows = [[f.get("repeat", 0), f.get("fold", "-"), f.get("n_train", "-"), f.get("n_test", "-"), _pct(f.get("wa")),
             _pct(f.get("ua")), _pct(f.get("f1"))] for f in cv.get("folds", [])]
    per_repeat = cv.get("per_repeat") or {}
    if len(per_repeat.get("wa", [])) > 1:
        for k in range(len(per_repeat["wa"])):
            means = [_pct(_at(per_repeat.get(m), k)) for m in ("wa", "ua", "f1")]
            rows.append([f"**repeat {k} mean**", "", "", "", *means])
    rows.append([f"**mean ± std over {cv.get('std_over', 'folds')}**", "", "", "", _mean_std(cv.get("wa")),
                 _mean_std(cv.get("ua")), _mean_std(cv.get("f1"))])
    return _md(["repeat", "fold", "train", "test", "WA %", "UA %", "macro-F1 %"], rows)


def _at(values: Sequence | None, k: int) -> Any:
    return values[k] if values is not None and k < len(values) else None


def cv_summary_table(cvs: dict[str, dict[str, Any]]) -> str:
    """Several CV experiments side by side: ``{title: cv_results}`` -> mean ± std per metric."""
    rows = [[t, cv.get("n_folds", len(cv.get("folds", []))), cv.get("std_over", "-"), _mean_std(cv.get("wa")),
             _mean_std(cv.get("ua")), _mean_std(cv.get("f1"))] for t, cv in cvs.items()]
    return _md(["experiment", "folds", "± over", "WA %", "UA %", "macro-F1 %"], rows)


# ------------------------------------------------------------------ label-noise protocol (seed 000)
_NOISE_KEYS = {"precision": re.compile(r"(filter|clean|noise)_?precision$"),
               "recall": re.compile(r"(filter|clean|noise)_?recall$"),
               "correction": re.compile(r"correct(ion)?_?acc(uracy)?$")}


def noise_metrics(record: dict[str, Any]) -> dict[str, float | None]:
    """Noise-detection figures of one epoch record, whatever prefix the method logs them under
    (``filter_precision``, ``train_filter_precision``, ``d3fer/filter_precision``, ...); absent -> None."""
    out: dict[str, float | None] = {k: None for k in _NOISE_KEYS}
    for key, value in _flatten(record).items():
        for name, pattern in _NOISE_KEYS.items():
            if out[name] is None and pattern.search(key) and isinstance(value, (int, float)):
                out[name] = float(value)
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k in ("val", "test"):
            continue  # evaluation splits carry no training-side noise statistics
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _last_noise_metrics(history: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The last epoch that logged noise-detection figures (warm-up epochs log none)."""
    for rec in reversed(history):
        nm = noise_metrics(rec)
        if any(v is not None for v in nm.values()):
            return nm
    return {k: None for k in _NOISE_KEYS}


def noise_table(runs: Sequence[RunRecord]) -> str:
    """One row per run ordered by noise rate: final test WA / UA and, where the method logs them (D3FER:
    ``filter_precision``, ``filter_recall``, ``correction_acc``), the last logged epoch's noise-detection precision /
    recall and label-correction accuracy (seed 000 protocol)."""
    ordered = sorted(runs, key=lambda r: (r.noise_rate, r.cfg("method.name", "")))
    rows = []
    for r in ordered:
        nm = _last_noise_metrics(r.history)
        rows.append([f"`{r.name}`", r.cfg("method.name", "-"), f"{100 * r.noise_rate:.0f}",
                     _pct(r.test.get("wa")), _pct(r.test.get("ua")), _pct(nm["precision"]), _pct(nm["recall"]),
                     _pct(nm["correction"])])
    return _md(["run", "method", "noise %", "test WA %", "test UA %", "filter precision %", "filter recall %",
                "correction acc. %"], rows, ["---", "---"] + ["---:"] * 6)
