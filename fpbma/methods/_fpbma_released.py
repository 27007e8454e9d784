"""FP-BMA with the released code's perturbation: the score of q at the step's sample, normalised per block.

The posterior, loss, second pass and update are FP-BMA's (:func:`fpbma.fpbma` with
``perturbation="released"``); only the perturbation differs: ε_k = ρ s_k/(‖s_k‖ + 10⁻¹²),
s_k = ∇_{θ_k} log q_θ(w) for each block k ∈ {mean, log_std, cov_factor} at the sampled weights w
(:func:`fpbma.released_perturbation`), so ρ is a Euclidean radius per block, not a KL radius, and the
loss gradient does not enter it. The density is q's own (the released code's σ-as-variance density is
not reproduced). For comparison with the released code; ``fpbma`` is the method of the paper's math.

>>> from fpbma import methods
>>> "radius" in methods.get("fpbma_released").defaults  # no KL ball: ρ is a per-block norm
False

Reference: Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664, and
its released code.
"""

from __future__ import annotations

from fpbma import transforms
from fpbma.methods import Method, register
from fpbma.methods._adapters import on_initial_posterior
from fpbma.methods._fpbma import FPBMA

# The released perturbation has no KL ball; damping only enters the optional natural-gradient step.
_FISHER_FIELDS = ("radius", "radius_steps", "blocks")


def _build(problem, hp, run):
    tx = transforms.fpbma(run.learning_rate, perturbation="released", **hp)
    return on_initial_posterior("fpbma_released", problem, tx, run.kl_weight)


FPBMA_RELEASED = register(Method(
    "fpbma_released", defaults={k: v for k, v in FPBMA.defaults.items() if k not in _FISHER_FIELDS},
    build=_build, shared=FPBMA.shared,
    search_space=FPBMA.search_space,
    summary="FP-BMA with the released code's perturbation (score of q, each block normalised to rho)"))
