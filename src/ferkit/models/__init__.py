"""Model files, one per architecture; importing this package registers every one of them.

Every model exposes ``forward(x, **extra) -> logits``, ``forward_features(x, **extra) -> (B, D)`` (penultimate
features, for t-SNE) and ``num_classes``. RGB-D models take ``depth=`` as a keyword.
"""
import importlib
import pkgutil

from .registry import (CheckpointMismatchError, FilteredState, KeyReport, ModelInfo, create_model, list_models,
                       load_filtered_state, load_state_file, model_info, register_model)
from .weights import DEFAULT_WEIGHTS, list_weights, resolve_weights

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _m not in ("registry", "weights") and not _m.startswith("_"):
        importlib.import_module(f"{__name__}.{_m}")

__all__ = ["create_model", "list_models", "model_info", "register_model", "ModelInfo", "KeyReport", "FilteredState",
           "load_state_file", "load_filtered_state", "CheckpointMismatchError", "resolve_weights", "list_weights",
           "DEFAULT_WEIGHTS"]
