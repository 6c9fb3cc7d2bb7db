"""RGB + depth network (seed 002) benchmarks: cost of the model, what depth adds, and a resumable tuning run.

1. ``profile``: parameters (total / trainable, backbones vs fusion network) and multiply-accumulates of
   ``rgbd_cmsa`` at the paper's 260x260 input (torch.utils.flop_counter), for the full model and the Table VI-VII
   ablations (RGB only, sum fusion, average pooling instead of the ViT encoder).
2. ``protocol``: the BU-3DFE-style protocol of seed 002 on the built-in synthetic RGB-D faces, whose RGB is
   degraded by low light and occluders (depth is untouched by both): neutral dropped, the two highest intensity
   levels, ``--subjects`` subjects drawn once, subject-wise ``--folds``-fold CV repeated ``--repeats`` times, result =
   mean of the repetition means (± std over repetitions). Three variants on the same folds and schedule: RGB only
   (Table VI), RGB + depth with the cross-modality spatial attention, RGB + depth with sum fusion (Table VII).
   Per-fold z-score statistics of the training part (Eq. 1) for every variant. Epochs per fold come from the
   budget: a calibration of the full model's seconds per training step at the bench's input size, the same epochs
   for every variant.
3. ``tune``: ``ferkit tune`` on ``rgbd_synthetic`` (small sets) in a subprocess, interrupted with SIGINT once
   ``--interrupt-after`` trials have started, then the same command again: the study resumes from its SQLite file
   and finishes ``--trials`` trials. Reported: trial states, best value, wall time of each leg.

Output: one JSON line per measurement (stdout and ``<out>/results.jsonl``), then markdown tables (stdout and
``<out>/table.md``).

    python bench/bench_rgbd.py --budget-min 30 --out bench/out/rgbd           # the real run
    python bench/bench_rgbd.py --quick --budget-min 0.5 --out /tmp/rgbd_smoke  # smoke test, a few minutes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ferkit.config import Config, load_config
from ferkit.data.base import FaceDataset
from ferkit.data.synthetic import SyntheticConfig, SyntheticFaces
from ferkit.engine.protocols import bu3dfe_protocol_pool, run_protocol

PARTS = ("profile", "protocol", "tune")
VARIANTS = {  # label -> model kwargs (seed 002 Tables VI-VII)
    "RGB only": {"use_depth": False},
    "RGB + depth, cross-modality attention": {},
    "RGB + depth, sum fusion": {"fusion": "sum"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-min", type=float, default=30.0, help="training minutes of part 2, all variants together")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--render-subjects", type=int, default=30, help="synthetic identities rendered")
    p.add_argument("--per-subject", type=int, default=56, help="synthetic samples per identity")
    p.add_argument("--subjects", type=int, default=20, help="subjects the protocol draws (paper: 60 of 100)")
    p.add_argument("--folds", type=int, default=5, help="paper: 10")
    p.add_argument("--repeats", type=int, default=2, help="paper: 100")
    p.add_argument("--input-size", type=int, default=64, help="paper: 260")
    p.add_argument("--low-light", type=float, default=0.5, help="share of synthetic images in low light")
    p.add_argument("--occlusion", type=float, default=0.4, help="share of synthetic images with an occluder")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=0, help="fixed epochs per fold (0: from the budget)")
    p.add_argument("--trials", type=int, default=8, help="part 3: trials of the study")
    p.add_argument("--interrupt-after", type=int, default=3, help="part 3: SIGINT once this many trials started")
    p.add_argument("--out", default="bench/out/rgbd")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sets and models (smoke test)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every protocol run (e.g. train.accum_steps=1 on a small CPU budget)")
    args = p.parse_args(argv)
    if args.quick:
        args.render_subjects, args.per_subject, args.subjects = 8, 21, 6
        args.folds, args.repeats, args.input_size = 2, 1, 32
        args.trials, args.interrupt_after, args.max_epochs = 3, 1, 2
    return args


def emit(row: dict, out: Path) -> dict:
    print(json.dumps(row), flush=True)
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return row


# ------------------------------------------------------------------------------------------------------ 1. profile
def profile_rows(args: argparse.Namespace) -> list[dict]:
    from ferkit.analysis.profile import profile_model
    from ferkit.models import create_model

    rows = []
    for label, kw in {**VARIANTS, "RGB + depth, attention, avg-pool head (no ViT)": {"head": "avgpool"}}.items():
        r = profile_model("rgbd_cmsa", num_classes=6, **kw)
        groups = create_model("rgbd_cmsa", num_classes=6, **kw).param_groups()
        rows.append({"part": "profile", "variant": label, "input": r["input"], "params_m": round(r["params_m"], 3),
                     "trainable_m": round(r["trainable_m"], 3), "macs_g": round(r["macs_g"], 3),
                     "backbones_m": round(sum(p.numel() for p in groups["backbones"]) / 1e6, 3),
                     "fusion_m": round(sum(p.numel() for p in groups["fusion"]) / 1e6, 3)})
    return rows


# ----------------------------------------------------------------------------------------------------- 2. protocol
def synthetic_pool(args: argparse.Namespace) -> FaceDataset:
    from ferkit.data.build import cache_dir

    cfg = SyntheticConfig(size=max(args.input_size, 32), num_subjects=args.render_subjects,
                          samples_per_subject=args.per_subject, occlusion_prob=args.occlusion,
                          low_light_prob=args.low_light, seed=args.seed)
    return SyntheticFaces("all", cfg, workers=min(2, os.cpu_count() or 1), cache_dir=str(cache_dir() / "synthetic"))


def protocol_config(args: argparse.Namespace, model_kwargs: dict, epochs: int, name: str) -> Config:
    s = args.input_size
    small = ["model.kwargs.embed_dim=64", "model.kwargs.num_heads=2", "model.kwargs.head_hidden=64",
             "train.batch_size=8", "train.accum_steps=1"] if args.quick else []
    ov = [f"name={name}", f"seed={args.seed}", f"data.input_size={s}", f"model.kwargs.img_size={s}",
          f"train.epochs={epochs}", f"train.device={args.device}", f"train.threads={args.threads}",
          "train.progress=false", "train.tensorboard=false", *small, *args.set]
    return load_config("rgbd_synthetic", ov + [f"model.kwargs.{k}={v}" for k, v in model_kwargs.items()])


def seconds_per_step(cfg: Config) -> float:
    """Training seconds per sample of the full model at the bench's input size (a few timed steps)."""
    from ferkit.methods import build_method
    from ferkit.models import create_model

    torch.manual_seed(0)
    model = create_model("rgbd_cmsa", num_classes=6, **cfg.model.kwargs)
    method = build_method("rgbd", model, **cfg.method.kwargs).to(cfg.train.device).train()
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    b, s = cfg.train.batch_size, cfg.data.input_size
    batch = {"image": torch.randn(b, 3, s, s), "depth": torch.rand(b, 1, s, s), "label": torch.arange(b) % 6}
    batch = {k: v.to(cfg.train.device) for k, v in batch.items()}
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        method.training_step(batch, None).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return min(times[1:]) / b


