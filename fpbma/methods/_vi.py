"""VI: FP-BMA's posterior, loss and update with ρ = 0, the ablation that isolates the perturbation.

q_θ (the problem's initial LowRankGaussian) is trained on L(θ) = E_{q_θ}[ℓ(w)] + β KL(q_θ ‖ p)/N by
:func:`fpbma.vi`: momentum SGD with weight decay on the means and the covariance parameters' rate scaled
by ``covariance_lr_scale``, one gradient pass per step. Its parameters after every step equal
``fpbma``'s with ``rho=0`` (which evaluates the gradient at θ twice), so any difference between the two
rows is the perturbation's.

>>> from fpbma import methods
>>> methods.get("vi").defaults["covariance_lr_scale"] == methods.get("fpbma").defaults["covariance_lr_scale"]
True

Reference: Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664.
"""

from __future__ import annotations

from fpbma import transforms
from fpbma.methods import Method, register
from fpbma.methods._adapters import on_initial_posterior
from fpbma.methods._fpbma import FPBMA

# FP-BMA's training fields without those of the perturbation.
_PERTURBATION_FIELDS = ("rho", "radius", "radius_steps", "blocks")


def _build(problem, hp, run):
    return on_initial_posterior("vi", problem, transforms.vi(run.learning_rate, **hp), run.kl_weight)


VI = register(Method(
    "vi", defaults={k: v for k, v in FPBMA.defaults.items() if k not in _PERTURBATION_FIELDS},
    build=_build, shared=FPBMA.shared,
    search_space={k: v for k, v in FPBMA.search_space.items() if k not in _PERTURBATION_FIELDS},
    summary="VI: FP-BMA's posterior and loss without the perturbation (rho = 0, one gradient pass)"))
