"""DSAN (seed 001): every equation on hand-computed tensors, Table 1 / Table 7 figures, ablation switches, centres
on their own optimiser, P(a = 0) per epoch, and a short run through the engine."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from ferkit import create_model
from ferkit.analysis.profile import profile_model
from ferkit.config import load_config
from ferkit.data.build import DataSplits
from ferkit.engine import Trainer
from ferkit.engine.checkpoint import load_state
from ferkit.losses import CentreLoss, IslandLoss
from ferkit.methods import build_method
from ferkit.methods.dsan import ABLATIONS, LOSS_VARIANTS, ablation_overrides
from ferkit.models.dsan import (DSANOutput, MFFAN, SparseAttention, fuse_decisions, p_a_zero,
                                sparse_attention_params)

from tiny import TinyFaces

TRUNK = 11_176_512


def _method(model_kw=None, method_kw=None, k=7):
    model = create_model("dsan", num_classes=k, **(model_kw or {}))
    return build_method("dsan", model, **(method_kw or {}))


@pytest.mark.parametrize("layers, r, params", [(1, 1, 16_768), (2, 1, 33_536), (2, 2, 16_960), (2, 3, 11_262),
                                               (2, 4, 8_672), (2, 5, 6_859), (2, 6, 5_823)])
def test_sparse_attention_params_match_table7(layers, r, params):
    assert sparse_attention_params(128, r, layers) == params


def test_totals_match_table1():
    model = create_model("dsan", num_classes=7)
    heads = (512 * 128 + 128) + 16_960 + (128 * 7 + 7) + 4 * (128 * 128 + 128) + 4 * 129 + (128 * 7 + 7)
    assert sum(p.numel() for p in model.parameters()) == TRUNK + heads == 11_327_506
    row = profile_model("dsan")
    assert abs(row["params_diff_pct"]) < 0.5 and abs(row["macs_diff_pct"]) < 0.5
    assert row["paper_params_m"] == 11.33 and row["paper_macs_g"] == 1.82182


def _identity_bn(bn):
    bn.eval()
    bn.eps = 0.0
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)


def test_sparse_attention_eq2_by_hand():
    sa = SparseAttention(2, reduction=1, layers=2)
    with torch.no_grad():
        sa.fc1.weight.copy_(torch.eye(2))
        sa.fc1.bias.zero_()
        sa.fc2.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 2.0]]))
        sa.fc2.bias.copy_(torch.tensor([0.5, -1.0]))
    _identity_bn(sa.bn1)
    _identity_bn(sa.bn2)
    a = sa(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    # a = ReLU(W2 (W1 v + b1) + b2): [1 - 2 + .5, 4 - 1] = [-.5, 3] -> [0, 3]; [3 + 1 + .5, -2 - 1] -> [4.5, 0]
    torch.testing.assert_close(a, torch.tensor([[0.0, 3.0], [4.5, 0.0]]))
    assert float(p_a_zero(a)) == 0.5


def test_sparse_attention_trains_on_a_batch_of_one():
    sa = SparseAttention(8).train()
    assert sa(torch.randn(1, 8)).shape == (1, 8)  # the last short batch of an epoch must not fail


def test_feature_recalibration_loss_eqs3_to_6_by_hand():
    method = _method(method_kw={"lambda1": 0.01, "lambda2": 0.01}, k=3, model_kw={"hfe1_dim": 2})
    with torch.no_grad():
        method.centres.centres.copy_(torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]]))
    a = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    v = torch.tensor([[2.0, 3.0], [4.0, 1.0]])
    out = DSANOutput(logits=torch.zeros(2, 3), gfe_logits=torch.zeros(2, 3), gfe_feature=a * v, attention=a)
    terms = {k: v.item() for k, v in method.feature_recalibration_loss(out, torch.tensor([0, 1])).items()}
    assert math.isclose(terms["fr_ce"], math.log(3), rel_tol=1e-6)  # Eq. 3 with uniform logits
    # Eq. 4: i=0: 1 (2-1)^2 + 0 = 1;  i=1: .5 (2-2)^2 + 2 (2-0)^2 = 8;  (1 + 8) / (2 N) = 2.25
    assert math.isclose(terms["fr_c"], 2.25, rel_tol=1e-6)
    # Eq. 5: cos = 1/sqrt2, -1/sqrt2, 0 over the 3 pairs, each pair counted twice: 2 (3 + 0) = 6
    assert math.isclose(terms["ccs"], 6.0, rel_tol=1e-6)
    assert math.isclose(terms["fr"], math.log(3) + 0.01 * 2.25 + 0.01 * 6.0, rel_tol=1e-6)  # Eq. 6


def test_eq7_without_sa_the_loss_is_centre_and_island_loss():
    torch.manual_seed(0)
    feat, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    method = _method({"sa": False, "hfe1_dim": 4}, {"loss_variant": "island", "lambda1": 0.01, "lambda2": 0.02}, k=3)
    centre = CentreLoss(3, 4)
    island = IslandLoss(3, 4, lambda_island=2.0)  # λ2 / λ1
    centre.centres.data.copy_(method.centres.centres)
    island.centres.data.copy_(method.centres.centres)
    out = DSANOutput(logits=torch.zeros(6, 3), gfe_logits=torch.zeros(6, 3), gfe_feature=feat, attention=None)
    terms = method.feature_recalibration_loss(out, labels)
    torch.testing.assert_close(terms["fr_c"], centre(feat, labels))
    torch.testing.assert_close(terms["fr"] - terms["fr_ce"], 0.01 * island(feat, labels))


@pytest.mark.parametrize("lambda1", [0.01, 0.5])
def test_centre_step_does_not_shrink_with_lambda1(lambda1):
    """The centres' gradient from λ1 FR_C + λ2 CCS is ∂(FR_C + λ2/λ1 CCS)/∂c (Wen et al.'s update), while the
    features' gradient keeps the factor λ1."""
    torch.manual_seed(0)
    feat, labels = torch.rand(6, 4, requires_grad=True), torch.tensor([0, 1, 2, 0, 1, 2])
    method = _method({"sa": False, "hfe1_dim": 4}, {"loss_variant": "island", "lambda1": lambda1, "lambda2": 0.02}, k=3)
    out = DSANOutput(logits=torch.zeros(6, 3), gfe_logits=torch.zeros(6, 3), gfe_feature=feat, attention=None)
    terms = method.feature_recalibration_loss(out, labels)
    (terms["fr"] - terms["fr_ce"]).backward()
    c = method.centres.centres.detach().clone().requires_grad_(True)
    f = feat.detach().clone().requires_grad_(True)
    fr_c = ((f - c[labels]) ** 2).sum(1).mean() / 2
    cn = F.normalize(c, dim=1)
    ccs = ((cn @ cn.t())[~torch.eye(3, dtype=torch.bool)] + 1).sum()
    (fr_c + 0.02 / lambda1 * ccs).backward()
    torch.testing.assert_close(method.centres.centres.grad, c.grad)
    torch.testing.assert_close(feat.grad, lambda1 * f.grad)


