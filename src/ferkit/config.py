"""Configuration: typed schema, YAML presets (``configs/``), ``key.sub=value`` overrides, validation before work.

Every error is one line naming the key: ``config error: optim.lr: must be > 0, got -0.1``.
Presets may start from another with ``base: <preset>``. The resolved config is saved with every run.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

__all__ = ["Config", "ConfigError", "load_config", "run_config", "preset_dir", "list_presets", "parse_overrides",
           "to_dict"]


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


@dataclass
class AugmentConfig:
    hflip: bool = True
    hflip_prob: float = 0.5  # RandomHorizontalFlip's probability when hflip is on
    crop_padding: int = 4  # random crop after padding (the "weak" view, SPEC 2.3); 0 = off
    scale_jitter: float = 0.0  # RandomResizedCrop min scale as 1 - jitter; 0 = off
    rotation: float = 0.0  # degrees
    color_jitter: float = 0.0  # brightness/contrast/saturation strength (RGB only)
    randaugment_ops: int = 0  # RandAugment(num_ops) (the "strong" view uses 2)
    randaugment_magnitude: int = 9
    erasing: float = 0.0  # RandomErasing probability
    erasing_scale: list[float] = field(default_factory=lambda: [0.02, 0.25])  # erased area / image area, (min, max)
    # the official POSTER / ARM "basic_aug": with this probability, one of {horizontal flip, Gaussian pixel noise},
    # equally likely, on the source image before resizing (both official codes: 0.5)
    flip_or_noise: float = 0.0
    gaussian_noise: float = 0.0  # probability of Gaussian pixel noise on its own
    noise_var: float = 30.0  # its variance on the 0-255 pixel scale (official add_gaussian_noise: var 30)


@dataclass
class NoiseConfig:
    rate: float = 0.0  # fraction of training labels flipped to another class (SPEC 2.3)
    seed: int = 0
    # or a published noisy label list read in place of the clean one (RAF-DB's EmoLabel/noise03.txt; path absolute or
    # relative to data.root); the samples whose label differs from the clean list are recorded as flipped
    file: str | None = None


@dataclass
class SyntheticDataConfig:
    num_classes: int = 7
    train_subjects: int = 40
    test_subjects: int = 12
    samples_per_subject: int = 60
    occlusion_prob: float = 0.25
    pose_max_yaw: float = 60.0
    pose_max_pitch: float = 30.0
    low_light_prob: float = 0.0
    render_size: int = 112
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    val_split: str | None = None  # a named split used to select the best checkpoint
    val_fraction: float = 0.0  # or carve a validation split from train (subject-aware where subjects are known)
    input_size: int | None = None  # H = W fed to the model; None: the model's paper size
    grayscale: bool = False  # convert to 3-channel grey (for grey datasets the images already are)
    mean: list[float] | None = None  # None: the model's normalisation
    std: list[float] | None = None
    depth_mean: float = 0.5  # depth maps in [0, 1]; RGB-D protocols set per-fold statistics of the training part
    depth_std: float = 0.25
    skip_bad: bool = False
    decode_cache: bool = False  # decode same-size image sets once into a memory map under $FERKIT_CACHE/decoded
    num_workers: int = 0
    persistent_workers: bool = False
    sampler: Literal["random", "class_balanced", "mrr"] = "random"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    options: dict[str, Any] = field(default_factory=dict)  # adapter-specific options
    limit_train: int = 0  # use only the first N training samples (smoke tests); 0 = all
    limit_test: int = 0


@dataclass
class ModelConfig:
    name: str = "resnet18"
    pretrained: str | None = None  # path of a weights file given by the user (never downloaded)
    strict: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = "supervised"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd", "sam_adam", "sam_sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    sam_rho: float = 0.05
    scheduler: Literal["none", "exponential", "step", "cosine", "onecycle"] = "exponential"
    gamma: float = 0.9  # exponential / step decay
    step_size: int = 10
    warmup_epochs: int = 0
    min_lr: float = 0.0
    max_lr: dict[str, float] = field(default_factory=dict)  # one-cycle peak LR per optimiser name


@dataclass
class EarlyStopConfig:
    patience: int = 0  # epochs without improvement of train.select_metric; 0 = off


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 256
    accum_steps: int = 1
    clip_grad: float = 0.0  # max grad norm; 0 = off
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: fp16 + GradScaler on CUDA, bf16 on native-bf16 CPUs
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = torch default
    select_metric: Literal["wa", "ua", "f1", "loss"] = "wa"
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    checkpoint_every_steps: int = 0  # also save a resumable state every N optimiser steps (0: epoch ends only)
    time_budget_min: float = 0.0  # stop after the epoch that crosses this wall-clock budget (0: none)
    nan_policy: Literal["stop", "skip"] = "stop"
    sync_bn: bool = False  # SyncBatchNorm under DDP (CUDA only)
    freeze_bn: bool = False  # BatchNorm layers use their running statistics while training (affine still learns)
    flip_tta: bool = False
    channels_last: bool = False  # NHWC memory format for conv nets (faster on recent CPUs and GPUs)
    progress: bool = True
    tensorboard: bool = True


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search_space: dict[str, Any] = field(default_factory=dict)  # for `ferkit tune`
    notes: str = ""  # where the preset's numbers come from


# ------------------------------------------------------------------------------------------------------------------
def preset_dir() -> Path:
    return Path(__file__).resolve().parent / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if key_node.value in first:
                    raise _DuplicateKey(key_node.value, first[key_node.value], line)
                first[key_node.value] = line
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    from ferkit.data.base import text_problem

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(text_problem(path) or f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    if "\x00" in text:  # valid UTF-8, but UTF-16 without a byte-order mark
        raise ConfigError(text_problem(path) or f"{path}: NUL byte in text")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.again}: duplicate key {e.key!r} (first given at line {e.first})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        raise ConfigError(f"{path}: empty config file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    cand = preset_dir() / f"{p.stem if p.suffix else name_or_path}.yaml"
    if cand.is_file():
        return cand
    raise ConfigError(f"config {name_or_path!r}: no such file or preset; presets: {', '.join(list_presets())}")


def _load_raw(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    path = _resolve_preset(name_or_path)
    if str(path) in seen:
        raise ConfigError(f"{path}: 'base' chain loops ({' -> '.join(seen)})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be a preset name")
    return _merge_preset(_load_raw(base, seen + (str(path),)), data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _merge_preset(base: dict, child: dict) -> dict:
    """A child preset over its base; a model or method that names another constructor than the base's does not
    inherit the base's ``kwargs`` (they belong to the base's constructor: d3fer takes no label_smoothing)."""
    out = _merge(base, child)
    for section in ("model", "method"):
        mine, theirs = child.get(section), base.get(section)
        if not (isinstance(mine, dict) and isinstance(theirs, dict)):
            continue
        if mine.get("name", theirs.get("name")) != theirs.get("name"):
            out[section] = {**out[section], "kwargs": dict(mine.get("kwargs") or {})}
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["optim.lr=1e-3", "data.augment.hflip=false"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set to a value and a mapping")
        node[parts[-1]] = value
    return out


# ------------------------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in get_args(tp):
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for a in args:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and ("off" if value is False else "on") in allowed:
            value = "off" if value is False else "on"  # YAML 1.1 reads a bare off / on as a boolean
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {type(value).__name__}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for k in data:
        if k not in names:
            close = [n for n in names if n.startswith(str(k)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{prefix}{k}: unknown key{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def _check_values(cfg: Config) -> None:
    def need(cond: bool, key: str, msg: str, value: Any) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}, got {value!r}")

    o, t, d = cfg.optim, cfg.train, cfg.data
    need(o.lr > 0, "optim.lr", "must be > 0", o.lr)
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    need(0 < o.gamma <= 1, "optim.gamma", "must be in (0, 1]", o.gamma)
    need(o.step_size > 0, "optim.step_size", "must be > 0", o.step_size)
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)", o.betas)
    need(o.sam_rho > 0, "optim.sam_rho", "must be > 0", o.sam_rho)
    need(t.epochs > 0, "train.epochs", "must be > 0", t.epochs)
    need(t.batch_size > 0, "train.batch_size", "must be > 0", t.batch_size)
    need(t.eval_batch_size > 0, "train.eval_batch_size", "must be > 0", t.eval_batch_size)
    need(t.accum_steps > 0, "train.accum_steps", "must be > 0", t.accum_steps)
    need(t.clip_grad >= 0, "train.clip_grad", "must be >= 0", t.clip_grad)
    need(t.time_budget_min >= 0, "train.time_budget_min", "must be >= 0", t.time_budget_min)
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
         "must be auto, cpu or cuda[:N]", t.device)
    need(0 <= d.val_fraction < 1, "data.val_fraction", "must be in [0, 1)", d.val_fraction)
    need(d.input_size is None or d.input_size >= 16, "data.input_size", "must be >= 16", d.input_size)
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0", d.num_workers)
    need(0 <= d.noise.rate < 1, "data.noise.rate", "must be in [0, 1)", d.noise.rate)
    need(not (d.noise.file and d.noise.rate > 0), "data.noise.file", "is a noisy label list; it cannot be combined "
         "with synthetic noise (data.noise.rate > 0)", d.noise.file)
    a = d.augment
    for key in ("erasing", "hflip_prob", "flip_or_noise", "gaussian_noise"):
        need(0 <= getattr(a, key) <= 1, f"data.augment.{key}", "must be a probability", getattr(a, key))
    need(len(a.erasing_scale) == 2 and 0 < a.erasing_scale[0] <= a.erasing_scale[1] < 1, "data.augment.erasing_scale",
         "must be [min, max] with 0 < min <= max < 1", a.erasing_scale)
    need(a.noise_var >= 0, "data.augment.noise_var", "must be >= 0", a.noise_var)
    need(d.synthetic.num_classes in (7, 8), "data.synthetic.num_classes", "must be 7 or 8", d.synthetic.num_classes)
    need((d.mean is None) == (d.std is None), "data.std", "mean and std must be given together", d.std)
    need(d.std is None or all(s > 0 for s in d.std), "data.std", "must be > 0", d.std)
    need(d.depth_std > 0, "data.depth_std", "must be > 0", d.depth_std)
    need(not (d.decode_cache and d.dataset == "synthetic"), "data.decode_cache",
         "is for image-file datasets (the synthetic set has a cache of its own)", d.decode_cache)

    from ferkit.data.build import known_datasets
    need(d.dataset in known_datasets(), "data.dataset", f"unknown dataset (known: {', '.join(known_datasets())})",
         d.dataset)
    from ferkit.models import list_models
    need(cfg.model.name in list_models(), "model.name", f"unknown model (known: {', '.join(list_models())})",
         cfg.model.name)
    if cfg.model.pretrained is not None:
        from ferkit.models.weights import WeightsNotFound, resolve_weights

        try:
            found = resolve_weights(cfg.model.pretrained).is_file()
        except WeightsNotFound:
            found = False
        need(found, "model.pretrained", "weights file not found (nor a ferkit: name)", cfg.model.pretrained)
    from ferkit.methods import list_methods
    need(cfg.method.name in list_methods(), "method.name", f"unknown method (known: {', '.join(list_methods())})",
         cfg.method.name)


def load_config(name_or_path: str | None = None, overrides: list[str] | dict | None = None,
                check: bool = True) -> Config:
    """Resolve preset (+ base chain) + overrides into a validated :class:`Config`."""
    raw = _load_raw(name_or_path) if name_or_path else {}
    if overrides:
        raw = _merge(raw, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    cfg = _build(Config, raw)
    if check:
        _check_values(cfg)
    return cfg


def run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config a run directory was trained with: its ``config.yaml`` without the ``_run`` block (commit, classes,
    versions), plus ``overrides``. A damaged file is a one-line :class:`ConfigError`."""
    data = _read_yaml(Path(run_dir) / "config.yaml")
    data.pop("_run", None)
    return config_from_dict(_merge(data, parse_overrides(overrides)) if overrides else data)


def config_from_dict(data: dict, check: bool = True) -> Config:
    cfg = _build(Config, data)
    if check:
        _check_values(cfg)
    return cfg
