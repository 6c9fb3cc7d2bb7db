"""`ferkit tune`: search-space validation, a tiny study that is interrupted and resumed from its SQLite file, a
trial whose process died (stale heartbeat) re-queued with its parameters, pruning, and the best-params preset."""
import time

import optuna
import pytest
from optuna.trial import TrialState

from ferkit.config import ConfigError, load_config
from ferkit.data.build import DataSplits
from ferkit.tune import parse_search_space, run_study

from tiny import TinyFaces

FIXED = {"train": {"epochs": 1, "batch_size": 16, "progress": False, "tensorboard": False},
         "data": {"input_size": 16, "augment": {"hflip": False, "crop_padding": 0}},
         "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                          "optim.name": ["adam", "sgd"]}}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import ferkit.analysis.report as report

    monkeypatch.setattr(report, "write_run_report", lambda *a, **k: None)  # plots cost seconds on the CI CPU


def _splits():
    return DataSplits(TinyFaces(32, seed=0), TinyFaces(16, seed=1, split="test"))


def _states(study):
    return sorted(t.state.name for t in study.get_trials(deepcopy=False))


def test_search_space_is_validated_before_any_trial(tmp_path):
    assert parse_search_space({"a.b": [1, 2]}) == {"a.b": {"type": "categorical", "choices": [1, 2]}}
    with pytest.raises(ConfigError, match="search_space.optim.lr: need low < high"):
        parse_search_space({"optim.lr": {"type": "float", "low": 1.0, "high": 0.1}})
    with pytest.raises(ConfigError, match="search_space.optim.lr: type must be"):
        parse_search_space({"optim.lr": {"type": "loguniform", "low": 1.0, "high": 2.0}})
    bad = {**FIXED, "search_space": {"optim.learning_rate": [0.1, 0.2]}}
    with pytest.raises(ConfigError, match=r"search_space.optim.learning_rate=0.1: optim.learning_rate: unknown key"):
        run_study("resnet18_synthetic", bad, tmp_path, 2, splits=_splits())
    neg = {**FIXED, "search_space": {"optim.lr": {"type": "float", "low": -1.0, "high": 1.0}}}
    with pytest.raises(ConfigError, match=r"optim.lr=-1.0: optim.lr: must be > 0"):
        run_study("resnet18_synthetic", neg, tmp_path, 2, splits=_splits())
    assert not (tmp_path / "study.db").exists()


def test_interrupted_study_resumes_from_sqlite_to_the_requested_count(tmp_path, monkeypatch):
    from ferkit.engine import trainer as trainer_mod

    real_fit, calls = trainer_mod.Trainer.fit, []

    def fit(self):
        calls.append(self.run_dir.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second trial
        return real_fit(self)

    monkeypatch.setattr(trainer_mod.Trainer, "fit", fit)
    with pytest.raises(KeyboardInterrupt):
        run_study("resnet18_synthetic", FIXED, tmp_path, 3, splits=_splits(), pruner="none")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="resnet18_synthetic", storage=storage)
    assert _states(study) == ["COMPLETE", "FAIL"]  # the interrupted trial is recorded as failed
    assert (tmp_path / "best.yaml").is_file()  # the best so far is already a preset
    study = run_study("resnet18_synthetic", FIXED, tmp_path, 3, splits=_splits(), pruner="none")
    assert _states(study) == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    assert calls == ["trial_0000", "trial_0001", "trial_0002", "trial_0003"]
    # resuming a finished study runs nothing
    assert len(run_study("resnet18_synthetic", FIXED, tmp_path, 3, splits=_splits()).trials) == 4
    best = study.best_trial
    cfg = load_config(str(tmp_path / "best.yaml"))
    assert cfg.name == "resnet18_synthetic_tuned" and cfg.model.name == "resnet18"  # from base: the preset
    assert cfg.optim.lr == pytest.approx(best.params["optim.lr"]) and cfg.optim.name == best.params["optim.name"]
    assert cfg.train.epochs == 1 and cfg.data.input_size == 16  # the fixed overrides
    assert best.value == pytest.approx(max(t.value for t in study.trials if t.state == TrialState.COMPLETE))


def test_a_trial_whose_process_died_is_failed_and_requeued(tmp_path):
    fixed = {**FIXED, "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
    study = run_study("resnet18_synthetic", fixed, tmp_path, 1, splits=_splits(), grace_period=1)
    # a second process starts a trial, then is killed: RUNNING, heartbeat stops
    dead = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    study._storage.record_heartbeat(dead._trial_id)
    lost = dead.params["optim.lr"]
    time.sleep(2.2)
    study = run_study("resnet18_synthetic", fixed, tmp_path, 2, splits=_splits(), grace_period=1)
    trials = study.get_trials(deepcopy=False)
    assert _states(study) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert trials[dead.number].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].params["optim.lr"] == pytest.approx(lost)  # same parameters


def test_pruning_reports_every_epoch(tmp_path):
    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return len(trial.intermediate_values) >= 2  # stop after the second epoch report

    fixed = {**FIXED, "train": {**FIXED["train"], "epochs": 3}}
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    from ferkit.engine import Trainer
    from ferkit.tune import _pruning_callback

    trial = study.ask()
    cfg = load_config("resnet18_synthetic", fixed)
    trainer = Trainer(cfg, tmp_path / "run", splits=_splits(), epoch_callbacks=[_pruning_callback(trial)])
    with pytest.raises(optuna.TrialPruned, match="after epoch 2"):
        trainer.fit()
    assert sorted(study.get_trials()[0].intermediate_values) == [1, 2]
    assert trainer.state.epoch == 2  # stopped after the epoch that was pruned, its checkpoint saved


def test_a_resumed_study_draws_new_parameters(tmp_path):
    """A resumed leg must not replay the first leg's suggestions (a re-created sampler with the start seed would)."""
    run_study("resnet18_synthetic", FIXED, tmp_path, 2, splits=_splits(), pruner="none")
    study = run_study("resnet18_synthetic", FIXED, tmp_path, 4, splits=_splits(), pruner="none")
    params = [t.params for t in sorted(study.trials, key=lambda t: t.number)]
    assert len(params) == 4
    assert params[2] != params[0] and params[3] != params[1]
