"""SGD / MAP fine-tuning: the "DNN" row of the paper's tables.

The update (heavy-ball momentum, coupled L2 weight decay):

    g ← ∇ℓ(w) + wd · w,    m ← μ m + g,    w ← w − η m.

The fitted weights are a point estimate; wrap them with :func:`fpbma.types.point_mass` to
hand them to BMA code (a one-sample :class:`~fpbma.types.SampleSet`).

Reference: Robbins & Monro (1951); Polyak (1964) for momentum. As the "DNN" baseline in
Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664.
"""

from __future__ import annotations

import optax

from fpbma.baselines._common import outer_sgd

__all__ = ["sgd"]


def sgd(learning_rate, momentum: float = 0.9, weight_decay: float = 0.0,
        nesterov: bool = False) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay.

    Args:
      learning_rate: η > 0, a float or an optax schedule.
      momentum: μ in [0, 1).
      weight_decay: wd ≥ 0.
      nesterov: Nesterov momentum.

    Returns:
      An ``optax.GradientTransformation``.

    >>> import jax, jax.numpy as jnp, optax
    >>> grad = jax.grad(lambda w: 0.5 * jnp.sum((w - 1.0) ** 2))
    >>> tx = sgd(0.1, momentum=0.9)
    >>> w = jnp.zeros(2)
    >>> state = tx.init(w)
    >>> for _ in range(2):                      # m = 1, then 0.9 + 0.9: w = 0.1, then 0.28
    ...     updates, state = tx.update(grad(w), state, w)
    ...     w = optax.apply_updates(w, updates)
    >>> [round(float(v), 4) for v in w]
    [0.28, 0.28]
    """
    return outer_sgd(learning_rate, momentum, weight_decay, nesterov)
