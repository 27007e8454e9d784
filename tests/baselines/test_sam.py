"""SAM (via optax.contrib.sam, opaque mode): steps on a quadratic equal Foret et al. (2021) by hand."""


import jax.numpy as jnp
import numpy as np
import pytest

from fpbma.baselines import _sam as sam_lib

A = np.array([[2.0, 0.5], [0.5, 1.0]])
B = np.array([1.0, -1.0])


def grad_fn(w):
    return jnp.asarray(A, jnp.float32) @ w - jnp.asarray(B, jnp.float32)


def test_three_steps_on_quadratic_equal_hand_computation():
    lr, rho, mu, wd = 0.05, 0.2, 0.9, 0.01
    tx = sam_lib.sam(lr, rho=rho, momentum=mu, weight_decay=wd)
    w = jnp.array([0.3, -0.2])
    state = tx.init(w)
    w_np, m_np = np.array([0.3, -0.2]), np.zeros(2)
    for _ in range(3):
        u, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
        w = w + u
        g = A @ w_np - B
        d = A @ (w_np + rho * g / np.linalg.norm(g)) - B + wd * w_np
        m_np = mu * m_np + d
        w_np = w_np - lr * m_np
        np.testing.assert_allclose(np.asarray(w), w_np, rtol=1e-5)


def test_sam_requires_grad_fn_and_positive_rho():
    tx = sam_lib.sam(0.1)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
    with pytest.raises(ValueError, match="rho"):
        sam_lib.sam(0.1, rho=0.0)
