"""timm-style model registry: named constructors with metadata, and strict, reported loading of foreign weights.

Constructors do no I/O. ``create_model(name, pretrained=PATH)`` builds the module, reads the file with
``torch.load(weights_only=True)`` (or safetensors), passes it through the model file's ``checkpoint_filter_fn`` and
loads it, logging missing / unexpected / shape-mismatched keys by name. The only automatic relaxation is the
classifier, dropped when its class count differs from the requested one (and reported as such).
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "ModelInfo", "KeyReport", "FilteredState", "register_model", "create_model", "list_models", "model_info",
    "load_state_file", "load_filtered_state", "CheckpointMismatchError",
]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What a model needs at inference and what its paper reports (shown by ``ferkit profile``)."""

    name: str
    input_size: tuple[int, int, int] = (3, 224, 224)  # the paper's input (C, H, W)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    paper: str = ""  # seed / reference
    paper_params_m: float | None = None  # params in millions as published (or as SPEC pins them)
    paper_macs_g: float | None = None  # multiply-accumulates in G at input_size
    gradcam_layer: str | None = None  # dotted path of the Grad-CAM target layer
    gradcam_reshape: str | None = None  # target output -> (B,C,H,W): None, "tokens[a:b]", "bhwc" (analysis/gradcam)
    classifier: str | tuple[str, ...] | None = None  # dotted prefix(es) of the head(s), dropped when K differs
    modalities: tuple[str, ...] = ("image",)  # ("image", "depth") for RGB-D models
    filter_fn: Callable[[dict, nn.Module], dict] | None = None  # maps official checkpoints onto the module
    default_kwargs: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], ModelInfo]] = {}


def register_model(info: ModelInfo) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a constructor ``fn(num_classes=..., **kw) -> nn.Module`` under ``info.name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if info.name in _REGISTRY:
            raise ValueError(f"model {info.name!r} registered twice")
        _REGISTRY[info.name] = (fn, info)
        return fn

    return wrap


def _ensure_loaded() -> None:
    # importing the package registers every architecture file
    import ferkit.models  # noqa: F401


def list_models(pattern: str | None = None) -> list[str]:
    _ensure_loaded()
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def model_info(name: str) -> ModelInfo:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][1]


@dataclass
class KeyReport:
    """Outcome of loading a state dict: nothing is dropped without a name."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    new_classifier: list[str] = field(default_factory=list)  # re-initialised head keys
    # the part of ``missing`` the filter declared absent by design (:class:`FilteredState`, e.g. the head of a model
    # loaded from a trunk-only file): still missing, left at their fresh initialisation, accepted by a strict load
    kept_fresh: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Every model key came from the file and every file key was used (a re-initialised classifier aside)."""
        return not (self.missing or self.unexpected or self.shape_mismatch)

    @property
    def acceptable(self) -> bool:
        """What a strict load requires: clean, except for missing keys declared ``kept_fresh``."""
        return not (self.unexpected or self.shape_mismatch or set(self.missing) - set(self.kept_fresh))

    def lines(self) -> list[str]:
        out = []
        unplanned = [k for k in self.missing if k not in self.kept_fresh]
        if unplanned:
            out.append(f"missing keys ({len(unplanned)}): {', '.join(unplanned)}")
        if self.kept_fresh:
            out.append(f"missing keys absent from this kind of file by design, freshly initialised "
                       f"({len(self.kept_fresh)}): {', '.join(self.kept_fresh)}")
        if self.unexpected:
            out.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for k, got, want in self.shape_mismatch:
            out.append(f"shape mismatch {k}: checkpoint {tuple(got)} vs model {tuple(want)}")
        if self.new_classifier:
            out.append(f"classifier initialised afresh (absent or other class count): {', '.join(self.new_classifier)}")
        return out or ["all keys matched"]

    def __str__(self) -> str:
        return "; ".join(self.lines())


class CheckpointMismatchError(RuntimeError):
    pass


class FilteredState(dict):
    """What a ``checkpoint_filter_fn`` returns when it knows the file lacks part of the model by design (a trunk-only
    file has no head): the state, plus ``fresh``, the model keys that keep their fresh initialisation. The loader
    reports them as missing (and in ``KeyReport.kept_fresh``) instead of failing a strict load on them."""

    def __init__(self, state: dict[str, torch.Tensor], fresh: list[str] | tuple[str, ...] = ()):
        super().__init__(state)
        self.fresh = list(fresh)


def load_state_file(path: str | Path) -> dict[str, Any]:
    """Read a weights file safely: safetensors, or torch.load with weights_only=True (never unrestricted pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with arbitrary objects, truncated file, ...
        raise CheckpointMismatchError(f"{path}: cannot be read as a weights-only checkpoint ({e.__class__.__name__}: "
                                      f"{str(e).splitlines()[0][:200]})") from None


def load_filtered_state(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True,
                        classifier: str | tuple[str, ...] | None = None, source: str = "checkpoint") -> KeyReport:
    """Load ``state`` into ``model`` and report every key that did not match.

    A classifier whose shape differs is the one automatic relaxation (re-initialised, reported). Missing keys that a
    :class:`FilteredState` declares ``fresh`` are reported as missing but do not fail a strict load. Any other
    mismatch raises in strict mode; otherwise the matching keys load and the rest are reported.
    """
    own = model.state_dict()
    declared_fresh = set(getattr(state, "fresh", ()))
    report = KeyReport()
    to_load = {}
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            if _is_classifier(k, classifier):
                report.new_classifier.append(k)
            else:
                report.shape_mismatch.append((k, tuple(v.shape), tuple(own[k].shape)))
        else:
            to_load[k] = v
    for k in own:
        if k in state or _is_counter(k):
            continue
        if _is_classifier(k, classifier):
            report.new_classifier.append(k)  # absent from the file (a trunk-only checkpoint): freshly initialised
        else:
            report.missing.append(k)
            if k in declared_fresh:
                report.kept_fresh.append(k)
    if strict and not report.acceptable:
        raise CheckpointMismatchError(f"{source}: " + "; ".join(report.lines()))
    model.load_state_dict(to_load, strict=False)
    for line in report.lines():
        _logger.info("%s: %s", source, line)
    return report


def _is_classifier(key: str, classifier: str | tuple[str, ...] | None) -> bool:
    prefixes = (classifier,) if isinstance(classifier, str) else (classifier or ())
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def create_model(name: str, num_classes: int = 7, pretrained: str | Path | None = None, *,
                 strict: bool = True, **kwargs: Any) -> nn.Module:
    """Build a registered model; optionally load weights from a user-given file through its filter function.

    ``pretrained``: a weights file, or a name (``ferkit:resnet18-fer7``; :mod:`ferkit.models.weights`).
    ``model.key_report`` holds the load report when weights were given.
    """
    _ensure_loaded()
    fn, info = _REGISTRY[name] if name in _REGISTRY else (None, None)
    if fn is None:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    model = fn(num_classes=num_classes, **{**info.default_kwargs, **kwargs})
    model.model_name = name  # type: ignore[attr-defined]
    if pretrained:
        from .weights import resolve_weights

        pretrained = resolve_weights(pretrained)  # a path, or a name: ferkit:resnet18-fer7, $FERKIT_WEIGHTS/<name>
        state = load_state_file(pretrained)
        if info.filter_fn is not None:
            state = info.filter_fn(state, model)
        model.key_report = load_filtered_state(  # type: ignore[attr-defined]
            model, state, strict=strict, classifier=info.classifier, source=str(pretrained))
    return model
