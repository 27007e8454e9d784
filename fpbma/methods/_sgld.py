"""Cyclical SGLD: Langevin steps on U(w) = N ℓ(w) − log p(w) with a cosine step size over n_cycle cycles.

The step size on U is η/N (η on the mean loss); each cycle explores without noise for a fraction
``exploration_ratio`` and then samples at ``temperature`` T; the weights at the end of every cycle are
the samples (a :class:`fpbma.types.SampleSet`). ``preconditioner="rmsprop"`` is pSGLD (Li et al., 2016):
the step on U is (η/N) P with P = 1/(ε + √V) and V the RMSprop average (decay ``precond_decay``, ε =
``precond_eps``) of the squared mean-loss gradient (∇U/N)², the noise √(2 (η/N) P T); the correction term
Γ of a moving P is dropped, as in the paper's practical algorithm (:func:`fpbma.baselines.csgld`).

>>> from fpbma import methods
>>> methods.get("sgld").defaults["temperature"]
1.0
>>> import jax, jax.numpy as jnp
>>> loss = lambda w, batch, key: 0.5 * jnp.mean((batch["x"] @ w["w"] - batch["y"]) ** 2)
>>> problem = methods.plain_problem(loss, {"w": jnp.zeros(2)}, num_data=4,
...                                 log_prior=lambda w: -0.5 * jnp.sum(w["w"] ** 2))
>>> trainer = methods.get("sgld").trainer(problem, learning_rate=0.05, num_steps=20, n_cycle=2,
...                                       preconditioner="rmsprop")
>>> batch = {"x": jnp.eye(4, 2), "y": jnp.ones(4)}
>>> state = trainer.init()
>>> for k in range(20):
...     state = jax.jit(trainer.step)(state, batch, jax.random.PRNGKey(k))
>>> trainer.finalize(state).samples["w"].shape
(2, 2)

References:
  Zhang et al., "Cyclical Stochastic Gradient MCMC for Bayesian Deep Learning", ICLR 2020.
  Li et al., "Preconditioned Stochastic Gradient Langevin Dynamics for Deep Neural Networks", AAAI 2016.
"""

from __future__ import annotations

from fpbma.baselines._sgld import csgld
from fpbma.methods import Method, register
from fpbma.methods._adapters import langevin


def _build(problem, hp, run):
    n_cycle = int(hp["n_cycle"])
    tx = csgld(run.learning_rate / int(problem.num_data), num_steps=run.num_steps, n_cycle=n_cycle,
               exploration_ratio=hp["exploration_ratio"], temp=hp["temperature"], seed=hp["seed"],
               preconditioner=hp["preconditioner"], precond_decay=hp["precond_decay"],
               precond_eps=hp["precond_eps"], num_data=int(problem.num_data))
    return langevin("sgld", problem, tx, num_steps=run.num_steps, n_cycle=n_cycle,
                    collect=lambda params, opt_state: (params,))


SGLD = register(Method(
    "sgld", defaults=dict(n_cycle=4, exploration_ratio=0.8, temperature=1.0, seed=0, preconditioner="none",
                          precond_decay=0.99, precond_eps=1e-5),
    build=_build, search_space={"learning_rate": ("log_uniform", 1e-3, 0.5), "temperature": ("log_uniform", 1e-3, 1.0),
                                "preconditioner": ("choice", ("none", "rmsprop"))},
    summary="cyclical SGLD (one sample per cycle at temperature T)"))
