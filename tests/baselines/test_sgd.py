"""SGD/MAP: steps with momentum and weight decay equal the formula by hand."""


import jax.numpy as jnp
import numpy as np
import pytest

from fpbma.baselines import _sgd as sgd_lib


def test_steps_equal_hand_computation():
    lr, mu, wd = 0.1, 0.5, 0.2
    tx = sgd_lib.sgd(lr, momentum=mu, weight_decay=wd)
    w = jnp.array([1.0, -2.0])
    state = tx.init(w)
    w_np, m_np = np.array([1.0, -2.0]), np.zeros(2)
    for g in ([0.5, 0.5], [-1.0, 2.0]):
        u, state = tx.update(jnp.asarray(g), state, w)
        w = w + u
        m_np = mu * m_np + np.asarray(g) + wd * w_np
        w_np = w_np - lr * m_np
        np.testing.assert_allclose(np.asarray(w), w_np, rtol=1e-6)


def test_sgd_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="momentum"):
        sgd_lib.sgd(0.1, momentum=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        sgd_lib.sgd(0.1, weight_decay=-1.0)
