"""Split a network's parameters into the Bayesian subset and the frozen rest (docs page :doc:`/transfer`).

Schemes:

* ``"nl_ll"`` — every normalisation layer's scale/bias (a module name containing ``norm`` or a
  ``bn`` token: ``bn1``, ``downsample_bn``, ``norm1``, ``LayerNorm_0``) plus the classifier
  ``head``: the subset the paper trains with FP-BMA;
* ``"last_layer"`` — the ``head`` only;
* ``"full"`` — every parameter.

The two returned trees are nested dicts holding disjoint leaves; :func:`merge` puts them back.
Every leaf is checked to land in exactly one of them, and a scheme that selects nothing of what it
promises (no ``head``, no normalisation layer) is an error rather than a silently empty subset.

References:
  Lim et al. Flat Posterior Does Matter For Bayesian Model Averaging. arXiv 2406.15664, §4.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
from flax import traverse_util

SCHEMES = ("nl_ll", "last_layer", "full")

_NORM_NAME = re.compile(r"norm|(^|_)bn(\d+|_|$)", re.IGNORECASE)


def _is_head(path: tuple[str, ...]) -> bool:
    return path[0] == "head"


def _is_norm(path: tuple[str, ...]) -> bool:
    return any(_NORM_NAME.search(name) for name in path[:-1])


def _rule(scheme: str) -> Callable[[tuple[str, ...]], bool]:
    if scheme == "nl_ll":
        return lambda path: _is_head(path) or _is_norm(path)
    if scheme == "last_layer":
        return _is_head
    if scheme == "full":
        return lambda path: True
    raise ValueError(f"Unknown partition scheme {scheme!r}; choose one of {SCHEMES}.")


def _flatten(params: Any) -> dict[tuple[str, ...], Any]:
    if not isinstance(params, dict) and not hasattr(params, "items"):
        raise TypeError(f"params must be a nested dict of arrays, got {type(params).__name__}.")
    if "params" in params and len(params) <= 2 and isinstance(params["params"], dict):
        raise ValueError("Pass variables['params'], not the whole variables dict, to partition.")
    return traverse_util.flatten_dict(dict(params))


def mask(params: Any, scheme: str = "nl_ll") -> Any:
    """A tree of bools shaped like ``params``: True where the leaf belongs to ``scheme``'s subset.

    Suitable for ``optax.masked`` / ``optax.multi_transform``.

    Args:
      params: ``variables["params"]`` of a model from :mod:`fpbma.models`.
      scheme: one of ``"nl_ll"``, ``"last_layer"``, ``"full"``.

    Returns:
      A nested dict of Python bools with the structure of ``params``.
    """
    rule = _rule(scheme)
    flat = _flatten(params)
    selected = {path: bool(rule(path)) for path in flat}
    if scheme in ("nl_ll", "last_layer") and not any(_is_head(p) for p in flat):
        raise ValueError(
            f"Scheme {scheme!r} needs a classifier module named 'head'; top-level modules are "
            f"{sorted({p[0] for p in flat})}.")
    if scheme == "nl_ll" and not any(_is_norm(p) for p in flat):
        raise ValueError(
            "Scheme 'nl_ll' found no normalisation layer (module names containing 'norm' or 'bn'); "
            "use scheme='last_layer' for a network without normalisation.")
    return traverse_util.unflatten_dict(selected)


def split(params: Any, scheme: str = "nl_ll") -> tuple[dict, dict]:
    """Returns ``(subset, rest)``: the leaves ``scheme`` selects and all the others.

    Args:
      params: ``variables["params"]``.
      scheme: one of ``"nl_ll"``, ``"last_layer"``, ``"full"``.

    Returns:
      Two nested dicts with disjoint leaves whose union is ``params``.
    """
    flat = _flatten(params)
    selected = traverse_util.flatten_dict(mask(params, scheme))
    subset = {p: v for p, v in flat.items() if selected[p]}
    rest = {p: v for p, v in flat.items() if not selected[p]}
    # Coverage is by construction, but asserting it guards future rule changes.
    if set(subset) & set(rest) or len(subset) + len(rest) != len(flat):
        raise AssertionError("partition does not cover every leaf exactly once.")
    return traverse_util.unflatten_dict(subset), traverse_util.unflatten_dict(rest)


def merge(subset: dict, rest: dict) -> dict:
    """Inverse of :func:`split`: the full parameter tree from its two disjoint parts."""
    a, b = traverse_util.flatten_dict(subset), traverse_util.flatten_dict(rest)
    overlap = sorted("/".join(p) for p in set(a) & set(b))
    if overlap:
        raise ValueError(f"subset and rest share leaves {overlap}; they must be disjoint.")
    return traverse_util.unflatten_dict({**a, **b})


def count(tree: Any) -> int:
    """Number of scalar parameters in a tree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
