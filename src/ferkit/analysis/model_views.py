"""Model-specific views, the figures each paper draws of its own mechanism, dispatched on the registered model name:

* ``dsan`` (seed 001): P(a_ij = 0), the share of GFE-AN feature elements the sparse attention removes (Fig. 10), per
  sample and per class; the histogram of attention weights a; MFF-AN's local feature weights b_f (Eq. 8).
* ``arm`` (seed 003): the learned de-albino kernel, the weight it gives every pixel of the arranged map (its
  perception bias against the albino border, §3.3), the learned affinity λ and the running a_GAR (Eq. 2).
* ``poster*`` (seed 004): cross-fusion attention of the image mean token (which the classifier reads) over the 7x7
  landmark-feature grid, per pyramid level.
* ``rgbd_cmsa`` (seed 002): the spatial masks M_rgb, M_depth and their mean that gates the RGB features (§III-C).

Everything is read through forward hooks on named submodules, so the models need no analysis code; a model without a
view (the baseline) gives none, and a model whose submodules changed gives a "skipped" note instead of an error.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from .gradcam import extra_modalities  # noqa: E402

__all__ = ["View", "ViewContext", "model_views", "has_views", "CaptureOutputs", "poster_mean_token_attention",
           "dsan_attention_stats"]

_logger = logging.getLogger("ferkit")


@dataclass
class View:
    """One section of a report: a title, an optional PNG (path relative to the report) and markdown text."""

    title: str
    image: str | None = None
    text: str = ""

    def markdown(self, level: int = 3) -> str:
        lines = [f"{'#' * level} {self.title}", ""]
        if self.text:
            lines += [self.text, ""]
        if self.image:
            lines += [f"![{self.title}]({self.image})", ""]
        return "\n".join(lines)


@dataclass
class ViewContext:
    """What a view may use: test batches (eval-transformed dicts), a few raw samples with their transform (for
    per-image maps), class names, the run's per-epoch history, where to write and how to name the files."""

    out_dir: Path
    loader: Iterable[dict[str, Any]] | None = None
    samples: Sequence[dict[str, Any]] = ()
    transform: Any = None
    class_names: Sequence[str] | None = None
    history: Sequence[dict[str, Any]] = ()
    rel_prefix: str = "plots"  # how report.md reaches out_dir
    max_batches: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def rel(self, filename: str) -> str:
        return f"{self.rel_prefix}/{filename}" if self.rel_prefix else filename


# ------------------------------------------------------------------ hooks and inputs
class CaptureOutputs:
    """Context manager: forward hooks on ``modules`` recording ``fn(module, args, kwargs, output)`` per call.

    ``with CaptureOutputs({"sa": model.gfe_an.sa}) as cap: model(x)`` -> ``cap["sa"]`` is a list, one entry per call.
    """

    def __init__(self, modules: dict[str, nn.Module],
                 fn: Callable[[nn.Module, tuple, dict, Any], Any] | None = None):
        self.modules = modules
        self.fn = fn or (lambda m, a, kw, out: out.detach().float().cpu())
        self.records: dict[str, list[Any]] = {k: [] for k in modules}
        self.handles: list[Any] = []

    def __enter__(self) -> dict[str, list[Any]]:
        for name, module in self.modules.items():
            def hook(m, args, kwargs, out, _name=name):
                self.records[_name].append(self.fn(m, args, kwargs, out))
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self.records

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def _batches(model: nn.Module, ctx: ViewContext
             ) -> Iterable[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]:
    """(image, the extra modalities the model takes, labels) per test batch."""
    from ferkit.engine.evaluate import model_inputs

    for n, batch in enumerate(ctx.loader or ()):
        if ctx.max_batches is not None and n >= ctx.max_batches:
            break
        x, extra = model_inputs(batch, model)
        extra = {k: v.to(ctx.device) for k, v in extra.items()}
        yield x.to(ctx.device), extra, torch.as_tensor(batch["label"])


