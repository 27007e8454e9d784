"""SAM (Foret et al., 2021) through ``optax.contrib.sam`` in opaque mode.

    ε* = ρ g / ‖g‖₂,   g = ∇ℓ(w);     w ← OuterSGD(w, ∇ℓ(w + ε*)).

Only the adapter fpbma needs is added: ``update(grads, state, params, grad_fn=...)`` takes
``grad_fn(params) -> grads`` (the fpbma convention) and hands optax the ``(params, i)`` form it expects.
The perturbed pass runs inside ``update``, so BatchNorm statistics of that pass never reach the model.

Reference: Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021.
"""

from __future__ import annotations

from typing import Optional

import optax
import optax.contrib

from fpbma.baselines._common import check_number, outer_sgd

__all__ = ["sam", "wrap_grad_fn"]


def wrap_grad_fn(tx: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
    """Adapts a transform whose ``grad_fn`` takes ``(params, i)`` to one taking ``params`` only."""

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        if grad_fn is None:
            raise ValueError("SAM evaluates the gradient at the perturbed point itself: pass "
                             "grad_fn=lambda params: <gradient of the loss at params> to update().")
        return tx.update(updates, state, params, grad_fn=lambda p, _: grad_fn(p), **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def sam(learning_rate, rho: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0,
        nesterov: bool = False, batch_axis_name: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
    """SAM with an SGD-momentum outer optimizer.

    One ``update`` computes ε* = ρ g/‖g‖ from the incoming ``grads`` g, calls ``grad_fn(w + ε*)`` and
    applies the outer SGD (weight decay wd, momentum μ, rate η) to that gradient.

    Args:
      learning_rate: η > 0 (float or schedule).
      rho: radius ρ > 0 of the Euclidean ball.
      momentum: μ in [0, 1).
      weight_decay: wd ≥ 0.
      nesterov: Nesterov momentum in the outer step.
      batch_axis_name: pmap axis name, or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``grad_fn=lambda params: grads``.

    >>> import jax, jax.numpy as jnp, optax
    >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum((w - 1.0) ** 2))
    >>> tx = sam(0.1, rho=0.05, momentum=0.0)
    >>> w = jnp.zeros(2)                        # g = (−1, −1), ε* = −0.05 g/‖g‖
    >>> updates, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
    >>> [round(float(v), 4) for v in optax.apply_updates(w, updates)]  # −0.1 ∇ℓ(w + ε*) = 0.1 (1 + 0.05/√2)
    [0.1035, 0.1035]

    References:
      Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021.
    """
    check_number(rho, "rho", low=0.0, low_open=True)
    outer = outer_sgd(learning_rate, momentum, weight_decay, nesterov)
    adversarial = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    return wrap_grad_fn(optax.contrib.sam(outer, adversarial, sync_period=2, opaque_mode=True,
                                          batch_axis_name=batch_axis_name))
