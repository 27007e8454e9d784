"""The per-step metrics in the train state, and what the experiment stages log from them.

References are recomputed from the definitions: the loss of a step is ℓ at the weights before the
update, a variational step's ``kl`` is KL(q ‖ p) of the posterior before the update, ``num_skipped``
counts the steps whose result was not finite, and the logged learning rate is the schedule's η_t.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpbma import methods
from fpbma import posterior as post

X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).normal(size=(8, 1)), jnp.float32)
BATCH = {"x": X, "y": Y}


def _loss(w, batch, key):
    del key
    return jnp.mean((batch["x"] @ w["head"]["kernel"] - batch["y"]) ** 2)


def _params():
    return {"head": {"kernel": jnp.full((3, 1), 0.3, jnp.float32)}}


def test_a_point_step_reports_the_loss_before_its_update():
    trainer = methods.get("sgd").trainer(methods.plain_problem(_loss, _params(), 8), learning_rate=0.1, num_steps=3)
    state = trainer.init()
    assert float(state.metrics["loss"]) == 0.0 and int(state.metrics["num_skipped"]) == 0
    new = jax.jit(trainer.step)(state, BATCH, jax.random.PRNGKey(0))
    assert float(new.metrics["loss"]) == pytest.approx(float(_loss(_params(), BATCH, None)), rel=1e-6)
    again = jax.jit(trainer.step)(new, BATCH, jax.random.PRNGKey(1))
    assert float(again.metrics["loss"]) == pytest.approx(float(_loss(new.params, BATCH, None)), rel=1e-6)
    assert float(again.metrics["loss"]) < float(new.metrics["loss"])  # SGD descended


def test_a_variational_step_reports_its_kl_and_expected_loss():
    zeros = jax.tree.map(jnp.zeros_like, _params())
    prior = post.LowRankGaussian(_params(), zeros, jax.tree.map(lambda x: jnp.zeros((2,) + x.shape), _params()))
    kl = lambda q: post.kl_divergence(q, prior)  # noqa: E731
    problem = methods.plain_problem(_loss, _params(), 8, kl=kl)
    trainer = methods.get("vi").trainer(problem, learning_rate=0.05, num_steps=3)
    state = trainer.init()
    new = jax.jit(trainer.step)(state, BATCH, jax.random.PRNGKey(3))
    assert float(new.metrics["kl"]) == pytest.approx(float(kl(state.params)), rel=1e-5)
    # the expected loss at the step's sample: ε from the first half of the step key (the variational adapter)
    k_noise, k_loss = jax.random.split(jax.random.PRNGKey(3))
    w = post.sample_from_noise(state.params, post.sample_noise(state.params, k_noise))
    assert float(new.metrics["loss"]) == pytest.approx(float(_loss(w, BATCH, k_loss)), rel=1e-5)


def test_non_finite_steps_are_counted_and_skipped():
    def loss(w, batch, key):
        return jnp.mean((batch["x"] @ w["head"]["kernel"] - batch["y"]) ** 2) * batch["scale"]

    trainer = methods.get("sgd").trainer(methods.plain_problem(loss, _params(), 8), learning_rate=0.1, num_steps=3)
    step = jax.jit(trainer.step)
    state = step(trainer.init(), {**BATCH, "scale": jnp.float32(1.0)}, jax.random.PRNGKey(0))
    bad = step(state, {**BATCH, "scale": jnp.float32(jnp.nan)}, jax.random.PRNGKey(1))
    assert int(bad.metrics["num_skipped"]) == 1 and math.isnan(float(bad.metrics["loss"]))
    np.testing.assert_array_equal(bad.params["head"]["kernel"], state.params["head"]["kernel"])
    good = step(bad, {**BATCH, "scale": jnp.float32(1.0)}, jax.random.PRNGKey(2))
    assert int(good.metrics["num_skipped"]) == 1 and int(good.step) == 3


def test_the_stages_log_every_step_with_the_schedules_rate(tmp_path):
    from experiments import training
    from experiments import workdir as layout
    from tests.experiment_utils import tiny_config

    config = tiny_config(tmp_path / "wd", **{"hparams.sgd.schedule": "cosine", "hparams.sgd.warmup_steps": 2})
    training.pretrain(config)
    training.fit_prior(config)
    training.train_method(config, "sgd", 0)
    directory = layout.method_dir(config, "sgd", 0)
    lines = training.read_metrics(directory)
    train = [r for r in lines if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, config.transfer.steps + 1))
    rate = methods.learning_rate_schedule(config.transfer.learning_rate, config.transfer.steps, "cosine", 2)
    np.testing.assert_allclose([r["train/learning_rate"] for r in train],
                               [float(rate(t)) for t in range(config.transfer.steps)], rtol=1e-6)
    assert all(r["train/num_skipped"] == 0 for r in train)
    val = [r for r in lines if "validation/nll" in r]
    selection = json.load(open(f"{directory}/selection.json"))
    assert [[r["step"], r["validation/nll"]] for r in val] == selection["curve"]
    events = list((tmp_path / "wd").rglob("events.out.tfevents.*"))
    assert {e.parent.parent.name.split("-")[0] for e in events} >= {"source", "prior", "sgd"}
    assert all(e.stat().st_size > 0 for e in events)
    pre = training.read_metrics(layout.stage_dir(config, "source"))
    assert len(pre) == config.pretrain.steps and all(math.isfinite(r["train/loss"]) for r in pre)
