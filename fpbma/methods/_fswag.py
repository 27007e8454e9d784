"""F-SWAG: SWAG collected along SAM's trajectory (radius ``rho``); the schedule of collection is SWAG's.

>>> from fpbma import methods
>>> methods.get("fswag").defaults["rho"]
0.05

Reference: Nguyen et al., "Flat Seeking Bayesian Neural Networks", NeurIPS 2023.
"""

from __future__ import annotations

from fpbma.baselines._swag import fswag, swag_posterior
from fpbma.methods import SCHEDULED, SEARCH_LEARNING_RATE, SEARCH_WEIGHT_DECAY, Method, register
from fpbma.methods._adapters import point
from fpbma.methods._swag import COLLECTION, swa_start


def _build(problem, hp, run):
    tx = fswag(run.learning_rate, rho=hp["rho"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
               swa_start=swa_start(hp, run.num_steps), collect_every=hp["collect_every"],
               max_num_models=hp["max_num_models"])
    return point(problem, tx, lambda s: swag_posterior(s.opt_state))


FSWAG = register(Method(
    "fswag", defaults=dict(rho=0.05, momentum=0.9, weight_decay=0.0, **COLLECTION),
    build=_build, shared=SCHEDULED,
    search_space={"learning_rate": SEARCH_LEARNING_RATE, "rho": ("log_uniform", 0.01, 0.5),
                  "weight_decay": SEARCH_WEIGHT_DECAY},
    summary="F-SWAG: SWAG collected along SAM (Euclidean radius rho)"))
