"""ARM (seed 003): shapes of each block, Eqs. 1-2 by hand, batch-independent inference, the official checkpoint
format, Table 2 / Fig. 6 switches, the MRR sampler (§4.4) and a short run through the engine."""
import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from ferkit import create_model
from ferkit.config import load_config
from ferkit.data.build import DataSplits
from ferkit.data.samplers import EpochSampler, mrr_order
from ferkit.engine import Trainer
from ferkit.inference import Predictor
from ferkit.models import CheckpointMismatchError
from ferkit.models.arm import ABLATIONS, AmendRepresentation

from tiny import TinyFaces

TRUNK = 11_176_512


@pytest.fixture(scope="module")
def arm7():
    torch.manual_seed(0)
    return create_model("arm", num_classes=7)


def test_blocks_shapes_and_params(arm7):
    feat = torch.randn(2, 512, 7, 7)  # the trunk's output at 224 px
    arranged = arm7.arrangement(feat)
    assert arranged.shape == (2, 2, 112, 112)
    assert torch.equal(arranged[0, :, :16, :16].flatten(), feat[0, :, 0, 0])  # a 16x16 cluster = one position
    assert arm7.arm.de_albino.weight.shape == (1, 1, 32, 32) and arm7.arm.de_albino.bias is None
    assert arm7.arm.represent(arranged).shape == (2, 121)  # (112 - 32) / 8 + 1 = 11
    assert arm7.fc.in_features == 121
    assert sum(p.numel() for p in arm7.parameters()) == TRUNK + 32 * 32 + 2 * 2 + 1 + 121 * 7 + 7
    assert arm7.arm.alpha.item() == 1.0 and arm7.arm.alpha.requires_grad


def _identity_bn(bn):
    bn.eval()
    bn.eps = 0.0


def test_de_albino_and_sharing_affinity_eqs1_2_by_hand():
    block = AmendRepresentation(channels=2, side=4, kernel_size=2, stride=2, batch_affinity=True).eval()
    _identity_bn(block.bn)
    with torch.no_grad():
        block.de_albino.weight.fill_(1.0)  # sums each 2x2 window of each channel with the one shared kernel
        block.alpha.fill_(0.5)
    x = torch.zeros(2, 2, 4, 4)
    x[0, 0], x[0, 1] = 1.0, 2.0  # sample 0: window sums 4 and 8 -> channel mean 6; sample 1: 0
    a = block.represent(x)
    torch.testing.assert_close(a, torch.tensor([[6.0] * 4, [0.0] * 4]))
    # a_GAR = 3 (Eq. 1);  a + 0.5 a_GAR (Eq. 2)
    torch.testing.assert_close(block(x), torch.tensor([[7.5] * 4, [1.5] * 4]))


def test_eval_predictions_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = create_model("arm", num_classes=4, img_size=128)  # 4x4 trunk map -> 5x5 representation
    x = torch.randn(6, 3, 128, 128)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(x)  # tracks the running a_GAR like BatchNorm's running statistics
        assert int(model.arm.num_gar_tracked) == 3
        model.eval()
        alone = model(x[:1])
        in_batch = model(x)[:1]
        torch.testing.assert_close(alone, in_batch)
        model.arm.batch_affinity = True  # the official behaviour
        assert not torch.allclose(model(x[:1]), model(x)[:1], atol=1e-4)


def test_calibration_replaces_the_batch_mean():
    torch.manual_seed(0)
    model = create_model("arm", num_classes=4, img_size=128).eval()
    x = torch.randn(4, 3, 128, 128)
    with torch.no_grad():
        assert not torch.allclose(model(x[:1]), model(x)[:1], atol=1e-4)  # untracked: batch mean, as official
        model.calibrate_affinity([x[:2], x[2:]])
        reps = model.arm.represent(model.arrangement(model.features(x)))
        torch.testing.assert_close(model.arm.running_gar, reps.mean(0))
        torch.testing.assert_close(model(x[:1]), model(x)[:1])