def _sample_inputs(model: nn.Module, ctx: ViewContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from .gradcam import _prepare

    prepared = [_prepare(ctx.transform, dict(s)) for s in ctx.samples]
    x = torch.cat([p[0] for p in prepared]).to(ctx.device)
    keys = set.intersection(*(set(p[1]) for p in prepared)) & extra_modalities(model)
    return x, {k: torch.cat([p[1][k] for p in prepared]).to(ctx.device) for k in keys}


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _display(sample: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """The raw sample's RGB image resized to (H, W), float in [0, 1]."""
    from PIL import Image

    h, w = size
    return np.asarray(sample["image"].convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) -> (N, H, W) bilinear."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def _label(ctx: ViewContext, sample: dict[str, Any]) -> str:
    y = sample.get("label")
    if y is None:
        return ""
    return ctx.class_names[y] if ctx.class_names is not None else str(y)


# ------------------------------------------------------------------ DSAN (seed 001)
def dsan_attention_stats(model: nn.Module, batches: Iterable[tuple[torch.Tensor, dict, torch.Tensor]]
                         ) -> dict[str, np.ndarray]:
    """Over batches: SA weights a (N, d) (``gfe_an.sa`` output), labels (N,), and MFF-AN's b (N, F) (``mff_an.lfa.f``
    outputs) when the stream exists."""
    modules: dict[str, nn.Module] = {}
    if getattr(model, "gfe_an", None) is not None and getattr(model.gfe_an, "sa", None) is not None:
        modules["a"] = model.gfe_an.sa
    mff = getattr(model, "mff_an", None)
    if mff is not None and getattr(mff, "lfa", None) is not None:
        modules.update({f"b{f}": m for f, m in enumerate(mff.lfa)})
    labels = []
    with CaptureOutputs(modules) as rec, torch.no_grad():
        for x, extra, y in batches:
            model(x, **extra)
            labels.append(y)
    out: dict[str, np.ndarray] = {"labels": torch.cat(labels).numpy() if labels else np.zeros(0, int)}
    if "a" in rec and rec["a"]:
        out["a"] = torch.cat(rec["a"]).numpy()
    if mff is not None and "b0" in rec and rec["b0"]:
        out["b"] = torch.cat([torch.cat(rec[f"b{f}"]) for f in range(len(mff.lfa))], dim=1).numpy()
    return out


def _dsan_views(model: nn.Module, ctx: ViewContext) -> list[View]:
    stats = dsan_attention_stats(model, _batches(model, ctx))
    if "a" not in stats and "b" not in stats:
        return [View("DSAN attention", text="skipped: neither the sparse attention (SA) nor LFA is switched on")]
    labels = stats["labels"]
    names = list(ctx.class_names or [str(c) for c in range(int(labels.max()) + 1)])
    panels = [p for p, on in (("p0", "a" in stats), ("hist", "a" in stats), ("class", "a" in stats),
                              ("b", "b" in stats), ("epochs", any("p_a_zero" in r for r in ctx.history))) if on]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    ax = dict(zip(panels, axes[0]))
    text = []
    if "a" in stats:
        a = stats["a"]
        p0 = (a == 0).mean(1)  # per-sample P(a_ij = 0)
        ax["p0"].hist(p0, bins=np.linspace(0, 1, 26), color="#4c72b0")
        ax["p0"].axvline(p0.mean(), color="k", ls="--", label=f"mean {p0.mean():.3f}")
        ax["p0"].set(title="P(a_ij = 0) per test sample (Fig. 10)", xlabel="share of elements removed",
                     ylabel="samples")
        ax["p0"].legend(fontsize=8)
        nz = a[a > 0]
        ax["hist"].hist(nz, bins=40, color="#55a868")
        ax["hist"].set(title=f"attention weights a > 0 ({100 * (a == 0).mean():.1f}% are 0)", xlabel="a_ij",
                       ylabel="elements")
        per_class = [p0[labels == c].mean() if (labels == c).any() else np.nan for c in range(len(names))]
        ax["class"].bar(names, per_class, color="#c44e52")
        ax["class"].set(title="mean P(a_ij = 0) per class", ylim=(0, 1))
        ax["class"].tick_params(axis="x", rotation=40)
        text.append(f"P(a_ij = 0) over the test set: **{p0.mean():.3f}** (d = {a.shape[1]}, n = {len(a)}); "
                    "Fig. 10 of the paper reports > 0.5 for GFE-AN alone and a clear drop once MFF-AN is added.")
        text.append("| class | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n| P(a=0) | "
                    + " | ".join("-" if np.isnan(v) else f"{v:.3f}" for v in per_class) + " |")
    if "b" in stats:
        b = stats["b"]
        ax["b"].boxplot([b[:, f] for f in range(b.shape[1])], showfliers=False)
        ax["b"].set_xticks(range(1, b.shape[1] + 1), [f"f={f + 1}" for f in range(b.shape[1])])
        ax["b"].set(title="MFF-AN local feature weights b_f (Eq. 8)")
        text.append("Mean LFA weights b_f: " + ", ".join(f"f{f + 1} {b[:, f].mean():.3f}" for f in range(b.shape[1])))
    if "epochs" in ax:
        hist = [(r["epoch"], r["p_a_zero"]) for r in ctx.history if "p_a_zero" in r]
        ax["epochs"].plot(*zip(*hist), marker="o")
        ax["epochs"].set(title="P(a_ij = 0) on training batches", xlabel="epoch", ylim=(0, 1))
        ax["epochs"].xaxis.set_major_locator(MaxNLocator(integer=True))
    for a_ in axes[0]:
        a_.grid(alpha=0.3)
    _save(fig, ctx.out_dir / "dsan_attention.png")
    return [View("DSAN sparse attention and local feature weights", ctx.rel("dsan_attention.png"), "\n\n".join(text))]


# ------------------------------------------------------------------ ARM (seed 003)
def _arm_views(model: nn.Module, ctx: ViewContext) -> list[View]:
    arm = model.arm
    affinity = bool(getattr(arm, "sharing_affinity", False))
    n_panels = 2 * (arm.de_albino is not None) + affinity
    if n_panels == 0:
        return [View("ARM", text="skipped: this ablation has neither the de-albino block nor the sharing affinity")]
    fig, axes = plt.subplots(1, n_panels, figsize=(4.4 * n_panels, 3.9), squeeze=False)
    panels = iter(axes[0])
    text = []
    if arm.de_albino is not None:
        kernel = arm.de_albino.weight.detach().float().cpu()  # (1, 1, k, k)
        k, stride = kernel.shape[-1], arm.de_albino.stride[0]
        lim = float(kernel.abs().max()) or 1.0
        ax = next(panels)
        fig.colorbar(ax.imshow(kernel[0, 0].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim), ax=ax, fraction=0.046)
        ax.set_title(f"de-albino kernel ({k}x{k}, stride {stride})")
        cover = _perception_frequency(arm, k)
        ax = next(panels)
        fig.colorbar(ax.imshow(cover, cmap="viridis"), ax=ax, fraction=0.046)
        ax.set_title("perception frequency (windows per pixel)")
        border, centre = _border_centre(cover, k)
        text.append(f"De-albino kernel {k}x{k}, stride {stride}, no padding, on the arranged "
                    f"{cover.shape[0]}x{cover.shape[1]} map. Perception frequency (how many kernel windows see a "
                    f"pixel): {border:.2f} on average over the outer {k // 2}-pixel ring vs {centre:.2f} inside, a "
                    f"centre / edge ratio of {centre / max(border, 1e-9):.2f} (§3.3 and Fig. 6: the border, where "
                    "padding's albino features gather, is seen less).")
    if affinity:
        lam = float(arm.alpha.detach().float().reshape(-1)[0])
        gar = arm.running_gar.detach().float().cpu()
        side = math.isqrt(gar.numel())
        ax = next(panels)
        if side * side == gar.numel():
            fig.colorbar(ax.imshow(gar.reshape(side, side).numpy(), cmap="magma"), ax=ax, fraction=0.046)
        else:
            ax.plot(gar.numpy())
        ax.set_title(f"running a_GAR; learned λ = {lam:.4f}")
        tracked = int(getattr(arm, "num_gar_tracked", torch.tensor(0)))
        text.append(f"Sharing affinity (Eq. 2): learned **λ = {lam:.4f}** (initialised at 1.0); running a_GAR tracked "
                    f"over {tracked} training steps" + (" (none: eval uses the batch mean)" if tracked == 0 else "")
                    + ".")
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, ctx.out_dir / "arm_de_albino.png")
    return [View("ARM de-albino kernel and sharing affinity", ctx.rel("arm_de_albino.png"), "\n\n".join(text))]


def _perception_frequency(arm: nn.Module, k: int) -> np.ndarray:
    """How many de-albino windows cover each input pixel, (S, S): the transposed convolution of a map of ones the
    size of the block's output with a k x k kernel of ones (S = the span the strided windows reach)."""
    per_map = arm.dim // (1 if arm.channel_mean else arm.bn.num_features)  # output positions of one channel
    out = math.isqrt(per_map)
    ones = torch.ones(1, 1, out, out)
    return F.conv_transpose2d(ones, torch.ones(1, 1, k, k), stride=arm.de_albino.stride[0])[0, 0].numpy()


def _border_centre(cover: np.ndarray, k: int) -> tuple[float, float]:
    ring = k // 2
    mask = np.zeros_like(cover, dtype=bool)
    mask[ring:-ring, ring:-ring] = True
    return float(cover[~mask].mean()), float(cover[mask].mean())


# ------------------------------------------------------------------ POSTER (seed 004)
def _attention_probs(module: nn.Module, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_h)) of one CrossFusionAttention call: (B, h, Nq, N). Queries enter unprojected and
    keys come from ``kv``, as in the module's forward."""
    b, n, c = context.shape
    h = module.num_heads
    k = module.kv(context).reshape(b, n, 2, h, c // h)[:, :, 0].transpose(1, 2)  # (B, h, N, C/h)
    q = query.reshape(b, query.shape[1], h, c // h).transpose(1, 2)  # (B, h, Nq, C/h)
    return (q @ k.transpose(-2, -1) / math.sqrt(c // h)).softmax(-1)


def poster_mean_token_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per pyramid level, the head-averaged attention of the image mean token (the one the classifier reads) over the
    landmark tokens of the large-scale block: (levels, B, 7, 7) over MobileFaceNet's spatial grid."""
    levels = list(model.cross_fusion.blocks)
    modules = {str(i): lvl.block_l.attn_lm for i, lvl in enumerate(levels)}

    def grab(m, args, kwargs, out):
        q = kwargs.get("query", args[0] if args else None)
        ctx = kwargs.get("context", args[1] if len(args) > 1 else None)
        return _attention_probs(m, q, ctx).detach().float().cpu()

    with CaptureOutputs(modules, grab) as rec, torch.no_grad():
        model(x)
    maps = []
    for i in range(len(levels)):
        probs = rec[str(i)][0]  # (B, h, P, P): queries = image tokens, keys = landmark tokens (mean token first)
        row = probs[:, :, 0, 1:].mean(1)  # image mean token over the 49 landmark positions, heads averaged
        side = math.isqrt(row.shape[-1])
        maps.append(row.reshape(len(row), side, side))
    return torch.stack(maps)


def _poster_views(model: nn.Module, ctx: ViewContext) -> list[View]:
    if not ctx.samples:
        return [View("POSTER cross-fusion attention", text="skipped: no sample images")]
    x, _ = _sample_inputs(model, ctx)
    maps = poster_mean_token_attention(model, x)  # (L, B, 7, 7)
    n_levels, n = maps.shape[:2]
    size = tuple(x.shape[-2:])
    fig, axes = plt.subplots(n, n_levels + 1, figsize=(1.9 * (n_levels + 1), 2.0 * n + 0.4), squeeze=False)
    for r, sample in enumerate(ctx.samples):
        img = _display(sample, size)
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(_label(ctx, sample) if r else "input\n" + _label(ctx, sample), fontsize=8)
        up = _upsample(maps[:, r], size)
        for lvl in range(n_levels):
            axes[r, lvl + 1].imshow(img)
            axes[r, lvl + 1].imshow(up[lvl], cmap="jet", alpha=0.5)
            if r == 0:
                axes[r, lvl + 1].set_title(f"level {lvl + 1}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("attention of the image mean token over the 7x7 landmark-feature grid (heads averaged)", fontsize=9)
    _save(fig, ctx.out_dir / "poster_attention.png")
    text = ("In each large-scale cross-fusion block the image tokens attend to the landmark tokens (§2.2.4); shown is "
            "the attention of the image mean token, which the classifier reads, over MobileFaceNet's 7x7 grid. "
            "(POSTER's image tokens are channel groups of IR-50's map, not spatial patches, so only the landmark "
            "side has a spatial layout.)")
    return [View("POSTER cross-fusion attention", ctx.rel("poster_attention.png"), text)]


# ------------------------------------------------------------------ RGB-D (seed 002)
def _rgbd_views(model: nn.Module, ctx: ViewContext) -> list[View]:
    if getattr(model, "rgb_attention", None) is None:
        return [View("RGB-D spatial masks", text="skipped: this variant has no cross-modality attention (sum fusion)")]
    if not ctx.samples:
        return [View("RGB-D spatial masks", text="skipped: no sample images")]
    x, extra = _sample_inputs(model, ctx)
    modules = {"rgb": model.rgb_attention}
    if getattr(model, "depth_attention", None) is not None:
        modules["depth"] = model.depth_attention
    with CaptureOutputs(modules) as rec, torch.no_grad():
        model(x, **extra)
    masks = {k: v[0][:, 0] for k, v in rec.items()}  # (B, h, w) each, sigmoid outputs in [0, 1]
    if "depth" in masks:
        masks["mean (gates RGB)"] = (masks["rgb"] + masks["depth"]) / 2
    size = tuple(x.shape[-2:])
    cols = ["RGB", "depth"] + [f"M {k}" for k in masks]
    fig, axes = plt.subplots(len(ctx.samples), len(cols), figsize=(2.1 * len(cols), 2.2 * len(ctx.samples) + 0.4),
                             squeeze=False)
    for r, sample in enumerate(ctx.samples):
        img = _display(sample, size)
        axes[r, 0].imshow(img)
        axes[r, 0].set_ylabel(_label(ctx, sample), fontsize=8)
        if "depth" in extra:
            axes[r, 1].imshow(extra["depth"][r, 0].cpu().numpy(), cmap="gray")
        for c, (name, m) in enumerate(masks.items(), start=2):
            axes[r, c].imshow(img)
            im = axes[r, c].imshow(_upsample(m[r:r + 1], size)[0], cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for c, name in enumerate(cols):
        axes[0, c].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, fraction=0.02, label="mask value")
    _save(fig, ctx.out_dir / "rgbd_masks.png")
    means = ", ".join(f"{k} {float(v.mean()):.3f}" for k, v in masks.items())
    text = ("LANet masks (S maps, max over maps) of each modality and their mean, which multiplies the RGB features "
            f"(§III-C); masks on a fixed [0, 1] scale. Mean mask values: {means}.")
    return [View("RGB-D cross-modality spatial masks", ctx.rel("rgbd_masks.png"), text)]


# ------------------------------------------------------------------ dispatch
_VIEWS: dict[str, Callable[[nn.Module, ViewContext], list[View]]] = {
    "dsan": _dsan_views, "arm": _arm_views, "poster": _poster_views, "rgbd_cmsa": _rgbd_views,
}


def _family(name: str) -> str | None:
    for key in sorted(_VIEWS, key=len, reverse=True):
        if name == key or name.startswith(key + "_"):
            return key
    return None


def has_views(name: str) -> bool:
    return _family(name) is not None


def model_views(model: nn.Module, ctx: ViewContext, name: str | None = None) -> list[View]:
    """The views of ``model`` (by its registered name), or ``[]`` when it has none; a view that no longer fits the
    model's submodules becomes a "skipped" note naming the reason."""
    name = name or getattr(model, "model_name", "") or ""
    family = _family(name)
    if family is None:
        return []
    was_training = model.training
    model.eval()
    try:
        return _VIEWS[family](model, ctx)
    except (AttributeError, KeyError, IndexError, RuntimeError, ValueError) as e:
        _logger.warning("model view %s skipped: %s: %s", family, e.__class__.__name__, e)
        plt.close("all")
        return [View(f"{family} view", text=f"skipped: {e.__class__.__name__}: {e}")]
    finally:
        model.train(was_training)
