"""Entropy-MCMC: Langevin on the joint energy of w and a guide w_a coupled by ‖w − w_a‖²/(2η).

Step size η_lr/N on U(w) = N ℓ(w) − log p(w), the cyclical schedule of cSGLD; both w and the guide w_a
are kept at the end of every cycle (two samples per cycle).

>>> from fpbma import methods
>>> methods.get("emcmc").defaults["eta"]
0.01

Reference: Li & Zhang, "Entropy-MCMC: Sampling from Flat Basins with Ease", ICLR 2024.
"""

from __future__ import annotations

from fpbma.baselines._emcmc import emcmc, guiding_params
from fpbma.methods import Method, register
from fpbma.methods._adapters import langevin


def _build(problem, hp, run):
    n_cycle = int(hp["n_cycle"])
    tx = emcmc(run.learning_rate / int(problem.num_data), eta=hp["eta"], temp=hp["temperature"],
               num_steps=run.num_steps, n_cycle=n_cycle, exploration_ratio=hp["exploration_ratio"], seed=hp["seed"])
    return langevin("emcmc", problem, tx, num_steps=run.num_steps, n_cycle=n_cycle, per_cycle=2,
                    collect=lambda params, opt_state: (params, guiding_params(opt_state)))


EMCMC = register(Method(
    "emcmc", defaults=dict(eta=1e-2, n_cycle=4, exploration_ratio=0.5, temperature=1.0, seed=0),
    build=_build, search_space={"learning_rate": ("log_uniform", 1e-3, 0.5), "temperature": ("log_uniform", 1e-3, 1.0)},
    summary="Entropy-MCMC (w and its guide sampled at the end of every cycle)"))
