"""The one training engine. It drives any :class:`ferkit.methods.Method` and knows nothing of any paper.

It owns: device placement, torch.amp (fp16 + GradScaler on CUDA, bf16 on request), gradient accumulation and
clipping, optimisers and LR schedulers as the method declares them, DDP through torchrun (rank-sharded samplers,
rank-0 logging and saving, all-reduced metrics), deterministic seeding, progress bars, per-epoch metrics
(JSONL + TensorBoard), early stopping, best/last checkpoints, and exact resume.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn

from ferkit.config import Config, to_dict
from ferkit.data.base import FaceDataset
from ferkit.data.build import DataSplits, build_splits
from ferkit.data.loader import SeededViews, make_eval_loader, make_train_loader
from ferkit.data.samplers import EpochSampler
from ferkit.data.transforms import build_transform
from ferkit.methods import Method, build_method
from ferkit.models import create_model, model_info
from . import checkpoint as ckpt
from .distributed import (DistInfo, all_reduce_sum, average_gradients, barrier, broadcast_module, cleanup,
                          init_distributed)
from .evaluate import Predictions, evaluate_predictions, predict_loader
from .optim import build_optimizer, build_scheduler, scheduler_steps_per_batch

__all__ = ["Trainer", "TrainingError", "StepContext", "seed_everything", "resolve_device", "input_spec",
           "check_writable"]

_logger = logging.getLogger("ferkit")


class TrainingError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"train.device: {name} requested but CUDA is not available")
    return torch.device(name)


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and write (then remove) a small file in it, or raise a one-line :class:`TrainingError`
    naming the folder: a read-only, full or forbidden output directory is found before training starts."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir) as f:
            f.write(b"ferkit write probe")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise TrainingError(f"{run_dir}: output directory is not writable ({e.strerror or e})") from None


def _clip_gradients(opt: torch.optim.Optimizer, max_norm: float) -> None:
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def _clipping(closure: Callable[[], torch.Tensor], opt: torch.optim.Optimizer,
              max_norm: float) -> Callable[[], torch.Tensor]:
    """``closure`` followed by gradient clipping (SAM's second pass computes the gradients the optimiser applies)."""
    def clipped() -> torch.Tensor:
        loss = closure()
        _clip_gradients(opt, max_norm)
        return loss
    return clipped


def input_spec(cfg: Config) -> dict[str, Any]:
    """Input size and normalisation the model is trained (and later served) with."""
    info = model_info(cfg.model.name)
    size = cfg.data.input_size or info.input_size[-1]
    return {"input_size": [3, size, size], "mean": list(cfg.data.mean or info.mean), "std": list(cfg.data.std or info.std),
            "interpolation": info.interpolation, "grayscale": cfg.data.grayscale, "modalities": list(info.modalities),
            "depth_mean_std": [cfg.data.depth_mean, cfg.data.depth_std]}


@dataclass
class StepContext:
    """What a method's step may use: epoch/step counters and, under manual optimisation, backward / step."""

    trainer: "Trainer"
    epoch: int = 0
    step: int = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.trainer._backward(loss)

    def optimizer_step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        """Step every optimiser; ``closure`` (re-computes loss and gradients) is passed to ``opt.step`` (SAM)."""
        self.trainer._optimizer_step(closure)

    def optimizer(self, name: str = "model") -> torch.optim.Optimizer:
        return self.trainer.optimizers[name]

    def zero_grad(self) -> None:
        for opt in self.trainer.optimizers.values():
            opt.zero_grad(set_to_none=True)


class _StepAdapter(nn.Module):
    """Lets DDP see the method's whole training step as one forward (all parameters, incl. loss centres)."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        out = self.method.training_step(batch, ctx)
        return {"loss": out.loss, "logits": out.logits, "logs": out.logs}


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast trains 1.6-2.5x faster
    than fp32 (measured on ResNet-18, Zen 4); elsewhere bf16 on CPU is emulated and slower. ``FERKIT_CPU_BF16=0``
    (or ``1``) overrides the detection, e.g. to keep ``train.amp=auto`` runs in fp32 everywhere (the test suite)."""
    forced = os.environ.get("FERKIT_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_amp(mode: str, device: torch.device) -> str:
    """``train.amp=auto``: fp16 + GradScaler on CUDA, bf16 on a CPU with native bf16, otherwise off."""
    if mode != "auto":
        return mode
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"


@dataclass
class TrainState:
    epoch: int = 0  # epoch to run next (or being run when position > 0)
    position: int = 0  # samples of ``epoch`` already consumed on this rank
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    partial: dict[str, float] = field(default_factory=dict)  # running sums of the epoch in progress (resume)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool = False, trust_checkpoint: bool = False,
                 splits: DataSplits | None = None,
                 epoch_callbacks: list[Callable[["Trainer", dict], None]] | None = None):
        self.cfg = cfg
        self.epoch_callbacks = list(epoch_callbacks or [])  # cb(trainer, record) after each saved epoch (tune)
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg.train.device)
        self.dist = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if self.dist.is_main:
            check_writable(self.run_dir)  # before any data or model work: fail in seconds, not after an epoch
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.seed)
        self.splits = splits or build_splits(cfg.data, cfg.seed, progress=cfg.train.progress and self.dist.is_main)
        self.class_names = self.splits.train.class_names
        self.spec = input_spec(cfg)
        self._setup_noise()
        self.method = self._build_method()
        self._setup_data()
        self._setup_optim()
        self.state = TrainState()
        self.amp_dtype, self.scaler = self._setup_amp()
        self.step_module: nn.Module = _StepAdapter(self.method)
        if self.dist.enabled and self.method.manual_optimization:
            broadcast_module(self.method, self.dist)  # gradients are averaged in _backward instead of by DDP
        elif self.dist.enabled:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(cfg.method.kwargs.get("find_unused_parameters", False)))
        if resume:
            self._load_state(trust_checkpoint)
        elif self.dist.is_main:
            self._init_run_dir()
        self.writer = self._tensorboard() if self.dist.is_main and cfg.train.tensorboard else None

    # ------------------------------------------------------------------ setup
    def _setup_noise(self) -> None:
        """Label noise, synthetic (SPEC 2.3) or from a published noisy list (``data.noise.file``): the flipped indices
        are recorded for noise-detection scoring either way."""
        n = self.cfg.data.noise
        self.train_labels = self.splits.train.targets
        self.noisy_indices = np.zeros(0, dtype=np.int64)
        clean = self.splits.train.clean_targets
        if clean is not None:
            self.noisy_indices = np.flatnonzero(self.train_labels != clean).astype(np.int64)
            _logger.info("label noise from %s: %d of %d training labels differ from the clean list (%.2f %%)", n.file,
                         len(self.noisy_indices), len(clean), 100 * len(self.noisy_indices) / max(len(clean), 1))
        elif n.rate > 0:
            from ferkit.data.noise import inject_label_noise

            self.train_labels, self.noisy_indices = inject_label_noise(
                self.splits.train.targets, n.rate, len(self.class_names), n.seed)

    def _build_method(self) -> Method:
        cfg = self.cfg
        model = create_model(cfg.model.name, num_classes=len(self.class_names), pretrained=cfg.model.pretrained,
                             strict=cfg.model.strict, **cfg.model.kwargs)
        if cfg.train.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise TrainingError("train.sync_bn: SyncBatchNorm needs CUDA; on CPU use train.freeze_bn=true or "
                                    "accept per-process batch statistics")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        method = build_method(cfg.method.name, model, **{k: v for k, v in cfg.method.kwargs.items()
                                                         if k != "find_unused_parameters"})
        method.set_epoch_context(num_classes=len(self.class_names), class_names=self.class_names,
                                 class_counts=np.bincount(self.train_labels, minlength=len(self.class_names)),
                                 noisy_indices=self.noisy_indices, dataset_size=len(self.splits.train),
                                 epochs=cfg.train.epochs)
        method = method.to(self.device)
        if cfg.train.channels_last:
            method = method.to(memory_format=torch.channels_last)
        return method

    def _views(self, dataset: FaceDataset, kinds: dict[str, str], labels: np.ndarray | None = None) -> SeededViews:
        d = self.cfg.data
        tfs = {key: build_transform(kind, self.spec["input_size"][-1], self.spec["mean"], self.spec["std"], d.augment,
                                    grayscale=d.grayscale, depth_mean_std=(d.depth_mean, d.depth_std))
               for key, kind in kinds.items()}
        return SeededViews(dataset, tfs, seed=self.cfg.seed, labels=labels)

    def _setup_data(self) -> None:
        d, t = self.cfg.data, self.cfg.train
        noisy = self.train_labels if len(self.noisy_indices) else None
        self.train_views = self._views(self.splits.train, self.method.train_views, noisy)
        self.sampler = EpochSampler(self.train_labels, d.sampler, seed=self.cfg.seed, rank=self.dist.rank,
                                    world_size=self.dist.world_size)
        pin = self.device.type == "cuda"
        self.train_loader = make_train_loader(self.train_views, self.sampler, t.batch_size, d.num_workers,
                                              d.persistent_workers, pin)
        self.eval_loaders = {name: self.eval_loader(ds) for name, ds in (("val", self.splits.val),
                                                                         ("test", self.splits.test)) if ds is not None}

    def eval_loader(self, dataset: FaceDataset):
        """A loader over ``dataset`` with this run's evaluation preprocessing (e.g. a held-out set scored once)."""
        d = self.cfg.data
        return make_eval_loader(self._views(dataset, {"image": "eval"}), self.cfg.train.eval_batch_size,
                                d.num_workers, self.device.type == "cuda")

    def _setup_optim(self) -> None:
        o, t = self.cfg.optim, self.cfg.train
        self.specs = {s.name: s for s in self.method.optimizer_specs()}
        self.optimizers = {n: build_optimizer(s, o) for n, s in self.specs.items()}
        batches = math.ceil(len(self.sampler) / t.batch_size)
        self.steps_per_epoch = max(math.ceil(batches / t.accum_steps), 1)  # + the epoch's last partial accumulation
        self.schedulers = {n: build_scheduler(opt, self.specs[n], o, t.epochs, self.steps_per_epoch)
                           for n, opt in self.optimizers.items()}
        self.schedulers = {n: s for n, s in self.schedulers.items() if s is not None}
        self.per_batch_sched = scheduler_steps_per_batch(o)

    def _setup_amp(self) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
        mode = resolve_amp(self.cfg.train.amp, self.device)
        if self.cfg.train.amp == "auto" and self.dist.is_main:
            _logger.info("train.amp=auto -> %s on %s%s", mode, self.device.type,
                         " (native bf16 on this CPU)" if mode == "bf16" and self.device.type == "cpu" else "")
        if mode == "off":
            return None, None
        if mode == "fp16":
            if self.device.type != "cuda":
                raise TrainingError("train.amp: fp16 needs CUDA; use bf16 on CPU")
            return torch.float16, torch.amp.GradScaler("cuda")
        return torch.bfloat16, None

    def _init_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        resolved = to_dict(self.cfg)
        resolved["_run"] = {"commit": _git_commit(), "seed": self.cfg.seed, "torch": str(torch.__version__),
                            "select_split": self.splits.select[0], "classes": self.class_names}
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
        if len(self.noisy_indices):
            n = self.cfg.data.noise
            source = {"file": n.file} if n.file else {"seed": n.seed}
            (self.run_dir / "noise.json").write_text(json.dumps(
                {"rate": len(self.noisy_indices) / len(self.train_labels), **source,
                 "flipped_indices": self.noisy_indices.tolist()}), encoding="utf-8")
        for ds in (self.splits.train, self.splits.val, self.splits.test):
            if ds is not None:
                _logger.info("%s", ds.describe())

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _logger.warning("tensorboard not installed: no TensorBoard events")
            return None
        return SummaryWriter(str(self.run_dir / "tb"))

    # ------------------------------------------------------------------ step mechanics
    def _backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.cfg.train.accum_steps
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.method.manual_optimization:
            average_gradients(self.method.parameters(), self.dist)

    def _optimizer_step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        t = self.cfg.train
        if closure is not None and self.scaler:
            raise TrainingError("a closure-based optimiser step (SAM) cannot run under the fp16 GradScaler; "
                                "set train.amp=bf16 or train.amp=off")
        for name, opt in self.optimizers.items():
            clip = t.clip_grad > 0 and self.specs[name].clip
            if self.scaler:
                self.scaler.unscale_(opt)
            if clip:
                _clip_gradients(opt, t.clip_grad)
            if self.scaler:
                self.scaler.step(opt)
            elif closure is not None:  # SAM: the closure's gradients are the ones applied, so clip those too
                opt.step(_clipping(closure, opt, t.clip_grad) if clip else closure)
            else:
                opt.step()
        if self.scaler:
            self.scaler.update()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.method.after_optimizer_step()
        self.state.global_step += 1
        if self.per_batch_sched:
            for s in self.schedulers.values():
                s.step()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: self._tensor_to_device(v) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _tensor_to_device(self, v: torch.Tensor) -> torch.Tensor:
        if v.ndim == 4 and self.cfg.train.channels_last:  # image-like (B, C, H, W)
            return v.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return v.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        start = time.time() - self.state.elapsed_s
        try:
            while self.state.epoch < t.epochs:
                epoch = self.state.epoch
                train_logs = self._train_epoch(epoch, start)
                if not self.per_batch_sched:
                    for s in self.schedulers.values():
                        s.step()
                record = {"epoch": epoch + 1, **train_logs, **self.method.on_train_epoch_end(epoch)}
                record.update(self._evaluate_epoch())
                record["lr"] = {n: o.param_groups[0]["lr"] for n, o in self.optimizers.items()}
                record["time_s"] = round(time.time() - start, 2)
                self.state.history.append(record)
                self.state.epoch, self.state.position = epoch + 1, 0
                self.state.elapsed_s = time.time() - start
                improved = self._track_best(record)
                self._log_epoch(record)
                self._save(improved)
                for callback in self.epoch_callbacks:  # may raise to stop (optuna pruning)
                    callback(self, record)
                if t.early_stop.patience and self.state.bad_epochs >= t.early_stop.patience:
                    _logger.info("early stop: no %s improvement for %d epochs", t.select_metric, t.early_stop.patience)
                    break
                if self._over_budget(start):
                    _logger.info("time budget of %.1f min reached after epoch %d", t.time_budget_min, epoch + 1)
                    break
            return self._finish()
        finally:
            if self.writer is not None:
                self.writer.close()

    def _over_budget(self, start: float) -> bool:
        """Wall-clock budget check, agreed by all ranks (any rank over budget stops everyone)."""
        if not self.cfg.train.time_budget_min:
            return False
        over = torch.tensor([float(time.time() - start > 60 * self.cfg.train.time_budget_min)])
        return bool(all_reduce_sum(over, self.dist).item() > 0)

    def _train_epoch(self, epoch: int, start: float) -> dict[str, float]:
        t = self.cfg.train
        self.method.train()
        if t.freeze_bn:
            for m in self.method.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        self.method.on_train_epoch_start(epoch)
        self.sampler.set_epoch(epoch, self.state.position)
        sums: dict[str, float] = self.state.partial  # carried over when resuming mid-epoch
        sums.setdefault("_seen", 0.0)
        sums.setdefault("_correct", 0.0)
        micro = 0
        ctx = StepContext(self)
        progress = _progress(self.train_loader, f"epoch {epoch + 1}/{t.epochs}", t.progress and self.dist.is_main)
        for batch in progress:
            batch = self._to_device(batch)
            ctx.epoch, ctx.step = epoch, self.state.global_step
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.step_module(batch, ctx)
            loss = out["loss"]
            if not torch.isfinite(loss.detach()).all():
                self._non_finite(loss, out["logs"], epoch)
                continue
            if not self.method.manual_optimization:
                self._backward(loss)
            micro += 1
            bs = len(batch["label"])
            self.state.position += bs
            sums["_seen"] += bs
            if out["logits"] is not None:
                sums["_correct"] += int((out["logits"].argmax(1) == batch["label"]).sum())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * bs
            for k, v in out["logs"].items():
                sums[k] = sums.get(k, 0.0) + float(v) * bs
            if not self.method.manual_optimization and micro % t.accum_steps == 0:
                self._optimizer_step()
                if t.checkpoint_every_steps and self.state.global_step % t.checkpoint_every_steps == 0:
                    self.state.elapsed_s = time.time() - start
                    self._save_state()
            elif self.method.manual_optimization and t.checkpoint_every_steps and \
                    self.state.global_step % t.checkpoint_every_steps == 0 and self.state.global_step > 0:
                self.state.elapsed_s = time.time() - start
                self._save_state()
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(loss=f"{sums['loss'] / max(sums['_seen'], 1):.3f}")
        if not self.method.manual_optimization and micro % t.accum_steps:
            self._optimizer_step()  # the epoch's last partial accumulation
        self.state.partial = {}
        names = [k for k in sums if not k.startswith("_")]
        totals = all_reduce_sum(torch.tensor([sums["_seen"], sums["_correct"], *(sums[k] for k in names)],
                                             dtype=torch.float64), self.dist)
        n = max(float(totals[0]), 1.0)
        logs = {f"train_{k}": float(v) / n for k, v in zip(names, totals[2:].tolist())}
        logs["train_acc"] = float(totals[1]) / n
        return logs

    def _non_finite(self, loss: torch.Tensor, logs: dict, epoch: int) -> None:
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in logs.items())
        msg = f"non-finite loss {float(loss.detach())} at epoch {epoch + 1}, step {self.state.global_step}" + \
              (f" ({terms})" if terms else "")
        if self.cfg.train.nan_policy == "stop":
            raise TrainingError(msg + "; lower the LR, enable train.clip_grad, or set train.nan_policy=skip")
        _logger.warning("%s: batch skipped", msg)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def predict(self, split: str, with_features: bool = False) -> Predictions:
        model = self.method.inference_model()
        return predict_loader(model, self.eval_loaders[split], self.device, flip_tta=self.cfg.train.flip_tta,
                              with_features=with_features, amp_dtype=self.amp_dtype)

    def _evaluate_epoch(self) -> dict[str, Any]:
        """Every rank evaluates the full split (small FER test sets); rank 0 logs."""
        out = {}
        for split in self.eval_loaders:
            ds = self.splits.val if split == "val" else self.splits.test
            m = evaluate_predictions(self.predict(split), len(self.class_names), ds.subsets())
            out[split] = m
        return out

    def _track_best(self, record: dict) -> bool:
        split = self.splits.select[0]
        metric = self.cfg.train.select_metric
        value = record[split][metric] if metric != "loss" else -record["train_loss"]
        if self.state.best_metric is None or value > self.state.best_metric:
            self.state.best_metric, self.state.best_epoch, self.state.bad_epochs = value, record["epoch"], 0
            return True
        self.state.bad_epochs += 1
        return False

    def _log_epoch(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        line = {k: v for k, v in record.items()}
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        summary = [f"epoch {record['epoch']}", f"loss {record['train_loss']:.4f}"]
        for split in ("val", "test"):
            if split in record:
                summary.append(f"{split} WA {100 * record[split]['wa']:.2f} UA {100 * record[split]['ua']:.2f}")
        _logger.info(" | ".join(summary))
        if self.writer is not None:
            e = record["epoch"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k.replace("train_", "train/"), v, e)
            for split in ("val", "test"):
                if split in record:
                    for m in ("wa", "ua", "f1"):
                        self.writer.add_scalar(f"{split}/{m}", record[split][m], e)
            for n, lr in record["lr"].items():
                self.writer.add_scalar(f"lr/{n}", lr, e)

    # ------------------------------------------------------------------ checkpoints
    def weights_metadata(self, metrics: dict | None = None) -> dict[str, Any]:
        return {"format": 1, "model": self.cfg.model.name, "model_kwargs": self.cfg.model.kwargs,
                "num_classes": len(self.class_names), "class_names": self.class_names, **self.spec,
                "dataset": self.cfg.data.dataset, "method": self.cfg.method.name, "epoch": self.state.epoch,
                "selected_on": self.splits.select[0], "metrics": metrics or {}, "config": to_dict(self.cfg),
                "commit": _git_commit()}

    def _save(self, improved: bool) -> None:
        if not self.dist.is_main:
            barrier(self.dist)
            return
        last = self.state.history[-1]
        metrics = {s: {k: last[s][k] for k in ("wa", "ua", "f1", "n")} for s in ("val", "test") if s in last}
        weights = self.method.inference_model().state_dict()
        ck = self.run_dir / "checkpoints"
        ckpt.save_weights(ck / "last.safetensors", weights, self.weights_metadata(metrics))
        if improved:
            ckpt.save_weights(ck / "best.safetensors", weights, self.weights_metadata(metrics))
        self._save_state()
        barrier(self.dist)

    def _save_state(self) -> None:
        if not self.dist.is_main:
            return
        state = {
            "method": _unwrapped_state(self.method),
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": ckpt.capture_rng(),
            "train_state": {**self.state.__dict__, "history": json.dumps(self.state.history)},
            "world_size": self.dist.world_size,
        }
        ckpt.save_state(self.run_dir / "checkpoints" / "state.pt", state)

    def _load_state(self, trust: bool) -> None:
        state = ckpt.load_state(self.run_dir / "checkpoints" / "state.pt", trust=trust)
        if state.get("world_size", 1) != self.dist.world_size:
            raise TrainingError(f"resume: state was saved with {state.get('world_size')} processes, "
                                f"now {self.dist.world_size}; the sampler position would not match")
        self.method.load_state_dict(state["method"])
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        for n, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][n])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        ts = dict(state["train_state"])
        ts["history"] = json.loads(ts["history"])
        self.state = TrainState(**ts)
        ckpt.restore_rng(state["rng"])
        _logger.info("resumed from %s at epoch %d, sample %d", self.run_dir, self.state.epoch + 1, self.state.position)

    def _finish(self) -> dict[str, Any]:
        """Final report: last-epoch and best-checkpoint metrics; test predictions saved for the analysis tools."""
        result = {"run_dir": str(self.run_dir), "epochs_run": self.state.epoch, "best_epoch": self.state.best_epoch,
                  "selected_on": self.splits.select[0], "last": self.state.history[-1] if self.state.history else {}}
        if self.dist.is_main and self.state.history:
            from ferkit.analysis.report import write_run_report

            pred = self.predict("test", with_features=False)
            _save_predictions(self.run_dir / "test_predictions.csv", pred, self.class_names)
            result["test"] = evaluate_predictions(pred, len(self.class_names), self.splits.test.subsets())
            write_run_report(self.run_dir, result["test"], self.state.history, self.class_names, self.cfg,
                             selected_on=self.splits.select[0], best_epoch=self.state.best_epoch)
        barrier(self.dist)
        cleanup(self.dist)
        return result


def _unwrapped_state(method: Method) -> dict[str, torch.Tensor]:
    return {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in method.state_dict().items()}


def _save_predictions(path: Path, pred: Predictions, class_names: list[str]) -> None:
    lines = ["index,label,pred," + ",".join(f"p_{c}" for c in class_names)]
    for i, y, p, probs in zip(pred.indices, pred.labels, pred.preds, pred.probs):
        lines.append(f"{i},{y},{p}," + ",".join(f"{x:.6f}" for x in probs))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