def protocol_rows(args: argparse.Namespace, out: Path) -> list[dict]:
    torch.set_num_threads(args.threads)
    ds = synthetic_pool(args)
    pool_fn = lambda d, seed: bu3dfe_protocol_pool(d, num_subjects=args.subjects, seed=seed)  # noqa: E731
    pool = pool_fn(ds, args.seed)
    n_train = len(pool) * (args.folds - 1) / args.folds
    epochs = args.epochs
    if not epochs:
        per_sample = seconds_per_step(protocol_config(args, {}, 1, "calibration"))
        fold_s = 60 * args.budget_min / (len(VARIANTS) * args.folds * args.repeats)
        per_epoch = per_sample * (n_train + len(pool) / args.folds / 3) * 1.15  # + evaluation, data loading
        epochs = int(min(args.max_epochs, max(1, math.floor(fold_s / per_epoch))))
    emit({"part": "protocol", "what": "plan", "pool_samples": len(pool), "subjects": args.subjects,
          "classes": pool.class_names, "folds": args.folds, "repeats": args.repeats, "epochs_per_fold": epochs,
          "input_size": args.input_size, "low_light_prob": args.low_light, "occlusion_prob": args.occlusion}, out)
    rows = []
    for label, kw in VARIANTS.items():
        slug = label.split(",")[-1].strip().replace(" ", "_").replace("+", "").replace("__", "_")
        cfg = protocol_config(args, kw, epochs, f"bench_rgbd_{slug}")
        t0 = time.time()
        s = run_protocol(cfg, out / "cv" / slug, "bu3dfe", folds=args.folds, repeats=args.repeats, dataset=ds,
                         pool_fn=pool_fn)
        rows.append(emit({"part": "protocol", "variant": label, "wa_mean": s["wa"]["mean"], "wa_std": s["wa"]["std"],
                          "ua_mean": s["ua"]["mean"], "ua_std": s["ua"]["std"], "std_over": s["std_over"],
                          "per_repeat_wa": s["per_repeat"]["wa"], "n_folds": s["n_folds"], "epochs": epochs,
                          "wall_s": round(time.time() - t0, 1)}, out))
    return rows