def test_centre_warmup_ramps_the_features_gradient_only():
    """centre_warmup_epochs=2: the features feel λ1 FR_C at 0, 1/2, 1 of its gradient in epochs 0, 1, 2; the loss
    value and the centres' gradient do not change."""
    torch.manual_seed(0)
    method = _method({"sa": False, "hfe1_dim": 4}, {"loss_variant": "centre", "lambda1": 0.1,
                                                    "centre_warmup_epochs": 2}, k=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    feat0 = torch.rand(6, 4)
    grads, values, centre_grads = [], [], []
    for epoch in range(3):
        method.on_train_epoch_start(epoch)
        feat = feat0.clone().requires_grad_(True)
        method.centres.centres.grad = None
        out = DSANOutput(logits=torch.zeros(6, 3), gfe_logits=torch.zeros(6, 3), gfe_feature=feat, attention=None)
        terms = method.feature_recalibration_loss(out, labels)
        (terms["fr"] - terms["fr_ce"]).backward()
        grads.append(feat.grad)
        values.append(float(terms["fr"]))
        centre_grads.append(method.centres.centres.grad.clone())
    assert float(grads[0].abs().max()) == 0 and float(grads[2].abs().max()) > 0
    torch.testing.assert_close(grads[1], grads[2] / 2)
    assert values[0] == values[1] == values[2]
    torch.testing.assert_close(centre_grads[0], centre_grads[2])
    with pytest.raises(ValueError, match="centre_warmup_epochs"):
        _method({}, {"centre_warmup_epochs": -1})


def test_mff_an_eqs8_9_by_hand():
    mff = MFFAN(num_classes=2, in_dim=4, num_local=2)
    with torch.no_grad():
        for hfe in mff.hfe2:
            hfe.fc.weight.copy_(torch.eye(2))
            hfe.fc.bias.zero_()
        for lfa, bias in zip(mff.lfa, (0.0, math.log(3))):
            lfa.fc.weight.zero_()
            lfa.fc.bias.fill_(bias)
    feat, b, _ = mff(torch.tensor([[1.0, -2.0, 3.0, 4.0]]))
    torch.testing.assert_close(b, torch.tensor([[0.5, 0.75]]))  # sigmoid(0), sigmoid(ln 3)
    torch.testing.assert_close(feat, torch.tensor([[0.5 * 1 + 0.75 * 3, 0.5 * 0 + 0.75 * 4]]))  # Σ b_f ReLU(v_f)


def test_decision_fusion_eq11():
    p = fuse_decisions(torch.zeros(1, 2), torch.tensor([[math.log(3), 0.0]]), 0.4).softmax(1)
    torch.testing.assert_close(p, torch.tensor([[0.4 * 0.5 + 0.6 * 0.75, 0.4 * 0.5 + 0.6 * 0.25]]))
    torch.manual_seed(0)
    model = create_model("dsan", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_branches(x)
        want = 0.4 * out.gfe_logits.softmax(1) + 0.6 * out.mff_logits.softmax(1)
        torch.testing.assert_close(model(x).softmax(1), want)
        assert model.forward_features(x).shape == (2, 128 + 128)


def test_training_step_is_eq11_and_logs_p_a_zero_per_epoch():
    torch.manual_seed(0)
    method = _method(k=4).train()
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3])}
    method.on_train_epoch_start(0)
    out = method.training_step(batch, None)
    logs = out.logs
    torch.testing.assert_close(out.loss.detach(), 0.4 * logs["fr"] + 0.6 * logs["mff_ce"])
    with torch.no_grad():
        attention = method.model.forward_branches(batch["image"]).attention  # same batch statistics in train mode
    method.training_step(batch, None)
    assert method.on_train_epoch_end(0)["p_a_zero"] == pytest.approx(float(p_a_zero(attention)), abs=1e-6)


