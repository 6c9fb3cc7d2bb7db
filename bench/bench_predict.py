"""Prediction throughput on CPU: batched folder prediction vs a one-image-at-a-time loop, and end-to-end photos/s with
face detection on real photos (JAFFE, when FERKIT_DATA has it).

    python bench/bench_predict.py --budget 60            # JSON lines, then a markdown table
    python bench/bench_predict.py --budget 5 --n 64      # a quick check

Crops are synthetic faces written as PNG files, so both paths include decoding and preprocessing; the model is a
randomly initialised ResNet-18 baseline (throughput does not depend on what the weights learnt). Each measurement
gets an equal share of the budget and stops early when its share is spent (the images/s are still per image);
setting up (rendering the crops, building checkpoints) is not counted. Rows carry the 1-minute load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def _checkpoint(folder: Path, size: int) -> Path:
    from ferkit.engine.checkpoint import save_weights
    from ferkit.labels import class_names_for
    from ferkit.models import create_model

    torch.manual_seed(0)
    names = class_names_for("fer2013")
    meta = {"format": 1, "model": "resnet18", "model_kwargs": {}, "num_classes": len(names), "class_names": names,
            "input_size": [3, size, size], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "grayscale": False, "modalities": ["image"]}
    path = folder / f"resnet18_{size}.safetensors"
    save_weights(path, create_model("resnet18", num_classes=len(names)).state_dict(), meta)
    return path


def _crops(folder: Path, size: int, n: int) -> list[Path]:
    from ferkit.data.synthetic import SyntheticConfig, SyntheticFaces

    ds = SyntheticFaces("test", SyntheticConfig(size=size, num_subjects=max(1, n // 10), samples_per_subject=10))
    out = []
    for i in range(min(n, len(ds))):
        p = folder / f"crop{size}_{i:05d}.png"
        ds.load(i)["image"].save(p)
        out.append(p)
    return out


def _loop_one_at_a_time(predictor, paths: list[Path], budget: float) -> tuple[int, float]:
    """The naive loop: open, preprocess, forward a batch of one, per file."""
    from ferkit.data.base import open_image

    start, done = time.perf_counter(), 0
    for p in paths:
        predictor.predict_tensor(predictor.preprocess(open_image(p))[None])
        done += 1
        if time.perf_counter() - start > budget:
            break
    return done, time.perf_counter() - start


def _batched(predictor, paths: list[Path], budget: float) -> tuple[int, float]:
    start, done = time.perf_counter(), 0
    chunk = predictor.batch_size
    for i in range(0, len(paths), chunk):
        done += sum(1 for _ in predictor.predict_paths(paths[i:i + chunk]))
        if time.perf_counter() - start > budget:
            break
    return done, time.perf_counter() - start


def _emit(rows: list[dict], row: dict) -> None:
    row["loadavg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews every figure
    rows.append(row)
    print(json.dumps(row), flush=True)


def bench_crops(rows: list[dict], sizes: list[int], n: int, batch_size: int, share: float, device: str) -> None:
    from ferkit.inference import Predictor

    with tempfile.TemporaryDirectory(prefix="ferkit-bench-") as tmp:
        tmp = Path(tmp)
        for size in sizes:
            paths = _crops(tmp, size, n)
            predictor = Predictor.from_checkpoint(_checkpoint(tmp, size), device=device, batch_size=batch_size)
            _batched(predictor, paths[:batch_size], share)  # warm-up (allocator, kernels)
            one_n, one_t = _loop_one_at_a_time(predictor, paths, share / 2)
            bat_n, bat_t = _batched(predictor, paths, share / 2)
            one, bat = one_n / one_t, bat_n / bat_t
            _emit(rows, {"bench": "crops", "size": size, "device": device, "batch_size": batch_size,
                         "one_at_a_time_img_s": round(one, 1), "batched_img_s": round(bat, 1),
                         "speedup": round(bat / one, 2), "images": [one_n, bat_n]})


def bench_photos(rows: list[dict], data_root: Path, share: float, device: str, size: int) -> None:
    """End-to-end on real photos: decode, detect, align, classify (batched), per available detector."""
    from ferkit.inference import Predictor
    from ferkit.inference.faces import mediapipe_available

    files = sorted((data_root / "jaffe").rglob("*.tiff"))
    if not files:
        print(f"# no JAFFE photos under {data_root}/jaffe: end-to-end benchmark skipped", file=sys.stderr)
        return
    backends = ["haar"] + (["mediapipe"] if mediapipe_available() else [])
    with tempfile.TemporaryDirectory(prefix="ferkit-bench-") as tmp:
        ckpt = _checkpoint(Path(tmp), size)
        for backend in backends:
            predictor = Predictor.from_checkpoint(ckpt, device=device, faces="detect", detector=backend)
            _batched(predictor, files[:4], share)  # warm-up
            start, images, faces = time.perf_counter(), 0, 0
            for i in range(0, len(files), predictor.batch_size):
                rows_ = list(predictor.predict_paths(files[i:i + predictor.batch_size]))
                images += len({r.path for r in rows_})
                faces += sum(r.status == "ok" for r in rows_)
                if time.perf_counter() - start > share:
                    break
            t = time.perf_counter() - start
            _emit(rows, {"bench": "photos", "data": "jaffe 256x256", "detector": backend, "device": device,
                         "model_input": size, "images": images, "faces": faces,
                         "img_s": round(images / t, 1)})


def _table(rows: list[dict]) -> str:
    lines = ["| benchmark | setting | one-at-a-time img/s | batched img/s | speedup |", "|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "crops":
            lines.append(f"| crops {r['size']} px | resnet18, batch {r['batch_size']}, {r['device']} | "
                         f"{r['one_at_a_time_img_s']} | {r['batched_img_s']} | {r['speedup']}x |")
        else:
            lines.append(f"| photos ({r['data']}) | detect {r['detector']} + resnet18@{r['model_input']}, "
                         f"{r['device']} | | {r['img_s']} ({r['faces']} faces / {r['images']} images) | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=60.0, help="total seconds of measurement (default 60)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 112], help="crop sizes (default 48 112)")
    ap.add_argument("--n", type=int, default=512, help="crops per size (default 512)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--photo-input", type=int, default=112, help="model input for the photo benchmark")
    ap.add_argument("--data", default=os.environ.get("FERKIT_DATA", str(Path(__file__).resolve().parents[2] /
                                                                       "shared" / "data")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import cv2

    cv2.setNumThreads(args.threads)
    parts = len(args.sizes) + 2  # crops per size, then up to two detectors
    share = args.budget / parts
    rows: list[dict] = []
    bench_crops(rows, args.sizes, args.n, args.batch_size, share, args.device)
    bench_photos(rows, Path(args.data), share, args.device, args.photo_input)
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