class _OfficialAmend(nn.Module):
    """The official ``Amend_raf`` layout and forward (de_albino per channel, bn, channel mean + α batch mean)."""

    def __init__(self):
        super().__init__()
        self.de_albino = nn.Conv2d(1, 1, kernel_size=32, stride=8, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.alpha = nn.Parameter(torch.tensor([1.0]))

    def forward(self, x):
        x = self.bn(torch.cat([self.de_albino(x[:, i:i + 1]) for i in range(x.size(1))], 1))
        return x.mean(1, keepdim=True) + self.alpha * x.mean(dim=[0, 1])


class _OfficialARM(nn.Module):
    """``ResNet18_ARM___RAF``'s module names: features, arrangement, arm, fc."""

    def __init__(self, num_classes=7, kernel=32):
        super().__init__()
        self.features = nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-2])
        self.arrangement = nn.PixelShuffle(16)
        self.arm = _OfficialAmend()
        if kernel != 32:
            self.arm.de_albino = nn.Conv2d(1, 1, kernel_size=kernel, stride=8, padding=0, bias=False)
        self.fc = nn.Linear(121, num_classes)

    def forward(self, x):
        return self.fc(self.arm(self.arrangement(self.features(x))).flatten(1))


def _official_file(path, **kw):
    torch.manual_seed(1)
    official = _OfficialARM(**kw)
    with torch.no_grad():
        official.arm.alpha.fill_(0.7)
        official.arm.bn.running_mean.fill_(0.1)
    opt = torch.optim.Adam(official.parameters())
    torch.save({"iter": 12, "model_state_dict": official.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    return official


def test_official_checkpoint_loads_and_reproduces_the_official_forward(tmp_path):
    official = _official_file(tmp_path / "epoch12_acc0.9.pth")
    model = create_model("arm", num_classes=7, pretrained=tmp_path / "epoch12_acc0.9.pth")
    assert model.key_report.clean and model.key_report.lines() == ["all keys matched"]
    assert model.arm.alpha.item() == pytest.approx(0.7) and int(model.arm.num_gar_tracked) == 0
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        official.eval()
        model.eval()
        torch.testing.assert_close(model(x), official(x), rtol=1e-4, atol=1e-5)  # untracked: batch mean, as official


def test_official_checkpoint_mismatches_are_reported(tmp_path):
    _official_file(tmp_path / "k8.pth", num_classes=8)
    m = create_model("arm", num_classes=7, pretrained=tmp_path / "k8.pth")  # AffectNet-8 weights, 7 classes
    assert set(m.key_report.new_classifier) == {"fc.weight", "fc.bias"} and not m.key_report.shape_mismatch
    _official_file(tmp_path / "k16.pth", kernel=16)  # another de-albino kernel
    with pytest.raises(CheckpointMismatchError, match=r"arm\.de_albino\.weight"):
        create_model("arm", num_classes=7, pretrained=tmp_path / "k16.pth")
    m = create_model("arm", num_classes=7, pretrained=tmp_path / "k16.pth", strict=False)
    assert m.key_report.shape_mismatch == [("arm.de_albino.weight", (1, 1, 16, 16), (1, 1, 32, 32))]


def test_imagenet_trunk_file_leaves_arm_fresh(tmp_path):
    tv = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(tv, tmp_path / "resnet18-imagenet.pth")
    m = create_model("arm", num_classes=7, pretrained=tmp_path / "resnet18-imagenet.pth")  # strict, and it loads
    r = m.key_report
    assert not r.unexpected and r.missing == r.kept_fresh  # ARM's keys are reported missing, as fresh by design
    assert set(r.missing) == {k for k in m.state_dict() if k.startswith("arm.") and "num_batches" not in k}
    assert not r.clean and r.acceptable
    assert set(r.new_classifier) == {"fc.weight", "fc.bias"}
    torch.testing.assert_close(m.features[0].weight, tv["conv1.weight"])


@pytest.mark.parametrize("row", list(ABLATIONS))
def test_table2_and_fig6_switches(row):
    kw = ABLATIONS[row]
    model = create_model("arm", num_classes=3, **kw).train()
    feat = torch.randn(2, 512, 7, 7)  # skip the trunk: the rows differ after it
    rep = model.arm(model.arrangement(feat))
    fa, da = kw["arrangement"], kw["de_albino"]
    k = kw.get("kernel_size", 32 if fa else 3)
    want = {(True, True): 121, (True, False): 121, (False, True): 512 * (8 - k) ** 2, (False, False): 512}[(fa, da)]
    assert rep.shape == (2, want) and model.fc(rep).shape == (2, 3)
    assert (model.arm.de_albino is not None) == da and model.arm.sharing_affinity == kw["sharing_affinity"]
    if not (fa or da or kw["sharing_affinity"]):  # the first row is the GAP baseline
        torch.testing.assert_close(rep, feat.mean((2, 3)))


def test_kernel_larger_than_the_map_is_an_error():
    with pytest.raises(ValueError, match="kernel_size"):
        create_model("arm", arrangement=False, kernel_size=32)


# --- MRR (minimal random resampling, §4.4) ---------------------------------------------------------------------
def _imbalanced_labels():
    counts = [120, 9, 30, 55]  # largest / smallest > 13, like AffectNet's 35
    return np.repeat(np.arange(4), counts)[np.random.default_rng(0).permutation(sum(counts))], counts


def test_mrr_epoch_draws_the_smallest_class_size_without_repeats():
    labels, counts = _imbalanced_labels()
    for epoch in range(30):
        order = mrr_order(labels, seed=3, epoch=epoch)
        assert len(order) == len(set(order.tolist())) == 4 * min(counts)  # no image twice in an epoch
        assert np.bincount(labels[order], minlength=4).tolist() == [min(counts)] * 4
    assert not np.array_equal(np.sort(mrr_order(labels, 3, 0)), np.sort(mrr_order(labels, 3, 1)))  # fresh draws


def test_mrr_eventually_sees_every_sample_of_the_largest_class():
    labels, counts = _imbalanced_labels()
    largest = np.flatnonzero(labels == 0)
    seen: set[int] = set()
    epochs = 0
    while not set(largest.tolist()) <= seen:
        seen.update(mrr_order(labels, seed=5, epoch=epochs).tolist())
        epochs += 1
        assert epochs <= int(np.ceil(counts[0] / min(counts))) + 1, "largest class not covered in time"
    assert seen == set(range(len(labels)))  # every class, all of it


def test_mrr_sampler_is_deterministic_and_yields_epoch_index_pairs():
    labels, counts = _imbalanced_labels()
    sampler = EpochSampler(labels, "mrr", seed=2)
    sampler.set_epoch(4)
    items = list(sampler)
    assert len(sampler) == len(items) == 4 * min(counts) and {e for e, _ in items} == {4}
    assert [i for _, i in items] == mrr_order(labels, 2, 4).tolist()


# --- engine ----------------------------------------------------------------------------------------------------
def test_two_training_steps_through_the_engine(tmp_path):
    cfg = load_config("arm_synthetic", ["train.epochs=1", "train.batch_size=8", "data.input_size=32",
                                        "model.kwargs.img_size=128", "train.progress=false",
                                        "train.tensorboard=false"])
    trainer = Trainer(cfg, tmp_path / "run", splits=DataSplits(TinyFaces(16), TinyFaces(8, seed=1, split="test")))
    alpha0 = trainer.method.model.arm.alpha.item()
    trainer.fit()
    model = trainer.method.model
    assert trainer.state.global_step == 2 and int(model.arm.num_gar_tracked) == 2
    assert model.arm.alpha.item() != alpha0  # λ learns
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
    pred = Predictor.from_run(tmp_path / "run")  # the checkpoint carries the running a_GAR
    images = [TinyFaces(4).load(i)["image"] for i in range(4)]
    np.testing.assert_allclose(pred.predict_images(images[:1]), pred.predict_images(images)[:1], atol=1e-5)
