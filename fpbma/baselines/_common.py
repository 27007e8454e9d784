"""Shared helpers for the baselines: hyperparameter checks and the SGD-style outer update."""

from __future__ import annotations

import numbers
from typing import Any

import optax

from fpbma.transforms import _check_number as check_number  # one validation rule for the whole library

PyTree = Any


def check_int(value, name: str, *, low: int) -> int:
    """An integer hyperparameter >= ``low``; the error names it and the rule."""
    is_int = isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and float(value).is_integer())
    if isinstance(value, bool) or not is_int:
        raise TypeError(f"{name}={value!r} must be an integer >= {low}.")
    if int(value) < low:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= {low}.")
    return int(value)


def outer_sgd(learning_rate, momentum: float, weight_decay: float, nesterov: bool = False):
    """g ← g + wd·w;  m ← momentum·m + g;  update = −η m  (the SGD row and SAM/FSAM's outer step)."""
    check_number(learning_rate, "learning_rate", low=0.0, low_open=True)
    check_number(momentum, "momentum", low=0.0, high=1.0, high_open=True)
    check_number(weight_decay, "weight_decay", low=0.0)
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def find_state(state: Any, state_type: type, needed_by: str):
    """The ``state_type`` instance inside a (possibly chained or wrapped) optax state, depth first."""
    if isinstance(state, state_type):
        return state
    if isinstance(state, (tuple, list)):
        for s in state:
            try:
                return find_state(s, state_type, needed_by)
            except TypeError:
                pass
    raise TypeError(f"{needed_by} needs the state of an optimizer holding a {state_type.__name__}, "
                    f"got {type(state).__name__}.")
