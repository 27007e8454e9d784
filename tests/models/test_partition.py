"""The nl_ll / last_layer / full partitions cover every leaf once and select the right ones."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import fpbma.models as M
from fpbma.models import partition


def _params(name, size):
    model = M.spec(name).build(10, size)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))[
        "params"]


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("resnet50_small", 32), ("vit_ti16", 32)])
@pytest.mark.parametrize("scheme", ["nl_ll", "last_layer", "full"])
def test_every_leaf_exactly_once(name, size, scheme):
    params = _params(name, size)
    subset, rest = partition.split(params, scheme)
    all_paths = set(traverse_util.flatten_dict(params))
    a, b = set(traverse_util.flatten_dict(subset)), set(traverse_util.flatten_dict(rest))
    assert not (a & b) and (a | b) == all_paths
    if scheme == "full":
        assert not b
    # membership by the leaf's module names, checked independently of the regex in partition.py
    for path in all_paths:
        mods = path[:-1]
        is_head = path[0] == "head"
        is_norm = any(m.startswith(("bn", "norm")) or m == "downsample_bn" for m in mods)
        want = {"full": True, "last_layer": is_head, "nl_ll": is_head or is_norm}[scheme]
        assert (path in a) == want, path
    merged = partition.merge(subset, rest)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)


def test_nl_ll_counts_resnet20():
    params = _params("resnet20", 32)
    subset, _ = partition.split(params)
    # 19 BatchNorms (stem + 18 in blocks) + 2 projection-shortcut BNs, each scale+bias;
    # widths: stem 16, stage1 6x16, stage2 6x32 + proj 32, stage3 6x64 + proj 64; head 64*10+10.
    bn = 2 * (16 + 6 * 16 + 7 * 32 + 7 * 64)
    assert partition.count(subset) == bn + 64 * 10 + 10


def test_mask_freezes_the_rest_under_optax_multi_transform():
    params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape), _params("resnet20", 32))
    labels = jax.tree_util.tree_map(lambda m: "train" if m else "freeze",
                                    partition.mask(params, "nl_ll"))
    tx = optax.multi_transform({"train": optax.sgd(1.0), "freeze": optax.set_to_zero()}, labels)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params))
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["head"]["kernel"], 0.0)
    np.testing.assert_array_equal(new["layer2_0"]["downsample_bn"]["scale"], 0.0)
    np.testing.assert_array_equal(new["conv1"]["kernel"], 1.0)
    np.testing.assert_array_equal(new["layer2_0"]["downsample_conv"]["kernel"], 1.0)


def test_bad_inputs_raise_clear_errors():
    params = _params("resnet20", 32)
    with pytest.raises(ValueError, match="Unknown partition scheme 'nl'"):
        partition.split(params, "nl")
    with pytest.raises(ValueError, match=r"variables\['params'\]"):
        partition.split({"params": params, "batch_stats": {}})
    no_head = {k: v for k, v in params.items() if k != "head"}
    with pytest.raises(ValueError, match="named 'head'"):
        partition.split(no_head, "last_layer")
    with pytest.raises(ValueError, match="no normalisation layer"):
        partition.split({"head": params["head"], "conv1": params["conv1"]}, "nl_ll")
