import pytest

from ferkit.config import Config, ConfigError, list_presets, load_config, parse_overrides


def test_every_preset_validates():
    names = list_presets()
    assert "resnet18_synthetic" in names and "resnet18_fer2013" in names
    for name in names:
        cfg = load_config(name, check=False)
        assert isinstance(cfg, Config)
    load_config("resnet18_synthetic")  # full check incl. dataset / model / method names


def test_overrides_are_typed_and_nested():
    cfg = load_config("resnet18_synthetic", ["optim.lr=3e-4", "data.augment.hflip=false", "train.epochs=2"])
    assert cfg.optim.lr == 3e-4 and cfg.data.augment.hflip is False and cfg.train.epochs == 2
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=0.1", "optim.lrr: unknown key"),
    ("optim.lr=-0.1", "optim.lr: must be > 0"),
    ("optim.lr=fast", "optim.lr: must be a number"),
    ("train.epochs=1.5", "train.epochs: must be an integer"),
    ("train.batch_size=0", "train.batch_size: must be > 0"),
    ("data.dataset=imagenet", "data.dataset: unknown dataset"),
    ("model.name=vgg99", "model.name: unknown model"),
    ("data.sampler=magic", "data.sampler: must be one of"),
    ("data.augment.hflip=maybe", "data.augment.hflip: must be true or false"),
    ("data.noise.rate=1.5", "data.noise.rate: must be in [0, 1)"),
    ("model.pretrained=/no/such/file.pth", "model.pretrained: weights file not found"),
    ("train.amp=fp8", "train.amp: must be one of"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("resnet18_synthetic", [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config("resnet18_synthetic", ["optim.lr"])


def test_base_inheritance_and_file_errors(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: resnet18_synthetic\nname: child\noptim: {lr: 0.01}\n")
    cfg = load_config(str(child))
    assert cfg.name == "child" and cfg.optim.lr == 0.01 and cfg.data.dataset == "synthetic"

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty config file"):
        load_config(str(empty))

    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(latin))

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\noptim: {lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        load_config(str(broken))

    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(loop))

    with pytest.raises(ConfigError, match="no such file or preset"):
        load_config("no_such_preset")
