"""DSAN — Dual Stream Attention Network (Tang, Li, Jin, The Visual Computer 2024; seed 001 §3, SPEC 3.2).

ResNet-18 trunk -> 512x7x7 -> global max pool -> v (C = 512), then two parallel streams:

* GFE-AN (global feature element-based attention network): HFE1 = Linear(C, d) + ReLU (Eq. 1, d = C/F = 128);
  sparse attention SA with the bottleneck Linear(d, d/r) -> BN -> Linear(d/r, d) -> BN -> ReLU (Eq. 2, Fig. 3a);
  the recalibrated feature a ⊗ v^h1 -> Linear(d, K). Trained with the feature-recalibration loss (Eqs. 3-6), see
  ``ferkit.methods.dsan``.
* MFF-AN (multi-feature fusion-based attention network): v split into F local features of C/F; per part
  HFE2_f = Linear(C/F, C/F) + ReLU and LFA_f = Linear(C/F, 1) + Sigmoid (Eq. 8); v^h2 = Σ_f b_f v_f^h2 (Eq. 9)
  -> Linear(C/F, K); trained with CE.
* Decision fusion (Eq. 11): p = α softmax(z_GFE) + (1 - α) softmax(z_MFF), α = 0.4. ``forward`` returns log p, so
  ``softmax(forward(x)) == p`` and every ferkit consumer (metrics, predictor, ONNX) sees the fused decision.

No official code was published. Deviations / ferkit's reading of the paper:

* BatchNorm placement in SA is the one that reproduces every parameter count of Table 7 exactly (one layer:
  Linear(d, d) -> BN(d) -> ReLU, 16,768 at d = 128; two layers: 16,960 at r = 2, 11,262 at r = 3, d/r floored).
* Switching a block off (Table 6): HFE1 off -> v^h1 = v (d = C); SA off -> a ≡ 1 (then Eq. 7: the loss reduces to
  CE / centre / island); HFE2 off -> v_f^h2 = v_f; LFA off -> b_f = 1. A stream switched off, or α = 0 / 1 (Fig. 9:
  "DSAN is reduced to MFF-AN / GFE-AN"), is not built.
* SA's BatchNorm1d cannot take batch statistics of a single sample; a training batch of one (the last, short batch
  of an epoch) is normalised with the running statistics instead of failing.
* Totals at 224: 11.33 M params (Table 1) match; MACs 1.8137 G vs 1.82182 G published (-0.44 %, torch's flop
  counter does not count pooling / BN / activations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ferkit.layers import resnet18_trunk, trunk_checkpoint_filter
from .registry import ModelInfo, register_model

__all__ = ["DSAN", "HighLevelFeatureExtractor", "SparseAttention", "LocalFeatureAttention", "GFEAN", "MFFAN",
           "DSANOutput", "fuse_decisions", "sparse_attention_params", "p_a_zero", "checkpoint_filter_fn"]

_C = 512  # ResNet-18 trunk channels


def _bn_any_batch(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm1d that falls back to running statistics for a training batch of one sample."""
    if bn.training and x.shape[0] == 1:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)


class HighLevelFeatureExtractor(nn.Module):
    """HFE: Linear + ReLU (Eq. 1; HFE1 in GFE-AN, HFE2_f in MFF-AN)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class SparseAttention(nn.Module):
    """SA block (Eq. 2, Fig. 3a): ReLU(BN(W2 BN(W1 v + b1) + b2)); the ReLU zeroes elements (sparsity, Fig. 10).

    ``layers=1``: ReLU(BN(W v + b)) with W in R^{d x d} (Table 7, first row).
    """

    def __init__(self, dim: int, reduction: int = 2, layers: int = 2):
        super().__init__()
        if layers not in (1, 2):
            raise ValueError(f"sa_layers: must be 1 or 2, got {layers!r}")
        if layers == 2 and not 1 <= reduction <= dim:
            raise ValueError(f"reduction: must be in [1, {dim}], got {reduction!r}")
        hidden = dim if layers == 1 else dim // reduction
        self.fc1 = nn.Linear(dim, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, dim) if layers == 2 else None
        self.bn2 = nn.BatchNorm1d(dim) if layers == 2 else None

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        a = _bn_any_batch(self.bn1, self.fc1(v))  # (B, d/r)
        if self.fc2 is not None:
            a = _bn_any_batch(self.bn2, self.fc2(a))  # (B, d)
        return F.relu(a)


class LocalFeatureAttention(nn.Module):
    """LFA (Eq. 8, Fig. 3b): b = sigmoid(w^T v^h2 + b), one scalar weight per local feature."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x))  # (B, 1)


