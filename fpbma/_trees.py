"""Restricting nested-dict pytrees and posteriors to a set of leaf paths (shared by transfer and methods)."""

from __future__ import annotations

import jax
from flax import traverse_util

from fpbma import posterior as post
from fpbma.types import HEAD


def flat(tree) -> dict:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def keep(tree, paths) -> dict:
    leaves = flat(tree)
    return traverse_util.unflatten_dict({p: leaves[p] for p in leaves if p in paths})


def restrict(q, like):
    """q restricted to the leaves whose paths occur in ``like`` (a nested dict of the same kind).

    For a Gaussian this is the exact marginal: the mean, log σ and the rows of the deviation columns D of
    those coordinates (Σ_SS = ½(diag σ_S² + D_S D_Sᵀ/(K − 1))).

    Args:
      q: a :class:`fpbma.DiagGaussian` / :class:`fpbma.LowRankGaussian`, or a plain nested dict.
      like: nested dict whose leaf paths select the coordinates (values are ignored).

    Returns:
      The same family (or dict) over the selected leaves only.
    """
    paths = set(flat(like))
    if isinstance(q, (post.DiagGaussian, post.LowRankGaussian)):
        return type(q)(*[keep(field, paths) for field in q])
    return keep(q, paths)


def is_head(path, head: str = HEAD) -> bool:
    return path[0] == head


def split_head(tree, head: str = HEAD) -> tuple[dict, dict]:
    """``(rest, head_subtree)`` of a nested dict, split at the top-level key ``head``."""
    leaves = flat(tree)
    top = {p: v for p, v in leaves.items() if is_head(p, head)}
    rest = {p: v for p, v in leaves.items() if not is_head(p, head)}
    return traverse_util.unflatten_dict(rest), traverse_util.unflatten_dict(top)


def empty(tree) -> bool:
    return not jax.tree_util.tree_leaves(tree)
