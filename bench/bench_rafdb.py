"""RAF-DB at CPU scale: the papers' RAF-DB table (baseline, DSAN, ARM, D3FER; clean and with EAC's noisy label lists
noise01/02/03.txt) rerun from ferkit's FERPlus-pretrained trunk, with the paper figures side by side.

    python bench/make_ferplus_trunk.py                 # once: the trunk every row starts from
    python bench/bench_rafdb.py                        # every row, then README's "RAF-DB at CPU scale" section
    python bench/bench_rafdb.py --rows baseline d3fer --noise 0 30 --seeds 0 1 --parallel 2

Each run is ``ferkit train --config <preset>`` (presets ``*_rafdb_cpu[_noiseNN]``) in ``<out>/runs/<preset>-s<seed>``:
a finished run is reused, an interrupted one resumed. Figures are the *last* epoch on RAF-DB's official test set.
Writes ``<out>/rafdb_cpu.jsonl`` (one row per run), ``<out>/table.md``, confusion matrices and D3FER's per-epoch
filtering curves under ``docs/rafdb_cpu/`` (``--plots``), and (default; ``--no-readme``) README's section.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import REPO, JsonLines, default_data_root, facts, write_readme_section

ROWS = {"baseline": ("resnet18", "resnet18_rafdb_cpu"), "dsan": ("DSAN", "dsan_rafdb_cpu"),
        "arm": ("ARM", "arm_rafdb_cpu"), "d3fer": ("D3FER", "d3fer_rafdb_cpu")}
NOISE = (0, 10, 20, 30)
# published WA % (224 px, MS-Celeb / ImageNet trunks): DSAN Table 1 (baseline, DSAN), ARM Table 3a; noise columns:
# EAC's ResNet-18 table (baseline) and EAC itself (the noise-robust method of that table, beside D3FER's row)
PAPER = {("baseline", 0): "86.93 (DSAN T1)", ("dsan", 0): "89.70", ("arm", 0): "90.55",
         ("baseline", 10): "81.01", ("baseline", 20): "77.98", ("baseline", 30): "75.50",
         ("d3fer", 10): "EAC 88.02", ("d3fer", 20): "EAC 86.05", ("d3fer", 30): "EAC 84.42"}
DEFAULT_JOBS = [("baseline", 0), ("dsan", 0), ("arm", 0), ("d3fer", 0), ("baseline", 10), ("baseline", 20),
                ("baseline", 30), ("d3fer", 10), ("d3fer", 20), ("d3fer", 30)]


def preset(row: str, noise: int) -> str:
    return ROWS[row][1] + (f"_noise{noise}" if noise else "")


def run_dir(out: Path, row: str, noise: int, seed: int) -> Path:
    return out / "runs" / f"{preset(row, noise)}-s{seed}"


def is_done(run: Path) -> bool:
    return (run / "test_predictions.csv").is_file()


def train(run: Path, row: str, noise: int, seed: int, args: argparse.Namespace) -> None:
    """One run as its own process (a crash or a kill leaves a resumable run, not a broken bench)."""
    if is_done(run):
        print(f"[bench_rafdb] reuse {run}", flush=True)
        return
    common = [f"train.threads={args.threads}", "train.progress=false", "train.tensorboard=false"]
    if (run / "checkpoints" / "state.pt").is_file():
        cmd = ["-m", "ferkit", "train", "--resume", str(run), *common]
    else:
        cmd = ["-m", "ferkit", "train", "--config", preset(row, noise), "--run-dir", str(run), f"seed={seed}",
               f"data.root={args.data_root}", f"model.pretrained={args.trunk}", *common, *args.set]
    print(f"[bench_rafdb] {' '.join(['python', *cmd])}", flush=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"{run.name}.log", "a", encoding="utf-8") as log:
        done = subprocess.run([sys.executable, *cmd], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{run}: training failed (exit {done.returncode}); see {run.parent / (run.name + '.log')}")


def history(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@functools.cache
def profile(row: str) -> dict:
    """Params / MACs of a row's model at its CPU-scale input (one measurement per method, whatever its runs)."""
    from ferkit.analysis.profile import profile_model
    from ferkit.config import load_config

    cfg = load_config(preset(row, 0), check=False)
    r = profile_model(cfg.model.name, input_size=cfg.data.input_size, **cfg.model.kwargs)
    return {"input": cfg.data.input_size, "params_m": round(r["params_m"], 3), "macs_g": round(r["macs_g"], 4)}


