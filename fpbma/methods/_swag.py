"""SWAG: SGD-momentum whose iterates after a fraction ``swa_start_fraction`` of the steps are collected every
``collect_every`` steps into N(w̄, ½(diag σ² + DDᵀ/(K − 1))), K = ``max_num_models``.

>>> from fpbma import methods
>>> methods.get("swag").defaults["swa_start_fraction"]
0.5

Reference: Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning", NeurIPS 2019.
"""

from __future__ import annotations

import math

from fpbma.baselines._common import check_number
from fpbma.baselines._sgd import sgd
from fpbma.baselines._swag import swag, swag_posterior
from fpbma.methods import SCHEDULED, SEARCH_LEARNING_RATE, SEARCH_WEIGHT_DECAY, Method, register
from fpbma.methods._adapters import point

COLLECTION = dict(collect_every=1, max_num_models=5, swa_start_fraction=0.5)


def swa_start(hp, num_steps: int) -> int:
    """The step after which collection starts: ⌊K · swa_start_fraction⌋."""
    check_number(hp["swa_start_fraction"], "swa_start_fraction", low=0.0, high=1.0, high_open=True)
    return math.floor(num_steps * hp["swa_start_fraction"])


def _build(problem, hp, run):
    tx = swag(sgd(run.learning_rate, momentum=hp["momentum"], weight_decay=hp["weight_decay"]),
              swa_start=swa_start(hp, run.num_steps), collect_every=hp["collect_every"],
              max_num_models=hp["max_num_models"])
    return point(problem, tx, lambda s: swag_posterior(s.opt_state))


SWAG = register(Method(
    "swag", defaults=dict(momentum=0.9, weight_decay=0.0, **COLLECTION),
    build=_build, shared=SCHEDULED,
    search_space={"learning_rate": SEARCH_LEARNING_RATE, "weight_decay": SEARCH_WEIGHT_DECAY},
    summary="SWAG collected along SGD-momentum (a rank-K Gaussian)"))
