"""bSAM: the mean m of q = N(m, 1/(N s)) moved by SAM's step at a noisy sample, the precision s in the state.

The result is the DiagGaussian :func:`fpbma.baselines.bsam_posterior` (log σ = −½ log(N s)).

>>> from fpbma import methods
>>> methods.get("bsam").defaults["s_init"]
1.0

Reference: Möllenhoff & Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023.
"""

from __future__ import annotations

from fpbma.baselines._bsam import bsam, bsam_posterior
from fpbma.methods import SCHEDULED, SEARCH_WEIGHT_DECAY, Method, register
from fpbma.methods._adapters import point


def _build(problem, hp, run):
    n = int(problem.num_data)
    return point(problem, bsam(run.learning_rate, num_data=n, **hp), lambda s: bsam_posterior(s.params, s.opt_state, n))


BSAM = register(Method(
    "bsam", defaults=dict(rho=0.05, beta1=0.9, beta2=0.999, weight_decay=0.0, damping=0.1, s_init=1.0,
                          noise_scale=1.0, seed=0),
    build=_build, shared=SCHEDULED,
    search_space={"learning_rate": ("log_uniform", 1e-3, 1.0), "rho": ("log_uniform", 0.01, 0.5),
                  "weight_decay": SEARCH_WEIGHT_DECAY},
    summary="Bayesian SAM (a diagonal Gaussian from the precision of the update)"))
