"""Rebuild ferkit's built-in expression model (``ferkit:resnet18-fer7``) and measure its model card.

    python bench/make_ferplus_trunk.py          # once: the FERPlus-pretrained trunk it starts from
    python bench/make_builtin_model.py          # train (resumable), pack, measure, write the card
    python bench/make_builtin_model.py --card   # only re-measure the shipped file and rewrite the card

1. ``ferkit train --config builtin_resnet18`` (RAF-DB train + FER2013 train, from the FERPlus trunk; seeded);
2. the run's *last* epoch, in fp16, with its classes, preprocessing and card facts, is written to
   ``src/ferkit/weights/resnet18-fer7.safetensors``;
3. the card's figures, all through the command line on the current code: ``ferkit eval`` on RAF-DB test, FERPlus
   valid, FER2013 PublicTest and CK+48 (cross-dataset: classes mapped by name, contempt left out), ``ferkit predict``
   on JAFFE's full photos (faces found, accuracy), speed on 2 cores (faces / s over a folder of crops, one-image
   latency); written to ``src/ferkit/weights/resnet18-fer7.md`` and printed as JSON lines.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, JsonLines, default_data_root, facts, write_readme_section

NAME = "resnet18-fer7"
PRESET = "builtin_resnet18"
WEIGHTS_DIR = REPO / "src" / "ferkit" / "weights"
# (row, preset giving the dataset, split, extra overrides)
EVALS = [("RAF-DB test", "resnet18_rafdb_cpu", "test", ["model.pretrained=null"]),
         ("FERPlus valid (majority, 7 of 8 classes)", "resnet18_ferplus_trunk", "valid", []),
         ("FER2013 PublicTest", "resnet18_fer2013", "val", []),
         ("CK+48 (all 981 crops, 6 of 7 classes)", "resnet18_ckplus_cv", "all", [])]
JAFFE_FOLDERS = {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "happiness", "neutral": "neutral",
                 "sad": "sadness", "surprise": "surprise"}


def ferkit(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ferkit", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"ferkit {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def train(run: Path, data_root: Path, trunk: str, threads: int) -> None:
    if (run / "test_predictions.csv").is_file():
        print(f"[builtin] reuse {run}", flush=True)
        return
    if (run / "checkpoints" / "state.pt").is_file():
        ferkit("train", "--resume", str(run), f"train.threads={threads}")
        return
    parts = [{"dataset": "rafdb", "root": str(data_root / "rafdb"), "splits": {"train": "train", "test": "test"}},
             {"dataset": "fer2013", "root": str(data_root / "fer2013"), "splits": {"train": "train", "val": "val"}}]
    ferkit("train", "--config", PRESET, "--run-dir", str(run), f"model.pretrained={trunk}",
           f"data.options.parts={json.dumps(parts)}", "train.progress=false", f"train.threads={threads}")


def pack(run: Path, out: Path) -> dict:
    """The last epoch in fp16 (half the size; predictions equal to fp32's within 1e-3) with the card's facts."""
    import torch

    from ferkit.engine.checkpoint import load_weights, save_weights

    state, meta = load_weights(run / "checkpoints" / "last.safetensors")
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    keep = ("format", "model", "model_kwargs", "num_classes", "class_names", "input_size", "mean", "std",
            "interpolation", "grayscale", "modalities", "depth_mean_std", "method", "epoch", "commit", "config")
    card = {"summary": "ResNet-18, 64 px, 7 classes; RAF-DB + FER2013 train from a FERPlus-train trunk",
            "trained_on": "RAF-DB train (12,271) + FER2013 Training (28,709); trunk pretrained on FERPlus train",
            "recipe": "python bench/make_ferplus_trunk.py && python bench/make_builtin_model.py",
            "licence": "weights: Apache-2.0 as ferkit; trained on research-only data (RAF-DB, FER2013, FERPlus "
                       "images): research and non-commercial use only",
            "card": f"ferkit/weights/{NAME}.md"}
    meta = {**{k: meta[k] for k in keep if k in meta}, "dataset": "rafdb+fer2013", "dtype": str(torch.float16),
            "card": card, "metrics_at_training": meta.get("metrics")}
    save_weights(out, state, meta)
    return meta


def jaffe(name: str, root: Path) -> dict:
    """``ferkit predict`` (default face handling) over JAFFE's full photos: faces found and accuracy."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "jaffe.csv"
        start = time.perf_counter()
        ferkit("predict", name, str(root), "--out", str(out))
        seconds = time.perf_counter() - start
        with open(out, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    images = {r["path"] for r in rows}
    first = {}
    for r in rows:  # the most confident face of each photo (detections come most confident first)
        if r["status"] == "ok" and r["path"] not in first:
            first[r["path"]] = r
    right = sum(JAFFE_FOLDERS[Path(p).parent.name] == r["label"] for p, r in first.items())
    return {"row": "JAFFE (213 full photos, detected)", "n": len(images), "faces_found": len(first),
            "wa": right / max(len(images), 1), "wa_of_found": right / max(len(first), 1),
            "sources": sorted({r["source"] for r in first.values()}), "seconds": round(seconds, 1)}


def speed(name: str, crops: Path) -> dict:
    """Faces per second over a folder of crops with ``ferkit predict`` (whole process, 2 threads) and the median
    latency of one image through ``Predictor`` (model loaded once)."""
    import torch
    from PIL import Image

    from ferkit.inference import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ferkit("predict", name, str(crops), "--out", str(Path(tmp) / "p.csv"))
        seconds = time.perf_counter() - start
        n = sum(1 for _ in open(Path(tmp) / "p.csv")) - 1
    torch.set_num_threads(2)
    pred = Predictor.from_pretrained(name)
    image = Image.open(next(iter(sorted(crops.rglob("*.jpg"))))).convert("RGB")
    times = []
    for _ in range(30):
        t = time.perf_counter()
        pred.predict([image])
        times.append(time.perf_counter() - t)
    return {"row": "speed", "folder_images": n, "folder_seconds": round(seconds, 1),
            "faces_per_s": round(n / seconds, 1), "latency_ms": round(1000 * statistics.median(times[5:]), 2)}


def card_markdown(meta: dict, rows: list[dict], speed_row: dict, file: Path) -> str:
    lines = [f"# Model card: `ferkit:{NAME}`", "",
             f"ResNet-18 (max-pooled, linear head), {meta['input_size'][-1]} px RGB, normalised with mean "
             f"{[round(v, 3) for v in meta['mean']]} / std {[round(v, 3) for v in meta['std']]}, "
             f"7 classes ({', '.join(meta['class_names'])}), fp16 weights, {file.stat().st_size / 2**20:.1f} MB.",
             "", f"- Trained on: {meta['card']['trained_on']}; the shipped weights are the last epoch (no test or "
             "validation split selected them; FER2013 PublicTest was only monitored).",
             f"- Made by: `{meta['card']['recipe']}` (seed 0; preset `{PRESET}`).",
             f"- Licence: {meta['card']['licence']}.", "",
             f"Measured {time.strftime('%Y-%m-%d')} on a 2-core CPU by `python bench/make_builtin_model.py` (its card "
             "step, `--card` alone: `ferkit eval ferkit:resnet18-fer7 --config <preset> --split <split>` per row, "
             "`ferkit predict` for JAFFE and speed):", "",
             "| test set | n | WA % | UA % | per-class recall % |", "|---|---:|---:|---:|---|"]
    for r in rows:
        if "ua" in r:
            recall = ", ".join(f"{c} {100 * v:.0f}" for c, v in zip(r["classes"], r["per_class"]) if v is not None)
            lines.append(f"| {r['row']} | {r['n']} | {100 * r['wa']:.2f} | {100 * r['ua']:.2f} | {recall} |")
        else:
            lines.append(f"| {r['row']} | {r['n']} | {100 * r['wa']:.2f} (faces found in {r['faces_found']}; "
                         f"{100 * r['wa_of_found']:.2f} of those) | - | - |")
    lines += ["", f"Speed (2 cores, `ferkit predict` over {speed_row['folder_images']} face crops, whole process "
                  f"incl. start-up): {speed_row['faces_per_s']} faces / s; one image through `Predictor`: "
                  f"{speed_row['latency_ms']} ms (median).", "",
              "RAF-DB and FER2013 test figures are in-domain (their training splits were used); FERPlus valid is "
              "FER2013 PublicTest relabelled; CK+48 and JAFFE were never seen in training (cross-dataset). The `fer` "
              "package's bundled model scores about 65.7 % on FER2013 PublicTest."]
    return "\n".join(lines) + "\n"


def evaluate(name: str, data_root: Path) -> list[dict]:
    roots = {"resnet18_rafdb_cpu": "rafdb", "resnet18_ferplus_trunk": "ferplus", "resnet18_fer2013": "fer2013",
             "resnet18_ckplus_cv": "ckplus48"}
    rows = []
    for row, preset, split, extra in EVALS:
        out = ferkit("eval", name, f"data.root={data_root / roots[preset]}", "data.decode_cache=false", *extra,
                     "--config", preset, "--split", split, "--json")
        m = json.loads(out.strip().splitlines()[-1])
        rows.append({"row": row, "n": m["n"], "wa": m["wa"], "ua": m["ua"], "per_class": m["per_class"],
                     "classes": _dataset_classes(preset),
                     "command": f"ferkit eval {name} --config {preset} --split {split}"})
    return rows


def _dataset_classes(preset: str) -> list[str]:
    """The evaluated classes in the dataset's order (contempt, which the model lacks, left out)."""
    from ferkit.config import load_config
    from ferkit.labels import LABEL_SPACES

    return [n for n in LABEL_SPACES[load_config(preset, check=False).data.dataset] if n != "contempt"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / PRESET)
    p.add_argument("--trunk", default=str(REPO / "runs" / "ferplus_trunk" / "trunk.safetensors"))
    p.add_argument("--data-root", type=Path, default=Path(default_data_root()))
    p.add_argument("--card", action="store_true", help="only measure the shipped file and rewrite its card")
    p.add_argument("--no-card", dest="measure", action="store_false", help="train and pack only")
    p.add_argument("--threads", type=int, default=0, help="torch threads for training (0: torch's default)")
    p.add_argument("--speed", choices=("measure", "skip", "only"), default="measure",
                   help="skip: accuracy rows only (the CPU is busy); only: speed, reusing the saved accuracy rows")
    args = p.parse_args(argv)
    out = WEIGHTS_DIR / f"{NAME}.safetensors"
    if not args.card:
        train(args.run_dir, args.data_root, args.trunk, args.threads)
        pack(args.run_dir, out)
    if not args.measure:
        return 0
    from ferkit.engine.checkpoint import read_metadata

    meta = read_metadata(out)
    name = f"ferkit:{NAME}"
    saved = REPO / "bench" / "out" / "builtin_model.jsonl"
    if args.speed == "only":
        rows = [r for r in map(json.loads, saved.read_text(encoding="utf-8").splitlines()) if r["row"] != "speed"]
    else:
        with JsonLines(saved) as emit:
            rows = [emit({**r, **facts()}) for r in evaluate(name, args.data_root)]
            rows.append(emit({**jaffe(name, args.data_root / "jaffe"), **facts()}))
    if args.speed == "skip":
        return 0
    with JsonLines(saved, mode="a") as emit:
        speed_row = emit({**speed(name, args.data_root / "fer2013" / "val"), **facts()})
    text = card_markdown(meta, rows, speed_row, out)
    (WEIGHTS_DIR / f"{NAME}.md").write_text(text, encoding="utf-8")
    write_readme_section("builtin-model", text.split("\n", 2)[2].strip())  # the card without its title
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
