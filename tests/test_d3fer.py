"""D3FER (seed 000, SPEC 3.5): thresholds / filtering / correction on hand-built queues, loss values against hand
computation, momentum and queue mechanics, ablation switches, a noisy Trainer run and exact resume."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from ferkit.config import load_config
from ferkit.data.build import DataSplits
from ferkit.engine import Trainer
from ferkit.engine.checkpoint import load_weights
from ferkit.methods import build_method
from ferkit.methods.d3fer import (
    D3FER, MemoryQueue, class_thresholds, filter_and_correct, global_threshold, momentum_update, prior_penalty,
    supcon_queue_loss, symmetric_kl,
)

from tiny import TinyFaces


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> mean pool -> fc: the classifier contract D3FER needs, cheap enough for unit tests."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.num_classes, self.num_features = num_classes, 8
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, num_classes)

    def forward_features(self, x):
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))

    def forward_head(self, f):
        return self.fc(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _batch(n=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 8, 8, generator=g), "image_strong": torch.randn(n, 3, 8, 8, generator=g),
            "label": torch.arange(n) % k, "index": torch.arange(n)}


def _method(**kw):
    torch.manual_seed(0)
    kw.setdefault("warmup_epochs", 1)
    kw.setdefault("queue_batches", 2)
    return D3FER(TinyNet(), proj_dim=4, **kw)


# ---------------------------------------------------------------------------------------------- filtering
# queue: p̄ and given labels (class 2 has no entry)
Q_CONF = torch.tensor([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1]])
Q_LAB = torch.tensor([0, 0, 1])


def test_thresholds_from_a_hand_built_queue():
    tau = class_thresholds(Q_CONF, Q_LAB, 3)
    # τ0 = (0.8 + 0.4) / 2, τ1 = 0.7, τ2 (no entry) = class-agnostic mean of own-label confidence (0.8+0.4+0.7)/3
    torch.testing.assert_close(tau, torch.tensor([0.6, 0.7, 1.9 / 3]))
    torch.testing.assert_close(global_threshold(Q_CONF), torch.tensor((0.8 + 0.5 + 0.7) / 3))


def test_filtering_and_correction_exact_masks():
    tau, tau_g = class_thresholds(Q_CONF, Q_LAB, 3), global_threshold(Q_CONF)
    conf = torch.tensor([[0.70, 0.20, 0.10],   # y=0: 0.70 >= 0.6 -> clean
                         [0.10, 0.80, 0.10],   # y=0: not clean, max 0.8 >= 0.667, argmax 1 -> corrected to 1
                         [0.30, 0.40, 0.30],   # y=1: not clean, max 0.4 < τ_glob -> left out
                         [0.05, 0.65, 0.30],   # y=1: not clean, argmax = y -> left out (nothing to correct)
                         [0.10, 0.25, 0.65]])  # y=2: 0.65 >= 0.633 (fallback threshold) -> clean
    y = torch.tensor([0, 0, 1, 1, 2])
    r = filter_and_correct(conf, y, tau, tau_g)
    assert r.clean.tolist() == [True, False, False, False, True]
    assert r.corrected.tolist() == [False, True, False, False, False]
    assert r.target.tolist() == [0, 1, -1, -1, 2]
    r = filter_and_correct(conf, y, tau, tau_g, correction=False)
    assert r.corrected.tolist() == [False] * 5 and r.target.tolist() == [0, -1, -1, -1, 2]


def test_threshold_and_filter_switches():
    m = _method(threshold="fixed", fixed_threshold=0.3, fixed_correction_threshold=0.75)
    m.queue.allocate(4)
    m.queue.push(Q_CONF, Q_CONF, torch.zeros(3, 4), Q_LAB, torch.arange(3))
    tau, tau_g = m.thresholds()
    assert tau.tolist() == pytest.approx([0.3] * 3) and float(tau_g) == pytest.approx(0.75)
    conf = torch.tensor([[0.2, 0.8, 0.0], [0.2, 0.7, 0.1]])
    r = m.select(conf, torch.tensor([0, 0]), tau, tau_g)
    assert r.target.tolist() == [1, -1]  # 0.8 clears the fixed correction bar, 0.7 does not
    dyn = _method()
    dyn.queue.allocate(4)
    dyn.queue.push(Q_CONF, Q_CONF, torch.zeros(3, 4), Q_LAB, torch.arange(3))
    tau, tau_g = dyn.thresholds()  # only valid (non-empty) slots count
    torch.testing.assert_close(tau, torch.tensor([0.6, 0.7, 1.9 / 3]))
    off = _method(filtering=False)
    r = off.select(conf, torch.tensor([0, 2]), tau, tau_g)
    assert r.clean.all() and not r.corrected.any() and r.target.tolist() == [0, 2]


# ---------------------------------------------------------------------------------------------- losses
def test_symmetric_kl_against_hand_computation():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert float(symmetric_kl(p.log(), q.log())) == pytest.approx(kl_pq + kl_qp, abs=1e-6)
    # batch mean: a second, identical pair (KL 0) halves it
    two = symmetric_kl(torch.cat([p, p]).log(), torch.cat([q, p]).log())
    assert float(two) == pytest.approx((kl_pq + kl_qp) / 2, abs=1e-6)


def test_supcon_against_hand_computation():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    key_labels = torch.tensor([0, 1, 0, 2])
    t = 0.5
    # anchor 0 (label 0): logits z.k/t = [2, 0, -2, 1.2]; positives keys 0 and 2
    lse0 = math.log(math.exp(2) + 1 + math.exp(-2) + math.exp(1.2))
    l0 = -((2 - lse0) + (-2 - lse0)) / 2
    # anchor 1 (label 2): logits [0, 2, 0, 1.6]; positive key 3
    lse1 = math.log(1 + math.exp(2) + 1 + math.exp(1.6))
    l1 = -(1.6 - lse1)
    got = supcon_queue_loss(anchors, torch.tensor([0, 2]), keys, key_labels, t)
    assert float(got) == pytest.approx((l0 + l1) / 2, abs=1e-5)
    # an anchor without positives is skipped, not counted as zero
    got = supcon_queue_loss(anchors, torch.tensor([0, 5]), keys, key_labels, t)
    assert float(got) == pytest.approx(l0, abs=1e-5)
    assert float(supcon_queue_loss(anchors, torch.tensor([7, 5]), keys, key_labels, t)) == 0.0


def test_prior_penalty_against_hand_computation():
    # two samples whose predictions average to [0.5, 0.5] against a prior [0.8, 0.2]
    logits = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).log().requires_grad_(True)
    prior = torch.tensor([0.8, 0.2])
    want = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    got = prior_penalty(logits, prior)
    assert float(got.detach()) == pytest.approx(want, abs=1e-6)
    got.backward()  # descending it moves the batch-mean prediction towards the prior: class 0 up in both samples
    assert (logits.grad[:, 0] < 0).all() and (logits.grad[:, 1] > 0).all()
    # zero when the batch-mean prediction is the prior, whatever the single predictions
    assert float(prior_penalty(torch.tensor([[0.6, 0.4], [1.0, 0.0]]).clamp_min(1e-9).log(), prior)) == \
        pytest.approx(0.0, abs=1e-6)


def test_prior_term_uses_the_queue_label_histogram():
    b, post = _batch(), SimpleNamespace(epoch=1)
    b["label"] = torch.tensor([0, 0, 0, 0, 1, 2])
    plain, guarded = _method(), _method(lambda_prior=0.5)
    out_plain, out = plain.training_step(b, post), guarded.training_step(b, post)
    torch.testing.assert_close(guarded.queue_label_prior(), torch.tensor([4.0, 1.0, 1.0]) / 6)
    views = torch.cat([b["image"], b["image_strong"]])
    with torch.no_grad():
        logits = guarded.model(views)
    want = (prior_penalty(logits[:6], guarded.queue_label_prior()) +
            prior_penalty(logits[6:], guarded.queue_label_prior())) / 2
    assert float(out.logs["prior"]) == pytest.approx(float(want), abs=1e-5)
    assert "prior" not in out_plain.logs  # off by default (SPEC 3.5 has no such term)
    assert float(out.loss - out_plain.loss) == pytest.approx(0.5 * float(want), abs=1e-4)


# ---------------------------------------------------------------------------------------------- mechanics
def test_momentum_update_math():
    torch.manual_seed(0)
    q, k = TinyNet(), TinyNet()
    q.bn.running_mean.fill_(2.0)
    q.bn.num_batches_tracked.fill_(7)
    k_old = {n: v.clone() for n, v in k.state_dict().items()}
    momentum_update(k, q, 0.9)
    for name, v in k.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * k_old[name] + 0.1 * q.state_dict()[name])
    assert int(k.bn.num_batches_tracked) == 7
    momentum_update(k, q, 0.0)  # warm-up hard copy: exact
    assert all(torch.equal(a, b) for a, b in zip(k.state_dict().values(), q.state_dict().values()))


def test_queue_is_a_fifo_ring_and_loads_into_an_empty_queue():
    qu = MemoryQueue(num_classes=2, dim=1)
    qu.allocate(4)

    def push(ids):
        n = len(ids)
        ids = torch.tensor(ids)
        qu.push(torch.ones(n, 2), torch.ones(n, 2) / 2, ids[:, None].float(), ids % 2, ids)

    push([0, 1, 2])
    assert qu.ids.tolist() == [0, 1, 2, -1] and int(qu.ptr) == 3 and qu.valid.tolist() == [True, True, True, False]
    push([3, 4, 5])  # 0 and 1 (the oldest) are popped
    assert qu.ids.tolist() == [4, 5, 2, 3] and int(qu.ptr) == 2
    assert qu.keys[:, 0].tolist() == [4, 5, 2, 3] and qu.labels.tolist() == [0, 1, 0, 1]
    push([6, 7, 8, 9, 10])  # larger than the queue: its last 4 stay
    assert sorted(qu.ids.tolist()) == [7, 8, 9, 10] and int(qu.ptr) == 2
    fresh = MemoryQueue(num_classes=2, dim=1)
    fresh.load_state_dict(qu.state_dict())
    assert fresh.capacity == 4 and torch.equal(fresh.ids, qu.ids) and torch.equal(fresh.keys, qu.keys)


def test_step_pushes_the_batch_and_updates_the_key_branch():
    m = _method(momentum=0.9)
    m.train()
    assert not m.key_model.training  # the Key branch stays in eval mode
    b = _batch()
    out = m.training_step(b, SimpleNamespace(epoch=0))  # warm-up: CE on both views
    assert set(out.logs) == {"ce_weak", "ce_strong"}
    assert m.queue.capacity == 12 and m.queue.ids[:6].tolist() == list(range(6))
    torch.testing.assert_close(m.queue.p_weak[:6], out.logits.softmax(1))
    out.loss.backward()
    m.after_optimizer_step()
    assert all(torch.equal(a, b) for a, b in zip(m.key_model.state_dict().values(), m.model.state_dict().values()))
    out = m.training_step(_batch(seed=1), SimpleNamespace(epoch=1))  # after warm-up
    assert {"ce_clean", "ce_corrected", "skl", "supcon", "clean_frac", "tau_class", "tau_global"} <= set(out.logs)
    assert int(m.queue.ptr) == 0 and m.queue.valid.all()
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(1.0)  # stands in for the optimiser step
    key_old = {n: v.clone() for n, v in m.key_model.state_dict().items()}
    m.after_optimizer_step()
    for name, p in m.model.named_parameters():
        torch.testing.assert_close(m.key_model.get_parameter(name), 0.9 * key_old[name] + 0.1 * p)
    assert m.inference_model() is m.key_model
    assert "key_model.fc.weight" in m.state_dict() and "queue.keys" in m.state_dict()


def test_ablation_switches_change_what_they_should():
    b, post = _batch(), SimpleNamespace(epoch=1)
    full = _method().training_step(b, post)
    assert {"skl", "supcon"} <= set(full.logs)

    m = _method(lambda_contrast=0.0)
    out = m.training_step(b, post)
    out.loss.backward()
    assert "supcon" not in out.logs and all(p.grad is None for p in m.projector.parameters())

    out = _method(lambda_kl=0.0).training_step(b, post)
    assert "skl" not in out.logs and "supcon" in out.logs

    out = _method(correction=False).training_step(b, post)
    assert float(out.logs["ce_corrected"]) == 0.0 and float(out.logs["corrected_frac"]) == 0.0

    out = _method(threshold="fixed", fixed_threshold=0.2, fixed_correction_threshold=0.8).training_step(b, post)
    assert float(out.logs["tau_class"]) == pytest.approx(0.2) and float(out.logs["tau_global"]) == pytest.approx(0.8)

    single = _method(channels="single")
    assert single.train_views == {"image": "weak"} and D3FER.train_views["image_strong"] == "strong"
    out = single.training_step({k: v for k, v in b.items() if k != "image_strong"}, post)
    assert "skl" not in out.logs
    torch.testing.assert_close(single.queue.p_weak, single.queue.p_strong)

    nomo = _method(use_momentum=False)
    assert nomo.inference_model() is nomo.model
    nomo.training_step(b, post)
    with torch.no_grad():
        for p in nomo.model.parameters():
            p.mul_(2.0)
    nomo.after_optimizer_step()  # m = 0 even after warm-up: the Key branch is the current Query
    assert all(torch.equal(a, c) for a, c in zip(nomo.key_model.parameters(), nomo.model.parameters()))


def test_filtering_statistics_against_recorded_noise():
    m = _method()
    m.set_epoch_context(num_classes=3, noisy_indices=np.array([1, 3]), dataset_size=6, epochs=2)
    # samples 0..5, flipped labels at 1 and 3; sample 1's true label is 2
    batch = {"label": torch.tensor([0, 1, 2, 0, 1, 2]), "true_label": torch.tensor([0, 2, 2, 1, 1, 2]),
             "index": torch.arange(6)}
    from ferkit.methods.d3fer import FilterResult

    clean = torch.tensor([True, False, True, True, False, False])
    corrected = torch.tensor([False, True, False, False, True, False])
    target = torch.tensor([0, 2, 2, 0, 0, -1])  # 1 corrected to its true label, 4 (clean) wrongly corrected
    m._count(batch, FilterResult(clean, corrected, target))
    stats = m.on_train_epoch_end(1)
    assert stats["filter_precision"] == pytest.approx(2 / 3)  # selected {0, 2, 3}: 3 is noisy
    assert stats["filter_recall"] == pytest.approx(2 / 4)  # truly clean {0, 2, 4, 5}
    assert stats["correction_acc"] == pytest.approx(1 / 2) and stats["noisy_fixed_frac"] == pytest.approx(1 / 2)
    assert stats["selected_frac"] == pytest.approx(3 / 6) and stats["corrected_frac"] == pytest.approx(2 / 6)
    assert m.on_train_epoch_end(2) == {}  # counters reset; an epoch without filtering reports nothing


def test_warmup_fraction_of_the_budgeted_epochs():
    m = _method(warmup_fraction=0.3)
    m.set_epoch_context(epochs=10)
    assert m.warmup_length == 3
    m.set_epoch_context(epochs=2)
    assert m.warmup_length == 1  # at least one D3FER epoch remains
    assert _method(warmup_epochs=4).warmup_length == 4


# ---------------------------------------------------------------------------------------------- engine runs
def _cfg(run_overrides=()):
    return load_config("d3fer_synthetic", [
        "train.epochs=2", "train.batch_size=8", "data.input_size=32", "train.progress=false",
        "train.tensorboard=false", "data.noise.rate=0.25", "data.noise.seed=1", "method.kwargs.warmup_fraction=null",
        "method.kwargs.warmup_epochs=1", "method.kwargs.queue_batches=2", *run_overrides])


def _splits():
    return DataSplits(TinyFaces(32, seed=0), TinyFaces(8, seed=1, split="test"))


@pytest.fixture(scope="module", autouse=True)
def _no_report():
    """report.md plots take longer than these tiny runs; the engine's own tests cover them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ferkit.analysis.report.write_run_report", lambda *a, **k: None)
        yield


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("d3fer") / "full"
    tr = Trainer(_cfg(), run, splits=_splits())
    tr.fit()
    return tr, run


