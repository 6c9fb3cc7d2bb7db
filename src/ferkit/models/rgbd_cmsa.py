"""RGB + depth network with cross-modality spatial attention (seed 002 §III-C, Fig. 8; SPEC 3.6).

Raimondo et al., "A new neural network architecture for facial expression recognition" (Politecnico di Torino).
No official model release; the experiment code of the authors is public but not the final architecture.

    I_rgb, I_depth (depth replicated to 3 channels) -> two EfficientNet-B2 streams (timm ``tf_efficientnet_b2``,
    the ``_ns`` weights' architecture), features after the last inverted residual block: X_rgb, X_depth 352x9x9
    -> LANet spatial attention, S = 4 maps per modality, max over maps: M_rgb, M_depth       (Fig. 5b)
    -> cross-modality fusion: X_out = X_rgb * (M_rgb + M_depth) / 2                          (§III-C)
    -> 1x1 conv to tokens (81) -> [cls] + position embedding -> ViT encoder, 4 layers (POSTER V2 style)
    -> MLP of two Linear layers -> K logits (softmax in the loss)

Ablations (Tables VI-VII) are arguments of the one class: ``use_depth=False`` (RGB stream only, its own mask),
``fusion="sum"`` (X_rgb + X_depth, Eq. 8), ``head="avgpool"`` (average pooling instead of the ViT encoder).

Not given by the paper, chosen here: ViT width 768, 8 heads, MLP ratio 4 and LANet reduction r = 8 (the values of
the authors' public experiment code); MLP head hidden width 512 with GELU. The position embedding is defined on the
9x9 grid of a 260x260 input and resampled (timm) when another input size gives another grid.

Weights: Savchenko's VGGFace2 face model ``state_vggface2_enet2.pt`` (a plain timm ``tf_efficientnet_b2_ns`` state
dict saved with ``classifier = Identity``) loads into *both* streams through :func:`checkpoint_filter_fn`; the
fusion network is trained from scratch (seed 002 §III-E). Constructors never download anything.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import timm
import torch
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ferkit.layers import MultiLANet
from .registry import FilteredState, ModelInfo, register_model

__all__ = ["RGBDCMSA", "checkpoint_filter_fn", "BACKBONE_CHANNELS"]

_logger = logging.getLogger(__name__)

BACKBONE = "tf_efficientnet_b2"  # timm 1.x name of the architecture of tf_efficientnet_b2_ns (weights tag .ns_jft_in1k)
BACKBONE_CHANNELS = 352  # output channels of the last inverted residual block (Table II)
_FEATURE_STRIDE = 32
# Savchenko's file holds the whole classification trunk; these layers come after the last inverted residual block
_UNUSED_TRUNK_PREFIXES = ("conv_head.", "bn2.", "classifier.")


def efficientnet_b2_stream() -> nn.Module:
    """EfficientNet-B2 trunk up to (and including) the last inverted residual block: (B,3,H,W) -> (B,352,H/32,W/32).

    timm's feature wrapper keeps the classification model's key names (``conv_stem``, ``bn1``, ``blocks.*``), so
    Savchenko's state dict maps onto it one to one."""
    return timm.create_model(BACKBONE, pretrained=False, features_only=True, out_indices=(4,))


def _grid(img_size: int) -> int:
    """Feature grid side of a TF-"same"-padded stride-32 trunk: ceil(img / 32) (260 -> 9)."""
    return math.ceil(img_size / _FEATURE_STRIDE)


