"""Baselines of the FP-BMA paper on one interface: the optimizers and fit functions of every method.

Every method is an optax transform (SGD, SAM, FSAM, bSAM, SGLD/cSGLD, E-MCMC, SWAG/F-SWAG collection,
FP-BMA) or a fit function (MOPED, last-layer Laplace) whose result is something
:func:`fpbma.types.draw` accepts: a posterior family of :mod:`fpbma.posterior`, an object with
``sample(key, n)``, or a :class:`~fpbma.types.SampleSet`.

``METHODS`` maps the paper's names to these constructors, for users' own loops; :func:`build` validates
hyperparameter *names* against the constructor before calling it (values are checked by the
constructor itself). Training a method on a problem, with its defaults and its objective, is
:mod:`fpbma.methods` (the registry of method names the experiments use). Each algorithm lives in a
private module (``_sam.py``, ``_swag.py`` …) re-exported here.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict

from fpbma.baselines._bsam import BSAMState, bsam, bsam_posterior
from fpbma.baselines._emcmc import EMCMCState, emcmc, guiding_params
from fpbma.baselines._fsam import fsam
from fpbma.baselines._laplace import (FullGaussian, LaplaceFit, LastLayerPosterior, fit_last_layer_laplace,
                                     last_layer_posterior, mc_predictive)
from fpbma.baselines._moped import MOPED, moped, moped_init
from fpbma.baselines._sam import sam
from fpbma.baselines._sgd import sgd
from fpbma.baselines._sgld import (PRECONDITIONERS, PSGLDState, SGLDState, csgld, cyclical_cosine_schedule,
                                   is_cycle_end, sgld)
from fpbma.baselines._swag import SWAGState, fswag, swag, swag_posterior, swag_samples
from fpbma.types import SampleSet, draw, num_samples, point_mass, stack_samples
from fpbma.transforms import fpbma as _fpbma


def _swag_sgd(learning_rate, momentum: float = 0.9, weight_decay: float = 0.0, swa_start: int = 0,
              collect_every: int = 1, max_num_models: int = 20):
    """SWAG collected along SGD-momentum (Maddox et al., 2019); see :func:`fpbma.baselines.swag`."""
    return swag(sgd(learning_rate, momentum=momentum, weight_decay=weight_decay), swa_start=swa_start,
                collect_every=collect_every, max_num_models=max_num_models)


METHODS: Dict[str, Callable] = {
    "fpbma": _fpbma,
    "sgd": sgd,
    "sam": sam,
    "fsam": fsam,
    "bsam": bsam,
    "moped": moped,
    "sgld": csgld,
    "emcmc": emcmc,
    "swag": _swag_sgd,
    "fswag": fswag,
    "laplace": fit_last_layer_laplace,
}


def hyperparameter_names(name: str) -> tuple:
    """The keyword names ``METHODS[name]`` accepts."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}.")
    params = inspect.signature(METHODS[name]).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def build(name: str, **hyperparameters):
    """``METHODS[name](**hyperparameters)`` after checking every name is one the method takes.

    >>> import jax, jax.numpy as jnp, optax
    >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum((w - 1.0) ** 2))   # ℓ(w) = ½‖w − 1‖²
    >>> tx = build("sam", learning_rate=0.1, rho=0.05, momentum=0.0)
    >>> w = jnp.zeros(2)
    >>> updates, state = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
    >>> [round(float(v), 4) for v in optax.apply_updates(w, updates)]  # 0.1 · ∇ℓ(w + ε*)
    [0.1035, 0.1035]
    >>> build("sam", learning_rate=0.1, radius=0.05)
    Traceback (most recent call last):
    ...
    ValueError: method 'sam' does not take hyperparameter(s) ['radius']; it takes ['learning_rate', 'rho', 'momentum', 'weight_decay', 'nesterov', 'batch_axis_name'].
    """
    allowed = hyperparameter_names(name)
    unknown = sorted(set(hyperparameters) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} does not take hyperparameter(s) {unknown}; it takes {list(allowed)}.")
    return METHODS[name](**hyperparameters)


__all__ = [
    "METHODS", "build", "hyperparameter_names",
    "SampleSet", "draw", "num_samples", "point_mass", "stack_samples",
    "sgd", "sam", "fsam", "bsam", "bsam_posterior", "BSAMState", "moped", "moped_init", "MOPED",
    "sgld", "csgld", "cyclical_cosine_schedule", "is_cycle_end", "SGLDState", "PSGLDState", "PRECONDITIONERS",
    "emcmc", "guiding_params", "EMCMCState",
    "swag", "fswag", "swag_posterior", "swag_samples", "SWAGState",
    "FullGaussian", "LaplaceFit", "LastLayerPosterior", "fit_last_layer_laplace", "last_layer_posterior",
    "mc_predictive",
]