def test_noisy_run_logs_filtering_precision_recall(full_run):
    tr, run = full_run
    assert isinstance(tr.method, D3FER)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "filter_precision" not in lines[0] and "train_ce_weak" in lines[0]  # warm-up epoch
    for key in ("filter_precision", "filter_recall", "correction_acc", "selected_frac", "noisy_fixed_frac"):
        assert 0.0 <= lines[1][key] <= 1.0, key
    for key in ("train_ce_clean", "train_ce_corrected", "train_skl", "train_supcon"):
        assert key in lines[1]
    flipped = json.loads((run / "noise.json").read_text())["flipped_indices"]
    assert len(flipped) == 8 and tr.method.noisy_mask.nonzero().flatten().tolist() == flipped
    # inference weights are the Key branch, loadable as a plain resnet18
    weights, meta = load_weights(run / "checkpoints" / "last.safetensors")
    assert meta["method"] == "d3fer"
    key_state = tr.method.key_model.state_dict()
    assert weights.keys() == key_state.keys() and torch.equal(weights["fc.weight"], key_state["fc.weight"])


def test_resume_restores_queue_and_key_branch_exactly(full_run, tmp_path):
    tr_full, run_full = full_run

    class Crash(RuntimeError):
        pass

    run = tmp_path / "resumed"
    cfg = _cfg(["train.checkpoint_every_steps=6"])  # 4 steps per epoch: step 6 is mid-way through epoch 2
    tr = Trainer(cfg, run, splits=_splits())
    hook = tr.method.after_optimizer_step

    def crash_at_step_7():
        if tr.state.global_step == 6:
            raise Crash
        hook()

    tr.method.after_optimizer_step = crash_at_step_7
    with pytest.raises(Crash):
        tr.fit()
    resumed = Trainer(cfg, run, resume=True, splits=_splits())
    assert resumed.state.global_step == 6 and resumed.method.queue.capacity == 16
    assert resumed.method.noise_stats[0] == 16  # the half epoch's filtering counters came back too
    resumed.fit()
    full, res = tr_full.method.state_dict(), resumed.method.state_dict()
    assert full.keys() == res.keys()
    for name in ("queue.keys", "queue.p_strong", "queue.ids", "queue.ptr", "key_model.fc.weight",
                 "key_model.features.0.weight", "key_projector.2.weight", "model.fc.weight"):
        assert torch.equal(full[name], res[name]), name
    mismatched = [n for n in full if not torch.allclose(full[n].double(), res[n].double(), rtol=0, atol=1e-6)]
    assert not mismatched
    last = [json.loads(x) for x in (run_full / "metrics.jsonl").read_text().splitlines()][-1]
    again = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    for key in ("filter_precision", "filter_recall", "correction_acc"):
        assert again[key] == last[key]


