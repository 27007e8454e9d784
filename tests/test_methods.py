"""The shared harness every registered method joins by being registered (as optax's ``_common_test.py``).

For every name of ``fpbma.methods.names()``:

* on the transfer scheme of a tiny network (``tests/method_utils.py``): build with the defaults, jit'd
  steps, ``finalize``, BMA draws; a run killed after 2 of 4 steps and resumed from an orbax checkpoint
  ends bit-identical to the uninterrupted one; a step whose gradient is NaN leaves the weights, the
  samples and their count exactly as they were;
* on a user's own loss (multinomial logistic regression on three separated blobs, ℓ(w₀) = log 3): the
  method's draws fit the training data better than the start.

A toy method registered in this file alone trains through ``experiments.train`` on the tiny config.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fpbma import methods, transfer, types
from fpbma.methods._adapters import point
from fpbma.models.checkpoints import restore_checkpoint, save_checkpoint
from tests.method_utils import logistic_problem, tiny_transfer_problem

STEPS = 4


@functools.lru_cache(maxsize=None)
def _transfer_run(name):
    """The method on the tiny scheme: ``(trainer, jitted step, batch, problem pieces)`` (compiled once)."""
    model, stats, scheme, apply_fn, features, x, y = tiny_transfer_problem()
    trainer = transfer.make_trainer(name, scheme, apply_fn, num_data=24, num_steps=STEPS, learning_rate=0.01,
                                    features_fn=features, train_data=(x, y))
    return trainer, jax.jit(trainer.step), {"image": x, "label": y}, (model, stats, scheme, x)


def _key(t):
    return jax.random.fold_in(jax.random.PRNGKey(5), t)


def _run(step, state, batch, start, stop):
    for t in range(start, stop):
        state = step(state, batch, _key(t))
    return state


def _equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", methods.names())
def test_on_the_transfer_scheme(name, tmp_path):
    """Build, steps, finalize, draws; kill-and-resume; a NaN gradient skipped (one compilation per method)."""
    _check_builds_steps_finalizes_and_draws(name)
    _check_kill_and_resume(name, tmp_path)
    _check_non_finite_gradient_is_skipped(name)


def _check_builds_steps_finalizes_and_draws(name):
    trainer, step, batch, (model, stats, scheme, x) = _transfer_run(name)
    init = trainer.init()
    state = _run(step, init, batch, 0, STEPS)
    assert int(state.step) == STEPS
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(init.params),
                                                               jax.tree_util.tree_leaves(state.params)))
    assert moved > 0
    result = trainer.finalize(state)
    # BMA draws: the network's leaves and shapes, finite logits; frozen weights differ between draws.
    sampler = transfer.sample_weights(scheme, result, {"batch_stats": stats})
    v1, v2 = sampler(jax.random.PRNGKey(0)), sampler(jax.random.PRNGKey(1))
    logits = model.apply(v1, x)
    assert logits.shape == (24, 3) and bool(jnp.all(jnp.isfinite(logits)))
    assert not np.allclose(v1["params"]["conv1"]["kernel"], v2["params"]["conv1"]["kernel"])
    # draw(result, key, n) stacks n subset trees shaped like the start; a point mass is the trained point.
    subset = transfer.init_point(scheme)
    n = types.num_samples(result) if isinstance(result, types.SampleSet) else 3
    w = types.draw(result, jax.random.PRNGKey(2), n)
    for a, b in zip(jax.tree_util.tree_leaves(w), jax.tree_util.tree_leaves(subset), strict=True):
        assert a.shape == (n,) + b.shape and np.all(np.isfinite(np.asarray(a)))
    if isinstance(result, types.SampleSet) and n == 1:
        _equal(jax.tree.map(lambda a: a[0], w), state.params)


def _check_kill_and_resume(name, tmp_path):
    trainer, step, batch, _ = _transfer_run(name)
    straight = _run(step, trainer.init(), batch, 0, STEPS)
    half = _run(step, trainer.init(), batch, 0, STEPS // 2)
    save_checkpoint(tmp_path / "ckpt", half, overwrite=True)
    resumed = _run(step, restore_checkpoint(tmp_path / "ckpt", like=trainer.init()), batch, STEPS // 2, STEPS)
    _equal(straight, resumed)
    _equal(trainer.finalize(straight), trainer.finalize(resumed))


def _check_non_finite_gradient_is_skipped(name):
    trainer, step, batch, _ = _transfer_run(name)
    state = _run(step, trainer.init(), batch, 0, STEPS - 1)  # the last step closes an SGLD cycle
    bad = {**batch, "image": batch["image"].at[0].set(jnp.nan)}
    skipped = step(state, bad, _key(STEPS - 1))
    assert int(skipped.step) == int(state.step) + 1
    _equal(skipped.params, state.params)
    _equal((skipped.samples, skipped.num_collected), (state.samples, state.num_collected))
    # The next finite step trains again.
    after = step(skipped, batch, _key(STEPS))
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves(after.params))


@pytest.mark.parametrize("name", methods.names())
def test_fits_a_users_own_loss(name):
    problem, batch = logistic_problem()
    trainer = methods.get(name).trainer(problem, learning_rate=0.1, num_steps=40, kl_weight=1.0)
    step = jax.jit(trainer.step)
    state = _run(step, trainer.init(), batch, 0, 40)
    result = trainer.finalize(state)
    n = types.num_samples(result) if isinstance(result, types.SampleSet) else 8
    draws = types.draw(result, jax.random.PRNGKey(0), n)
    losses = [float(problem.loss(jax.tree.map(lambda a: a[i], draws), batch, None)) for i in range(n)]
    assert np.mean(losses) < 0.8 * math.log(3), losses


def test_vi_is_fpbma_at_rho_zero_on_the_transfer_scheme():
    """The ablation row: the same posterior after every step as FP-BMA with ρ = 0 (KL term, noise and all)."""
    model, stats, scheme, apply_fn, features, x, y = tiny_transfer_problem()
    batch = {"image": x, "label": y}
    build = lambda name, **hp: transfer.make_trainer(name, scheme, apply_fn, num_data=24, num_steps=STEPS,  # noqa: E731
                                                     learning_rate=0.05, kl_weight=1.0, hyperparameters=hp)
    plain, zero = build("vi", weight_decay=0.01), build("fpbma", rho=0.0, weight_decay=0.01)
    sv, sf = plain.init(), zero.init()
    for t in range(STEPS):
        sv, sf = jax.jit(plain.step)(sv, batch, _key(t)), jax.jit(zero.step)(sf, batch, _key(t))
        for a, b in zip(jax.tree_util.tree_leaves(sv.params), jax.tree_util.tree_leaves(sf.params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), sv.params, plain.init().params)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3


def test_unknown_names_fail_with_one_line_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'adam'; choose one of "
                                         r"\['fpbma', 'vi', 'fpbma_released', 'fpbma_mean', 'sgd'"):
        methods.get("adam")
    with pytest.raises(ValueError, match=r"method 'sam' has no hyperparameter\(s\) \['temperature'\]; its "
                                         r"hyperparameters are \['momentum', 'nesterov', 'rho', 'weight_decay'\]"):
        methods.get("sam").hyperparameters({"temperature": 1.0})
    with pytest.raises(ValueError, match="registered already"):
        methods.register(methods.get("sgd"))
    with pytest.raises(ValueError, match="must be a bool, int, float or str"):
        methods.Method("bad", defaults={"grid": (1, 2)}, build=None)
    # Values are checked by the constructors when the trainer is built, before any step.
    with pytest.raises(ValueError, match="rho=-1.0"):
        methods.get("sam").check({"rho": -1.0})
    with pytest.raises(ValueError, match="n_cycle=4 exceeds num_steps=3"):
        methods.get("sgld").check(num_steps=3)


# A method and a result type that exist here and nowhere else: gradient descent with the step η · shrink,
# whose result is an isotropic Gaussian N(w, scale² I) around the trained weights.
class _Jitter(NamedTuple):
    point: dict
    scale: jax.Array

    def sample(self, key, n=None):
        leaves, treedef = jax.tree.flatten(self.point)
        keys = jax.random.split(key, len(leaves))
        shape = () if n is None else (int(n),)
        return jax.tree.unflatten(treedef, [x + self.scale * jax.random.normal(k, shape + x.shape)
                                            for k, x in zip(keys, leaves)])


TOY = methods.Method(
    "toy", defaults={"shrink": 0.5, "scale": 0.1}, summary="test-only gradient descent with step lr * shrink",
    build=lambda problem, hp, run: point(problem, optax.sgd(run.learning_rate * hp["shrink"]),
                                         lambda s: _Jitter(s.params, jnp.float32(hp["scale"]))))


@pytest.fixture
def toy_method():
    methods.register(TOY)
    try:
        yield TOY
    finally:
        methods.unregister("toy")


def test_a_method_registered_in_a_test_file_trains_and_evaluates_through_the_experiments(toy_method, tmp_path,
                                                                                         capsys):
    from experiments import cli, config_checks, training
    from experiments import pipeline as stages, workdir as layout
    from tests.experiment_utils import tiny_config

    # The config derives config.hparams.toy from the registry; shrink = 0 keeps the start exactly.
    config = tiny_config(tmp_path / "wd", method="toy", **{"hparams.toy.shrink": 0.0})
    assert config.hparams.toy.to_dict() == {"shrink": 0.0, "scale": 0.1, "learning_rate": None, "steps": None}
    assert tiny_config(tmp_path / "other").hparams.toy.shrink == 0.5
    training.pretrain(config)
    training.fit_prior(config)
    cli.run_cli("train", config)
    assert capsys.readouterr().out.strip().endswith(f"toy: {config.transfer.steps} steps")
    cli.run_cli("evaluate", config)  # BMA over the new result type: transfer.sample_subset → _Jitter.sample
    metrics = json.loads(capsys.readouterr().out)["in_domain"]["raw"]
    seed = int(config.seed)
    setup = training.setup_transfer(config, seed)
    trained = training.train_method(config, "toy", seed, setup)
    posterior, state, finished = trained.posterior, trained.state, trained.finished
    assert finished and int(state.step) == config.transfer.steps
    _equal(state.params, transfer.init_point(setup.scheme))
    assert isinstance(posterior, _Jitter) and float(posterior.scale) == pytest.approx(0.1)
    lp = np.load(os.path.join(layout.method_dir(config, "toy", seed), "test_log_probs.npy"))
    labels = setup.data["test_label"]
    assert metrics["acc"] == pytest.approx(float(np.mean(np.argmax(lp, -1) == labels)))
    # draw() stacks n draws of the new type: mean ≈ the point, spread ≈ scale.
    w = types.draw(posterior, jax.random.PRNGKey(0), 2000)["head"]["kernel"]
    np.testing.assert_allclose(np.std(np.asarray(w), 0), 0.1, rtol=0.1)
    with pytest.raises(config_checks.ConfigError, match=r"config.hparams.toy: method 'toy' has no hyperparameter\(s\) "
                                                 r"\['rate'\]; its hyperparameters are \['scale', 'shrink'\]"):
        stages.validate(tiny_config(tmp_path / "wd", method="toy", **{"hparams.toy.rate": 1.0}), "train")


def test_every_baseline_constructor_is_a_registered_method():
    from fpbma import baselines

    assert set(baselines.METHODS) <= set(methods.names())


# ------------------------------------------------------------------------------------------------
# The learning-rate schedule as a shared training field.


def test_learning_rate_schedule_is_linear_warm_up_then_cosine():
    peak, k, w = 0.2, 12, 3
    sched = methods.learning_rate_schedule(peak, k, "cosine", w)
    for t in range(k + 1):
        expected = peak * t / w if t < w else peak * 0.5 * (1 + math.cos(math.pi * (t - w) / (k - w)))
        assert float(sched(t)) == pytest.approx(expected, abs=1e-7), t
    constant = methods.learning_rate_schedule(peak, k, "constant", w)
    assert [float(constant(t)) for t in (0, 1, 3, 11)] == pytest.approx([0.0, peak / 3, peak, peak])
    no_warmup = methods.learning_rate_schedule(peak, k, "cosine", 0)
    assert [float(no_warmup(t)) for t in (0, k)] == pytest.approx([peak, 0.0])
    assert float(methods.learning_rate_schedule(peak, k, "constant", k)(k)) == pytest.approx(peak)
    # The default is the float itself: today's optimizers, bit for bit.
    assert methods.learning_rate_schedule(peak, k) is peak


def test_a_cosine_schedule_reaches_the_optimizer_step_by_step():
    """SGD-momentum on the logistic problem: w after every step equals the recursion with η_t by hand."""
    problem, batch = logistic_problem()
    peak, k, w, mu = 0.3, 6, 2, 0.9
    trainer = methods.get("sgd").trainer(problem, learning_rate=peak, num_steps=k, schedule="cosine",
                                         warmup_steps=w, momentum=mu)
    state, step = trainer.init(), jax.jit(trainer.step)
    ref, m = problem.init_params, jax.tree.map(jnp.zeros_like, problem.init_params)
    grad = jax.grad(lambda p: problem.loss(p, batch, None))
    for t in range(k):
        eta = peak * t / w if t < w else peak * 0.5 * (1 + math.cos(math.pi * (t - w) / (k - w)))
        m = jax.tree.map(lambda a, g: mu * a + g, m, grad(ref))
        ref = jax.tree.map(lambda p, a: p - eta * a, ref, m)
        state = step(state, batch, _key(t))
        for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(ref), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in methods.names() if "schedule" in methods.get(n).shared])
def test_every_scheduled_method_follows_the_warm_up(name):
    """A warm-up from η_0 = 0: the first step leaves the trained object exactly as it was, the second moves it."""
    problem, batch = logistic_problem()
    trainer = methods.get(name).trainer(problem, learning_rate=0.1, num_steps=10, schedule="cosine",
                                        warmup_steps=1)
    step = jax.jit(trainer.step)
    init = trainer.init()
    first = step(init, batch, _key(0))
    _equal(first.params, init.params)
    second = step(first, batch, _key(1))
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(second.params),
                                                               jax.tree_util.tree_leaves(first.params))) > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(schedule="linear"),
     r"schedule='linear' is not a learning-rate schedule; use one of \('constant', 'cosine'\)"),
    (dict(warmup_steps=-1), r"warmup_steps=-1 must be an integer >= 0"),
    (dict(warmup_steps=11), r"warmup_steps=11 exceeds steps=10: the warm-up would never end"),
    (dict(schedule="cosine", warmup_steps=10), r"warmup_steps=10 leaves no step for the cosine decay \(steps=10\)"),
    (dict(warmup_steps=1.5), r"warmup_steps=1.5 must be an integer >= 0"),
])
def test_bad_schedules_fail_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        methods.get("sgd").check(num_steps=10, **kwargs)


def test_a_method_with_its_own_step_size_refuses_a_schedule():
    assert "schedule" not in methods.get("sgld").shared
    with pytest.raises(ValueError, match=r"method 'sgld' takes no learning-rate schedule"):
        methods.get("sgld").check(num_steps=10, schedule="cosine")


# ------------------------------------------------------------------------------------------------
# Search spaces: stated beside the defaults, checked here.


@pytest.mark.parametrize("name", methods.names())
def test_every_method_states_a_search_space_of_its_own_names_that_holds_its_defaults(name):
    m = methods.get(name)
    # Every method searches at least the paper's grid of rates, 1e-3 … 1e-1; the samplers and bSAM, whose
    # step is bounded by the prior's stiffness rather than by momentum, search further up.
    kind, low, high = m.search_space["learning_rate"]
    assert kind == "log_uniform" and low == 1e-3 and high == (
        {"sgld": 0.5, "emcmc": 0.5, "bsam": 1.0}.get(name, 1e-1))
    for key, spec in m.search_space.items():
        assert key in m.defaults or key in m.shared, key
        if key not in m.defaults:
            continue  # a shared field's default is the run's (config.transfer)
        default = m.defaults[key]
        if spec[0] == "choice":
            assert default in spec[1], (key, default, spec)
        else:
            assert spec[1] <= default <= spec[2], (key, default, spec)
    # Every value the space can produce at its ends builds a trainer (the constructors accept it).
    ends = {k: (s[1][-1] if s[0] == "choice" else s[2]) for k, s in m.search_space.items() if k in m.defaults}
    for rate in m.search_space["learning_rate"][1:]:
        m.check(ends, learning_rate=rate, num_steps=100, num_data=100)


def test_the_paper_radii_are_searched_on_their_own_scales():
    space = {n: methods.get(n).search_space for n in methods.names()}
    assert space["fpbma"]["rho"] == space["fpbma_released"]["rho"] == ("log_uniform", 0.01, 10.0)
    assert space["sam"]["rho"] == space["fswag"]["rho"] == ("log_uniform", 0.01, 0.5)
    assert space["sgld"]["temperature"] == space["emcmc"]["temperature"] == ("log_uniform", 1e-3, 1.0)
    assert "rho" not in space["vi"] and space["vi"]["learning_rate"] == space["fpbma"]["learning_rate"]


@pytest.mark.parametrize("space,match", [
    ({"rate": ("log_uniform", 0.1, 1.0)}, r"search_space\['rate'\].* names no hyperparameter or shared field; "
                                          r"choose from \['learning_rate', 'shrink', 'steps'\]"),
    ({"shrink": ("log_uniform", 0.0, 1.0)}, r"must be \('log_uniform', low, high\) with finite 0 < low < high"),
    ({"shrink": ("uniform", 1.0, 0.5)}, r"must be \('uniform', low, high\) with finite low < high"),
    ({"shrink": ("choice", ())}, r"must be \('choice', \(value, ...\)\)"),
    ({"shrink": ("grid", 1, 2)}, r"must be a tuple starting with one of \('log_uniform', 'uniform', 'choice'\)"),
])
def test_a_bad_search_space_fails_when_the_method_is_made(space, match):
    with pytest.raises(ValueError, match=match):
        methods.Method("bad", defaults={"shrink": 0.5}, build=None, search_space=space)