def test_loss_variant_must_match_the_model():
    with pytest.raises(ValueError, match="model.kwargs.sa=false"):
        _method(method_kw={"loss_variant": "centre"})
    with pytest.raises(ValueError, match="loss_variant"):
        _method(method_kw={"loss_variant": "nope"})
    assert _method({"sa": False}, {"loss_variant": "ce"}).centres is None  # CE needs no centres


def _build_row(row, device="cpu"):
    cfg = load_config("dsan_synthetic", ablation_overrides(row))
    with torch.device(device):  # "meta": structure only, without the cost of initialising a ResNet-18
        model = create_model("dsan", num_classes=4, **cfg.model.kwargs)
        return build_method("dsan", model, **cfg.method.kwargs)


@pytest.mark.parametrize("row", list(ABLATIONS))
def test_every_ablation_row_builds(row):
    method = _build_row(row, "meta")
    assert method.model.gfe_an is not None or method.model.mff_an is not None


@pytest.mark.parametrize("row", ["table5.island", "table6.row1", "table6.row4", "table6.row7", "table7.layers1_r1",
                                 "fig6.lambda2_0", "fig8.F1", "fig9.alpha0.0", "fig9.alpha0.7"])
def test_ablation_rows_train(row):
    torch.manual_seed(0)
    method = _build_row(row).train()
    out = method.training_step({"image": torch.randn(3, 3, 32, 32), "label": torch.tensor([0, 1, 3])}, None)
    assert torch.isfinite(out.loss) and out.logits.shape == (3, 4)
    out.loss.backward()
    assert all(p.grad is not None for p in method.model.parameters())  # every switched-on block is trained


