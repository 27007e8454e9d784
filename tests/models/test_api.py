"""create / from_pretrained / preprocess entry points, orbax save/restore, and input validation."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpbma
import fpbma.models as M

MEAN, STD = np.array(M.IMAGENET_MEAN), np.array(M.IMAGENET_STD)


def test_preprocess_small_models_normalise_without_resizing():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    x = np.asarray(M.preprocess("resnet20", u))
    assert x.dtype == np.float32 and x.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(x, (u / 255.0 - MEAN) / STD, rtol=1e-6, atol=1e-6)
    single = np.asarray(M.preprocess("resnet18_small", u[0]))
    np.testing.assert_allclose(single, x[0], atol=1e-6)
    assert M.preprocess("resnet20", u, image_size=16).shape == (3, 16, 16, 3)


def test_preprocess_imagenet_centre_crop():
    rng = np.random.default_rng(1)
    u = rng.integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8)
    x = np.asarray(M.preprocess("resnet50", u))
    # 0.875 * 256 = 224: the central crop needs no resize, so it is exact.
    np.testing.assert_allclose(x, (u[:, 16:240, 16:240] / 255.0 - MEAN) / STD, atol=1e-5)
    # a constant image of another size stays constant through crop + resize.
    c = np.full((300, 400, 3), (10, 128, 250), np.uint8)
    y = np.asarray(M.preprocess("resnet18", c))
    assert y.shape == (224, 224, 3)
    np.testing.assert_allclose(y, np.broadcast_to((np.array([10, 128, 250]) / 255 - MEAN) / STD,
                                                  y.shape), atol=1e-5)
    v = np.asarray(M.preprocess("vit_b16", np.stack([np.zeros_like(c), np.full_like(c, 255)])))
    np.testing.assert_allclose(v[0], -1.0, atol=1e-6)
    np.testing.assert_allclose(v[1], 1.0, atol=1e-6)


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        M.preprocess("resnet20", np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        M.preprocess("resnet20", np.zeros((1, 3, 32, 32), np.uint8))


def test_create_validates_and_builds():
    with pytest.raises(ValueError, match="Unknown model 'resnet19'"):
        M.create("resnet19", 10, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        M.create("resnet20", 0, key=jax.random.PRNGKey(0))
    model, variables = M.create("vit_ti16", 5, key=jax.random.PRNGKey(0), image_size=32)
    assert set(variables) == {"params"}
    assert variables["params"]["pos_embed"].shape == (1, 1 + 4, 192)
    logits = jax.jit(model.apply)(variables, jnp.ones((2, 32, 32, 3)))
    assert logits.shape == (2, 5)
    # different keys give different initialisations; the same key the same one.
    _, v0 = M.create("resnet20", 3, key=jax.random.PRNGKey(0))
    _, again = M.create("resnet20", 3, key=jax.random.PRNGKey(0))
    _, other = M.create("resnet20", 3, key=jax.random.PRNGKey(1))
    k0 = v0["params"]["layer2_0"]["conv1"]["kernel"]
    np.testing.assert_array_equal(k0, again["params"]["layer2_0"]["conv1"]["kernel"])
    assert not np.allclose(k0, other["params"]["layer2_0"]["conv1"]["kernel"])
    # torchvision's fan-out He init: std sqrt(2 / (3 * 3 * 32)) for the 3x3x16->32 conv.
    np.testing.assert_allclose(np.std(np.asarray(k0)), np.sqrt(2 / (9 * 32)), rtol=0.1)


def test_from_pretrained_rejects_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.from_pretrained("resnet18", tmp_path / "nope.safetensors")
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="suffix '.ckpt'"):
        M.from_pretrained("resnet18", tmp_path / "w.ckpt")
    np.savez(tmp_path / "w.npz", a=np.zeros(1))
    with pytest.raises(ValueError, match="not .npz"):
        M.from_pretrained("resnet18", tmp_path / "w.npz")


def test_orbax_round_trip_of_variables_and_posterior(tmp_path):
    _, variables = M.create("resnet20", 10, key=jax.random.PRNGKey(0))
    path = M.save_checkpoint(tmp_path / "vars", variables)
    restored = M.restore_checkpoint(path, like=variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, variables)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(variables)

    head = variables["params"]["head"]
    q = fpbma.DiagGaussian(mean=head, log_std=jax.tree_util.tree_map(
        lambda x: jnp.full_like(x, -3.0), head))
    qpath = M.save_checkpoint(tmp_path / "posterior", q)
    q2 = M.restore_checkpoint(qpath, like=q)
    assert isinstance(q2, fpbma.DiagGaussian)
    jax.tree_util.tree_map(np.testing.assert_array_equal, q2, q)

    with pytest.raises(FileExistsError, match="overwrite=True"):
        M.save_checkpoint(qpath, q)
    q3 = q._replace(log_std=jax.tree_util.tree_map(lambda x: x - 1.0, q.log_std))
    M.save_checkpoint(qpath, q3, overwrite=True)
    np.testing.assert_array_equal(M.restore_checkpoint(qpath, like=q).log_std["bias"], -4.0)


@pytest.mark.skipif(importlib.util.find_spec("fpbma.models.efficientnet") is None,
                    reason="fpbma/models/efficientnet.py not in this checkout")
def test_efficientnet_lite0_registered_lazily():
    assert "efficientnet_lite0" in M.MODEL_NAMES
    model = M.spec("efficientnet_lite0").build(4, 64)
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    assert jax.eval_shape(lambda v: model.apply(v, x, train=False), variables).shape == (1, 4)
    x = M.preprocess("efficientnet_lite0", np.full((64, 64, 3), 255, np.uint8), image_size=64)
    np.testing.assert_allclose(np.asarray(x), (255 - 127) / 128, atol=1e-5)
    from fpbma.models import partition
    subset, _ = partition.split(variables["params"], "nl_ll")
    assert "head" in subset and len(subset) > 2  # head plus normalisation layers
