"""Command line for inference: ``ferkit predict`` (photos, folders, videos, webcam), ``ferkit faces``,
``ferkit export --onnx`` and ``ferkit serve``. Registered through ``ferkit.cli._EXTENSION_MODULES``."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

__all__ = ["register_cli", "run_predict", "predict_command"]

_log = logging.getLogger("ferkit")


def _add_face_args(p: argparse.ArgumentParser, default_faces: str = "auto") -> None:
    p.add_argument("--faces", choices=("auto", "detect", "none"), default=default_faces,
                   help="auto: images the size of a face crop (<= 192 px, near square) are taken whole, larger ones "
                        "go through detection; detect: always detect and align; none: every input is a face crop "
                        f"(default: {default_faces})")
    p.add_argument("--detector", choices=("auto", "mediapipe", "haar"), default="auto",
                   help="face detector (auto: mediapipe when installed, else OpenCV Haar cascades)")
    p.add_argument("--margin", type=float, default=None,
                   help="crop margin per side as a fraction of the face box (default: checkpoint's face_margin, "
                        "else 0.25)")
    p.add_argument("--landmarks", action="store_true",
                   help="68 landmarks per face from MediaPipe's face mesh (JSON lines output carries them)")


def register_cli(sub: argparse._SubParsersAction, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    _extend_predict(sub.choices["predict"])  # ferkit.cli.cmd_predict calls predict_command

    p = sub.add_parser("faces", help="detect and align the faces of an image folder into crops + manifest")
    p.add_argument("dataset", help="folder of images (walked recursively; its structure is kept)")
    p.add_argument("out", help="output folder (rerun to resume)")
    p.add_argument("--size", type=int, default=112, help="crop side in pixels (default 112)")
    p.add_argument("--margin", type=float, default=None, help="margin per side, fraction of the box (default 0.25)")
    p.add_argument("--detector", choices=("auto", "mediapipe", "haar"), default="auto")
    p.add_argument("--largest-only", action="store_true", help="keep only the largest face of each image")
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    commands["faces"] = _guard(_cmd_faces)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (checked against PyTorch with onnxruntime)")
    p.add_argument("--onnx", nargs=2, metavar=("RUN_OR_CKPT", "OUT.onnx"), required=True)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    commands["export"] = _guard(_cmd_export)

    p = sub.add_parser("serve", help="web page + JSON endpoint to classify the faces of uploaded photos")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="run directory, .safetensors checkpoint or weights name (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-mb", type=float, default=10.0, help="upload size limit in MiB")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="decoded picture size limit")
    _add_face_args(p)
    commands["serve"] = _guard(_cmd_serve)


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """This module's own errors as one line and exit 2, like the rest of the CLI."""

    def run(args: argparse.Namespace) -> int:
        from .export import ExportError
        from .faces import FaceBackendError

        try:
            return fn(args)
        except (ExportError, FaceBackendError, ValueError, OSError) as e:
            print(f"ferkit: error: {e}", file=sys.stderr)
            return 2

    run.__name__ = fn.__name__
    return run


# ------------------------------------------------------------------------------------------------------- predict
def _extend_predict(p: argparse.ArgumentParser) -> None:
    for action in p._actions:  # a webcam needs no path; the base parser's `paths` is nargs="+"
        if action.dest == "paths":
            action.nargs = "*"
            action.help = "image files, folders (recursive) or video files"
    _add_face_args(p)
    p.add_argument("--annotate", default=None, metavar="DIR",
                   help="write annotated copies of the images (and videos, as MP4) into DIR")
    p.add_argument("--frames-dir", default=None, metavar="DIR",
                   help="per-frame CSVs of videos (<stem>.frames.csv; default: --annotate DIR, else .)")
    p.add_argument("--stride", type=int, default=1, help="videos: classify every N-th frame")
    p.add_argument("--max-frames", type=int, default=None, help="videos / webcam: stop after N frames")
    p.add_argument("--webcam", type=int, default=None, metavar="N", help="read camera N (OpenCV index)")
    p.add_argument("--overwrite", action="store_true",
                   help="start --out afresh (default: resume, skipping images it already has)")