# --------------------------------------------------------------------------------------------------------- 3. tune
def _tune_command(args: argparse.Namespace, study_dir: Path) -> list[str]:
    subjects = "data.synthetic.train_subjects=6 data.synthetic.test_subjects=3 data.synthetic.samples_per_subject=14" \
        if args.quick else \
        "data.synthetic.train_subjects=16 data.synthetic.test_subjects=6 data.synthetic.samples_per_subject=28"
    small = "model.kwargs.embed_dim=64 model.kwargs.num_heads=2 data.input_size=32 model.kwargs.img_size=32 " \
            "data.synthetic.render_size=32 train.batch_size=8" if args.quick else \
        f"data.input_size={args.input_size} model.kwargs.img_size={args.input_size}"
    return [sys.executable, "-m", "ferkit", "tune", "--config", "rgbd_synthetic", "--out", str(study_dir),
            "--trials", str(args.trials), "--seed", str(args.seed), "--grace-period", "30",
            f"train.epochs={1 if args.quick else 3}", "train.progress=false", "train.tensorboard=false",
            f"train.threads={args.threads}", f"train.device={args.device}", "data.val_fraction=0.25",
            *subjects.split(), *small.split()]


def _trials_started(study_dir: Path) -> int:
    trials = study_dir / "trials"
    return len([p for p in trials.iterdir() if p.is_dir()]) if trials.is_dir() else 0


def tune_rows(args: argparse.Namespace, out: Path) -> list[dict]:
    import optuna

    study_dir = out / "tune"
    cmd = _tune_command(args, study_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(out / "tune_leg1.log", "w") as log:
        # a script's background job inherits SIGINT ignored (and Python then installs no KeyboardInterrupt
        # handler): give the child the default disposition so the Ctrl-C below reaches it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while proc.poll() is None and _trials_started(study_dir) <= args.interrupt_after:
            time.sleep(1.0)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of trial #interrupt_after
        rc1 = proc.wait()
    leg1 = time.time() - t0
    study = optuna.load_study(study_name="rgbd_synthetic", storage=f"sqlite:///{(study_dir / 'study.db').resolve()}")
    after1 = [t.state.name for t in study.get_trials(deepcopy=False)]
    t0 = time.time()
    with open(out / "tune_leg2.log", "w") as log:
        rc2 = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    leg2 = time.time() - t0
    study = optuna.load_study(study_name="rgbd_synthetic", storage=f"sqlite:///{(study_dir / 'study.db').resolve()}")
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    best = study.best_trial if any(s == "COMPLETE" for s in states) else None
    return [emit({"part": "tune", "trials_target": args.trials, "leg1_exit": rc1, "leg1_s": round(leg1, 1),
                  "states_after_interrupt": after1, "leg2_exit": rc2, "leg2_s": round(leg2, 1),
                  "states_final": states, "finished": sum(s in ("COMPLETE", "PRUNED") for s in states),
                  "best_value": None if best is None else best.value,
                  "best_params": None if best is None else best.params,
                  "best_preset": str(study_dir / "best.yaml")}, out)]


# -------------------------------------------------------------------------------------------------------- tables
def tables(rows: list[dict], args: argparse.Namespace) -> str:
    out = []
    prof = [r for r in rows if r["part"] == "profile"]
    if prof:
        out += ["rgbd_cmsa at 260x260, 6 classes (no paper figures: seed 002 reports none)", "",
                "| variant | params M | backbones M | fusion M | MACs G |", "|---|---:|---:|---:|---:|"]
        out += [f"| {r['variant']} | {r['params_m']:.3f} | {r['backbones_m']:.3f} | {r['fusion_m']:.3f} | "
                f"{r['macs_g']:.3f} |" for r in prof]
        out.append("")
    proto = [r for r in rows if r["part"] == "protocol" and "variant" in r]
    if proto:
        out += [f"BU-3DFE-style protocol on synthetic RGB-D faces (low light {args.low_light:g}, occluders "
                f"{args.occlusion:g}; {args.subjects} subjects, 6 classes, intensities 3-4; {args.folds}-fold x "
                f"{args.repeats}; {args.input_size} px; {proto[0]['epochs']} epochs per fold). WA / UA: mean of "
                f"repetition means ± std over {proto[0]['std_over']}.", "",
                "| variant | WA % | UA % | folds | wall s |", "|---|---:|---:|---:|---:|"]
        out += [f"| {r['variant']} | {100 * r['wa_mean']:.2f} ± {100 * r['wa_std']:.2f} | {100 * r['ua_mean']:.2f} ± "
                f"{100 * r['ua_std']:.2f} | {r['n_folds']} | {r['wall_s']:.0f} |" for r in proto]
        out.append("")
    for r in (r for r in rows if r["part"] == "tune"):
        out += [f"Tune: {r['trials_target']} trials; SIGINT leg exit {r['leg1_exit']} after {r['leg1_s']:.0f} s with "
                f"states {r['states_after_interrupt']}; resumed leg exit {r['leg2_exit']} after {r['leg2_s']:.0f} s; "
                f"final states {r['states_final']} ({r['finished']} finished); best {r['best_value']} "
                f"{r['best_params']}", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if "profile" in args.parts:
        rows += [emit(r, out) for r in profile_rows(args)]
    if "protocol" in args.parts:
        rows += protocol_rows(args, out)
    if "tune" in args.parts:
        rows += tune_rows(args, out)
    text = tables(rows, args)
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
