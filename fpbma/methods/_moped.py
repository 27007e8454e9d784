"""MOPED: mean-field VI whose initial posterior and prior come from the starting weights w₀.

q₀ = p = N(w₀, (δ|w₀|)²) (:func:`fpbma.baselines.moped`), except the problem's new head, which starts at
variance α and has no prior (the KL covers the rest); q is trained with Adam on
E_q[ℓ(w)] + β KL(q ‖ p)/N. ``prior_std`` > 0 replaces the prior's std δ|w₀| by a constant.

>>> from fpbma import methods
>>> methods.get("moped").defaults["moped_delta"]
0.1

Reference: Krishnan, Subedar & Tickoo, "Specifying Weight Priors in Bayesian Deep Neural Networks with
Empirical Bayes", AAAI 2020.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fpbma import _trees
from fpbma import posterior as post
from fpbma.baselines._moped import moped
from fpbma.methods import SEARCH_LEARNING_RATE, VARIATIONAL, Method, register
from fpbma.methods._adapters import variational, zero_kl
from fpbma.models import partition


def _build(problem, hp, run):
    m = moped(run.learning_rate, moped_delta=hp["moped_delta"], prior_std=hp["prior_std"] or None,
              min_std=hp["min_std"])
    q0, prior = m.init(problem.init_params)
    head = problem.head
    if head is None or head not in problem.init_params:
        return variational(problem, q0, lambda q: post.kl_divergence(q, prior), m.tx, run.kl_weight)
    half_log_alpha = 0.5 * math.log(problem.head_variance)
    head_log_std = jax.tree.map(lambda z: jnp.full_like(z, half_log_alpha), _trees.split_head(q0.mean, head)[1])
    q0 = post.DiagGaussian(q0.mean, partition.merge(_trees.split_head(q0.log_std, head)[0], head_log_std))
    body = _trees.split_head(q0.mean, head)[0]
    p_body = _trees.restrict(prior, body)
    kl_fn = zero_kl if _trees.empty(body) else (lambda q: post.kl_divergence(_trees.restrict(q, body), p_body))
    return variational(problem, q0, kl_fn, m.tx, run.kl_weight)


MOPED = register(Method(
    "moped", defaults=dict(moped_delta=0.1, prior_std=0.0, min_std=1e-6),
    build=_build, shared=VARIATIONAL,
    search_space={"learning_rate": SEARCH_LEARNING_RATE, "moped_delta": ("log_uniform", 0.01, 0.5)},
    summary="MOPED mean-field VI (prior and init std moped_delta*|w0|; prior_std>0 fixes the prior std)"))
