"""Every training method behind one interface, and the registry that is the single list of their names.

A method is a :class:`Method`: its name, its default hyperparameters and a ``build`` that turns a
:class:`fpbma.types.Problem` (the objective's pieces: the mean loss ℓ, the start, N, and where needed an
initial posterior, a KL term, a log-prior, head features) into a :class:`fpbma.types.Trainer`. Methods
share a few adapters (:mod:`fpbma.methods._adapters`): a variational one (the per-example negative
ELBO E_q[ℓ(w)] + β KL(q ‖ p)/N), a point estimate (ℓ), a point estimate whose optimizer collects
moments (SWAG), a Langevin sampler with a sample buffer (U(w) = N ℓ(w) − log p(w)) and a post-hoc fit.

``names()`` is the list every other place derives from: the experiments' ``config.hparams.<method>``
sections, their validation and help, :func:`fpbma.transfer.make_trainer` and the test harness. A new
method is one module that calls :func:`register`; nothing else needs an edit.

>>> import jax, jax.numpy as jnp
>>> from fpbma import methods
>>> loss = lambda w, batch, key: jnp.mean((batch["x"] @ w["head"]["kernel"] - batch["y"]) ** 2)
>>> problem = methods.plain_problem(loss, {"head": {"kernel": jnp.zeros((2, 1))}}, num_data=4)
>>> trainer = methods.get("sam").trainer(problem, learning_rate=0.1, num_steps=10, rho=0.01)
>>> state = trainer.init()
>>> batch = {"x": jnp.eye(2), "y": jnp.ones((2, 1))}
>>> state = jax.jit(trainer.step)(state, batch, jax.random.PRNGKey(0))
>>> int(state.step)
1

References:
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664 (the methods
  compared in its tables).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fpbma import posterior as post
from fpbma.types import HEAD, LossFn, Problem, Trainer

__all__ = ["Method", "TrainingSettings", "SHARED_FIELDS", "register", "unregister", "get", "names",
           "plain_problem"]

SHARED_FIELDS = ("learning_rate", "steps", "kl_weight")
"""Training fields every run sets once (``config.transfer.<field>``) and a method may override."""


class TrainingSettings(NamedTuple):
    """The shared training fields of one run: η, the number of steps K, the KL weight β."""

    learning_rate: Any
    num_steps: int
    kl_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method: defaults, and how to build its :class:`fpbma.types.Trainer` on a problem.

    Attributes:
      name: the method's name (``--config.method=NAME``).
      defaults: every hyperparameter of the method with its default value (bool, int, float or str).
      build: ``(problem, hyperparameters, settings) -> Trainer`` with the resolved hyperparameters (all
        names of ``defaults``) and the run's :class:`TrainingSettings`.
      summary: one line for help texts.
      shared: the :data:`SHARED_FIELDS` the method uses (``kl_weight`` only for variational methods).
    """

    name: str
    defaults: Mapping[str, Any]
    build: Callable[[Problem, dict, TrainingSettings], Trainer]
    summary: str = ""
    shared: tuple = ("learning_rate", "steps")

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"method name {self.name!r} must be a Python identifier (it is a config key).")
        for k, v in self.defaults.items():
            if k in SHARED_FIELDS:
                raise ValueError(f"method {self.name!r}: {k!r} is a shared training field, not a hyperparameter.")
            if not isinstance(v, (bool, int, float, str)):
                raise ValueError(f"method {self.name!r}: default {k}={v!r} must be a bool, int, float or str "
                                 "(every hyperparameter is a config field).")
        unknown = [s for s in self.shared if s not in SHARED_FIELDS]
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown shared field(s) {unknown}; choose from {SHARED_FIELDS}.")

    def hyperparameters(self, overrides: Optional[Mapping[str, Any]] = None) -> dict:
        """The defaults updated by ``overrides``; an unknown name raises one line naming the valid ones."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise ValueError(f"method {self.name!r} has no hyperparameter(s) {unknown}; its hyperparameters are "
                             f"{sorted(self.defaults)}.")
        return {**self.defaults, **overrides}

    def trainer(self, problem: Problem, *, learning_rate, num_steps: int, kl_weight: float = 1.0,
                **hyperparameters) -> Trainer:
        """The method's :class:`fpbma.types.Trainer` on ``problem`` (defaults updated by ``hyperparameters``)."""
        return self.build(problem, self.hyperparameters(hyperparameters),
                          TrainingSettings(learning_rate, int(num_steps), kl_weight))

    def check(self, hyperparameters: Optional[Mapping[str, Any]] = None, *, learning_rate=0.01,
              num_steps: int = 100, kl_weight: float = 1.0, num_data: int = 1) -> None:
        """Raises the error a run with these settings would raise when it builds its trainer, before any work.

        The trainer is built on a two-number probe problem (nothing is traced or compiled), so every value
        check of the method's constructors runs.
        """
        self.trainer(_probe_problem(num_data), learning_rate=learning_rate, num_steps=num_steps,
                     kl_weight=kl_weight, **dict(hyperparameters or {}))


