"""Last-layer Laplace: the SGD point estimate, then N(θ*, (GGN + δI)⁻¹) over the classifier head.

The GGN is taken at the trained weights on the problem's head features of the whole training set; the
prior precision δ is ``prior_precision`` when > 0, else chosen on a grid by the Laplace marginal
likelihood (:func:`fpbma.baselines.fit_last_layer_laplace`). The result is a
:class:`fpbma.types.SubsetLaplace`.

>>> from fpbma import methods
>>> methods.get("laplace").defaults["prior_precision"]
0.0

Reference: Daxberger et al., "Laplace Redux — Effortless Bayesian Deep Learning", NeurIPS 2021.
"""

from __future__ import annotations

import jax.numpy as jnp

from fpbma.baselines._laplace import fit_last_layer_laplace
from fpbma.baselines._sgd import sgd
from fpbma.methods import SCHEDULED, SEARCH_LEARNING_RATE, SEARCH_WEIGHT_DECAY, Method, register
from fpbma.methods._adapters import point, post_hoc
from fpbma.types import SubsetLaplace


def _linear_head(h, f):
    return f @ h["kernel"] + h["bias"]


def _build(problem, hp, run):
    if problem.features is None or problem.labels is None or problem.head not in problem.init_params:
        raise ValueError("method 'laplace' needs features_fn and train_data (the features of the training set at "
                         "the trained subset feed the last-layer GGN) and a 'head' in the weights.")
    base = point(problem, sgd(run.learning_rate, momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                              nesterov=hp["nesterov"]), finalize=None)
    precision = hp["prior_precision"] or None

    def fit(s):
        result = fit_last_layer_laplace(_linear_head, s.params[problem.head], problem.features(s.params),
                                        jnp.asarray(problem.labels), prior_precision=precision)
        return SubsetLaplace(point=s.params, head=result.posterior)

    return post_hoc(base, fit)


LAPLACE = register(Method(
    "laplace", defaults=dict(momentum=0.9, weight_decay=0.0, nesterov=False, prior_precision=0.0),
    build=_build, shared=SCHEDULED,
    search_space={"learning_rate": SEARCH_LEARNING_RATE, "weight_decay": SEARCH_WEIGHT_DECAY},
    summary="last-layer Laplace after SGD (prior precision by marginal likelihood when 0)"))
