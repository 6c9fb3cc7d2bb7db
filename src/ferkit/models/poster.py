"""POSTER: a pyramid cross-fusion transformer network for facial expression recognition (seed 004; Zheng, Mendieta &
Chen, ICCV 2023 workshops; official code zczcwh/POSTER, ``models/emotion_hyp.py`` + ``models/hyp_crossvit.py``).

Two streams over one face (SPEC 3.4; seed 004 §2.2, Fig. 2b):

* image stream: IR-50 (first three stages, ``models/irse.py``) on the face resized to 112 -> 256x14x14, read as 49
  tokens of 1024 by a raw ``reshape`` (as the official code does; these are not spatial patches) -> Linear -> 512;
* landmark stream: MobileFaceNet (``models/mobilefacenet.py``), frozen and held in eval mode, ``conv_6_sep`` ->
  49 tokens of 512.

Each stream gets a mean token in front (50 tokens), the image side a learned position embedding; the two are
concatenated (100 tokens) and passed through the cross-fusion transformer (§2.2.4): in every block the image tokens
are updated by attention whose queries are the landmark tokens and whose keys / values are the image tokens
(X'_img = CFMSA_img(Q_lm, K_img, V_img) + X_img), the landmark tokens symmetrically, each followed by an MLP. The
pyramid (§2.2.5) runs three copies of the stack at embedding widths 512 / 256 / 128 (Conv1d over the token axis makes
the narrower inputs) and adds the narrower outputs back by ConvTranspose1d after every level. The normed image mean
token -> SE gate -> linear classifier.

Variants (one class, argument dicts): ``poster_small`` / ``poster_base`` / ``poster`` (large) = 4 / 6 / 8 pyramid
levels with the per-block Conv1d token mixer (official RAF-DB / FERPlus model); ``poster_affectnet`` = large
without it (official ``hyp_crossvit_affect.py``).

Deviations from the official code, on purpose:
* the landmark stream stays in eval mode while the rest trains (the official code lets its BatchNorm statistics
  drift although its weights are frozen; SPEC 3.4);
* the official transformer's ``cls_token`` parameter is never used there; it is not built here and
  :func:`checkpoint_filter_fn` leaves it out by name (logged);
* no weights are read in a constructor: official checkpoints go through :func:`checkpoint_filter_fn`
  (``create_model(..., pretrained=...)``), the two backbone files through :func:`load_backbones`;
* the official pipeline feeds BGR images (``cv2.imread`` without conversion) to both streams; ferkit feeds RGB.
  To evaluate the official ``rafdb_best.pth`` as it was trained, build the model with ``bgr_input=True``.
* the position embedding starts from a truncated normal (std 0.02, timm ViT convention) instead of zeros.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from ferkit.layers import SEBlock
from .irse import IR50_CHANNELS, IR50_LAYERS, IRBackbone, load_ir50
from .mobilefacenet import MobileFaceNet, load_mobilefacenet
from .registry import KeyReport, ModelInfo, register_model

__all__ = ["Poster", "PyramidCrossFusion", "PyramidLevel", "CrossFusionBlock", "CrossFusionAttention",
           "checkpoint_filter_fn", "load_backbones", "OFFICIAL_RENAMES", "POSTER_VARIANTS", "FACE_SIZE"]

_logger = logging.getLogger(__name__)

FACE_SIZE = 112  # both streams run on the face resized to 112x112 (nearest, as the official F.interpolate)
NUM_PATCHES = 49  # 7x7 landmark map; IR-50's 14x14x256 read as 49x1024


class CrossFusionAttention(nn.Module):
    """Cross-fusion multi-head attention (CFMSA, §2.2.4): keys and values are projected from ``context`` (this
    stream), the queries are the other stream's normed tokens as they are (the official code has no query
    projection)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossFusionAttention: dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = context.shape
        h = self.num_heads
        k, v = self.kv(context).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, N, C/h)
        q = query.reshape(b, query.shape[1], h, c // h).transpose(1, 2)  # (B, h, Nq, C/h)
        # softmax(Q K^T / sqrt(d)) V (seed 004 §2.1.3), written out: the map reaches a hook on attn_drop (plots) and
        # its multiply-accumulates are counted by torch.utils.flop_counter (which skips SDPA on CPU)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))  # (B, h, Nq, N)
        x = (attn @ v).transpose(1, 2).reshape(b, query.shape[1], c)  # (B, Nq, C)
        return self.proj_drop(self.proj(x))


class CrossFusionBlock(nn.Module):
    """Cross-fusion transformer encoder (§2.2.4) on the concatenated tokens (B, 2P, C), P tokens per stream.

    X'_img = CFMSA_img(Q_lm, K_img, V_img) + X_img;   X_img_out = MLP(Norm(X'_img)) + X'_img
    X'_lm  = CFMSA_lm(Q_img, K_lm, V_lm) + X_lm;      X_lm_out  = MLP(Norm(X'_lm)) + X'_lm
    then, in the RAF-DB / FERPlus model, a Conv1d(2P, 2P, 1) mixing the tokens (``token_mixer``).
    """

    def __init__(self, dim: int, tokens_per_stream: int, num_heads: int, mlp_ratio: float = 2.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 token_mixer: bool = True):
        super().__init__()
        self.tokens_per_stream = tokens_per_stream
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn_img = CrossFusionAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp1 = Mlp(dim, hidden, drop=drop)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.attn_lm = CrossFusionAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm4 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp2 = Mlp(dim, hidden, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        n = 2 * tokens_per_stream
        self.conv = nn.Conv1d(n, n, 1) if token_mixer else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.tokens_per_stream
        x_img, x_lm = x[:, :p], x[:, p:]  # (B, P, C) each
        h = self.norm1(x)
        x_img = x_img + self.drop_path(self.attn_img(query=h[:, p:], context=h[:, :p]))
        x_img = x_img + self.drop_path(self.mlp1(self.norm2(x_img)))
        h = self.norm3(x)
        x_lm = x_lm + self.drop_path(self.attn_lm(query=h[:, :p], context=h[:, p:]))
        x_lm = x_lm + self.drop_path(self.mlp2(self.norm4(x_lm)))
        x = torch.cat((x_img, x_lm), dim=1)  # (B, 2P, C)
        return self.conv(x) if self.conv is not None else x


class PyramidLevel(nn.Module):
    """One pyramid level (official ``PyramidBlock``): a cross-fusion block at each width (large / medium / small =
    C, C/2, C/4), then the small output is added to the medium one and the medium to the large one by
    ConvTranspose1d(k=2, s=2) along the embedding axis (§2.2.5)."""

    def __init__(self, dim: int, tokens_per_stream: int, **block_kw: Any):
        super().__init__()
        self.block_l = CrossFusionBlock(dim, tokens_per_stream, **block_kw)
        self.block_m = CrossFusionBlock(dim // 2, tokens_per_stream, **block_kw)
        self.block_s = CrossFusionBlock(dim // 4, tokens_per_stream, **block_kw)
        n = 2 * tokens_per_stream
        self.upsample_m = nn.ConvTranspose1d(n, n, kernel_size=2, stride=2)
        self.upsample_s = nn.ConvTranspose1d(n, n, kernel_size=2, stride=2)

    def forward(self, x_l: torch.Tensor, x_m: torch.Tensor, x_s: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_l, x_m, x_s = self.block_l(x_l), self.block_m(x_m), self.block_s(x_s)  # (B, 2P, C), C/2, C/4
        x_m = x_m + self.upsample_s(x_s)  # C/4 -> C/2
        x_l = x_l + self.upsample_m(x_m)  # C/2 -> C
        return x_l, x_m, x_s


class PyramidCrossFusion(nn.Module):
    """Mean tokens, image position embedding, the pyramid of cross-fusion levels, final LayerNorm (official
    ``HyVisionTransformer``). (B, P, C) image and landmark tokens -> (B, C) normed image mean token."""

    def __init__(self, num_patches: int = NUM_PATCHES, embed_dim: int = 512, depth: int = 8, num_heads: int = 8,
                 mlp_ratio: float = 2.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, token_mixer: bool = True):
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"PyramidCrossFusion: embed_dim {embed_dim} must be divisible by 4 (three scales)")
        t = num_patches + 1  # tokens per stream incl. the mean token
        self.tokens_per_stream = t
        self.pos_embed = nn.Parameter(torch.zeros(1, t, embed_dim))  # image stream only
        self.pos_drop = nn.Dropout(drop_rate)
        self.downsample_m = nn.Conv1d(2 * t, 2 * t, kernel_size=2, stride=2)  # C -> C/2
        self.downsample_s = nn.Conv1d(2 * t, 2 * t, kernel_size=4, stride=4)  # C -> C/4
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, depth)
        self.blocks = nn.ModuleList([
            PyramidLevel(embed_dim, t, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                         attn_drop=attn_drop_rate, drop_path=dpr[i], token_mixer=token_mixer)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x_img: torch.Tensor, x_lm: torch.Tensor) -> torch.Tensor:
        x_img = torch.cat((x_img.mean(1, keepdim=True), x_img), dim=1)  # (B, P+1, C) mean token first
        x_img = self.pos_drop(x_img + self.pos_embed)
        x_lm = torch.cat((x_lm.mean(1, keepdim=True), x_lm), dim=1)  # (B, P+1, C)
        x_l = torch.cat((x_img, x_lm), dim=1)  # (B, 2P+2, C)
        x_m, x_s = self.downsample_m(x_l), self.downsample_s(x_l)  # (B, 2P+2, C/2), (B, 2P+2, C/4)
        for level in self.blocks:
            x_l, x_m, x_s = level(x_l, x_m, x_s)
        return self.norm(x_l)[:, 0]  # (B, C) image mean token at the large scale


class Poster(nn.Module):
    """POSTER (seed 004 Fig. 2b): IR-50 image stream + frozen MobileFaceNet landmark stream -> pyramid
    cross-fusion transformer -> SE -> linear head. Input (B, 3, H, W) at any size (resized to 112 inside)."""

    def __init__(self, num_classes: int = 7, depth: int = 8, embed_dim: int = 512, num_heads: int = 8,
                 mlp_ratio: float = 2.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, token_mixer: bool = True, ir_layers: Sequence[int] = IR50_LAYERS,
                 ir_channels: Sequence[int] = IR50_CHANNELS, ir_output_layer: bool = True, bgr_input: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = embed_dim
        self.bgr_input = bgr_input
        self.landmark_stream = MobileFaceNet(feature_dim=embed_dim)
        self.landmark_stream.requires_grad_(False)  # frozen (§2.2.2); kept in eval mode by train() below
        self.image_stream = IRBackbone(ir_layers, ir_channels, output_layer=ir_output_layer)
        # 14x14 map read as 49 tokens: 4 spatial positions x C channels per token (official view(B, 49, 1024))
        self.image_proj = nn.Linear(4 * ir_channels[-1], embed_dim)
        self.cross_fusion = PyramidCrossFusion(NUM_PATCHES, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                                               drop_rate, attn_drop_rate, drop_path_rate, token_mixer)
        self.se = SEBlock(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def train(self, mode: bool = True) -> "Poster":
        super().train(mode)
        self.landmark_stream.eval()  # frozen means frozen: no BatchNorm statistics drift either
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.bgr_input:
            x = x.flip(1)
        x = F.interpolate(x, size=FACE_SIZE)  # (B, 3, 112, 112), nearest as the official code
        b = x.shape[0]
        x_lm = self.landmark_stream.forward_features(x)  # (B, C, 7, 7)
        x_lm = x_lm.flatten(2).transpose(1, 2)  # (B, 49, C)
        x_img = self.image_stream(x)  # (B, 256, 14, 14)
        x_img = self.image_proj(x_img.reshape(b, NUM_PATCHES, -1))  # raw view (B, 49, 1024) -> (B, 49, C)
        return self.se(self.cross_fusion(x_img, x_lm))  # (B, C)

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        return self.head(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # (B, K)


# ------------------------------------------------------------------------------------------------------------------
# official key prefix -> ferkit key prefix (the official submodule names, models/emotion_hyp.py)
OFFICIAL_RENAMES: tuple[tuple[str, str], ...] = (
    ("face_landback.", "landmark_stream."),
    ("ir_back.", "image_stream."),
    ("ir_layer.", "image_proj."),
    ("pyramid_fuse.", "cross_fusion."),
    ("se_block.linear1.", "se.fc1."),
    ("se_block.linear2.", "se.fc2."),
    ("head.linear.", "head."),
)
_OFFICIAL_UNUSED = ("pyramid_fuse.cls_token",)  # defined by the official transformer, never used in its forward


def _rename(key: str, table: Sequence[tuple[str, str]]) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def checkpoint_filter_fn(state: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Official POSTER checkpoints (``rafdb_best.pth``: ``{'iter', 'model_state_dict' (keys 'module.'-prefixed),
    'optimizer_state_dict'}``) -> ferkit keys; ferkit checkpoints pass through.

    Official names are renamed by :data:`OFFICIAL_RENAMES`; the unused ``pyramid_fuse.cls_token`` is left out by
    name (logged). Every other key goes to the loader, which reports what does not fit.
    """
    for wrapper in ("model_state_dict", "state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    if not any(k.startswith(("pyramid_fuse.", "face_landback.", "ir_back.")) for k in state):
        return state  # already ferkit keys
    out = {}
    for k, v in state.items():
        if k in _OFFICIAL_UNUSED:
            _logger.info("official POSTER checkpoint: left out %s (unused by the official model)", k)
            continue
        out[_rename(k, OFFICIAL_RENAMES)] = v
    return out


def load_backbones(model: Poster, image_weights: str | Path | None = None,
                   landmark_weights: str | Path | None = None, strict: bool = True) -> dict[str, KeyReport]:
    """Initialise the two streams from their own files, as the official training starts: face.evoLVe ``ir50.pth``
    into the image stream, ``mobilefacenet_model_best.pth.tar`` (or a ``ferkit landmarks pretrain`` checkpoint)
    into the landmark stream. Returns one :class:`KeyReport` per file loaded."""
    reports = {}
    if image_weights:
        reports["image"] = load_ir50(model.image_stream, image_weights, strict=strict)
    if landmark_weights:
        reports["landmark"] = load_mobilefacenet(model.landmark_stream, landmark_weights, strict=strict)
    return reports


# ------------------------------------------------------------------------------------------------------------------
POSTER_VARIANTS: dict[str, dict[str, Any]] = {
    "small": dict(depth=4),
    "base": dict(depth=6),
    "large": dict(depth=8),
    "affectnet": dict(depth=8, token_mixer=False),  # official hyp_crossvit_affect.py: no per-block Conv1d mixer
}


def _create_poster(variant: str, num_classes: int, **kwargs: Any) -> Poster:
    return Poster(num_classes=num_classes, **{**POSTER_VARIANTS[variant], **kwargs})


def _info(name: str, **kw: Any) -> ModelInfo:
    return ModelInfo(name=name, input_size=(3, 224, 224), paper="seed 004 / POSTER (ICCV-W 2023), SPEC 3.4",
                     gradcam_layer="image_stream.body", classifier="head", filter_fn=checkpoint_filter_fn, **kw)


@register_model(_info("poster_small"))
def poster_small(num_classes: int = 7, **kwargs: Any) -> Poster:
    return _create_poster("small", num_classes, **kwargs)


@register_model(_info("poster_base"))
def poster_base(num_classes: int = 7, **kwargs: Any) -> Poster:
    return _create_poster("base", num_classes, **kwargs)


@register_model(_info("poster", paper_params_m=71.85, paper_macs_g=7.90))
def poster(num_classes: int = 7, **kwargs: Any) -> Poster:
    """POSTER large (8 levels), the RAF-DB / FERPlus model: SPEC 3.4 pins 71.85 M params, 7.90 G MACs at 224."""
    return _create_poster("large", num_classes, **kwargs)


@register_model(_info("poster_affectnet"))
def poster_affectnet(num_classes: int = 7, **kwargs: Any) -> Poster:
    return _create_poster("affectnet", num_classes, **kwargs)
