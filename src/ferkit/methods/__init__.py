"""Training methods: a method owns its model, losses and learnable loss state, and its training step.

The engine (``ferkit.engine``) drives any :class:`Method` without knowing which paper it comes from. Importing this
package registers every method module in it.
"""
import importlib
import pkgutil

from .base import Method, OptimizerSpec, StepOutput, build_method, list_methods, register_method

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _m != "base" and not _m.startswith("_"):
        importlib.import_module(f"{__name__}.{_m}")

__all__ = ["Method", "OptimizerSpec", "StepOutput", "register_method", "build_method", "list_methods"]
