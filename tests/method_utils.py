"""Tiny problems the method harness (tests/test_methods.py) and the transfer tests share."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fpbma import methods, transfer
from fpbma.models.resnet import BatchNorm


class TinyNet(nn.Module):
    """Dense "conv" → BatchNorm → ReLU → head: the smallest network with all three kinds of leaves."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(6, name="conv1")(x.reshape(x.shape[0], -1))
        x = nn.relu(BatchNorm(name="bn1")(x, train))
        return nn.Dense(3, name="head")(x)


def tiny_transfer_problem():
    """``(model, stats, scheme, apply_fn, features, x, y)``: a SWAG prior of TinyNet on 24 examples, ``nl_ll``."""
    model = TinyNet()
    x = jax.random.normal(jax.random.PRNGKey(0), (24, 4, 4, 1))
    y = jnp.arange(24) % 3
    variables = model.init(jax.random.PRNGKey(1), x, train=False)
    stats = variables["batch_stats"]

    def loss(p, batch):
        logits = model.apply({"params": p, "batch_stats": stats}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    prior = transfer.fit_swag_prior(loss, variables["params"], [(x, y)] * 6, rank=2, collect_every=2, min_var=1e-2)
    scheme = transfer.make_scheme(prior, variables["params"], "nl_ll")
    apply_fn = lambda p, im: model.apply({"params": p, "batch_stats": stats}, im)  # noqa: E731
    features = lambda p, im: transfer.head_features(model, {"params": p, "batch_stats": stats}, im)  # noqa: E731
    return model, stats, scheme, apply_fn, features, x, y


def logistic_problem(num_data: int = 60):
    """Three well-separated 2-D Gaussian blobs and multinomial logistic regression: ``(problem, batch)``.

    The weights are a ``head`` (kernel, bias) starting at 0, so ℓ(w₀) = log 3; features are the inputs.
    """
    centres = jnp.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    y = jnp.arange(num_data) % 3
    x = centres[y] + 0.5 * jax.random.normal(jax.random.PRNGKey(3), (num_data, 2))

    def loss(w, batch, key):
        del key
        logits = batch["x"] @ w["head"]["kernel"] + w["head"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    params = {"head": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}
    problem = methods.plain_problem(loss, params, num_data, features=lambda w: x, labels=y)
    return problem, {"x": x, "y": y}