def result_row(run: Path, row: str, noise: int, seed: int) -> dict:
    h = history(run)
    last = h[-1]
    out = {"row": row, "noise": noise, "seed": seed, "run": str(run), "epochs": last["epoch"],
           "wa": last["test"]["wa"], "ua": last["test"]["ua"], "minutes": round(last.get("time_s", 0) / 60, 1),
           "confusion": last["test"].get("confusion"), "history": h, **profile(row), **facts()}
    noisy = [r for r in h if "filter_precision" in r]
    if noisy:
        out["filter"] = [{"epoch": r["epoch"], "precision": r.get("filter_precision"), "recall": r.get("filter_recall"),
                          "correction": r.get("correction_acc")} for r in noisy]
    return out


def plots(rows: list[dict], out: Path) -> list[str]:
    """Confusion matrices of every run and D3FER's per-epoch filtering curves, as PNGs in ``out``."""
    import numpy as np

    from ferkit.analysis.d3fer_plots import plot_filtering_curves
    from ferkit.analysis.plots import plot_confusion
    from ferkit.labels import LABEL_SPACES

    made = []
    for r in rows:
        if r.get("confusion"):
            name = f"confusion_{r['row']}_noise{r['noise']}_s{r['seed']}.png"
            plot_confusion(np.asarray(r["confusion"]), LABEL_SPACES["rafdb"], out / name,
                           title=f"{ROWS[r['row']][0]}, {r['noise']} % noise, seed {r['seed']}: WA {100 * r['wa']:.2f} %")
            made.append(name)
    d3fer = {f"{r['noise']} % noise (seed {r['seed']})": r["history"] for r in rows
             if r["row"] == "d3fer" and r["noise"] > 0}
    if d3fer:
        plot_filtering_curves(d3fer, out / "d3fer_filtering.png", title="D3FER on RAF-DB, noise0N.txt")
        made.append("d3fer_filtering.png")
    return made


def cell(rows: list[dict], key: str) -> str:
    vals = [100 * r[key] for r in rows]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} (n={len(vals)})"


