"""Fisher SAM (Kim et al., 2022): SAM whose ball is measured with a diagonal empirical Fisher.

With g = ∇ℓ(w) and the metric M = I + η diag(g²), the maximiser of gᵀε subject to εᵀMε ≤ ρ² is

    f  = M⁻¹ g = g / (1 + η g²),
    ε* = ρ f / √(gᵀ f),
    w  ← OuterSGD(w, ∇ℓ(w + ε*)),

which is :func:`fpbma.perturb_along_metric` with the inverse-metric product g ↦ g/(1 + η g²) — the
same machinery FP-BMA uses with the posterior's Fisher.

Reference: Kim, Li, Hu & Hospedales, "Fisher SAM: Information Geometry and Sharpness Aware
Minimisation", ICML 2022.
"""

from __future__ import annotations

from typing import Optional

import jax
import optax

from fpbma.baselines._common import check_number, outer_sgd
from fpbma.transforms import perturb_along_metric

__all__ = ["fsam", "fisher_sam_inverse_metric_vp"]


def fisher_sam_inverse_metric_vp(eta: float):
    """``(params, g) -> g / (1 + η g²)``: M⁻¹ g for FSAM's metric M = I + η diag(g²)."""
    check_number(eta, "eta", low=0.0)
    return lambda params, g: jax.tree.map(lambda x: x / (1.0 + eta * x * x), g)


def fsam(learning_rate, rho: float = 0.1, eta: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
         nesterov: bool = False, batch_axis_name: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
    """Fisher SAM with an SGD-momentum outer optimizer.

    Args:
      learning_rate: η_lr > 0 (float or schedule).
      rho: radius ρ > 0.
      eta: η ≥ 0, the weight of the empirical Fisher in the metric (η = 0 is SAM).
      momentum: μ in [0, 1).
      weight_decay: wd ≥ 0 (coupled L2 on the weights).
      nesterov: Nesterov momentum in the outer step.
      batch_axis_name: pmap axis name, or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``grad_fn=lambda params: grads``.

    >>> import jax, jax.numpy as jnp, optax
    >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum((w - 1.0) ** 2))
    >>> tx = fsam(0.1, rho=0.05, eta=1.0, momentum=0.0)
    >>> w = jnp.zeros(2)                        # g = (−1, −1): f = g/2, ε* = 0.05 f/√(gᵀf)
    >>> updates, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
    >>> [round(float(v), 4) for v in optax.apply_updates(w, updates)]  # 0.1 (1 + 0.025)
    [0.1025, 0.1025]

    References:
      Kim et al., "Fisher SAM: Information Geometry and Sharpness Aware Minimisation", ICML 2022.
    """
    check_number(rho, "rho", low=0.0, low_open=True)
    return optax.chain(perturb_along_metric(rho, fisher_sam_inverse_metric_vp(eta), batch_axis_name),
                       outer_sgd(learning_rate, momentum, weight_decay, nesterov))
