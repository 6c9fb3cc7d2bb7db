"""Optimisers and LR schedulers from config + the method's :class:`OptimizerSpec` list.

SAM (POSTER) comes from the maintained ``pytorch-optimizer`` package, not a home-made copy.
"""
from __future__ import annotations

import torch

from ferkit.config import OptimConfig
from ferkit.methods import OptimizerSpec

__all__ = ["build_optimizer", "build_scheduler", "scheduler_steps_per_batch"]


def _base_optimizer(kind: str, params, o: OptimConfig, overrides: dict) -> torch.optim.Optimizer:
    lr = overrides.get("lr", o.lr)
    wd = overrides.get("weight_decay", o.weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=tuple(o.betas))
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=tuple(o.betas))
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=overrides.get("momentum", o.momentum))
    if kind in ("sam_adam", "sam_sgd"):
        try:
            from pytorch_optimizer import SAM
        except ImportError as e:
            raise ImportError("optim.name=sam_*: install the extra: pip install 'ferkit[sam]'") from e
        base = torch.optim.Adam if kind == "sam_adam" else torch.optim.SGD
        extra = {"betas": tuple(o.betas)} if kind == "sam_adam" else {"momentum": o.momentum}
        return SAM(params, base_optimizer=base, rho=overrides.get("rho", o.sam_rho), lr=lr, weight_decay=wd, **extra)
    raise ValueError(f"optim.name: unknown optimiser {kind!r}")


def build_optimizer(spec: OptimizerSpec, o: OptimConfig) -> torch.optim.Optimizer:
    return _base_optimizer(spec.kind or o.name, spec.params, o, spec.overrides)


def scheduler_steps_per_batch(o: OptimConfig) -> bool:
    return o.scheduler == "onecycle"


def build_scheduler(opt: torch.optim.Optimizer, spec: OptimizerSpec, o: OptimConfig, epochs: int,
                    steps_per_epoch: int):
    """Epoch-stepped (exponential, step, cosine, with optional linear warm-up) or batch-stepped (one-cycle)."""
    if not spec.scheduled or o.scheduler == "none":
        return None
    if o.scheduler == "onecycle":
        max_lr = o.max_lr.get(spec.name, spec.overrides.get("lr", o.lr))
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=max(epochs * steps_per_epoch, 1),
                                                   final_div_factor=max_lr / max(o.min_lr, 1e-12) / 25
                                                   if o.min_lr > 0 else 1e4)
    if o.scheduler == "exponential":
        main = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=o.gamma)
    elif o.scheduler == "step":
        main = torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_size, gamma=o.gamma)
    else:
        main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs - o.warmup_epochs, 1), eta_min=o.min_lr)
    if o.warmup_epochs <= 0:
        return main
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=o.warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[o.warmup_epochs])