def table(rows: list[dict], trunk_meta: dict | None) -> str:
    head = ["method", "noise", "WA %", "UA %", "paper WA %", "margin vs baseline (WA)", "epochs", "min / run",
            "input", "params M", "MACs G"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for noise in NOISE:
        base = [r for r in rows if r["row"] == "baseline" and r["noise"] == noise]
        for key in ROWS:
            mine = [r for r in rows if r["row"] == key and r["noise"] == noise]
            if not mine:
                continue
            margin = "-" if key == "baseline" or not base else \
                f"{100 * (statistics.mean(r['wa'] for r in mine) - statistics.mean(r['wa'] for r in base)):+.2f}"
            noise_txt = "clean" if noise == 0 else f"noise0{noise // 10}.txt ({noise} %)"
            lines.append(f"| {ROWS[key][0]} | {noise_txt} | {cell(mine, 'wa')} | {cell(mine, 'ua')} | "
                         f"{PAPER.get((key, noise), '-')} | {margin} | {mine[0]['epochs']} | "
                         f"{statistics.mean(r['minutes'] for r in mine):.1f} | {mine[0]['input']} | "
                         f"{mine[0]['params_m']:.2f} | {mine[0]['macs_g']:.3f} |")
    if trunk_meta:
        m = (trunk_meta.get("metrics") or {}).get("test") or {}
        lines += ["", f"FERPlus-pretrained trunk (`python bench/make_ferplus_trunk.py`, FER2013Valid, majority vote, "
                      f"8 classes): WA {100 * m.get('wa', float('nan')):.2f} %, UA {100 * m.get('ua', float('nan')):.2f} %."]
    filt = [r for r in rows if r.get("filter")]
    if filt:
        lines += ["", "D3FER's filter per epoch (precision / recall of 'clean' against the clean list, correction "
                      "accuracy), %:", ""]
        for r in filt:
            per = "; ".join(f"e{f['epoch']}: {_pct(f['precision'])} / {_pct(f['recall'])} / {_pct(f['correction'])}"
                            for f in r["filter"])
            lines.append(f"- {r['noise']} % noise, seed {r['seed']}: {per}")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="methods (default: the issue's grid)")
    p.add_argument("--noise", nargs="+", type=int, choices=NOISE, default=None, help="noise levels in %%")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (threads split between them)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores / --parallel)")
    p.add_argument("--trunk", default=str(REPO / "runs" / "ferplus_trunk" / "trunk.safetensors"))
    p.add_argument("--data-root", default=None, help="RAF-DB root (default: $FERKIT_DATA/rafdb or ../shared/data)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "rafdb_cpu", help="runs and JSON lines")
    p.add_argument("--plots", type=Path, default=REPO / "docs" / "rafdb_cpu", help="PNGs (committed: README links)")
    p.add_argument("--no-train", action="store_true", help="only tabulate the runs already finished")
    p.add_argument("--no-readme", dest="readme", action="store_false")
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every new run")
    args = p.parse_args(argv)
    args.data_root = args.data_root or str(Path(default_data_root()) / "rafdb")
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // max(args.parallel, 1))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.trunk).is_file() and not args.no_train:
        raise SystemExit(f"{args.trunk}: no trunk; make it first with `python bench/make_ferplus_trunk.py`")
    jobs = [(r, n) for r, n in DEFAULT_JOBS if (args.rows is None or r in args.rows)
            and (args.noise is None or n in args.noise)]
    if args.rows is not None and args.noise is not None:  # an explicit grid: every pair asked for
        jobs = [(r, n) for r in args.rows for n in args.noise]
    work = [(run_dir(args.out, r, n, s), r, n, s) for r, n in jobs for s in args.seeds]
    start = time.time()
    if not args.no_train:
        with ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
            list(pool.map(lambda w: train(*w, args), work))
    rows = []
    with JsonLines(args.out / "rafdb_cpu.jsonl") as emit:
        for run, r, n, s in sorted(run_dir_all(args.out)):
            row = result_row(run, r, n, s)
            emit({k: v for k, v in row.items() if k != "history"})  # the JSON line carries the filter summary
            rows.append(row)
    trunk = Path(args.trunk)
    meta = None
    if trunk.is_file():
        from ferkit.engine.checkpoint import read_metadata

        meta = read_metadata(trunk)
    made = plots(rows, args.plots)
    text = table(rows, meta)
    date = time.strftime("%Y-%m-%d")
    where = args.plots.relative_to(REPO) if args.plots.is_relative_to(REPO) else args.plots
    links = ", ".join(f"[{Path(m).stem}]({where}/{m})" for m in made) or "none"
    section = (f"Measured {date} on the 2-core CPU (bf16 autocast), `python bench/bench_rafdb.py`; plots: "
               f"{links}.\n\n{text}")
    (args.out / "table.md").write_text(section + "\n", encoding="utf-8")
    print(section)
    if args.readme:
        write_readme_section("rafdb-cpu", section)
    print(f"[bench_rafdb] {len(rows)} runs tabulated in {(time.time() - start) / 60:.1f} min", flush=True)
    return 0


def run_dir_all(out: Path) -> list[tuple[Path, str, int, int]]:
    """Every finished run under ``out/runs`` as (dir, row, noise, seed), whatever this call trained."""
    found = []
    for key, (_, name) in ROWS.items():
        for noise in NOISE:
            for run in sorted((out / "runs").glob(f"{preset(key, noise)}-s*")):
                if run.is_dir() and is_done(run):
                    found.append((run, key, noise, int(run.name.rsplit("-s", 1)[1])))
    return found


if __name__ == "__main__":
    sys.exit(main())
