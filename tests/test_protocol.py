"""The paper's protocol in the experiments: held-out test images, checkpoint selection, and the tuner.

Runs the real pipeline on the tiny config (2-shot digits, width-4 ResNet-8, 6 steps per method) and
checks every recorded value against a recomputation: the held-out positions by class, the selected
step as the argmin of the recorded validation curve, its NLL recomputed on the restored state, and the
tuner's choices against its own journal.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import fpbma.data
from experiments import config_checks, evaluation, input_pipeline, training, tune
from experiments import pipeline as stages, workdir as layout
from fpbma import methods
from tests.experiment_utils import tiny_config


def test_stratified_holdout_takes_the_ceiling_share_of_every_class_and_is_seeded():
    src = fpbma.data.load("digits", "train")
    held = fpbma.data.stratified_holdout(src, 0.45, seed=3)
    counts = np.bincount(src.labels, minlength=10)
    np.testing.assert_array_equal(np.bincount(src.labels[held], minlength=10), np.ceil(0.45 * counts))
    assert np.all(np.diff(held) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(held, fpbma.data.stratified_holdout(src, 0.45, seed=3))
    assert not np.array_equal(held, fpbma.data.stratified_holdout(src, 0.45, seed=4))
    assert fpbma.data.stratified_holdout(src, 0.0).size == 0
    with pytest.raises(ValueError, match=r"fraction=1.0 must lie in \[0, 1\)"):
        fpbma.data.stratified_holdout(src, 1.0)


def test_held_out_train_images_join_the_test_set_and_never_the_few_shot_draws(tmp_path):
    c = tiny_config(tmp_path)
    c.data.test_from_train = 0.45
    train_src = fpbma.data.load("digits", "train")
    held = fpbma.data.stratified_holdout(train_src, 0.45, input_pipeline.HOLDOUT_SEED)
    test_src = fpbma.data.load("digits", "test")
    for seed in (0, 1):
        data = input_pipeline.target_data(c, seed)
        assert data["test_label"].shape == (len(test_src) + held.size,)  # 355 + 653 = 1,008
        np.testing.assert_array_equal(data["test_label"][len(test_src):], train_src.labels[held])
        # No few-shot image (train or validation) is one of the held-out test images.
        raw_held = {train_src.get_batch([int(i)])[0]["image"].tobytes() for i in held}
        split = fpbma.data.few_shot_split(train_src, c.data.k_shot, seed, val_per_class=c.data.k_shot, exclude=held)
        assert not set(split.train.tolist() + split.validation.tolist()) & set(held.tolist())
        assert len(raw_held) > 0
    # The share changes the training draw, so it is part of every method's digest.
    other = tiny_config(tmp_path)
    other.data.test_from_train = 0.0
    assert layout.method_hash(c, "sgd") != layout.method_hash(other, "sgd")
    c.data.test_from_train = 1.0
    with pytest.raises(config_checks.ConfigError, match=r"test_from_train=1.0 must lie in \[0, 1\)"):
        stages.validate(c, "transfer")


def test_selection_returns_the_state_of_the_lowest_recorded_validation_nll(tmp_path):
    c = tiny_config(tmp_path, **{"transfer.select_every": 2, "transfer.steps": 6})
    training.pretrain(c)
    training.fit_prior(c)
    setup = training.setup_transfer(c, 0)
    seen = []
    trained = training.train_method(c, "sgd", 0, setup, report=lambda s, v: seen.append((s, v)))
    state, finished = trained.state, trained.finished
    assert finished
    record = json.load(open(os.path.join(layout.method_dir(c, "sgd", 0), "selection.json")))
    curve = [(s, v) for s, v in record["curve"]]
    assert [s for s, _ in curve] == [2, 4, 6] and seen == [(s, v) for s, v in curve]
    best_step, best_nll = min(curve, key=lambda p: p[1])
    assert record["step"] == best_step == int(state.step)
    trainer = training.make_method_trainer(c, "sgd", setup)
    recomputed = evaluation.validation_nll(c, trainer, state, setup, int(c.transfer.select_samples))
    assert recomputed == pytest.approx(best_nll, rel=1e-6)
    # "last" keeps the final step whatever the curve.
    last = tiny_config(tmp_path / "last", **{"transfer.select": "last", "transfer.steps": 6})
    last.workdir = c.workdir
    state_last = training.train_method(last, "sgd", 0, setup).state
    assert int(state_last.step) == 6
    bad = tiny_config(tmp_path, **{"transfer.select": "best"})
    with pytest.raises(config_checks.ConfigError, match=r"transfer.select='best'; choose one of \('val_nll', 'last'\)"):
        stages.validate(bad, "transfer")


def test_validation_nll_is_infinite_before_a_sampler_has_a_sample(tmp_path):
    c = tiny_config(tmp_path, **{"methods": ("sgld",)})
    training.pretrain(c)
    training.fit_prior(c)
    setup = training.setup_transfer(c, 0)
    trainer = training.make_method_trainer(c, "sgld", setup)
    assert evaluation.validation_nll(c, trainer, trainer.init(), setup, 2) == math.inf


def test_tune_writes_the_best_trial_of_its_journal_and_resumes(tmp_path):
    optuna = pytest.importorskip("optuna")
    out = tmp_path / "tuned.py"
    c = tiny_config(tmp_path, **{"methods": ("sgd",), "tune.trials": 3, "tune.startup_trials": 2,
                                 "tune.output": str(out)})
    records = tune.run(c, argv=["tune", "--config.tune.trials=3"])
    tuned, saved = tune.read_tuned(str(out))
    assert saved == records and set(tuned) == {"sgd"}
    space = methods.get("sgd").search_space
    assert set(tuned["sgd"]) == set(space)
    assert 1e-3 <= tuned["sgd"]["learning_rate"] <= 1e-1 and tuned["sgd"]["weight_decay"] in (0.0, 1e-4, 5e-4)
    journal = [f for f in os.listdir(tmp_path / "tune") if f.startswith("sgd-")]
    study = optuna.load_study(study_name="sgd", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "tune" / journal[0]))))
    values = [t.value for t in study.trials]
    assert len(values) == 3 and records["sgd"]["val_nll"] == pytest.approx(min(values))
    assert study.trials[0].params == {"learning_rate": 0.01, "weight_decay": 0.0}  # the registry default first
    assert records["sgd"]["default_val_nll"] == pytest.approx(values[0])
    assert records["sgd"]["seeds"] == [100] and "tune.trials=3" in records["sgd"]["command"]
    # The tuned file is a config module: applying it sets the chosen values.
    scope: dict = {}
    exec(out.read_text(), scope)
    applied = scope["apply"](tiny_config(tmp_path))
    assert applied.hparams.sgd.learning_rate == tuned["sgd"]["learning_rate"]
    # Raising the trial count continues the same study (one more trial, not four).
    c.tune.trials = 4
    tune.run(c)
    again = optuna.load_study(study_name="sgd", storage=study._storage).trials
    assert len(again) == 4 and [t.value for t in again[:3]] == values


@pytest.mark.parametrize("overrides, message", [
    ({"tune.seeds": (0,)}, r"overlap the reported seeds config.seeds at \[0\]"),
    ({"tune.methods": "nope"}, r"config.tune.methods has unknown method\(s\) \['nope'\]"),
    ({"tune.output": "x.txt"}, r"must be a .py file"),
    ({"tune.trials": 0}, r"tune.trials"),
])
def test_bad_tune_configs_fail_with_one_line_before_any_work(tmp_path, overrides, message):
    c = tiny_config(tmp_path, **overrides)
    with pytest.raises(config_checks.ConfigError, match=message):
        tune.run(c)
    assert not os.path.exists(os.path.join(c.workdir, "tune"))