_REGISTRY: dict = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Adds ``method`` to the registry (under ``method.name``) and returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a fpbma.methods.Method, got {type(method).__name__}.")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is registered already; pass replace=True to replace it.")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Removes a method from the registry (e.g. a test's toy method) and returns it."""
    return _REGISTRY.pop(get(name).name)


def get(name: str) -> Method:
    """The registered method ``name``; an unknown name raises one line naming the registered ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {list(_REGISTRY)}.")
    return _REGISTRY[name]


def names() -> tuple:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def plain_problem(loss_fn: LossFn, params, num_data: int, *, posterior=None, kl=None, log_prior=None,
                  features=None, labels=None, head: Optional[str] = HEAD, head_variance: float = 1e-4,
                  rank: int = 2) -> Problem:
    """A :class:`fpbma.types.Problem` for a user's own loss ``loss_fn(params, batch, key)`` and loop.

    Methods that train a posterior start from ``posterior``, by default the point ``params`` as a
    :class:`fpbma.LowRankGaussian` with variance α = ``head_variance`` and ``rank`` zero deviation columns.
    """
    if posterior is None:
        half_log = 0.5 * math.log(head_variance)
        posterior = post.LowRankGaussian(
            mean=params, log_std=jax.tree.map(lambda x: jnp.full(jnp.shape(x), half_log, jnp.float32), params),
            cov_factor=jax.tree.map(lambda x: jnp.zeros((rank,) + jnp.shape(x), jnp.float32), params))
    return Problem(loss=loss_fn, init_params=params, num_data=int(num_data), init_posterior=posterior, kl=kl,
                   log_prior=log_prior, features=features, labels=labels, head=head, head_variance=head_variance)


def _probe_problem(num_data: int) -> Problem:
    params = {HEAD: {"kernel": jnp.zeros((1, 2), jnp.float32), "bias": jnp.zeros((2,), jnp.float32)}}
    return plain_problem(lambda w, batch, key: jnp.zeros([], jnp.float32), params, max(int(num_data), 1),
                         features=lambda w: jnp.zeros((1, 1), jnp.float32), labels=jnp.zeros((1,), jnp.int32))


# The methods of the paper's tables, in the order they are listed; each module registers its method.
from fpbma.methods._fpbma import FPBMA  # noqa: E402
from fpbma.methods._sgd import SGD  # noqa: E402
from fpbma.methods._sam import SAM  # noqa: E402
from fpbma.methods._fsam import FSAM  # noqa: E402
from fpbma.methods._bsam import BSAM  # noqa: E402
from fpbma.methods._moped import MOPED  # noqa: E402
from fpbma.methods._sgld import SGLD  # noqa: E402
from fpbma.methods._emcmc import EMCMC  # noqa: E402
from fpbma.methods._swag import SWAG  # noqa: E402
from fpbma.methods._fswag import FSWAG  # noqa: E402
from fpbma.methods._laplace import LAPLACE  # noqa: E402

__all__ += ["FPBMA", "SGD", "SAM", "FSAM", "BSAM", "MOPED", "SGLD", "EMCMC", "SWAG", "FSWAG", "LAPLACE"]