class GFEAN(nn.Module):
    """GFE-AN: HFE1 -> SA -> recalibrated feature a ⊗ v^h1 -> fc (Eqs. 1-3)."""

    def __init__(self, num_classes: int, in_dim: int = _C, dim: int = 128, hfe1: bool = True, sa: bool = True,
                 reduction: int = 2, sa_layers: int = 2):
        super().__init__()
        self.dim = dim if hfe1 else in_dim
        self.hfe1 = HighLevelFeatureExtractor(in_dim, dim) if hfe1 else None
        self.sa = SparseAttention(self.dim, reduction, sa_layers) if sa else None
        self.fc = nn.Linear(self.dim, num_classes)

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """v (B, C) -> (recalibrated feature (B, d), attention a (B, d) or None when SA is off, logits (B, K))."""
        h = self.hfe1(v) if self.hfe1 is not None else v  # v^h1 (B, d)
        a = self.sa(h) if self.sa is not None else None  # a (B, d)
        feat = a * h if a is not None else h  # a ⊗ v^h1 (Eq. 3)
        return feat, a, self.fc(feat)


class MFFAN(nn.Module):
    """MFF-AN: F local features -> HFE2_f -> LFA_f weights -> weighted sum (Eqs. 8-9) -> fc."""

    def __init__(self, num_classes: int, in_dim: int = _C, num_local: int = 4, hfe2: bool = True, lfa: bool = True):
        super().__init__()
        if num_local < 1 or in_dim % num_local:
            raise ValueError(f"num_local: F must divide C = {in_dim}, got {num_local!r}")
        self.num_local = num_local
        self.dim = in_dim // num_local
        self.hfe2 = nn.ModuleList(HighLevelFeatureExtractor(self.dim, self.dim) for _ in range(num_local)) \
            if hfe2 else None
        self.lfa = nn.ModuleList(LocalFeatureAttention(self.dim) for _ in range(num_local)) if lfa else None
        self.fc = nn.Linear(self.dim, num_classes)

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """v (B, C) -> (v^h2 (B, C/F), local weights b (B, F), logits (B, K))."""
        parts = v.chunk(self.num_local, dim=1)  # F x (B, C/F)
        if self.hfe2 is not None:
            parts = tuple(hfe(p) for hfe, p in zip(self.hfe2, parts))  # v_f^h2
        local = torch.stack(parts, dim=1)  # (B, F, C/F)
        if self.lfa is not None:
            b = torch.cat([lfa(p) for lfa, p in zip(self.lfa, parts)], dim=1)  # (B, F), Eq. 8
        else:
            b = local.new_ones(local.shape[:2])
        feat = (b.unsqueeze(-1) * local).sum(1)  # Σ_f b_f v_f^h2 (Eq. 9) -> (B, C/F)
        return feat, b, self.fc(feat)


