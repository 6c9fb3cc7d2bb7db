"""D3FER: dual channel (weak / strong views) and dual branch (Query / Key) robust training (seed 000, SPEC 3.5).

Paper: "D3FER: Dual Channel and Dual Branch Network for Robust Facial Expression Recognition under Dual Challenges".
Only its supplementary material is public (Algorithm 1, implementation details); the main paper's equations are not,
so SPEC 3.5 is the specification implemented here. Comments cite Algorithm 1's line numbers ("Alg. 1 l. 15") and the
equation numbers Algorithm 1 refers to where the step is clear from it.

Pipeline per mini-batch (Alg. 1): the Query branch (classifier f∘g being trained + projection head) predicts
p^{W,Q}, p^{S,Q} on the weak and strong views; the Key branch (a momentum copy, no gradients) gives the L2-normalised
projection h^{S,K} of the strong view; the batch is pushed into a FIFO memory queue (l. 5–9). During warm-up the loss
is CE on both views and the Key branch is a hard copy of the Query (l. 10–13). After warm-up, samples are filtered
against per-class dynamic thresholds (mean historical confidence in the queue), non-clean confident samples have their
label corrected, and the loss is CE (clean, both views) + λ_c CE (corrected) + λ_k symmetric KL (weak vs strong, all
samples) + λ_s supervised contrastive (Query strong projections vs queue keys) (l. 15–17); the Key branch follows by
momentum (l. 18) and is the model used at inference (l. 20–23).

Choices where SPEC 3.5 is silent (ferkit's reading):
- Sample confidence p̄ = (p^{W,Q} + p^{S,Q}) / 2 for the batch *and* for queue entries; thresholds are computed after
  the batch is pushed (Alg. 1 pushes at l. 8 before filtering at l. 15), so the queue includes the current batch.
- Filtering and correction are applied to queue entries too (Alg. 1 l. 15: "on D_min and queue"): contrastive
  positives are queue entries whose *corrected* label equals the anchor's; entries left out by the filter are left out
  of the contrast set. Anchors are the batch samples with a trusted (clean or corrected) label.
- A class with no entry in the queue uses the class-agnostic historical confidence (mean over the queue of the
  confidence on the given label) as its threshold.
- CE terms are summed over the selected samples and divided by the mini-batch size, as Alg. 1 l. 11 normalises by
  |D_min|; symmetric KL = KL(p^W || p^S) + KL(p^S || p^W), batch mean; SupCon = Khosla et al. 2020 L^sup_out.
- The queue is a ring buffer of ``queue_batches`` x (first batch size) x (world size) samples ("the last L batches").
- The Key branch stays in eval mode (running BN statistics, no dropout); its floating buffers (BN running statistics)
  follow the same momentum rule as its parameters (timm ModelEmaV2 practice), integer buffers are copied.
- Under DDP every rank pushes the gathered global batch (MoCo's concat_all_gather) and adds the all-reduced filtering
  counts, so queues and counters are identical on every rank (DDP's buffer broadcast and rank 0's checkpoint keep
  them right). In warm-up the projection head receives no gradient: run DDP with
  ``method.kwargs.find_unused_parameters=true``.
- Image-only: RGB-D models are not supported (the strong view has no paired depth).

Beyond SPEC 3.5 (off by default, on in the from-scratch presets): ``lambda_prior`` adds λ_p KL(π || mean batch
prediction), π the given-label histogram of the queue (Tanaka et al. 2018; DivideMix and FreeMatch carry the same
guard). Every post-warm-up term is self-referential: the clean set, the corrected labels, the weak / strong agreement
and the contrast set all come from the Query branch's own predictions. From a randomly initialised trunk the warm-up
ends with a weak Query branch (measured on FER2013, 2,000 images, 40 % noise: 23 % train agreement), and each of
correction alone, or SKL + SupCon alone, drove the branch onto the majority class within one epoch; the prior term
stops that collapse. It does not make the filter informative: that takes a Query branch that ranks clean samples
above noisy ones (README's label-noise row; ``bench/d3fer_filter_probe.py`` measures it on any trained run).

Models: any registered classifier with ``num_classes`` and ``forward_features(x) -> (B, D)``. Logits and features
come from one pass through ``forward_head(feat)`` (ResNet-18) or ``forward_branches(x)`` (DSAN: the fused decision of
its Eq. 11 and the concatenated stream features); any other model costs a second pass (``model(x)``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .base import Method, OptimizerSpec, StepOutput, register_method

__all__ = [
    "D3FER", "MemoryQueue", "FilterResult", "class_thresholds", "global_threshold", "filter_and_correct",
    "symmetric_kl", "supcon_queue_loss", "prior_penalty", "momentum_update", "projection_head",
]


# ------------------------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------------------------
def projection_head(in_dim: int, out_dim: int = 128, hidden_dim: int | None = None) -> nn.Sequential:
    """Linear -> ReLU -> Linear (MoCo v2 / SupCon projection head); its output is L2-normalised by the caller."""
    hidden_dim = hidden_dim or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, m: float) -> None:
    """θ_K ← m θ_K + (1 − m) θ_Q (Alg. 1 l. 18, Eqs. 5–6); ``m = 0`` is the hard copy of warm-up (Alg. 1 l. 13).

    Floating buffers (BN running statistics) follow the same rule, integer buffers (``num_batches_tracked``) are copied.
    """
    for k, q in zip(chain(key.parameters(), key.buffers()), chain(query.parameters(), query.buffers()), strict=True):
        if m == 0.0 or not k.is_floating_point():
            k.copy_(q)
        else:
            k.mul_(m).add_(q.detach(), alpha=1.0 - m)


class MemoryQueue(nn.Module):
    """FIFO memory queue Q of the last L batches (Alg. 1 l. 8–9): p^{S,Q}, p^{W,Q}, h^{S,K}, label, sample id.

    A ring buffer of registered buffers, so checkpoints hold it. ``ptr`` is the slot written next (the oldest entry
    once the queue is full); empty slots have ``ids == -1``. Allocated on the first push (its capacity depends on the
    batch size) or when a saved queue is loaded into an unallocated one.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes, self.dim = num_classes, dim
        self.register_buffer("p_strong", torch.zeros(0, num_classes))
        self.register_buffer("p_weak", torch.zeros(0, num_classes))
        self.register_buffer("keys", torch.zeros(0, dim))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def capacity(self) -> int:
        return self.ids.numel()

    def allocate(self, capacity: int) -> None:
        dev = self.ptr.device
        self.p_strong = torch.zeros(capacity, self.num_classes, device=dev)
        self.p_weak = torch.zeros(capacity, self.num_classes, device=dev)
        self.keys = torch.zeros(capacity, self.dim, device=dev)
        self.labels = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.ids = torch.full((capacity,), -1, dtype=torch.long, device=dev)
        self.ptr.zero_()

    @property
    def valid(self) -> torch.Tensor:
        return self.ids >= 0  # (Q,)

    @torch.no_grad()
    def push(self, p_strong: torch.Tensor, p_weak: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
             ids: torch.Tensor) -> None:
        """Write a batch over the oldest entries (push + pop of Alg. 1 l. 8–9)."""
        n, cap = len(ids), self.capacity
        if n > cap:  # a batch larger than the queue: only its last ``cap`` samples stay
            p_strong, p_weak, keys, labels, ids = (t[n - cap:] for t in (p_strong, p_weak, keys, labels, ids))
            n = cap
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % cap
        for buf, val in ((self.p_strong, p_strong), (self.p_weak, p_weak), (self.keys, keys), (self.labels, labels),
                         (self.ids, ids)):
            buf[slots] = val.to(buf.dtype)
        self.ptr.copy_((self.ptr + n) % cap)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = state_dict.get(prefix + "ids")
        if self.capacity == 0 and saved is not None and saved.numel() > 0:
            self.allocate(saved.numel())  # an unallocated queue takes the saved capacity (resume before any step)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# ------------------------------------------------------------------------------------------------------------------
