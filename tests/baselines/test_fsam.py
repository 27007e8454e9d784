"""FSAM: steps on a quadratic equal Kim et al. (2022)'s perturbation computed by hand."""


import jax.numpy as jnp
import numpy as np
import pytest

from fpbma.baselines import _fsam as fsam_lib
from fpbma.baselines import _sam as sam_lib

A = np.array([[2.0, 0.5], [0.5, 1.0]])
B = np.array([1.0, -1.0])


def grad_fn(w):
    return jnp.asarray(A, jnp.float32) @ w - jnp.asarray(B, jnp.float32)


def test_two_steps_on_quadratic_equal_hand_computation():
    lr, rho, eta, mu, wd = 0.05, 0.1, 2.0, 0.9, 0.01
    tx = fsam_lib.fsam(lr, rho=rho, eta=eta, momentum=mu, weight_decay=wd)
    w = jnp.array([0.3, -0.2])
    state = tx.init(w)
    w_np, m_np = np.array([0.3, -0.2]), np.zeros(2)
    for _ in range(2):
        u, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
        w = w + u
        g = A @ w_np - B
        f = g / (1 + eta * g * g)  # f = (I + η diag g²)⁻¹ g
        eps = rho * f / np.sqrt(g @ f)
        d = A @ (w_np + eps) - B + wd * w_np
        m_np = mu * m_np + d
        w_np = w_np - lr * m_np
        np.testing.assert_allclose(np.asarray(w), w_np, rtol=1e-5)


def test_eta_zero_is_sam():
    w = jnp.array([0.3, -0.2])
    f, s = fsam_lib.fsam(0.05, rho=0.1, eta=0.0), sam_lib.sam(0.05, rho=0.1)
    uf, _ = f.update(grad_fn(w), f.init(w), w, grad_fn=grad_fn)
    us, _ = s.update(grad_fn(w), s.init(w), w, grad_fn=grad_fn)
    np.testing.assert_allclose(np.asarray(uf), np.asarray(us), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [(dict(rho=0.0), "rho"), (dict(eta=-1.0), "eta"),
                                           (dict(momentum=1.0), "momentum"), (dict(learning_rate=0.0), "learning_rate")])
def test_fsam_rejects_bad_hyperparameters(kwargs, match):
    base = dict(learning_rate=0.1)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fsam_lib.fsam(**base)
