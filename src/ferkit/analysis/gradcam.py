"""Grad-CAM overlays for any registered model (pytorch-grad-cam), as a grid of images x models.

The target layer is the model's registry entry (``ModelInfo.gradcam_layer``, a dotted module path) unless the caller
names one. Two adapters make every ferkit model fit the library's ``model(x) -> logits`` / ``(B, C, H, W)`` contract:

* models with extra inputs (RGB-D: ``depth=``) are wrapped in :class:`BoundInputs`, which closes over the sample's
  depth so the library can call ``wrapper(x)``;
* a target layer that outputs tokens (ViT / POSTER transformer blocks) is turned into a map by the registry's
  ``ModelInfo.gradcam_reshape`` spec (:func:`reshape_transform`): ``"tokens"`` (drop leading cls / mean tokens until a
  square grid remains), ``"tokens[a:b]"`` (take tokens a..b-1, e.g. one stream's half of a fused sequence) or
  ``"bhwc"`` (channels-last maps, Swin / ConvNeXt style).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

__all__ = ["CAM_METHODS", "BoundInputs", "reshape_transform", "resolve_target_layer", "compute_cams",
           "gradcam_grid", "overlay", "extra_modalities"]


def _cam_methods() -> dict[str, type]:
    try:
        import pytorch_grad_cam as pgc
    except ImportError:
        raise ImportError("Grad-CAM needs the grad-cam package: pip install 'ferkit[analysis]'") from None

    return {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "hirescam": pgc.HiResCAM,
            "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM}


CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam")
_TOKENS = re.compile(r"^tokens(?:\[(-?\d*):(-?\d*)\])?$")


class BoundInputs(nn.Module):
    """``model(x, **extra)`` seen as ``wrapper(x)``: the extra modalities (RGB-D ``depth``) of the current batch."""

    def __init__(self, model: nn.Module, **extra: torch.Tensor):
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, **self.extra)


def reshape_transform(spec: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The library's ``reshape_transform`` for a registry spec (module docstring); ``None`` for conv maps."""
    if spec is None:
        return None
    if spec == "bhwc":
        return lambda t: _first(t).permute(0, 3, 1, 2)
    m = _TOKENS.match(spec)
    if m is None:
        raise ValueError(f"gradcam_reshape {spec!r}: expected None, 'tokens', 'tokens[a:b]' or 'bhwc'")
    if m.group(1) is None:
        return _tokens_to_map
    start = int(m.group(1)) if m.group(1) else None
    stop = int(m.group(2)) if m.group(2) else None
    return lambda t: _tokens_to_map(_first(t)[:, start:stop], drop_leading=False)


def _first(t: Any) -> torch.Tensor:
    """Blocks that return ``(tokens, attention)`` tuples: the tokens."""
    return t[0] if isinstance(t, (tuple, list)) else t


def _tokens_to_map(t: Any, drop_leading: bool = True) -> torch.Tensor:
    """(B, N, C) -> (B, C, s, s); with ``drop_leading`` the first N - s^2 tokens (cls / mean tokens) are dropped."""
    t = _first(t)
    b, n, c = t.shape
    side = math.isqrt(n)
    if drop_leading:
        t = t[:, n - side * side:]
    elif side * side != n:
        raise ValueError(f"gradcam reshape: {n} tokens do not form a square grid")
    return t.reshape(b, side, side, c).permute(0, 3, 1, 2)


def resolve_target_layer(model: nn.Module, name: str | None = None, layer: str | None = None
                         ) -> tuple[nn.Module, Callable | None]:
    """(target module, reshape transform) from ``layer`` or the model's registry entry."""
    from ferkit.models import model_info

    reg_name = getattr(model, "model_name", None) or name
    info = None
    if reg_name is not None:
        try:
            info = model_info(reg_name)
        except KeyError:
            info = None
    path = layer or (info.gradcam_layer if info else None)
    if not path:
        raise ValueError(f"{reg_name or name}: no Grad-CAM target layer (set ModelInfo.gradcam_layer or pass one)")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{reg_name or name}: Grad-CAM layer {path!r} is not a submodule of the model") from None
    same_layer = info is not None and path == info.gradcam_layer
    spec = getattr(info, "gradcam_reshape", None) if same_layer else None
    return module, reshape_transform(spec)


