"""Cyclical SGLD: Langevin steps on U(w) = N ℓ(w) − log p(w) with a cosine step size over n_cycle cycles.

The step size on U is η/N (η on the mean loss); each cycle explores without noise for a fraction
``exploration_ratio`` and then samples at ``temperature`` T; the weights at the end of every cycle are
the samples (a :class:`fpbma.types.SampleSet`).

>>> from fpbma import methods
>>> methods.get("sgld").defaults["temperature"]
1.0

Reference: Zhang et al., "Cyclical Stochastic Gradient MCMC for Bayesian Deep Learning", ICLR 2020.
"""

from __future__ import annotations

from fpbma.baselines._sgld import csgld
from fpbma.methods import SEARCH_LEARNING_RATE, Method, register
from fpbma.methods._adapters import langevin


def _build(problem, hp, run):
    n_cycle = int(hp["n_cycle"])
    tx = csgld(run.learning_rate / int(problem.num_data), num_steps=run.num_steps, n_cycle=n_cycle,
               exploration_ratio=hp["exploration_ratio"], temp=hp["temperature"], seed=hp["seed"])
    return langevin("sgld", problem, tx, num_steps=run.num_steps, n_cycle=n_cycle,
                    collect=lambda params, opt_state: (params,))


SGLD = register(Method(
    "sgld", defaults=dict(n_cycle=4, exploration_ratio=0.8, temperature=1.0, seed=0),
    build=_build, search_space={"learning_rate": SEARCH_LEARNING_RATE, "temperature": ("log_uniform", 1e-3, 1.0)},
    summary="cyclical SGLD (one sample per cycle at temperature T)"))