# sample filtering and label correction (Alg. 1 l. 15, SPEC 3.5)
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class FilterResult:
    clean: torch.Tensor  # (N,) bool: p̄[y] ≥ τ_y
    corrected: torch.Tensor  # (N,) bool: not clean, max p̄ ≥ τ_glob and argmax ≠ y
    target: torch.Tensor  # (N,) long: y if clean, argmax if corrected, -1 if left out of the supervised terms

    @property
    def used(self) -> torch.Tensor:
        return self.target >= 0


def class_thresholds(conf: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class dynamic threshold τ_c = mean over queue entries labelled c of their confidence on c.

    ``conf`` (Q, K) historical confidences p̄, ``labels`` (Q,) given labels. Classes absent from the queue fall back
    to the class-agnostic historical confidence mean_j p̄_j[y_j]. Returns (K,).
    """
    own = conf.gather(1, labels[:, None]).squeeze(1)  # (Q,) confidence on the given label
    sums = torch.zeros(num_classes, dtype=conf.dtype, device=conf.device).index_add_(0, labels, own)
    counts = torch.bincount(labels, minlength=num_classes).to(conf.dtype)
    fallback = own.mean() if len(own) else conf.new_tensor(0.0)
    return torch.where(counts > 0, sums / counts.clamp_min(1), fallback)


def global_threshold(conf: torch.Tensor) -> torch.Tensor:
    """τ_glob = mean over the queue of the maximum confidence (the bar a correction must clear)."""
    return conf.max(1).values.mean() if len(conf) else conf.new_tensor(0.0)


def filter_and_correct(conf: torch.Tensor, labels: torch.Tensor, tau_class: torch.Tensor, tau_global: torch.Tensor |
                       float, *, correction: bool = True) -> FilterResult:
    """Clean if p̄[y] ≥ τ_y; a non-clean sample whose max p̄ ≥ τ_glob and argmax ≠ y takes the argmax as its label
    (label correction); the rest are left out. ``conf`` (N, K), ``labels`` (N,)."""
    own = conf.gather(1, labels[:, None]).squeeze(1)  # (N,)
    clean = own >= tau_class[labels]
    top, arg = conf.max(1)
    corrected = ~clean & (top >= tau_global) & (arg != labels) if correction else torch.zeros_like(clean)
    target = torch.where(clean, labels, torch.where(corrected, arg, torch.full_like(labels, -1)))
    return FilterResult(clean, corrected, target)


# ------------------------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------------------------
def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """KL(p_a || p_b) + KL(p_b || p_a), mean over the batch (weak / strong consistency, SPEC 3.5)."""
    log_a, log_b = logits_a.float().log_softmax(1), logits_b.float().log_softmax(1)
    kl_ab = F.kl_div(log_b, log_a, reduction="batchmean", log_target=True)  # KL(p_a || p_b)
    kl_ba = F.kl_div(log_a, log_b, reduction="batchmean", log_target=True)  # KL(p_b || p_a)
    return kl_ab + kl_ba


def supcon_queue_loss(anchors: torch.Tensor, anchor_labels: torch.Tensor, keys: torch.Tensor,
                      key_labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L^sup_out) of anchors against a bank of keys.

    ``anchors`` (B, d) and ``keys`` (Q, d) L2-normalised; positives of anchor i are the keys with its label:
    L_i = −1/|P(i)| Σ_{p∈P(i)} log(exp(z_i·k_p/τ) / Σ_{a} exp(z_i·k_a/τ)). Mean over anchors with a positive; 0 (with
    a graph) when none has one.
    """
    log_prob = (anchors.float() @ keys.float().T / temperature).log_softmax(1)  # (B, Q)
    pos = (anchor_labels[:, None] == key_labels[None, :]).float()  # (B, Q)
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        return anchors.sum() * 0.0
    per_anchor = -(pos * log_prob).sum(1)[has] / n_pos[has]
    return per_anchor.mean()


def prior_penalty(logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(π || p̄) with p̄ the batch-mean prediction: Σ_c π_c log(π_c / p̄_c) (Tanaka et al. 2018; DivideMix's and
    FreeMatch's guard against self-training collapsing onto one class). ``logits`` (B, K), ``prior`` (K,) sums to 1."""
    mean_p = logits.float().softmax(1).mean(0).clamp_min(1e-8)
    pi = prior.float().clamp_min(1e-8)
    return (pi * (pi.log() - mean_p.log())).sum()


def _ce_sum(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over ``mask`` of CE(logits_i, target_i) (targets outside the mask may be -1)."""
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), target[mask], reduction="sum")


# ------------------------------------------------------------------------------------------------------------------
# distributed helpers
# ------------------------------------------------------------------------------------------------------------------
def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_batch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor over all ranks (batch sizes may differ), so every rank pushes the same global batch."""
    world = _world_size()
    if world == 1:
        return tensors
    n = torch.tensor([len(tensors[0])], device=tensors[0].device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    n_max = int(max(s.item() for s in sizes))
    out = []
    for t in tensors:
        padded = torch.cat([t, t.new_zeros((n_max - len(t), *t.shape[1:]))]).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]))
    return tuple(out)


# ------------------------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------------------------
# per-epoch filtering counters (indices into D3FER.noise_stats)
_SEEN, _SEL, _SEL_CLEAN, _CLEAN, _CORR, _CORR_RIGHT, _NOISY, _NOISY_FIXED = range(8)


@register_method("d3fer")
class D3FER(Method):
    """D3FER training over any classifier; ``inference_model()`` is the Key branch (Alg. 1 l. 20–23).

    Ablation switches: ``filtering`` (off: every sample counts as clean), ``correction``, ``threshold``
    ("dynamic" queue thresholds or "fixed" ones), ``lambda_kl`` / ``lambda_contrast`` / ``lambda_correct`` (0 removes
    the term), ``lambda_prior`` (the collapse guard above; 0 by default), ``use_momentum`` (off: the Key branch is the
    current Query, m = 0, and inference uses the Query), ``channels`` ("single": the weak view only, no weak/strong
    consistency).
    """

    train_views = {"image": "weak", "image_strong": "strong"}

    def __init__(self, model: nn.Module, *, momentum: float = 0.999, warmup_epochs: int = 10,
                 warmup_fraction: float | None = None, queue_batches: int = 32, temperature: float = 0.1,
                 lambda_correct: float = 1.0, lambda_kl: float = 1.0, lambda_contrast: float = 1.0,
                 lambda_prior: float = 0.0, proj_dim: int = 128, proj_hidden: int | None = None,
                 filtering: bool = True, correction: bool = True,
                 threshold: Literal["dynamic", "fixed"] = "dynamic", fixed_threshold: float = 0.5,
                 fixed_correction_threshold: float = 0.9, use_momentum: bool = True,
                 channels: Literal["dual", "single"] = "dual"):
        super().__init__(model)
        if threshold not in ("dynamic", "fixed"):
            raise ValueError(f"d3fer: threshold must be 'dynamic' or 'fixed', got {threshold!r}")
        if channels not in ("dual", "single"):
            raise ValueError(f"d3fer: channels must be 'dual' or 'single', got {channels!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"d3fer: momentum must be in [0, 1), got {momentum}")
        if warmup_fraction is not None and not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"d3fer: warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if queue_batches < 1:
            raise ValueError(f"d3fer: queue_batches must be >= 1, got {queue_batches}")
        self.momentum = momentum if use_momentum else 0.0
        self.use_momentum = use_momentum
        self.warmup_epochs, self.warmup_fraction = warmup_epochs, warmup_fraction
        self.queue_batches, self.temperature = queue_batches, temperature
        self.lambda_correct, self.lambda_kl, self.lambda_contrast = lambda_correct, lambda_kl, lambda_contrast
        self.lambda_prior = lambda_prior
        self.filtering, self.correction, self.threshold = filtering, correction, threshold
        self.fixed_threshold, self.fixed_correction_threshold = fixed_threshold, fixed_correction_threshold
        self.channels = channels
        if channels == "single":
            self.train_views = {"image": "weak"}
        self.num_classes = int(model.num_classes)
        feat_dim = int(getattr(model, "num_features", 0)) or _probe_feature_dim(model)
        # Query branch = (self.model, self.projector), trained by gradients
        self.projector = projection_head(feat_dim, proj_dim, proj_hidden)
        # Key branch = momentum copy of the Query branch, no gradients (Alg. 1 l. 1: θ_K = θ_Q)
        self.key_model = copy.deepcopy(model).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.queue = MemoryQueue(self.num_classes, proj_dim)
        self.register_buffer("noise_stats", torch.zeros(8, dtype=torch.float64))  # persistent: mid-epoch resume
        self.register_buffer("noisy_mask", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.total_epochs: int | None = None
        self._warm_step = True  # whether the step just taken was a warm-up step (decides hard copy vs momentum)
        self.key_model.eval()
        self.key_projector.eval()

    # --- context and inference ------------------------------------------------------------------------------
    def set_epoch_context(self, **info: Any) -> None:
        if info.get("epochs") is not None:
            self.total_epochs = int(info["epochs"])
        if info.get("dataset_size") is not None:
            mask = torch.zeros(int(info["dataset_size"]), dtype=torch.bool, device=self.noise_stats.device)
            noisy = info.get("noisy_indices")
            if noisy is not None and len(noisy):
                mask[torch.as_tensor(noisy, dtype=torch.long, device=mask.device)] = True
            self.noisy_mask = mask

    @property
    def warmup_length(self) -> int:
        """E_warm: ``warmup_epochs``, or ``warmup_fraction`` of the run's epochs (budget-limited runs), at least 1
        and leaving at least one D3FER epoch when the run has two or more."""
        if self.warmup_fraction is None or self.total_epochs is None:
            return self.warmup_epochs
        e_warm = max(1, round(self.warmup_fraction * self.total_epochs))
        return min(e_warm, self.total_epochs - 1) if self.total_epochs >= 2 else e_warm

    def inference_model(self) -> nn.Module:
        return self.key_model if self.use_momentum else self.model

    def train(self, mode: bool = True) -> "D3FER":
        super().train(mode)
        self.key_model.eval()  # the Key branch always uses its running statistics and no dropout
        self.key_projector.eval()
        return self

    def optimizer_specs(self) -> list[OptimizerSpec]:
        params = [p for p in chain(self.model.parameters(), self.projector.parameters()) if p.requires_grad]
        return [OptimizerSpec("model", params)]

    # --- branches -------------------------------------------------------------------------------------------
    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query branch on (stacked) views: features (N, D) and logits (N, K), in one pass where the model allows."""
        if hasattr(self.model, "forward_head"):  # resnet18 and most models
            feat = self.model.forward_features(x)
            return feat, self.model.forward_head(feat)
        if hasattr(self.model, "forward_branches"):  # DSAN: fused decision + both streams' features (Eqs. 9, 11)
            out = self.model.forward_branches(x)
            feat = torch.cat([f for f in (out.gfe_feature, out.mff_feature) if f is not None], dim=1)
            return feat, out.logits
        return self.model.forward_features(x), self.model(x)  # any other classifier: two passes

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        """h^{S,K}: L2-normalised Key projection (Alg. 1 l. 7, Eq. 3). (B, d)"""
        return F.normalize(self.key_projector(self.key_model.forward_features(x)).float(), dim=1)

    # --- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], ctx) -> StepOutput:
        x_w, y, ids = batch["image"], batch["label"], batch["index"]
        b = len(y)
        dual = self.channels == "dual"
        x_s = batch["image_strong"] if dual else x_w
        # Query branch on both channels in one pass (Alg. 1 l. 5–6, Eqs. 1–2)
        feat, logits = self._query(torch.cat([x_w, x_s]) if dual else x_w)
        logits_w, logits_s = (logits[:b], logits[b:]) if dual else (logits, logits)
        feat_s = feat[b:] if dual else feat
        p_w, p_s = logits_w.detach().float().softmax(1), logits_s.detach().float().softmax(1)
        h_k = self._key(x_s)  # (B, d)
        self._push(p_s, p_w, h_k, y, ids)  # Alg. 1 l. 8–9
        self._warm_step = ctx.epoch < self.warmup_length
        if self._warm_step:  # Alg. 1 l. 10–11
            ce_w = F.cross_entropy(logits_w.float(), y)
            ce_s = F.cross_entropy(logits_s.float(), y) if dual else torch.zeros_like(ce_w)
            return StepOutput(loss=ce_w + ce_s, logits=logits_w.detach(),
                              logs={"ce_weak": ce_w.detach(), "ce_strong": ce_s.detach()})
        return self._robust_step(batch, logits_w, logits_s, feat_s, (p_s + p_w) / 2)

    def _push(self, p_s: torch.Tensor, p_w: torch.Tensor, h_k: torch.Tensor, y: torch.Tensor,
              ids: torch.Tensor) -> None:
        p_s, p_w, h_k, y, ids = _gather_batch(p_s, p_w, h_k, y, ids)
        if self.queue.capacity == 0:
            self.queue.allocate(self.queue_batches * len(ids))
        self.queue.push(p_s, p_w, h_k, y, ids)

    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(τ_c (K,), τ_glob) from the queue's historical confidences, or the fixed ablation thresholds."""
        if self.threshold == "fixed":
            dev = self.queue.ptr.device
            return (torch.full((self.num_classes,), self.fixed_threshold, device=dev),
                    torch.tensor(self.fixed_correction_threshold, device=dev))
        valid = self.queue.valid
        conf = (self.queue.p_strong[valid] + self.queue.p_weak[valid]) / 2  # (Q, K) historical p̄
        return class_thresholds(conf, self.queue.labels[valid], self.num_classes), global_threshold(conf)

    def queue_label_prior(self) -> torch.Tensor:
        """π: the given-label distribution of the queue's entries (K,)."""
        counts = torch.bincount(self.queue.labels[self.queue.valid], minlength=self.num_classes).float()
        return counts / counts.sum().clamp_min(1.0)

    def select(self, conf: torch.Tensor, labels: torch.Tensor, tau_class: torch.Tensor,
               tau_global: torch.Tensor) -> FilterResult:
        """Sample filtering + label correction (Alg. 1 l. 15, Eqs. 11–15) with the configured switches."""
        if not self.filtering:
            clean = torch.ones_like(labels, dtype=torch.bool)
            return FilterResult(clean, torch.zeros_like(clean), labels.clone())
        return filter_and_correct(conf, labels, tau_class, tau_global, correction=self.correction)

    def _robust_step(self, batch: dict[str, Any], logits_w: torch.Tensor, logits_s: torch.Tensor,
                     feat_s: torch.Tensor, conf: torch.Tensor) -> StepOutput:
        y = batch["label"]
        b = len(y)
        tau_class, tau_global = self.thresholds()
        sel = self.select(conf, y, tau_class, tau_global)
        self._count(batch, sel)
        views = (logits_w, logits_s) if self.channels == "dual" else (logits_w,)
        # Eqs. 18–21: CE on clean samples (both views) + λ_c CE on corrected samples + λ_k SKL + λ_s SupCon
        ce_clean = sum(_ce_sum(lg, sel.target, sel.clean) for lg in views) / b
        ce_corr = sum(_ce_sum(lg, sel.target, sel.corrected) for lg in views) / b
        loss = ce_clean + self.lambda_correct * ce_corr
        logs = {"ce_clean": ce_clean.detach(), "ce_corrected": ce_corr.detach(),
                "clean_frac": sel.clean.float().mean(), "corrected_frac": sel.corrected.float().mean(),
                "tau_class": tau_class.mean(), "tau_global": tau_global.float()}
        if self.lambda_kl > 0 and self.channels == "dual":
            skl = symmetric_kl(logits_w, logits_s)
            loss = loss + self.lambda_kl * skl
            logs["skl"] = skl.detach()
        if self.lambda_prior > 0:
            prior = self.queue_label_prior()
            pp = sum(prior_penalty(lg, prior) for lg in views) / len(views)
            loss = loss + self.lambda_prior * pp
            logs["prior"] = pp.detach()
        if self.lambda_contrast > 0:
            con = self._contrastive(feat_s, sel.target, tau_class, tau_global)
            loss = loss + self.lambda_contrast * con
            logs["supcon"] = con.detach()
        return StepOutput(loss=loss, logits=logits_w.detach(), logs=logs)

    def _contrastive(self, feat_s: torch.Tensor, target: torch.Tensor, tau_class: torch.Tensor,
                     tau_global: torch.Tensor) -> torch.Tensor:
        """SupCon of the Query strong projections against the queue keys h^{S,K}; queue entries are filtered and
        corrected like the batch (Alg. 1 l. 15) and positives share the (corrected) label."""
        z = F.normalize(self.projector(feat_s).float(), dim=1)  # (B, d)
        valid = self.queue.valid
        q_conf = (self.queue.p_strong[valid] + self.queue.p_weak[valid]) / 2
        q_target = self.select(q_conf, self.queue.labels[valid], tau_class, tau_global).target  # (Q,)
        keep = q_target >= 0
        anchors = target >= 0
        return supcon_queue_loss(z[anchors], target[anchors], self.queue.keys[valid][keep], q_target[keep],
                                 self.temperature)

    @torch.no_grad()
    def _count(self, batch: dict[str, Any], sel: FilterResult) -> None:
        """Accumulate filtering precision / recall (vs the recorded flipped indices) and correction accuracy."""
        y, ids = batch["label"], batch["index"]
        true = batch.get("true_label", y)
        noisy = self.noisy_mask[ids] if self.noisy_mask.numel() else (y != true)
        truly_clean = ~noisy
        right = sel.corrected & (sel.target == true)
        counts = (len(y), sel.clean.sum(), (sel.clean & truly_clean).sum(), truly_clean.sum(), sel.corrected.sum(),
                  right.sum(), noisy.sum(), (right & noisy).sum())
        batch_counts = torch.stack([torch.as_tensor(c, device=self.noise_stats.device) for c in counts]).double()
        if _world_size() > 1:  # every rank holds the global counts, so DDP's buffer broadcast and rank 0's
            dist.all_reduce(batch_counts)  # checkpoint both keep them right
        self.noise_stats += batch_counts

    def after_optimizer_step(self) -> None:
        """Key branch: hard copy during warm-up (Alg. 1 l. 13), momentum update after it (l. 18)."""
        m = 0.0 if self._warm_step else self.momentum
        momentum_update(self.key_model, self.model, m)
        momentum_update(self.key_projector, self.projector, m)

    def on_train_epoch_end(self, epoch: int) -> dict[str, float]:
        """Per-epoch filtering precision / recall and correction accuracy (SPEC 3.5), over all ranks under DDP."""
        s = self.noise_stats.tolist()
        self.noise_stats.zero_()
        if s[_SEEN] == 0:  # warm-up epoch: no filtering took place
            return {}

        def ratio(a: int, b: int) -> float:
            return s[a] / s[b] if s[b] > 0 else 0.0

        return {"filter_precision": ratio(_SEL_CLEAN, _SEL), "filter_recall": ratio(_SEL_CLEAN, _CLEAN),
                "correction_acc": ratio(_CORR_RIGHT, _CORR), "selected_frac": ratio(_SEL, _SEEN),
                "corrected_frac": ratio(_CORR, _SEEN), "noisy_fixed_frac": ratio(_NOISY_FIXED, _NOISY)}


def _probe_feature_dim(model: nn.Module) -> int:
    """Feature width D of a model that does not declare ``num_features``: one tiny eval-mode forward."""
    was = model.training
    model.eval()
    with torch.no_grad():
        d = model.forward_features(torch.zeros(1, 3, 64, 64)).shape[1]
    model.train(was)
    return int(d)