def fuse_decisions(gfe_logits: torch.Tensor, mff_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 11 decision fusion as log-probabilities: log(α softmax(z1) + (1 - α) softmax(z2)) (B, K)."""
    terms = torch.stack([F.log_softmax(gfe_logits.float(), 1) + math.log(alpha),
                         F.log_softmax(mff_logits.float(), 1) + math.log(1.0 - alpha)])
    return torch.logsumexp(terms, dim=0)


def p_a_zero(attention: torch.Tensor) -> torch.Tensor:
    """P(a_ij = 0): the share of feature elements SA removes (Fig. 10)."""
    return (attention == 0).float().mean()


@dataclass
class DSANOutput:
    """Everything a training step or an analysis needs from one forward pass."""

    logits: torch.Tensor  # (B, K) fused log-probabilities (Eq. 11)
    gfe_logits: torch.Tensor | None = None  # (B, K)
    mff_logits: torch.Tensor | None = None  # (B, K)
    gfe_feature: torch.Tensor | None = None  # a ⊗ v^h1 (B, d)
    attention: torch.Tensor | None = None  # a (B, d), None when SA is off (a ≡ 1)
    mff_feature: torch.Tensor | None = None  # v^h2 (B, C/F)
    local_weights: torch.Tensor | None = None  # b (B, F)


class DSAN(nn.Module):
    """features (ResNet-18 trunk) -> max pool -> gfe_an || mff_an -> decision fusion (Eq. 11)."""

    def __init__(self, num_classes: int = 7, in_chans: int = 3, num_local: int = 4, hfe1_dim: int | None = None,
                 reduction: int = 2, sa_layers: int = 2, alpha: float = 0.4, gfe_an: bool = True,
                 mff_an: bool = True, hfe1: bool = True, sa: bool = True, hfe2: bool = True, lfa: bool = True):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: must be in [0, 1], got {alpha!r}")
        gfe_an, mff_an = gfe_an and alpha > 0, mff_an and alpha < 1  # α = 0 / 1 reduce DSAN to one stream (Fig. 9)
        if not (gfe_an or mff_an):
            raise ValueError("gfe_an / mff_an: at least one stream must be on")
        self.num_classes = num_classes
        self.alpha = alpha if gfe_an and mff_an else float(gfe_an)  # weight of GFE-AN in Eq. 11
        self.features = resnet18_trunk(in_chans)
        self.gfe_an = GFEAN(num_classes, _C, hfe1_dim or _C // num_local, hfe1, sa, reduction, sa_layers) \
            if gfe_an else None  # d = C / F (§4.2)
        self.mff_an = MFFAN(num_classes, _C, num_local, hfe2, lfa) if mff_an else None
        self.num_features = sum(s.dim for s in (self.gfe_an, self.mff_an) if s is not None)

    def forward_branches(self, x: torch.Tensor) -> DSANOutput:
        v = torch.amax(self.features(x), dim=(2, 3))  # (B, 3, H, W) -> (B, 512, h, w) -> max pool -> (B, 512)
        gfe_feature = attention = gfe_logits = mff_feature = local_weights = mff_logits = None
        if self.gfe_an is not None:
            gfe_feature, attention, gfe_logits = self.gfe_an(v)
        if self.mff_an is not None:
            mff_feature, local_weights, mff_logits = self.mff_an(v)
        if gfe_logits is not None and mff_logits is not None:
            logits = fuse_decisions(gfe_logits, mff_logits, self.alpha)
        else:
            logits = gfe_logits if gfe_logits is not None else mff_logits
        return DSANOutput(logits, gfe_logits, mff_logits, gfe_feature, attention, mff_feature, local_weights)

    def forward_features(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """[a ⊗ v^h1, v^h2] (B, d + C/F): the features each stream classifies (Fig. 11). Image only: ``extra``
        modalities (depth) are not used."""
        out = self.forward_branches(x)
        return torch.cat([f for f in (out.gfe_feature, out.mff_feature) if f is not None], dim=1)

    def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self.forward_branches(x).logits


def sparse_attention_params(dim: int = 128, reduction: int = 2, layers: int = 2) -> int:
    """Parameters of one SA block (Table 7)."""
    return sum(p.numel() for p in SparseAttention(dim, reduction, layers).parameters())


_CLASSIFIERS = ("gfe_an.fc", "mff_an.fc")


def checkpoint_filter_fn(state: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """ferkit DSAN checkpoints pass through; a torchvision / MS-Celeb ResNet-18 file (the paper's initialisation,
    DAN's ``resnet18_msceleb.pth``) fills ``features.*`` and leaves both streams freshly initialised."""
    return trunk_checkpoint_filter(state, model, classifier=_CLASSIFIERS)


@register_model(ModelInfo(
    name="dsan", paper="seed 001 (Tang et al. 2024), Table 1", paper_params_m=11.33, paper_macs_g=1.82182,
    gradcam_layer="features.7", classifier=_CLASSIFIERS, filter_fn=checkpoint_filter_fn))
def dsan(num_classes: int = 7, **kwargs) -> DSAN:
    """DSAN with the paper's defaults: F = 4 (d = 128), SA with r = 2 in two layers, α = 0.4."""
    return DSAN(num_classes=num_classes, **kwargs)