def test_query_branch_one_pass_for_dsan_and_two_passes_otherwise():
    from ferkit.models import create_model

    x = torch.randn(2, 3, 32, 32)
    dsan = D3FER(create_model("dsan", num_classes=7), proj_dim=4).eval()
    feat, logits = dsan._query(x)  # DSAN: forward_branches gives the fused decision and both streams' features
    torch.testing.assert_close(logits, dsan.model(x))
    torch.testing.assert_close(feat, dsan.model.forward_features(x))
    assert dsan.projector[0].in_features == dsan.model.num_features == 256

    class NoHead(nn.Module):  # forward_features + forward only
        def __init__(self):
            super().__init__()
            self.net, self.num_classes = TinyNet(), 3

        def forward_features(self, x):
            return self.net.forward_features(x)

        def forward(self, x):
            return self.net(x)

    plain = D3FER(NoHead(), proj_dim=4).eval()
    assert plain.projector[0].in_features == 8  # width probed with one forward
    feat, logits = plain._query(x)
    torch.testing.assert_close(logits, plain.model(x))
    torch.testing.assert_close(feat, plain.model.forward_features(x))


@pytest.mark.parametrize("preset, warmup, epochs", [
    ("d3fer_rafdb", 10, 100), ("d3fer_rafdb_noise30", 10, 100), ("d3fer_ferplus", 5, 100),
    ("d3fer_affectnet7", 1, 10), ("d3fer_fer2013", 5, 30), ("d3fer_synthetic", None, 8)])
def test_presets_hold_the_supplementary_settings(preset, warmup, epochs):
    cfg = load_config(preset, check=False)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.scheduler, cfg.optim.gamma) == ("adam", 5e-4, "exponential", 0.98)
    assert cfg.train.epochs == epochs and cfg.method.name == "d3fer"
    m = build_method("d3fer", TinyNet(), **cfg.method.kwargs)  # every kwarg is a real switch
    m.set_epoch_context(epochs=cfg.train.epochs)
    assert m.warmup_length == (warmup if warmup is not None else 2)
    assert cfg.data.augment.randaugment_ops == 0  # the baseline's train view; D3FER's strong view adds RandAugment
    if preset == "d3fer_affectnet7":
        assert cfg.data.sampler == "class_balanced"
    if preset == "d3fer_rafdb_noise30":
        assert cfg.data.noise.rate == 0.3


def test_registered_and_built_from_config():
    m = build_method("d3fer", TinyNet(), warmup_epochs=2, proj_dim=4)
    assert isinstance(m, D3FER) and m.warmup_length == 2
    with pytest.raises(ValueError, match="threshold"):
        D3FER(TinyNet(), threshold="median")
