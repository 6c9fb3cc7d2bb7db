"""``ferkit tune``: hyper-parameter search with Optuna over a preset's ``search_space`` (seed 002 §III-E tunes batch
size, learning rates, weight decay, the loss weights and S this way), for any model and method.

    ferkit tune --config rgbd_bu3dfe_6cls --trials 30 --out runs/tune_bu3dfe [key.sub=value ...]

* The search space lives in the preset, one entry per dotted config key::

      search_space:
        optim.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
        train.accum_steps: {type: categorical, choices: [4, 8, 16]}   # effective batch 128 / 256 / 512
        model.kwargs.num_maps: {type: int, low: 1, high: 8}
        method.kwargs.loss: [ce, centre, island]                       # a bare list = categorical

  Every key is checked against the config schema before the first trial (a typo is a one-line error).
* Each trial is an ordinary run directory (``<out>/trials/trial_0007``); its objective is the best
  ``train.select_metric`` over epochs on the selection split (validation if the preset has one — set
  ``data.val_fraction`` to avoid tuning on the test split; a warning says so otherwise).
* Bad trials are pruned (median rule by default) from the per-epoch metric, reported through the trainer's epoch
  callback.
* The study lives in SQLite (``<out>/study.db``): rerunning the same command resumes it and runs until ``--trials``
  trials are finished (complete or pruned). A trial interrupted by Ctrl-C is marked failed; a trial whose process
  died stops sending heartbeats, is failed after ``--grace-period`` seconds and re-queued with the same parameters.
  Run one tuning process per study.
* The best parameters are written as a preset, ``<out>/best.yaml`` (``base:`` the tuned preset + command-line
  overrides + best parameters), loadable by ``ferkit train --config <out>/best.yaml``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import yaml

from ferkit.config import Config, ConfigError, load_config, parse_overrides

__all__ = ["parse_search_space", "suggest_params", "run_study", "write_best_preset", "register_cli"]

_logger = logging.getLogger("ferkit")

# search keys under these prefixes change the datasets themselves, so they are rebuilt for every trial
_DATA_REBUILD_KEYS = ("data.dataset", "data.root", "data.options", "data.synthetic", "data.train_split",
                      "data.test_split", "data.val_split", "data.val_fraction", "data.limit_", "data.skip_bad",
                      "data.noise")


# ---------------------------------------------------------------------------------------------------------------
# search space
# ---------------------------------------------------------------------------------------------------------------
def parse_search_space(space: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Normalise ``search_space`` entries to ``{type: float|int|categorical, ...}``; malformed entries raise a
    :class:`ConfigError` naming the key."""
    out = {}
    for key, spec in space.items():
        where = f"search_space.{key}"
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"{where}: expected {{type: float|int|categorical, ...}} or a list of choices")
        kind = spec["type"]
        if kind == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise ConfigError(f"{where}: categorical needs a non-empty 'choices' list")
            out[key] = {"type": kind, "choices": list(spec["choices"])}
            continue
        if kind not in ("float", "int"):
            raise ConfigError(f"{where}: type must be float, int or categorical, got {kind!r}")
        try:
            low, high = float(spec["low"]), float(spec["high"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: {kind} needs numeric 'low' and 'high'") from None
        log = bool(spec.get("log", False))
        if not low < high or (log and low <= 0):
            raise ConfigError(f"{where}: need low < high (and low > 0 with log), got {low}, {high}")
        entry = {"type": kind, "low": int(low) if kind == "int" else low, "high": int(high) if kind == "int" else high,
                 "log": log}
        if "step" in spec:
            entry["step"] = spec["step"]
        out[key] = entry
    return out


def suggest_params(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One draw of every search key from an Optuna trial."""
    params = {}
    for key, s in space.items():
        if s["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, s["choices"])
        elif s["type"] == "int":
            params[key] = trial.suggest_int(key, s["low"], s["high"], step=s.get("step", 1), log=s["log"])
        else:
            params[key] = trial.suggest_float(key, s["low"], s["high"], step=s.get("step"), log=s["log"])
    return params


def _nested(params: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1e-3}`` -> ``{"optim": {"lr": 1e-3}}``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _trial_config(preset: str, overrides: dict, params: dict[str, Any]) -> Config:
    return load_config(preset, _merge(overrides, _nested(params)))


def _check_space(preset: str, overrides: dict, space: dict[str, dict[str, Any]]) -> None:
    """Every key must exist in the schema and accept its range: build the config at each end of the space."""
    for key, s in space.items():
        values = s["choices"] if s["type"] == "categorical" else [s["low"], s["high"]]
        for v in values:
            try:
                _trial_config(preset, overrides, {key: v})
            except ConfigError as e:
                raise ConfigError(f"search_space.{key}={v!r}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------------------------
def _epoch_value(record: dict, split: str, metric: str) -> float:
    return -record["train_loss"] if metric == "loss" else float(record[split][metric])


def _pruning_callback(trial) -> Callable:
    import optuna

    def report(trainer, record: dict) -> None:
        split, metric = trainer.splits.select[0], trainer.cfg.train.select_metric
        trial.report(_epoch_value(record, split, metric), step=record["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {record['epoch']}")

    return report


def _make_pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r} (median, hyperband, none)")


def _open_study(out: Path, name: str, storage: str | None, seed: int, pruner: str, grace_period: int):
    import optuna
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    rdb = RDBStorage(url, heartbeat_interval=max(1, grace_period // 4), grace_period=grace_period,
                     failed_trial_callback=RetryFailedTrialCallback(max_retry=1))
    study = optuna.create_study(study_name=name, storage=rdb, load_if_exists=True, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed), pruner=_make_pruner(pruner))
    earlier = len(study.get_trials(deepcopy=False))
    if earlier:  # resumed: a sampler seeded as at the start would repeat its first (random start-up) suggestions
        study.sampler = optuna.samplers.TPESampler(seed=seed + earlier)
    return study


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_study(preset: str, overrides: list[str] | dict | None, out_dir: str | Path, n_trials: int, *,
              study_name: str | None = None, storage: str | None = None, seed: int = 0, pruner: str = "median",
              timeout: float | None = None, grace_period: int = 120, splits=None, zscore: bool = False,
              max_failures: int | None = None):
    """Run (or resume) the study until ``n_trials`` trials are finished; returns the Optuna study.

    ``splits``: prebuilt :class:`DataSplits` (tests, notebooks); otherwise built from the preset once (or per trial
    when the search space changes the data). ``zscore``: per-modality z-score statistics of the training split
    (seed 002 Eq. 1) go into every trial's config."""
    import optuna

    from ferkit.data.build import build_splits
    from ferkit.engine import Trainer, TrainingError

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fixed = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    base = load_config(preset, fixed)
    space = parse_search_space(base.search_space)
    if not space:
        raise ConfigError(f"search_space: the preset {preset!r} defines no search space")
    _check_space(preset, fixed, space)
    rebuild = any(k.startswith(_DATA_REBUILD_KEYS) for k in space)
    shared = splits if splits is not None or rebuild else build_splits(base.data, base.seed)
    if shared is not None and shared.val is None:
        _logger.warning("tune: no validation split (data.val_split / data.val_fraction): trials are selected on "
                        "the test split, which makes the tuned score optimistic")
    stats = None
    if zscore:
        from ferkit.engine.protocols import zscore_stats

        stats = zscore_stats((shared or build_splits(base.data, base.seed)).train, base)
    study = _open_study(out, study_name or base.name, storage, seed, pruner, grace_period)

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, space)
        cfg = _trial_config(preset, fixed, params)
        cfg = replace(cfg, name=f"{base.name}-trial{trial.number:04d}")
        if stats is not None:
            from ferkit.engine.protocols import with_zscore

            cfg = with_zscore(cfg, stats)
        run_dir = out / "trials" / f"trial_{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trainer = Trainer(cfg, run_dir, splits=shared, epoch_callbacks=[_pruning_callback(trial)])
        trainer.fit()
        value = trainer.state.best_metric
        if value is None or not math.isfinite(value):
            raise TrainingError(f"trial {trial.number}: no finite {cfg.train.select_metric}")
        return float(value)

    failures = {"n": 0}
    limit = max_failures if max_failures is not None else max(3, n_trials)

    def stop_when_done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        failures["n"] += trial.state == optuna.trial.TrialState.FAIL
        if _finished(study) >= n_trials or failures["n"] >= limit:
            study.stop()

    try:
        if _finished(study) < n_trials:
            _logger.info("tune: study %r has %d of %d trials finished", study.study_name, _finished(study), n_trials)
            study.optimize(objective, timeout=timeout, callbacks=[stop_when_done], catch=(TrainingError,))
    finally:  # also when interrupted: the best so far is a usable preset
        write_best_preset(study, preset, fixed, out / "best.yaml")
    return study


def write_best_preset(study, preset: str, overrides: dict, path: str | Path) -> Path | None:
    """The best trial as a preset: ``base`` + the fixed overrides + the best parameters (None if no trial is
    complete yet)."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    base_ref = preset if not Path(preset).suffix else str(Path(preset).resolve())
    base_name = load_config(preset, overrides, check=False).name
    body = _merge(overrides, _nested(best.params))
    body = {"base": base_ref, **{k: v for k, v in body.items() if k != "name"}, "name": f"{base_name}_tuned",
            "notes": f"ferkit tune: study {study.study_name!r}, best of {_finished(study)} finished trials = trial "
                     f"#{best.number} (objective {best.value:.4f}); run {best.user_attrs.get('run_dir', '?')}"}
    path = Path(path)
    path.write_text("# written by `ferkit tune`; load with: ferkit train --config " + str(path) + "\n" +
                    yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def register_cli(sub, commands) -> None:
    p = sub.add_parser("tune", help="Optuna hyper-parameter search over a preset's search_space (resumable)")
    p.add_argument("--config", "-c", required=True, help="preset name or YAML path (with a search_space)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="fixed overrides for every trial")
    p.add_argument("--trials", type=int, default=20, help="finished trials to reach (a resumed study continues)")
    p.add_argument("--out", required=True, help="study directory: study.db, trials/, best.yaml")
    p.add_argument("--study-name", default=None, help="default: the preset's name")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///<out>/study.db)")
    p.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"))
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--grace-period", type=int, default=120,
                   help="seconds without heartbeat after which a running trial counts as dead (re-queued)")
    p.add_argument("--zscore", action="store_true", help="z-score statistics of the training split (seed 002)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    commands["tune"] = _cmd_tune


def _cmd_tune(args) -> int:
    if args.trials < 1:
        raise SystemExit("ferkit: error: --trials must be >= 1")
    try:
        study = run_study(args.config, args.overrides, args.out, args.trials, study_name=args.study_name,
                          storage=args.storage, seed=args.seed, pruner=args.pruner, timeout=args.timeout,
                          grace_period=args.grace_period, zscore=args.zscore)
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume the study in {args.out}")
        return 130
    try:
        best = study.best_trial
    except ValueError:
        print("no trial completed")
        return 1
    print(f"best trial #{best.number}: {best.value:.4f} with {best.params}; preset: {Path(args.out) / 'best.yaml'}")
    return 0
