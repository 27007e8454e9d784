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
import numpy as np
import optax

from fpbma import posterior as post
from fpbma.types import HEAD, LossFn, Problem, Trainer

__all__ = ["Method", "TrainingSettings", "SHARED_FIELDS", "SCHEDULED", "VARIATIONAL", "SCHEDULES",
           "learning_rate_schedule", "SEARCH_KINDS", "SEARCH_LEARNING_RATE", "SEARCH_WEIGHT_DECAY", "register",
           "unregister", "get", "names", "plain_problem"]

SHARED_FIELDS = ("learning_rate", "steps", "kl_weight", "schedule", "warmup_steps")
"""Training fields every run sets once (``config.transfer.<field>``) and a method may override."""

SCHEDULED = ("learning_rate", "steps", "schedule", "warmup_steps")
"""The shared fields of a method whose optimizer takes an optax schedule as its learning rate."""

VARIATIONAL = ("learning_rate", "steps", "kl_weight", "schedule", "warmup_steps")
"""The shared fields of a scheduled method that trains a posterior on E_q[ℓ] + β KL/N."""

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(learning_rate, num_steps: int, schedule: str = "constant", warmup_steps: int = 0):
    """η_t of a run of K = ``num_steps`` steps: constant or cosine, after a linear warm-up of W steps.

    * ``"constant"``, W = 0: the float η itself (no schedule object, the optimizer's constant rate);
    * ``"constant"``, W > 0: η_t = η t/W for t < W, then η;
    * ``"cosine"``: ``optax.warmup_cosine_decay_schedule(0, η, W, K, 0)``: η t/W for t < W, then
      η · ½(1 + cos(π (t − W)/(K − W))) down to 0 at t = K.

    Bad input raises one line before any work.

    >>> sched = learning_rate_schedule(0.1, num_steps=10, schedule="cosine", warmup_steps=2)
    >>> [round(float(sched(t)), 4) for t in (0, 1, 2, 6, 10)]
    [0.0, 0.05, 0.1, 0.05, 0.0]

    References:
      Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017 (cosine
      decay); the paper's protocol (Lim et al., arXiv:2406.15664) trains with cosine decay and warm-up.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not a learning-rate schedule; use one of {SCHEDULES}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be an integer >= 0 (steps of linear warm-up).")
    if warmup_steps > num_steps:
        raise ValueError(f"warmup_steps={warmup_steps} exceeds steps={num_steps}: the warm-up would never end; "
                         f"use warmup_steps <= {num_steps}.")
    if schedule == "cosine" and warmup_steps == num_steps:
        raise ValueError(f"warmup_steps={warmup_steps} leaves no step for the cosine decay (steps={num_steps}); "
                         f"use warmup_steps < {num_steps}.")
    if callable(learning_rate):
        raise TypeError("learning_rate must be a number here: the schedule is chosen by schedule= and warmup_steps=.")
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, int(warmup_steps), int(num_steps), 0.0)
    if warmup_steps == 0:
        return learning_rate
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, int(warmup_steps)),
                                 optax.constant_schedule(learning_rate)], [int(warmup_steps)])


SEARCH_KINDS = ("log_uniform", "uniform", "choice")
"""The forms of a search-space entry: ``("log_uniform", low, high)`` (0 < low < high, sampled uniformly in
log), ``("uniform", low, high)`` (low < high) and ``("choice", (value, ...))``."""

SEARCH_LEARNING_RATE = ("log_uniform", 1e-3, 1e-1)
"""Every method's learning-rate range (the paper's protocol grids η over 1e-1 … 1e-3)."""

SEARCH_WEIGHT_DECAY = ("choice", (0.0, 1e-4, 5e-4))
"""The weight decays searched for methods whose optimizer has one (0 is the default)."""


def _check_search_space(method) -> None:
    valid = set(method.defaults) | set(method.shared)
    for key, spec in method.search_space.items():
        where = f"method {method.name!r}: search_space[{key!r}]={spec!r}"
        if key not in valid:
            raise ValueError(f"{where} names no hyperparameter or shared field; choose from {sorted(valid)}.")
        kind = spec[0] if isinstance(spec, tuple) and spec else None
        if kind not in SEARCH_KINDS:
            raise ValueError(f"{where} must be a tuple starting with one of {SEARCH_KINDS}.")
        if kind == "choice":
            ok = len(spec) == 2 and isinstance(spec[1], tuple) and len(spec[1]) > 0 and all(
                isinstance(v, (bool, int, float, str)) for v in spec[1])
            if not ok:
                raise ValueError(f"{where} must be ('choice', (value, ...)) with at least one bool/int/float/str.")
            continue
        ok = len(spec) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                    for v in spec[1:]) and spec[1] < spec[2]
        if not ok or (kind == "log_uniform" and spec[1] <= 0):
            bound = "0 < low < high" if kind == "log_uniform" else "low < high"
            raise ValueError(f"{where} must be ({kind!r}, low, high) with finite {bound}.")


class TrainingSettings(NamedTuple):
    """The shared training fields of one run: η (a float or, for scheduled methods, an optax schedule),
    the number of steps K, the KL weight β, and the schedule it was built from."""

    learning_rate: Any
    num_steps: int
    kl_weight: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method: defaults, and how to build its :class:`fpbma.types.Trainer` on a problem.

    Attributes:
      name: the method's name (``--config.method=NAME``).
      defaults: every hyperparameter of the method with its default value (bool, int, float or str).
      build: ``(problem, hyperparameters, settings) -> Trainer`` with the resolved hyperparameters (all
        names of ``defaults``) and the run's :class:`TrainingSettings`.
      summary: one line for help texts.
      shared: the :data:`SHARED_FIELDS` the method uses (``kl_weight`` only for variational methods;
        ``schedule`` and ``warmup_steps`` only for methods whose optimizer takes an optax schedule, which
        then gets ``settings.learning_rate`` = :func:`learning_rate_schedule`; see :data:`SCHEDULED`).
      search_space: the ranges a tuner searches on a validation split, by hyperparameter or shared field
        name, each one of the :data:`SEARCH_KINDS` forms (e.g. ``{"learning_rate": ("log_uniform", 1e-3,
        1e-1), "rho": ("log_uniform", 0.01, 10.0)}``). The library does not tune; it only states the space.
    """

    name: str
    defaults: Mapping[str, Any]
    build: Callable[[Problem, dict, TrainingSettings], Trainer]
    summary: str = ""
    shared: tuple = ("learning_rate", "steps")
    search_space: Mapping[str, tuple] = dataclasses.field(default_factory=dict)

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
        _check_search_space(self)

    def hyperparameters(self, overrides: Optional[Mapping[str, Any]] = None) -> dict:
        """The defaults updated by ``overrides``; an unknown name raises one line naming the valid ones."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise ValueError(f"method {self.name!r} has no hyperparameter(s) {unknown}; its hyperparameters are "
                             f"{sorted(self.defaults)}.")
        return {**self.defaults, **overrides}

    def settings(self, *, learning_rate, num_steps: int, kl_weight: float = 1.0, schedule: str = "constant",
                 warmup_steps: int = 0) -> TrainingSettings:
        """The :class:`TrainingSettings` the method's ``build`` gets; bad schedule fields raise one line."""
        scheduled = "schedule" in self.shared
        if not scheduled and (schedule != "constant" or warmup_steps != 0):
            raise ValueError(f"method {self.name!r} takes no learning-rate schedule (its shared fields are "
                             f"{list(self.shared)}); leave schedule='constant' and warmup_steps=0.")
        rate = learning_rate_schedule(learning_rate, int(num_steps), schedule, warmup_steps) if scheduled \
            else learning_rate
        return TrainingSettings(rate, int(num_steps), kl_weight, schedule, int(warmup_steps))

    def trainer(self, problem: Problem, *, learning_rate, num_steps: int, kl_weight: float = 1.0,
                schedule: str = "constant", warmup_steps: int = 0, **hyperparameters) -> Trainer:
        """The method's :class:`fpbma.types.Trainer` on ``problem`` (defaults updated by ``hyperparameters``).

        ``schedule`` / ``warmup_steps`` (methods with ``"schedule"`` in :attr:`shared`) turn the peak rate
        ``learning_rate`` into :func:`learning_rate_schedule` (learning_rate, num_steps, schedule, warmup_steps).
        """
        hp = self.hyperparameters(hyperparameters)
        return self.build(problem, hp, self.settings(learning_rate=learning_rate, num_steps=num_steps,
                                                     kl_weight=kl_weight, schedule=schedule,
                                                     warmup_steps=warmup_steps))

    def check(self, hyperparameters: Optional[Mapping[str, Any]] = None, *, learning_rate=0.01,
              num_steps: int = 100, kl_weight: float = 1.0, num_data: int = 1, schedule: str = "constant",
              warmup_steps: int = 0) -> None:
        """Raises the error a run with these settings would raise when it builds its trainer, before any work.

        The trainer is built on a two-number probe problem (nothing is traced or compiled), so every value
        check of the method's constructors runs.
        """
        self.trainer(_probe_problem(num_data), learning_rate=learning_rate, num_steps=num_steps,
                     kl_weight=kl_weight, schedule=schedule, warmup_steps=warmup_steps,
                     **dict(hyperparameters or {}))


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
                  rank: int = 2, model_state=None) -> Problem:
    """A :class:`fpbma.types.Problem` for a user's own loss ``loss_fn(params, batch, key)`` and loop.

    With ``model_state`` (e.g. BatchNorm statistics updated in train mode) the loss is
    ``loss_fn(params, batch, key, model_state) -> (loss, new_model_state)`` (point estimates only).

    Methods that train a posterior start from ``posterior``, by default the point ``params`` as a
    :class:`fpbma.LowRankGaussian` with variance α = ``head_variance`` and ``rank`` zero deviation columns.
    """
    if posterior is None:
        half_log = 0.5 * math.log(head_variance)
        posterior = post.LowRankGaussian(
            mean=params, log_std=jax.tree.map(lambda x: jnp.full(jnp.shape(x), half_log, jnp.float32), params),
            cov_factor=jax.tree.map(lambda x: jnp.zeros((rank,) + jnp.shape(x), jnp.float32), params))
    return Problem(loss=loss_fn, init_params=params, num_data=int(num_data), init_posterior=posterior, kl=kl,
                   log_prior=log_prior, features=features, labels=labels, head=head, head_variance=head_variance,
                   model_state=model_state)


def _probe_problem(num_data: int) -> Problem:
    params = {HEAD: {"kernel": jnp.zeros((1, 2), jnp.float32), "bias": jnp.zeros((2,), jnp.float32)}}
    return plain_problem(lambda w, batch, key: jnp.zeros([], jnp.float32), params, max(int(num_data), 1),
                         features=lambda w: jnp.zeros((1, 1), jnp.float32), labels=jnp.zeros((1,), jnp.int32))


# The methods of the paper's tables (FP-BMA and its two ablations first), in the order they are listed; each
# module registers its method.
from fpbma.methods._fpbma import FPBMA  # noqa: E402
from fpbma.methods._vi import VI  # noqa: E402
from fpbma.methods._fpbma_released import FPBMA_RELEASED  # noqa: E402
from fpbma.methods._fpbma_mean import FPBMA_MEAN  # noqa: E402
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

__all__ += ["FPBMA", "VI", "FPBMA_RELEASED", "FPBMA_MEAN", "SGD", "SAM", "FSAM", "BSAM", "MOPED", "SGLD", "EMCMC", "SWAG", "FSWAG",
            "LAPLACE"]