class RGBDCMSA(nn.Module):
    """Two EfficientNet-B2 streams, cross-modality spatial attention, ViT encoder, MLP head (seed 002 Fig. 8)."""

    def __init__(self, num_classes: int = 7, *, use_depth: bool = True, fusion: str = "attention",
                 head: str = "vit", num_maps: int = 4, reduction: int = 8, embed_dim: int = 768, vit_depth: int = 4,
                 num_heads: int = 8, mlp_ratio: float = 4.0, head_hidden: int = 512, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, img_size: int = 260):
        super().__init__()
        if fusion not in ("attention", "sum"):
            raise ValueError(f"fusion must be 'attention' or 'sum', got {fusion!r}")
        if head not in ("vit", "avgpool"):
            raise ValueError(f"head must be 'vit' or 'avgpool', got {head!r}")
        if fusion == "sum" and not use_depth:
            raise ValueError("fusion='sum' adds the depth features: it needs use_depth=True")
        self.num_classes = num_classes
        self.use_depth, self.fusion, self.head_kind = use_depth, fusion, head
        c = BACKBONE_CHANNELS
        self.rgb_backbone = efficientnet_b2_stream()
        self.depth_backbone = efficientnet_b2_stream() if use_depth else None
        # cross-modality spatial attention (one MultiLANet per modality); absent in the sum-fusion ablation
        self.rgb_attention = MultiLANet(c, num_maps, reduction) if fusion == "attention" else None
        self.depth_attention = MultiLANet(c, num_maps, reduction) if fusion == "attention" and use_depth else None
        self.grid = _grid(img_size)
        if head == "vit":
            self.token_proj = nn.Conv2d(c, embed_dim, kernel_size=1)  # 1x1 conv to tokens
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, embed_dim))
            dpr = torch.linspace(0, drop_path_rate, vit_depth).tolist()
            self.blocks = nn.Sequential(*[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                      drop_path=dpr[i]) for i in range(vit_depth)])
            self.norm = nn.LayerNorm(embed_dim)
            self.num_features = embed_dim
        else:
            self.num_features = c
        self.drop = nn.Dropout(drop_rate)
        self.head = Mlp(self.num_features, head_hidden, num_classes, act_layer=nn.GELU, drop=drop_rate)
        self._init_fusion()

    def _init_fusion(self) -> None:
        if self.head_kind == "vit":
            trunc_normal_(self.pos_embed, std=0.02)
            trunc_normal_(self.cls_token, std=0.02)
        for m in [*(self.blocks.modules() if self.head_kind == "vit" else []), *self.head.modules()]:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ parts
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Backbones (fine-tuned, One-Cycle max 1e-4) and the fusion network (from scratch, max 1e-3), Table III."""
        backbone_ids = {id(p) for m in (self.rgb_backbone, self.depth_backbone) if m is not None
                        for p in m.parameters()}
        backbones = [p for p in self.parameters() if id(p) in backbone_ids]
        fusion = [p for p in self.parameters() if id(p) not in backbone_ids]
        return {"backbones": backbones, "fusion": fusion}

    def _depth3(self, x: torch.Tensor, depth: torch.Tensor | None) -> torch.Tensor:
        if depth is None:
            raise ValueError("rgbd_cmsa: forward needs depth=(B, 1, H, W) (or build it with use_depth=False)")
        if depth.dim() != 4 or depth.shape[1] not in (1, 3) or depth.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"rgbd_cmsa: depth must be (B, 1, H, W) matching the image {tuple(x.shape)}, "
                             f"got {tuple(depth.shape)}")
        return depth.repeat(1, 3, 1, 1) if depth.shape[1] == 1 else depth  # channel stacking (§III-B)

    def stream_features(self, x: torch.Tensor, depth: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """X_rgb, X_depth: (B, 352, H/32, W/32) each (X_depth None for the RGB-only ablation)."""
        x_rgb = self.rgb_backbone(x)[-1]
        x_depth = self.depth_backbone(self._depth3(x, depth))[-1] if self.use_depth else None
        return x_rgb, x_depth

    def attention_masks(self, x_rgb: torch.Tensor, x_depth: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """M_rgb, M_depth (B, 1, h, w) and the fused mask (their mean) that multiplies X_rgb."""
        m_rgb = self.rgb_attention(x_rgb)
        if x_depth is None:
            return {"rgb": m_rgb, "fused": m_rgb}
        m_depth = self.depth_attention(x_depth)
        return {"rgb": m_rgb, "depth": m_depth, "fused": (m_rgb + m_depth) / 2}

    def fuse(self, x_rgb: torch.Tensor, x_depth: torch.Tensor | None) -> torch.Tensor:
        if self.fusion == "sum":
            return x_rgb + x_depth  # Eq. 8 ablation
        return x_rgb * self.attention_masks(x_rgb, x_depth)["fused"]  # masks averaged, applied to RGB features

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=(h, w), old_size=(self.grid, self.grid),
                                      num_prefix_tokens=1)

    def encode(self, x_out: torch.Tensor) -> torch.Tensor:
        """Fused map (B, 352, h, w) -> feature (B, D): ViT [cls] output, or the average-pooling ablation."""
        if self.head_kind == "avgpool":
            return x_out.mean(dim=(2, 3))
        tokens = self.token_proj(x_out)  # (B, D, h, w)
        h, w = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, h*w, D)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + h*w, D)
        tokens = self.blocks(tokens + self._pos_embed(h, w))
        return self.norm(tokens[:, 0])  # [cls] -> (B, D)

    # ------------------------------------------------------------------ API
    def forward_features(self, x: torch.Tensor, depth: torch.Tensor | None = None) -> torch.Tensor:
        """Features at the exit of the fusion network (the ones the centre / island losses act on): (B, D)."""
        x_rgb, x_depth = self.stream_features(x, depth)
        return self.encode(self.fuse(x_rgb, x_depth))

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(feat))  # two Linear layers -> (B, K)

    def forward(self, x: torch.Tensor, depth: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, depth))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, depth: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """For plots: the RGB / depth / fused masks, (B, 1, h, w) each (empty for the sum-fusion ablation)."""
        if self.fusion != "attention":
            return {}
        return self.attention_masks(*self.stream_features(x, depth))


# ---------------------------------------------------------------------------------------------------------------
def checkpoint_filter_fn(state: dict[str, Any], model: RGBDCMSA) -> dict[str, torch.Tensor]:
    """ferkit checkpoints pass through; Savchenko's VGGFace2 EfficientNet-B2 (a plain timm trunk state dict) is
    copied into both streams.

    For the face model, the layers after the last inverted residual block (``conv_head``, ``bn2``, a classifier if
    any) are dropped by name, trunk keys that do not belong to the architecture are left in place (the strict load
    then names them as unexpected), and the fusion network keeps its fresh initialisation — it is trained from
    scratch — declared as such (:class:`FilteredState`), so the key report lists it under ``kept_fresh``. What
    happened is logged and kept in ``model.face_weights_report``.
    """
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if any(k.startswith("rgb_backbone.") for k in state):
        return state
    if not any(k.startswith(("conv_stem.", "blocks.")) for k in state):
        raise ValueError("rgbd_cmsa: weights are neither a ferkit rgbd_cmsa checkpoint nor an EfficientNet-B2 trunk "
                         f"(first keys: {', '.join(list(state)[:5])})")
    dropped = sorted(k for k in state if k.startswith(_UNUSED_TRUNK_PREFIXES))
    trunk = {k: v for k, v in state.items() if not k.startswith(_UNUSED_TRUNK_PREFIXES)}
    streams = ["rgb_backbone"] + (["depth_backbone"] if model.use_depth else [])
    out = {f"{s}.{k}": v for s in streams for k, v in trunk.items()}
    own = model.state_dict()
    fresh = [k for k in own if not k.startswith(tuple(f"{s}." for s in streams))]
    report = {"streams": streams, "trunk_tensors": len(trunk), "dropped_after_last_irb": dropped,
              "fusion_initialised_afresh": fresh}
    model.face_weights_report = report  # type: ignore[attr-defined]
    _logger.info("rgbd_cmsa: face trunk (%d tensors) copied into %s; dropped (after the last IRB): %s; "
                 "fusion network initialised afresh (%d tensors)", len(trunk), " and ".join(streams),
                 ", ".join(dropped) or "none", len(fresh))
    return FilteredState(out, fresh=fresh)  # the loader reports the fusion network as kept fresh


@register_model(ModelInfo(
    name="rgbd_cmsa", input_size=(3, 260, 260), interpolation="bilinear",
    paper="seed 002 §III-C (two EfficientNet-B2 streams + cross-modality LANet attention + ViT encoder)",
    gradcam_layer="rgb_backbone.blocks.6", classifier="head.fc2", modalities=("image", "depth"),
    filter_fn=checkpoint_filter_fn))
def rgbd_cmsa(num_classes: int = 7, **kwargs: Any) -> RGBDCMSA:
    return RGBDCMSA(num_classes=num_classes, **kwargs)