def test_ablation_rows_have_the_tables_structure():
    baseline = _build_row("table6.row1", "meta").model  # max-pooled ResNet-18 + Linear(512, K)
    assert baseline.mff_an is None and baseline.gfe_an.hfe1 is None and baseline.gfe_an.sa is None
    assert sum(p.numel() for p in baseline.parameters()) == TRUNK + 512 * 4 + 4
    assert _build_row("fig9.alpha0.0", "meta").model.gfe_an is None  # α = 0: MFF-AN alone
    assert _build_row("fig9.alpha1.0", "meta").model.mff_an is None
    f8 = _build_row("fig8.F8", "meta").model
    assert f8.mff_an.dim == 64 and f8.gfe_an.dim == 64 and len(f8.mff_an.hfe2) == 8  # d = C / F
    gfe = _build_row("table7.layers2_r3", "meta").model.gfe_an
    assert sum(p.numel() for p in gfe.sa.parameters()) == 11_262
    row7 = _build_row("table6.row7", "meta").model
    assert row7.gfe_an.sa is None and row7.mff_an.lfa is not None and row7.alpha == 0.4
    for name, (sa, fr_c, ccs) in LOSS_VARIANTS.items():
        m = _build_row(f"table5.{name}", "meta")
        assert (m.model.gfe_an.sa is not None) == sa and (m.lambda1 > 0) == fr_c and (m.lambda2 > 0) == ccs


def test_trunk_file_and_class_count_change(tmp_path):
    tv = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({"state_dict": tv}, tmp_path / "resnet18_msceleb.pth")  # DAN's MS-Celeb layout
    m = create_model("dsan", num_classes=7, pretrained=tmp_path / "resnet18_msceleb.pth")
    r = m.key_report
    assert not r.unexpected and r.missing == r.kept_fresh  # both streams: missing, fresh by design, strict load passes
    assert {k.split(".")[0] for k in r.missing} == {"gfe_an", "mff_an"}
    assert not set(r.missing) & set(r.new_classifier)
    assert set(m.key_report.new_classifier) == {"gfe_an.fc.weight", "gfe_an.fc.bias", "mff_an.fc.weight",
                                                "mff_an.fc.bias"}
    torch.testing.assert_close(m.features[7][1].conv2.weight, tv["layer4.1.conv2.weight"])
    torch.save(create_model("dsan", num_classes=8).state_dict(), tmp_path / "dsan8.pth")
    m7 = create_model("dsan", num_classes=7, pretrained=tmp_path / "dsan8.pth")  # AffectNet-8 -> RAF-DB
    assert m7.key_report.clean and len(m7.key_report.new_classifier) == 4


def test_two_training_steps_through_the_engine(tmp_path):
    cfg = load_config("dsan_synthetic", ["train.epochs=1", "train.batch_size=32", "data.input_size=32",
                                         "train.progress=false", "train.tensorboard=false"])
    trainer = Trainer(cfg, tmp_path / "run", splits=DataSplits(TinyFaces(64), TinyFaces(16, seed=1, split="test")))
    assert trainer.specs["centres"].overrides["lr"] == 0.5 and not trainer.specs["centres"].scheduled
    before = trainer.method.centres.centres.detach().clone()
    trainer.fit()
    assert trainer.state.global_step == 2
    assert not torch.equal(before, trainer.method.centres.centres.detach())  # centres learn by their own SGD
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= record["p_a_zero"] <= 1.0 and "train_fr_c" in record and "train_mff_ce" in record
    state = load_state(tmp_path / "run" / "checkpoints" / "state.pt")
    assert "centres.centres" in state["method"] and "centres" in state["optimizers"]
