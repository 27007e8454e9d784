"""FP-BMA: a posterior q_θ trained by the sharpness-aware objective min_θ max_{KL(q_{θ+Δ} ‖ q_θ) ≤ γ} L(θ + Δ).

L(θ) = E_{q_θ}[ℓ(w)] + β KL(q_θ ‖ p)/N, optimised by :func:`fpbma.fpbma` (Δ* = τ F⁻¹g with the posterior's Fisher F and
τ such that KL(q_{θ+Δ*} ‖ q_θ) = ρ²/2, ρ = √(2γ) in nats^½; ``radius="second_order"`` takes the paper's
τ = ρ/√(gᵀF⁻¹g)) from the problem's initial posterior.

>>> from fpbma import methods
>>> methods.get("fpbma").defaults["rho"]
0.05

Reference: Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664.
"""

from __future__ import annotations

from fpbma import transforms
from fpbma.methods import SEARCH_LEARNING_RATE, SEARCH_WEIGHT_DECAY, VARIATIONAL, Method, register
from fpbma.methods._adapters import on_initial_posterior


def build_named(name: str):
    """The ``build`` of a method that trains :func:`fpbma.fpbma` with its hyperparameters (errors name ``name``)."""
    def build(problem, hp, run):
        return on_initial_posterior(name, problem, transforms.fpbma(run.learning_rate, **hp), run.kl_weight)
    return build


FPBMA = register(Method(
    "fpbma",
    defaults=dict(rho=0.05, momentum=0.9, damping=1e-3, covariance_lr_scale=0.1, weight_decay=0.0,
                  natural_gradient=False, nesterov=False, radius="exact_kl", radius_steps=4, blocks="all"),
    build=build_named("fpbma"), shared=VARIATIONAL,
    search_space={"learning_rate": SEARCH_LEARNING_RATE, "rho": ("log_uniform", 0.01, 10.0),
                  "covariance_lr_scale": ("log_uniform", 0.01, 1.0), "weight_decay": SEARCH_WEIGHT_DECAY},
    summary="FP-BMA: the posterior trained in a KL ball of radius rho (nats^1/2) around it"))

