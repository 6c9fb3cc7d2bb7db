"""Training and evaluation engine (method-agnostic)."""
from .trainer import StepContext, Trainer, TrainingError, input_spec, resolve_device, seed_everything

__all__ = ["Trainer", "TrainingError", "StepContext", "seed_everything", "resolve_device", "input_spec"]
