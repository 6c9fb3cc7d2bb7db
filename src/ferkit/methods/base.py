"""The contract between a method and the engine.

A method is an ``nn.Module`` holding the model and any learnable loss state (centres, queues, momentum branches),
so ``state_dict()`` checkpoints all of it. It declares its optimisers (:class:`OptimizerSpec`: parameter groups and
per-group overrides, e.g. DSAN's centres on their own SGD) and implements ``training_step``; the engine does the
rest (device, AMP, accumulation, clipping, schedulers, logging, checkpoints, DDP).

Methods that need several forward/backward passes per step (SAM) set ``manual_optimization = True`` and call
``ctx.backward(loss)`` / ``ctx.optimizer_step()`` themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["Method", "OptimizerSpec", "StepOutput", "register_method", "build_method", "list_methods"]


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to back-propagate (ignored under manual optimisation)
    logits: torch.Tensor | None = None  # (B, K) for running train accuracy
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)  # named loss terms, statistics


@dataclass
class OptimizerSpec:
    """One optimiser: ``params`` (iterable or param groups); ``kind`` and ``overrides`` adjust the config's optimiser
    (e.g. ``kind='sgd', overrides={'lr': 0.5}`` for loss centres). ``scheduled=False`` keeps its LR constant."""

    name: str
    params: Iterable | list[dict]
    kind: str | None = None  # None: the config's optimiser
    overrides: dict[str, Any] = field(default_factory=dict)
    scheduled: bool = True
    clip: bool = True  # gradient clipping applies


_METHODS: dict[str, Callable[..., "Method"]] = {}


def register_method(name: str):
    def wrap(cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = cls
        cls.method_name = name
        return cls
    return wrap


def list_methods() -> list[str]:
    import ferkit.methods  # noqa: F401

    return sorted(_METHODS)


def build_method(name: str, model: nn.Module, **kwargs: Any) -> "Method":
    list_methods()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name](model, **kwargs)


class Method(nn.Module):
    """Base method: plain supervised training of ``model`` is provided by subclasses; see ``supervised.py``."""

    method_name = "base"
    manual_optimization = False
    # which views of each training sample the data pipeline must deliver: key in batch -> transform kind
    train_views: dict[str, str] = {"image": "train"}

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # --- inference -----------------------------------------------------------------------------------------
    def inference_model(self) -> nn.Module:
        """The network used for evaluation, export and prediction (D3FER: its Key branch)."""
        return self.model

    def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self.inference_model()(x, **extra) if extra else self.inference_model()(x)

    # --- training ------------------------------------------------------------------------------------------
    def optimizer_specs(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("model", [p for p in self.model.parameters() if p.requires_grad])]

    def training_step(self, batch: dict[str, Any], ctx: "StepContext") -> StepOutput:  # noqa: F821
        raise NotImplementedError

    def on_train_epoch_start(self, epoch: int) -> None:
        """Hook: warm-up switches, BN freezing of fixed sub-networks (called after ``train()``)."""

    def on_train_epoch_end(self, epoch: int) -> dict[str, float]:
        """Hook: statistics to log for the epoch (e.g. D3FER filtering precision/recall)."""
        return {}

    def after_optimizer_step(self) -> None:
        """Hook: momentum updates (D3FER Key branch)."""

    def set_epoch_context(self, **info: Any) -> None:
        """Receives dataset facts the method may need (num_classes, class counts, noisy indices)."""
