"""Tests of fpbma.data.corruptions on real images (sklearn's UCI digits and sample photographs)."""

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from fpbma.data import corruptions
from fpbma.data.corruptions import CORRUPTIONS, corrupt

# Corruptions whose output depends on the seed (the others are deterministic functions).
RANDOM = {
    "gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost",
    "fog", "elastic_transform", "speckle_noise", "spatter",
}


@pytest.fixture(scope="module")
def digits28():
    """64 real UCI digits (8x8, 17 gray levels) upscaled bilinearly to 28x28 uint8, shape (64, 28, 28, 1)."""
    raw = load_digits().images[:64]
    small = np.rint(raw * 255.0 / 16.0).astype(np.uint8)
    big = [np.asarray(Image.fromarray(im).resize((28, 28), Image.Resampling.BILINEAR)) for im in small]
    return np.stack(big)[..., None]


@pytest.fixture(scope="module")
def digits8():
    raw = load_digits().images[:16]
    return np.rint(raw * 255.0 / 16.0).astype(np.uint8)[..., None]


@pytest.fixture(scope="module")
def photos32():
    """16 real 32x32 RGB patches: 4x4 grid of 2x-downsampled crops of sklearn's two sample photos."""
    patches = []
    for photo in load_sample_images().images:
        half = np.asarray(Image.fromarray(photo).resize((photo.shape[1] // 2, photo.shape[0] // 2)))
        for r in range(2):
            for c in range(4):
                top, left = 40 + 64 * r, 40 + 64 * c
                patches.append(half[top : top + 32, left : left + 32])
    return np.stack(patches)


def test_names():
    assert len(CORRUPTIONS) == 19 and len(set(CORRUPTIONS)) == 19


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_determinism(name, digits28, digits8, photos32):
    for images in (digits28[:8], digits8[:8], photos32[:8]):
        out = corrupt(images, name, 3, seed=1)
        assert out.shape == images.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, corrupt(images, name, 3, seed=1))
        other = corrupt(images, name, 3, seed=2)
        if name in RANDOM:
            assert np.any(other != out), f"{name}: different seeds gave identical images"
        else:
            np.testing.assert_array_equal(other, out)
    # The input is not modified.
    before = digits28.copy()
    corrupt(digits28[:4], name, 5, seed=0)
    np.testing.assert_array_equal(digits28, before)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_subset_consistency(name, photos32):
    full = corrupt(photos32, name, 4, seed=7)
    np.testing.assert_array_equal(corrupt(photos32[:5], name, 4, seed=7), full[:5])
    idx = np.array([11, 2, 9])
    np.testing.assert_array_equal(corrupt(photos32[idx], name, 4, seed=7, indices=idx), full[idx])


def test_bad_inputs(digits28):
    with pytest.raises(ValueError, match="valid names: gaussian_noise"):
        corrupt(digits28, "gaussian", 1, 0)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match=r"severity must be an int in \[1, 2, 3, 4, 5\]"):
            corrupt(digits28, "fog", severity, 0)
    with pytest.raises(TypeError, match="dtype uint8"):
        corrupt(digits28.astype(np.float32), "fog", 1, 0)
    with pytest.raises(TypeError, match="numpy array"):
        corrupt(digits28.tolist(), "fog", 1, 0)
    with pytest.raises(ValueError, match=r"C in \(1, 3\)"):
        corrupt(digits28[..., 0], "fog", 1, 0)
    with pytest.raises(ValueError, match=r"C in \(1, 3\)"):
        corrupt(np.repeat(digits28, 2, axis=-1), "fog", 1, 0)
    with pytest.raises(ValueError, match="at least 8x8"):
        corrupt(digits28[:, :7, :7], "fog", 1, 0)
    with pytest.raises(ValueError, match="non-negative int"):
        corrupt(digits28, "fog", 1, -1)
    with pytest.raises(ValueError, match="indices must be"):
        corrupt(digits28[:3], "fog", 1, 0, indices=np.arange(2))