def compute_cams(model: nn.Module, x: torch.Tensor, target_layer: nn.Module, *,
                 reshape: Callable | None = None, extra: Mapping[str, torch.Tensor] | None = None,
                 targets: Sequence[int] | None = None, method: str = "gradcam") -> tuple[np.ndarray, np.ndarray]:
    """CAMs (B, H, W) in [0, 1] at the input resolution and the probabilities (B, K) of the model on ``x``.

    ``targets``: class per image (default: the predicted class).
    """
    methods = _cam_methods()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in methods:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
    was_training = model.training
    wrapped = BoundInputs(model, **dict(extra or {})).eval()
    device = next(model.parameters()).device
    x = x.to(device)
    tgt = None if targets is None else [ClassifierOutputTarget(int(c)) for c in targets]  # None: the argmax
    with torch.enable_grad(), methods[method](model=wrapped, target_layers=[target_layer],
                                              reshape_transform=reshape) as cam:
        maps = cam(input_tensor=x, targets=tgt)
        probs = cam.outputs.detach().float().softmax(1).cpu().numpy()
    model.train(was_training)
    return np.nan_to_num(maps.astype(np.float32)), probs


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image (resized to the CAM) under a jet heat map; uint8 (H, W, 3)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    h, w = cam.shape
    rgb = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=1.0 - alpha)


def _prepare(transform: Any, sample: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1, C, H, W) input and extra modalities; ferkit sample transforms take the raw sample dict (and produce depth),
    plain torchvision transforms take the PIL image."""
    from ferkit.data.transforms import SampleTransform

    if isinstance(transform, SampleTransform):
        out = transform(dict(sample))
        extra = {k: out[k][None] for k in ("depth",) if k in out}
        return out["image"][None], extra
    return transform(sample["image"])[None], {}


def _as_sample(item: Image.Image | dict[str, Any]) -> dict[str, Any]:
    return dict(item) if isinstance(item, dict) else {"image": item}


def gradcam_grid(models: dict[str, nn.Module], images: list[Image.Image], transform: Any, path: str | Path,
                 target_layers: dict[str, str] | None = None, *, class_names: Sequence[str] | None = None,
                 method: str = "gradcam", alpha: float = 0.5) -> Path:
    """Rows = images, columns = the input then one Grad-CAM overlay per model (predicted class and probability on
    each cell; the true class on the input when the image is a sample dict with ``label``).

    ``images``: PIL images or raw sample dicts (``{"image": PIL, "depth": PIL, "label": int}`` as datasets return
    them; RGB-D models need the depth). ``transform``: one for all models or ``{model name: transform}``; a ferkit
    ``SampleTransform`` or a torchvision PIL -> tensor transform. ``target_layers``: ``{model name: dotted path}``
    overrides of the registry's Grad-CAM layer.
    """
    if not models or not images:
        raise ValueError("gradcam_grid: needs at least one model and one image")
    samples = [_as_sample(im) for im in images]
    cells: dict[str, list[tuple[np.ndarray, str]]] = {}
    for name, model in models.items():
        tf = transform[name] if isinstance(transform, Mapping) else transform
        layer, reshape = resolve_target_layer(model, name, (target_layers or {}).get(name))
        cells[name] = []
        for s in samples:
            x, extra = _prepare(tf, s)
            wanted = extra_modalities(model)
            if wanted - set(extra):
                raise ValueError(f"{name}: the model also takes {sorted(wanted)}: pass dataset samples that have them")
            extra = {k: v for k, v in extra.items() if k in wanted}
            cam, probs = compute_cams(model, x, layer, reshape=reshape, extra=extra, method=method)
            k = int(probs[0].argmax())
            label = class_names[k] if class_names is not None and k < len(class_names) else str(k)
            cells[name].append((overlay(s["image"], cam[0], alpha), f"{label} {probs[0, k]:.2f}"))
    return _draw_grid(samples, cells, class_names, Path(path), method)


def extra_modalities(model: nn.Module) -> set[str]:
    """Inputs a model takes besides the image, from its registry entry (RGB-D: ``{"depth"}``); unregistered: none."""
    from ferkit.models import model_info

    try:
        return set(model_info(getattr(model, "model_name", "")).modalities) - {"image"}
    except KeyError:
        return set()


def _draw_grid(samples: list[dict], cells: dict[str, list[tuple[np.ndarray, str]]],
               class_names: Sequence[str] | None, path: Path, method: str) -> Path:
    """Images x (input + models); laid out with the longer side horizontal (one model: images in a row)."""
    columns: list[tuple[str, list[tuple[Any, str]]]] = [("input", [
        (s["image"].convert("RGB"), "" if s.get("label") is None else
         "true: " + (class_names[s["label"]] if class_names is not None else str(s["label"]))) for s in samples])]
    columns += list(cells.items())
    transpose = len(columns) < len(samples)  # rows = input / models, columns = images
    rows, cols = (len(columns), len(samples)) if transpose else (len(samples), len(columns))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.55 * rows + 0.5), squeeze=False)
    for c, (name, col) in enumerate(columns):
        for r, (image, text) in enumerate(col):
            ax = axes[c, r] if transpose else axes[r, c]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(text, fontsize=9)
            if transpose and r == 0:
                ax.set_ylabel(name, fontsize=10, fontweight="bold")
            elif not transpose and r == 0:
                ax.set_title(f"[{name}]\n{text}", fontsize=9)
    fig.suptitle(f"{method}: predicted class and its probability", fontsize=10)
    fig.tight_layout(h_pad=1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
