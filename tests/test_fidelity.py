"""Fidelity to the official code (issue 17): the POSTER and ARM train transforms follow their official recipes
(flip / Gaussian noise / erasing statistics over many samples)."""
import numpy as np
import pytest
import torch
from PIL import Image

from ferkit.config import load_config
from ferkit.data.transforms import PixelNoise, build_transform


def _source() -> Image.Image:
    """100 px (RAF-DB's size): a dark left half and a bright right half, both flat."""
    a = np.full((100, 100, 3), 220, np.uint8)
    a[:, :50] = 30
    return Image.fromarray(a)


def _statistics(preset: str, n: int = 1500) -> dict[str, float]:
    cfg = load_config(preset, check=False)
    tf = build_transform("train", 64, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], cfg.data.augment)
    torch.manual_seed(0)
    flipped = noisy = both = erased = 0
    areas = []
    image = _source()
    for _ in range(n):
        x = tf({"image": image, "label": 0})["image"]
        hole = (x == 0).all(0)  # RandomErasing writes 0 after normalisation; no source pixel normalises to 0
        if hole.any():
            erased += 1
            areas.append(hole.float().mean().item())
        left, right = x[0, :, 4:28], x[0, :, 36:60]
        is_flipped = bool(left.mean() > right.mean())
        bright = left if is_flipped else right
        is_noisy = bool(bright[~hole[:, 36:60] if not is_flipped else ~hole[:, 4:28]].std() > 0.01)
        flipped += is_flipped
        noisy += is_noisy
        both += is_flipped and is_noisy
    return {"flip": flipped / n, "noise": noisy / n, "both": both / n, "erased": erased / n,
            "max_area": max(areas), "mean_area": float(np.mean(areas))}


@pytest.mark.parametrize("preset, flip, noise", [
    ("poster_rafdb", 0.50, 0.25),  # basic_aug (flip or noise, p 0.5) then RandomHorizontalFlip: net flip 1/2
    ("arm_rafdb", 0.25, 0.25),  # basic_aug only: a flip or noise, never both
])
def test_official_train_transforms_statistics(preset, flip, noise):
    s = _statistics(preset)
    assert abs(s["flip"] - flip) < 0.05 and abs(s["noise"] - noise) < 0.05, s
    if preset == "arm_rafdb":
        assert s["both"] == 0  # one of the two, as the official basic_aug
    assert abs(s["erased"] - 0.5) < 0.05, s  # RandomErasing p 0.5
    assert s["max_area"] <= 0.1 + 0.01 and 0.03 < s["mean_area"] < 0.08, s  # scale (0.02, 0.1), not (0.02, 0.25)


def test_pixel_noise_has_the_official_variance_and_leaves_depth_alone():
    from torchvision import tv_tensors

    torch.manual_seed(0)
    image = tv_tensors.Image(torch.full((3, 200, 200), 128, dtype=torch.uint8))
    depth = tv_tensors.Image(torch.rand(1, 20, 20))
    out = PixelNoise(30)({"image": image, "depth": depth})
    assert out["image"].dtype == torch.uint8 and abs(out["image"].float().var().item() - 30) < 2
    assert torch.equal(out["depth"], depth)


def test_augmentation_values_are_validated():
    from ferkit.config import ConfigError

    with pytest.raises(ConfigError, match="data.augment.erasing_scale"):
        load_config("resnet18_synthetic", ["data.augment.erasing_scale=[0.3, 0.1]"])
    with pytest.raises(ConfigError, match="data.augment.flip_or_noise"):
        load_config("resnet18_synthetic", ["data.augment.flip_or_noise=1.5"])


def test_dsan_paper_presets_split_the_optimisers_as_section_4_2():
    from ferkit.engine.optim import build_optimizer
    from ferkit.methods import build_method
    from ferkit.models import create_model

    for preset in ("dsan_rafdb", "dsan_ferplus", "dsan_affectnet7"):
        assert load_config(preset, check=False).method.kwargs["optimisation"] == "paper", preset
    cfg = load_config("dsan_rafdb", check=False)
    model = create_model("dsan", num_classes=7, **cfg.model.kwargs)
    method = build_method("dsan", model, **cfg.method.kwargs)
    specs = {s.name: s for s in method.optimizer_specs()}
    assert set(specs) == {"model", "first_branch"}
    sgd = build_optimizer(specs["first_branch"], cfg.optim)
    adam = build_optimizer(specs["model"], cfg.optim)
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adam, torch.optim.Adam)
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.9, 0.9, 1e-4)
    assert (adam.param_groups[0]["lr"], adam.param_groups[0]["weight_decay"]) == (1e-3, 1e-4)
    first = {id(p) for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in first}
    assert names == {n for n, _ in model.gfe_an.named_parameters(prefix="gfe_an") if not n.startswith("gfe_an.fc.")}
    assert id(method.centres.centres) in first  # the centres learn with the first branch (L_FR_C, L_CCS)
    everything = {id(p) for p in model.parameters()} | {id(method.centres.centres)}
    assert first | {id(p) for p in adam.param_groups[0]["params"]} == everything
    assert not first & {id(p) for p in adam.param_groups[0]["params"]}
    # ferkit's variant stays available by name: network on the config's optimiser, centres alone on SGD 0.5
    ferkit = build_method("dsan", create_model("dsan", num_classes=7), optimisation="ferkit")
    assert [s.name for s in ferkit.optimizer_specs()] == ["model", "centres"]


def test_rgbd_loss_is_eq5_as_printed_on_a_fixed_batch():
    from ferkit.methods.rgbd import RGBDIsland

    class Features(torch.nn.Module):  # forward_features = the input itself; a fixed linear head
        num_classes, num_features = 3, 2

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(2, 3)
            with torch.no_grad():
                self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
                self.head.bias.zero_()

        def forward_features(self, x, **extra):
            return x.flatten(1)

        def forward_head(self, f):
            return self.head(f)

    feat = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0], [-1.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 0])
    method = RGBDIsland(Features(), lambda_centre=0.01, lambda_island=10.0)
    method.set_epoch_context(class_counts=[2, 1, 1])
    with torch.no_grad():
        method.centres.centres.copy_(torch.tensor([[1.0, 1.0], [0.0, -1.0], [1.0, -1.0]]))
    out = method.training_step({"image": feat.view(4, 2, 1, 1), "label": labels}, None)
    # by hand: w_c = N / (K n_c) = 4 / (3 n_c); Eq. 2 divides by N; Eq. 4 sums; Eq. 6 over ordered pairs
    w = torch.tensor([4 / 6, 4 / 3, 4 / 3])
    logp = torch.log_softmax(feat @ torch.tensor([[1.0, 0, -1], [0, 1.0, -1]]), 1)
    ce = -(w[labels] * logp[torch.arange(4), labels]).sum() / 4
    c = method.centres.centres.detach()
    lc = 0.5 * ((feat - c[labels]) ** 2).sum()
    cos = torch.nn.functional.cosine_similarity(c[:, None], c[None], dim=2)
    li = (cos + 1).sum() - (cos + 1).diagonal().sum()
    torch.testing.assert_close(out.loss, ce + 0.01 * lc + 10.0 * li)
    cai = RGBDIsland(Features(), lambda_centre=0.01, lambda_island=10.0, eq5="cai")  # the other reading, by name
    assert cai.eq5 == "cai"