def _iter_inputs(paths: list[str]) -> Iterator[tuple[Path, Path]]:
    """(file, path relative to its input root) for images: folders walked recursively, files as given."""
    from .predictor import IMAGE_EXTENSIONS

    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS):
                yield f, f.relative_to(p)
        else:
            yield p, Path(p.name)


def _columns(class_names: list[str]) -> list[str]:
    return ["path", "face", "status", "source", "label", "error", "x0", "y0", "x1", "y1", "score",
            *[f"p_{c}" for c in class_names]]


def _done_paths(out: Path) -> set[str]:
    """Paths an earlier run already wrote to ``out``; a torn last line (crash mid-write) is cut off first."""
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    data = out.read_bytes()
    if not data.endswith(b"\n"):
        with open(out, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    with open(out, newline="", encoding="utf-8") as f:
        if out.suffix == ".jsonl":
            return {json.loads(line)["path"] for line in f if line.strip()}
        return {row["path"] for row in csv.DictReader(f)}


class _RowSink:
    """CSV or JSON lines, to a file (appending when resuming) or stdout; one write + flush per image."""

    def __init__(self, out: Path | None, columns: list[str], append: bool, landmarks: bool):
        self.jsonl = out is not None and out.suffix == ".jsonl"
        self.landmarks = landmarks
        self.columns = columns
        fresh = not append or out is None or not out.is_file() or out.stat().st_size == 0
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
        self.fh: TextIO = open(out, "w" if fresh else "a", newline="", encoding="utf-8") if out else sys.stdout
        if fresh and not self.jsonl:
            csv.DictWriter(self.fh, fieldnames=columns).writeheader()

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.jsonl:
            text = "".join(json.dumps(r) + "\n" for r in rows)
        else:
            import io

            buf = io.StringIO()
            csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore").writerows(rows)
            text = buf.getvalue()
        self.fh.write(text)
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not sys.stdout:
            self.fh.close()


def run_predict(args: argparse.Namespace) -> int:
    """``ferkit predict``: image rows to --out (CSV / JSON lines, resumable), videos and webcam to per-frame CSVs."""
    from ferkit.data.base import DataError

    from .predictor import VIDEO_EXTENSIONS, Predictor

    model, args.paths = split_model_and_paths(args.checkpoint, list(args.paths))
    if not args.paths and args.webcam is None:
        raise DataError("nothing to predict: give image / folder / video paths or --webcam N")
    predictor = Predictor.from_checkpoint(model, device=args.device, batch_size=args.batch_size,
                                          faces=args.faces, detector=_detector(args), margin=args.margin)
    _log.info("model: %s (%s, %d classes: %s)", model, predictor.meta.get("model"), len(predictor.class_names),
              ", ".join(predictor.class_names))
    videos = [Path(p) for p in args.paths if Path(p).suffix.lower() in VIDEO_EXTENSIONS]
    images = [p for p in args.paths if Path(p).suffix.lower() not in VIDEO_EXTENSIONS]
    if args.webcam is not None:
        _predict_stream(predictor, args.webcam, f"webcam{args.webcam}", args)
    for video in videos:
        _predict_stream(predictor, video, video.stem, args)
    if images:
        _predict_images(predictor, images, args)
        print(f"ferkit predict: {predictor.summary()}" + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def is_model_spec(item: str | None) -> bool:
    """A weights name, a checkpoint file or a run directory (``checkpoints/`` or ``config.yaml`` inside) — not an
    image, video or folder of images."""
    from ferkit.models.weights import is_weights_name

    if item is None:
        return False
    p = Path(item)
    return (is_weights_name(item) or p.suffix in (".safetensors", ".pt", ".pth")
            or (p.is_dir() and ((p / "checkpoints").is_dir() or (p / "config.yaml").is_file())))


def split_model_and_paths(first: str | None, paths: list[str]) -> tuple[str, list[str]]:
    """``ferkit predict [MODEL] PATH...``: the first argument is the model when it names one, else the first path
    and the built-in model is used."""
    from ferkit.models.weights import DEFAULT_WEIGHTS

    if is_model_spec(first):
        return str(first), paths
    if first is not None:
        _log.info("no model given: using the built-in %s", DEFAULT_WEIGHTS)
    return DEFAULT_WEIGHTS, ([first] if first is not None else []) + paths


def _detector(args: argparse.Namespace):
    if args.faces == "none":
        return None
    from .faces import FaceBackendError, make_detector

    if not args.landmarks:
        return make_detector(args.detector)
    if args.detector == "haar":
        raise FaceBackendError("--landmarks needs the mediapipe detector (face mesh), not haar")
    return make_detector("mediapipe", landmarks=True)


def _predict_images(predictor, paths: list[str], args: argparse.Namespace) -> None:
    from .annotate import annotate_image

    out = Path(args.out) if args.out else None
    done = set() if (out is None or args.overwrite) else _done_paths(out)
    if done:
        _log.info("resuming %s: %d images already there (--overwrite to start afresh)", out, len(done))
    todo = [(f, rel) for f, rel in _iter_inputs(paths) if str(f) not in done]
    rel_of = {str(f): rel for f, rel in todo}
    sink = _RowSink(out, _columns(predictor.class_names), append=bool(done), landmarks=args.landmarks)
    annotate = Path(args.annotate) if args.annotate else None
    results = predictor.predict_sources(((str(f), f) for f, _ in todo), keep_images=annotate is not None)
    try:
        for result in _progress(results, len(todo), "images", enabled=len(todo) > 1):
            sink.write([p.row(args.landmarks) for p in result.predictions])
            if annotate is not None and result.image is not None:
                target = (annotate / rel_of[result.path]).with_suffix(".jpg")
                target.parent.mkdir(parents=True, exist_ok=True)
                annotate_image(result.image, result.predictions, predictor.class_names).save(target, quality=92)
    finally:
        sink.close()


def _predict_stream(predictor, source, stem: str, args: argparse.Namespace) -> None:
    from .video import predict_video

    frames_dir = Path(args.frames_dir or args.annotate or ".")
    video_out = Path(args.annotate) / f"{stem}.mp4" if args.annotate else None
    summary = predict_video(predictor, source, stride=args.stride, csv_path=frames_dir / f"{stem}.frames.csv",
                            video_out=video_out, max_frames=args.max_frames, progress=sys.stderr.isatty())
    _log.info("%s: %d frames read, %d classified, %d faces -> %s%s", source, summary.frames_read,
              summary.frames_classified, summary.faces, frames_dir / f"{stem}.frames.csv",
              f", {video_out}" if video_out else "")


predict_command = _guard(run_predict)


def _progress(iterable, total: int | None, unit: str, enabled: bool = True):
    """A progress bar on stderr (tqdm) for folders and videos; silent when stderr is not a terminal and for one
    image, so pipes and logs stay clean."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, unit=f" {unit}", desc="predict", file=sys.stderr)


# ------------------------------------------------------------------------------------------------------- others
def _cmd_faces(args: argparse.Namespace) -> int:
    from .crops import align_dataset
    from .faces import DEFAULT_MARGIN, make_detector

    summary = align_dataset(args.dataset, args.out, make_detector(args.detector), size=args.size,
                            margin=DEFAULT_MARGIN if args.margin is None else args.margin,
                            largest_only=args.largest_only, image_format=args.format)
    print(f"{summary}\ncrops and manifest.csv in {args.out}; images without a face: "
          f"{os.path.join(args.out, 'no_face.csv')}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    src, dst = args.onnx
    path, diff = export_onnx(src, dst, opset=args.opset, verify=not args.no_verify)
    check = "" if diff is None else f"; onnxruntime vs PyTorch max |diff| {diff:.2e}"
    print(f"wrote {path} (dynamic batch{check})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .predictor import Predictor
    from .serve import ServeConfig, run_server

    from ferkit.models.weights import DEFAULT_WEIGHTS

    predictor = Predictor.from_checkpoint(args.checkpoint or DEFAULT_WEIGHTS, device=args.device, faces=args.faces,
                                          detector=_detector(args), margin=args.margin)
    config = ServeConfig(max_bytes=int(args.max_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6))
    run_server(predictor, args.host, args.port, config)
    return 0
