"""Prediction throughput on CPU: batched folder prediction vs a one-image-at-a-time loop, and end-to-end photos/s with
face detection on real photos (JAFFE, when FERKIT_DATA has it).

    python bench/bench_predict.py --budget 60            # JSON lines, then a markdown table
    python bench/bench_predict.py --budget 5 --n 64      # a quick check

Crops are synthetic faces written as PNG files, so both paths include decoding and preprocessing; the model is a
randomly initialised ResNet-18 baseline (throughput does not depend on what the weights learnt). The one-at-a-time
path is the loop a user would write, ``for p in paths: predictor.predict(p)``. Each measurement gets an equal share
of the budget and stops early when its share is spent (the images/s are still per image); setting up (rendering the
crops, building checkpoints) is not counted. Rows carry the 1-minute load average and, beside wall-clock images/s,
images per CPU-second of this process (``*_cpu_img_s``): with one torch thread that figure barely moves when other
work shares the machine, so compare those under load.

A ``forward`` row per size bounds what batching can give: the model's forward alone at batch 1 and at the batch
size (ms per image, CPU time), its GFLOPs per image, this core's matrix-multiply peak, and ``max_speedup``: the
one-at-a-time loop's time per image over the time the forward alone would take at that peak (no batch can beat it).
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


def _loop_one_at_a_time(predictor, paths: list[Path], budget: float) -> tuple[int, float, float]:
    """The natural loop: ``predictor.predict(path)`` per file (decode, preprocess, a forward pass of one)."""
    return _timed(paths, budget, lambda p: len(predictor.predict(p)))


def _batched(predictor, paths: list[Path], budget: float) -> tuple[int, float, float]:
    chunks = [paths[i:i + predictor.batch_size] for i in range(0, len(paths), predictor.batch_size)]
    return _timed(chunks, budget, lambda chunk: sum(1 for _ in predictor.predict_paths(chunk)))


def _timed(items: list, budget: float, step) -> tuple[int, float, float]:
    """Run ``step`` (-> images done) over ``items`` until the budget is spent: (images, wall s, CPU s)."""
    wall, cpu, done = time.perf_counter(), time.process_time(), 0
    for item in items:
        done += step(item)
        if time.perf_counter() - wall > budget:
            break
    return done, time.perf_counter() - wall, time.process_time() - cpu


def _forward_ms(model, batch: int, size: int, budget: float) -> float:
    """CPU ms per image of the model's forward alone at ``batch`` (channels-last, as the Predictor runs it)."""
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        start, n = time.process_time(), 0
        while n < 2 * batch or time.process_time() - start < budget:
            model(x)
            n += batch
    return (time.process_time() - start) / n * 1e3


def _gemm_gflops(budget: float, n: int = 1024) -> float:
    """This process's fp32 matrix-multiply rate (GFLOP per CPU-second): the ceiling any convolution runs under."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start, reps = time.process_time(), 0
    while reps < 3 or time.process_time() - start < budget:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.process_time() - start) / 1e9


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
            one_n, one_t, one_c = _loop_one_at_a_time(predictor, paths, share / 2)
            bat_n, bat_t, bat_c = _batched(predictor, paths, share / 2)
            one, bat, one_cpu, bat_cpu = one_n / one_t, bat_n / bat_t, one_n / one_c, bat_n / bat_c
            _emit(rows, {"bench": "crops", "size": size, "device": device, "batch_size": batch_size,
                         "one_at_a_time_img_s": round(one, 1), "batched_img_s": round(bat, 1),
                         "speedup": round(bat / one, 2), "one_at_a_time_cpu_img_s": round(one_cpu, 1),
                         "batched_cpu_img_s": round(bat_cpu, 1), "speedup_cpu": round(bat_cpu / one_cpu, 2),
                         "images": [one_n, bat_n]})
            if device == "cpu":
                bench_forward(rows, predictor, size, share, loop_ms=1e3 / one_cpu)


def bench_forward(rows: list[dict], predictor, size: int, share: float, loop_ms: float) -> None:
    """The ceiling on batching: forward alone at batch 1 and at the batch size vs the GEMM peak of this core."""
    from ferkit.analysis.profile import profile_model

    model, batch_size = predictor.model, predictor.batch_size
    gflop = 2 * profile_model(predictor.meta["model"], input_size=size)["macs_g"]
    one, bat = _forward_ms(model, 1, size, share / 3), _forward_ms(model, batch_size, size, share / 3)
    peak = _gemm_gflops(share / 3)
    _emit(rows, {"bench": "forward", "size": size, "batch_size": batch_size, "gflop_per_img": round(gflop, 3),
                 "batch1_ms_img": round(one, 2), "batched_ms_img": round(bat, 2),
                 "batched_gflop_s": round(gflop / bat * 1e3, 1), "gemm_peak_gflop_s": round(peak, 1),
                 "loop_ms_img": round(loop_ms, 2), "max_speedup": round(loop_ms / (gflop / peak * 1e3), 2)})


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
                         f"{r['one_at_a_time_img_s']} ({r['one_at_a_time_cpu_img_s']} per CPU-s) | "
                         f"{r['batched_img_s']} ({r['batched_cpu_img_s']} per CPU-s) | "
                         f"{r['speedup']}x ({r['speedup_cpu']}x) |")
        elif r["bench"] == "forward":
            lines.append(f"| forward only {r['size']} px | {r['gflop_per_img']} GFLOP/img, GEMM peak "
                         f"{r['gemm_peak_gflop_s']} GFLOP/s | {r['batch1_ms_img']} ms/img | {r['batched_ms_img']} "
                         f"ms/img ({r['batched_gflop_s']} GFLOP/s) | at most {r['max_speedup']}x |")
        else:
            lines.append(f"| photos ({r['data']}) | detect {r['detector']} + resnet18@{r['model_input']}, "
                         f"{r['device']} | | {r['img_s']} ({r['faces']} faces / {r['images']} images) | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=60.0, help="total seconds of measurement (default 60)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 112], help="crop sizes (default 48 64 112)")
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
    parts = 2 * len(args.sizes) + 2  # crops and forward per size, then up to two detectors
    share = args.budget / parts
    rows: list[dict] = []
    bench_crops(rows, args.sizes, args.n, args.batch_size, share, args.device)
    bench_photos(rows, Path(args.data), share, args.device, args.photo_input)
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
