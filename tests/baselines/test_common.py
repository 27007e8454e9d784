"""Every baseline runs a jitted step on a tiny CNN and yields something ``draw`` accepts."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fpbma
from fpbma import baselines as bl

NUM_CLASSES = 3
NUM_DATA = 64


class TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(NUM_CLASSES, name="head")(self.embed(x, train))

    @nn.compact
    def embed(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.relu(x)
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, name="conv2")(x))
        return jnp.mean(x, axis=(1, 2))


@pytest.fixture(scope="module")
def setup():
    model = TinyCNN()
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (8, 8, 8, 1))
    y = jnp.arange(8) % NUM_CLASSES
    variables = model.init(jax.random.PRNGKey(1), x)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def loss(p):
        logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return model, params, batch_stats, x, y, loss


def _assert_draws(result, params, n=3):
    w = bl.draw(result, jax.random.PRNGKey(5), n)
    chex.assert_trees_all_equal_structs(jax.tree.map(lambda a: a[0], w), params)
    for a, p in zip(jax.tree.leaves(w), jax.tree.leaves(params)):
        assert a.shape == (n,) + p.shape
        assert np.all(np.isfinite(np.asarray(a)))
    return w


def _moved(before, after):
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


OPTIMIZERS = {
    "sgd": dict(learning_rate=0.1),
    "sam": dict(learning_rate=0.1, rho=0.05),
    "fsam": dict(learning_rate=0.1, rho=0.05, eta=1.0),
    "bsam": dict(learning_rate=0.1, num_data=NUM_DATA, rho=0.05, s_init=10.0),
    "sgld": dict(learning_rate=1e-4, num_steps=4, n_cycle=2, exploration_ratio=0.0),
    "emcmc": dict(learning_rate=1e-4, eta=1e-2),
    "swag": dict(learning_rate=0.1, swa_start=0, max_num_models=2),
    "fswag": dict(learning_rate=0.1, rho=0.05, swa_start=0, max_num_models=2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_step_on_cnn(setup, name):
    _, params, _, _, _, loss = setup
    tx = bl.build(name, **OPTIMIZERS[name])
    grad = jax.grad(loss)
    scale = NUM_DATA if name in ("sgld", "emcmc") else 1.0  # Langevin methods take ∇U = N ∇(mean loss)

    @jax.jit
    def step(p, state):
        g = jax.tree.map(lambda a: scale * a, grad(p))
        kwargs = {} if name in ("sgd", "sgld", "emcmc", "swag") else {"grad_fn": grad}
        updates, state = tx.update(g, state, p, **kwargs)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    p = params
    for _ in range(3):
        p, state = step(p, state)
    assert _moved(params, p) > 0
    if name == "bsam":
        result = bl.bsam_posterior(p, state, NUM_DATA)
        assert isinstance(result, fpbma.DiagGaussian)
    elif name in ("swag", "fswag"):
        result = bl.swag_posterior(state)
        assert isinstance(result, fpbma.LowRankGaussian) and result.rank == 2
    elif name == "emcmc":
        result = bl.stack_samples([p, bl.guiding_params(state)])
    else:
        result = bl.point_mass(p) if name != "sgld" else bl.stack_samples([params, p])
    _assert_draws(result, params, n=bl.num_samples(result) if isinstance(result, bl.SampleSet) else 3)


@pytest.mark.parametrize("family", ["diag", "lowrank"])
def test_fpbma_step_on_cnn(setup, family):
    _, params, _, _, _, loss = setup
    q = (fpbma.DiagGaussian.from_point(params, 1e-3) if family == "diag"
         else fpbma.LowRankGaussian.from_point(params, 1e-3, rank=2))
    tx = bl.build("fpbma", learning_rate=0.05, rho=0.05, damping=1e-3)
    noise = fpbma.sample_noise(q, jax.random.PRNGKey(2))
    grad = jax.grad(lambda q_: fpbma.negative_elbo(q_, noise, loss))

    @jax.jit
    def step(q, state):
        updates, state = tx.update(grad(q), state, q, grad_fn=grad)
        return optax.apply_updates(q, updates), state

    new_q, _ = step(q, tx.init(q))
    assert _moved(q.mean, new_q.mean) > 0
    _assert_draws(new_q, params)


def test_moped_step_on_cnn(setup):
    _, params, _, _, _, loss = setup
    m = bl.build("moped", learning_rate=1e-2, moped_delta=0.1, kl_beta=1.0)
    q, prior = m.init(params)

    # The prior is an argument, not a closure constant: fpbma.posterior's finiteness check calls bool()
    # on jnp ops, which are staged (and fail) inside jit for closed-over concrete arrays.
    @jax.jit
    def step(q, prior, state, key):
        g = jax.grad(m.loss)(q, fpbma.sample_noise(q, key), loss, prior, NUM_DATA)
        updates, state = m.tx.update(g, state, q)
        return optax.apply_updates(q, updates), state

    new_q, _ = step(q, prior, m.tx.init(q), jax.random.PRNGKey(3))
    assert _moved(q.log_std, new_q.log_std) > 0
    _assert_draws(new_q, params)


def test_laplace_on_cnn(setup):
    model, params, batch_stats, x, y, _ = setup
    variables = {"params": params, "batch_stats": batch_stats}
    features = jax.jit(lambda v, x: model.apply(v, x, method=TinyCNN.embed))(variables, x)
    head = nn.Dense(NUM_CLASSES)
    fit = bl.build("laplace", head_fn=lambda hp, f: head.apply({"params": hp}, f), head_params=params["head"],
                   features=features, labels=y)
    assert fit.prior_precision in fit.grid
    posterior = bl.last_layer_posterior(params, ("head",), fit.posterior)
    w = _assert_draws(posterior, params)
    # Only the head varies across draws; the body is the MAP.
    np.testing.assert_array_equal(np.asarray(w["conv1"]["kernel"][1]), np.asarray(params["conv1"]["kernel"]))
    assert float(jnp.max(jnp.abs(w["head"]["kernel"][0] - w["head"]["kernel"][1]))) > 0


def test_registry_names_and_validation():
    assert sorted(bl.METHODS) == sorted(["fpbma", "sgd", "sam", "fsam", "bsam", "moped", "sgld", "emcmc",
                                         "swag", "fswag", "laplace"])
    with pytest.raises(ValueError, match="does not take hyperparameter"):
        bl.build("sam", learning_rate=0.1, rho=0.05, eta=1.0)
    with pytest.raises(ValueError, match="unknown method"):
        bl.build("adam")
    with pytest.raises(ValueError, match="rho"):
        bl.build("sam", learning_rate=0.1, rho=-1.0)


def test_draw_sampleset_subsets():
    s = bl.SampleSet({"w": jnp.arange(5.0)[:, None]})
    np.testing.assert_array_equal(np.asarray(bl.draw(s, jax.random.PRNGKey(0))["w"]), np.arange(5.0)[:, None])
    sub = np.asarray(bl.draw(s, jax.random.PRNGKey(0), 3)["w"])[:, 0]
    assert len(set(sub.tolist())) == 3 and set(sub.tolist()) <= set(range(5))
    with pytest.raises(ValueError, match="n=6"):
        bl.draw(s, jax.random.PRNGKey(0), 6)
    with pytest.raises(TypeError, match="does not know how to sample"):
        bl.draw({"w": jnp.zeros(2)}, jax.random.PRNGKey(0), 2)
    with pytest.raises(ValueError, match="different tree structure"):
        bl.stack_samples([{"w": jnp.zeros(2)}, {"v": jnp.zeros(2)}])
    assert bl.num_samples(bl.stack_samples([{"w": jnp.zeros(2)}] * 4)) == 4
    with pytest.raises(ValueError, match="needs n"):
        bl.draw(fpbma.DiagGaussian.from_point({"w": jnp.zeros(2)}, 0.1), jax.random.PRNGKey(0))
