"""ONNX export (SPEC 6): a checkpoint's inference model as an ONNX graph with a dynamic batch axis.

Inputs are named after the model's modalities (``image`` (B, 3, H, W) normalised as the metadata says; ``depth``
(B, 1, H, W) for RGB-D models), the output is ``logits`` (B, K) — exactly what ``model(x)`` returns in eval mode.
The checkpoint's metadata (class names, input size, mean/std, grey conversion) is copied into the ONNX file's
``metadata_props`` so a deployment needs nothing else.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter. The dynamo exporter needs
``onnxscript``, which ferkit does not depend on; the TorchScript one covers every op ferkit's models use.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .predictor import load_checkpoint_model

__all__ = ["NOT_EXPORTABLE", "ExportError", "export_onnx", "export_model", "onnx_parity", "example_inputs"]

_log = logging.getLogger(__name__)
DEFAULT_OPSET = 17

# Models whose eval-mode forward cannot be written as an ONNX graph that matches PyTorch, and why. Checked before any
# work (``ExportError``). Registered models not listed here are exported and compared in
# tests/test_inference_export.py.
NOT_EXPORTABLE: dict[str, str] = {}


class ExportError(RuntimeError):
    pass


class _Inputs(nn.Module):
    """Positional ONNX inputs -> the model's call convention (``depth=`` as keyword for RGB-D models)."""

    def __init__(self, model: nn.Module, modalities: tuple[str, ...]):
        super().__init__()
        self.model, self.modalities = model, modalities

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        extra = dict(zip(self.modalities[1:], xs[1:]))
        return self.model(xs[0], **extra)


def example_inputs(meta: dict[str, Any], batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random normalised inputs shaped as the checkpoint expects, one per modality."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = meta["input_size"]
    xs = [torch.randn(batch, c, h, w, generator=g)]
    if "depth" in meta.get("modalities", ["image"]):
        xs.append(torch.randn(batch, 1, h, w, generator=g))
    return tuple(xs)


def export_model(model: nn.Module, meta: dict[str, Any], out: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export an eval-mode model with its metadata; raises ``ExportError`` for models in ``NOT_EXPORTABLE``."""
    name = meta.get("model", type(model).__name__)
    if name in NOT_EXPORTABLE:
        raise ExportError(f"{name} cannot be exported to ONNX: {NOT_EXPORTABLE[name]}")
    modalities = tuple(meta.get("modalities", ["image"]))
    wrapper = _Inputs(model.eval(), modalities)
    inputs = example_inputs(meta)
    names = list(modalities[: len(inputs)])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        try:
            torch.onnx.export(wrapper, inputs, str(out), input_names=names, output_names=["logits"],
                              dynamic_axes={**{n: {0: "batch"} for n in names}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        except Exception as e:  # report which model and op failed, not a 200-line trace
            raise ExportError(f"{name}: ONNX export failed: {e.__class__.__name__}: {str(e).splitlines()[0]}") from e
    _add_metadata(out, meta)
    return out


def _add_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    keep = {k: meta[k] for k in ("model", "class_names", "input_size", "mean", "std", "grayscale", "modalities",
                                 "face_margin") if k in meta}
    for key, value in keep.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"ferkit.{key}", json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, verify: bool = True,
                atol: float = 1e-4) -> tuple[Path, float | None]:
    """Run directory or checkpoint -> ONNX file; with ``verify``, the largest |onnxruntime - PyTorch| logit
    difference on a random batch of 3 (``ExportError`` when above ``atol``)."""
    model, meta = load_checkpoint_model(checkpoint, "cpu")
    path = export_model(model, meta, out, opset)
    diff = None
    if verify:
        diff = onnx_parity(model, path, example_inputs(meta, batch=3, seed=1))
        if diff > atol:
            raise ExportError(f"{path}: onnxruntime differs from PyTorch by {diff:.2e} (> {atol:g})")
    return path, diff


@torch.no_grad()
def onnx_parity(model: nn.Module, path: str | Path, inputs: tuple[torch.Tensor, ...]) -> float:
    """Max absolute difference between onnxruntime's and PyTorch's outputs on ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    got = session.run(["logits"], feeds)[0]
    modalities = [i.name for i in session.get_inputs()]
    want = _Inputs(model.eval(), tuple(modalities))(*inputs).numpy()
    return float(np.abs(got - want).max())
