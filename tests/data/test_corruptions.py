"""Tests of fpbma.data.corruptions on real images (sklearn's UCI digits and sample photographs)."""

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from fpbma.data import corruptions
from fpbma.data.corruptions import CORRUPTIONS, corrupt

# Corruptions whose output depends on the seed (the others are deterministic functions).
RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
    "speckle_noise",
    "spatter",
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
    """48 real 32x32 RGB patches: a 3x8 grid on each of sklearn's two sample photos, halved in size."""
    patches = []
    for photo in load_sample_images().images:
        half = np.asarray(Image.fromarray(photo).resize((photo.shape[1] // 2, photo.shape[0] // 2)))
        for r in range(3):
            for c in range(8):
                top, left = 20 + 60 * r, 8 + 38 * c
                patches.append(half[top : top + 32, left : left + 32])
    return np.stack(patches)


def test_names_and_empty_batch(digits28):
    assert len(CORRUPTIONS) == 19 and len(set(CORRUPTIONS)) == 19
    for name in CORRUPTIONS:
        assert corrupt(digits28[:0], name, 5, 0).shape == (0, 28, 28, 1)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_determinism(name, digits28, digits8, photos32):
    for images in (digits28[:8], digits8[:8], photos32[:8], photos32[:3, :16, :24]):
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
    idx = np.array([41, 2, 9])
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


# ----------------------------------------------------------------------------- severity ordering


def _mad(clean, corrupted):
    """Mean absolute change in gray levels."""
    return float(np.abs(corrupted.astype(np.float64) - clean).mean())


def _mads(images, name):
    return np.array([_mad(images, corrupt(images, name, s, seed=0)) for s in range(1, 6)])


# Corruptions whose CIFAR-10-C table is ordered in plain pixel change; each of the others has its
# own test below with the measure its design implies.
PIXEL_ORDERED = [
    n
    for n in CORRUPTIONS
    if n not in {"glass_blur", "motion_blur", "frost", "elastic_transform", "pixelate", "spatter", "saturate"}
]


@pytest.mark.parametrize("name", PIXEL_ORDERED)
def test_severity_increases_pixel_change(name, digits28, photos32):
    for images in (digits28, photos32):
        mads = _mads(images, name)
        assert np.all(np.diff(mads) > 0), f"{name}: mean |change| by severity {mads}"


def test_glass_blur_ordering(digits28, photos32):
    """Glass blur = local pixel swaps + Gaussian blur, both growing with severity.

    The blur averages the swapped pixels back towards their neighbours, so the raw pixel change
    drops from severity 2 (σ=0.25) to 3 (σ=0.4); the damage shows at the scale of the swaps
    (one pixel), so both images are compared after the same σ=1 smoothing.
    """
    from scipy import ndimage

    def smooth(z):
        return ndimage.gaussian_filter(z.astype(np.float64), (0, 1, 1, 0))

    for images in (digits28, photos32):
        changes = [
            np.abs(smooth(corrupt(images, "glass_blur", s, 0)) - smooth(images)).mean() for s in range(1, 6)
        ]
        assert np.all(np.diff(changes) > 0), changes
    # At severity 1 the blur (σ=0.05) is the identity, so the output is a permutation of each image's pixels.
    out = corrupt(photos32, "glass_blur", 1, 0)
    assert np.any(out != photos32)
    for a, b in zip(out, photos32, strict=False):
        pixels_a, counts_a = np.unique(a.reshape(-1, 3), axis=0, return_counts=True)
        pixels_b, counts_b = np.unique(b.reshape(-1, 3), axis=0, return_counts=True)
        np.testing.assert_array_equal(pixels_a, pixels_b)
        np.testing.assert_array_equal(counts_a, counts_b)


def test_motion_blur_ordering(digits28, photos32):
    """Streak length grows with severity, except that CIFAR-10-C's severities 3 and 4 coincide.

    Their (radius, σ) are (6, 2) and (8, 2); ImageMagick's kernel weights exp(-i²/2σ²) beyond the
    13 taps of radius 6 are below 1e-9, so the two severities give identical 8-bit images.
    """
    for images in (digits28, photos32):
        np.testing.assert_array_equal(
            corrupt(images, "motion_blur", 3, 0), corrupt(images, "motion_blur", 4, 0)
        )
        mads = _mads(images, "motion_blur")[[0, 1, 2, 4]]
        assert np.all(np.diff(mads) > 0), mads


def _pearson(clean, corrupted):
    a = clean.reshape(len(clean), -1).astype(np.float64)
    b = corrupted.reshape(len(corrupted), -1).astype(np.float64)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    return float(np.mean((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))))


def test_frost_ordering(digits28, photos32):
    """Frost is y = a·x + b·F: the image weight a falls (1, 1, .9, .85, .75) as the frost weight b rises.

    Pixel change is not ordered (from severity 3 to 4 the image only dims, which moves dark digit
    backgrounds less), but the image's share of the output is, so its correlation with the clean
    image strictly falls.
    """
    for images in (digits28, photos32):
        correlations = [_pearson(images, corrupt(images, "frost", s, 0)) for s in range(1, 6)]
        assert np.all(np.diff(correlations) < 0), correlations
        for s in (1, 2):  # a = 1: frost only adds light
            assert np.all(corrupt(images, "frost", s, 0) >= images)


def test_elastic_transform_ordering(digits28, photos32):
    """CIFAR-10-C's elastic table trades a shrinking affine jitter for a growing elastic field.

    The jitter of the three anchor points falls from 8% to 3% of the side while the smooth local
    displacement grows from 0; the rigid part dominates plain pixel change, which therefore falls
    with severity. The corruption's design measure, the non-affine (elastic) displacement, rises.
    """
    h = w = 28
    rms_elastic, rms_affine = [], []
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    grid = np.stack([cols.ravel(), rows.ravel(), np.ones(h * w)])
    for s in range(5):
        elastic, affine = [], []
        for k in range(200):
            inverse, dy, dx = corruptions._elastic_fields(np.random.default_rng(k), h, w, s)
            elastic.append(np.mean(dx**2 + dy**2))
            affine.append(np.mean(((inverse @ grid - grid)[:2]) ** 2))
        rms_elastic.append(np.sqrt(np.mean(elastic)))
        rms_affine.append(np.sqrt(np.mean(affine)))
    assert rms_elastic[0] == 0.0 and np.all(np.diff(rms_elastic) > 0), rms_elastic
    assert np.all(np.diff(rms_affine) < 0), rms_affine
    for images in (digits28, photos32):
        mads = _mads(images, "elastic_transform")
        assert np.all(np.diff(mads) < 0), mads


def test_pixelate_ordering(digits28, photos32):
    """Pixelate resamples through a grid of int(side·c) pixels, c = .95, .9, .85, .75, .65.

    At 32 px (CIFAR-10-C) the grids are 30, 28, 27, 24, 20 and pixel change is ordered. At 28 px
    the grids are 26, 25, 23, 21, 18; the first two give box-resampling phase patterns of equal
    strength, so only severities 2-5 are strictly ordered, and severity 1 is below severity 3.
    """
    assert np.all(np.diff(_mads(photos32, "pixelate")) > 0)
    mads = _mads(digits28, "pixelate")
    assert np.all(np.diff(mads[1:]) > 0) and mads[0] < mads[2], mads


def test_spatter_ordering(digits28, photos32):
    """Spatter is translucent water drops at severities 1-3 and opaque mud at 4-5 (CIFAR-10-C table).

    Within each kind, pixel change grows with severity; the table is not ordered across the switch
    (water at severity 3 covers more of the image than mud at 4). Water only adds light; mud pulls
    every pixel towards its brown (63, 42, 20).
    """
    brown = np.array([63, 42, 20])
    for images in (digits28, photos32):
        mads = _mads(images, "spatter")
        assert mads[0] < mads[1] < mads[2] and mads[3] < mads[4], mads
        rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
        for s in (1, 2, 3):
            assert np.all(corrupt(images, "spatter", s, 0) >= images)
        if images.shape[-1] == 3:
            for s in (4, 5):
                out = corrupt(images, "spatter", s, 0).astype(int)
                assert np.all(np.abs(out - brown) <= np.abs(rgb.astype(int) - brown) + 1)
                assert np.any(out != rgb)


def test_saturate_against_matplotlib(digits28, photos32):
    """Saturate sets the HSV saturation to clip(a·S + b); checked against matplotlib's HSV conversion.

    The CIFAR-10-C table desaturates at severities 1-2 (a = .3, .1) and oversaturates at 3-5
    (a = 1.5, 2, 2.5; b = 0, .1, .2), so saturation falls at 1-2 and rises at 3-5. Gray pixels have
    S = 0, so on grayscale images severities 1-3 are exactly the identity.
    """
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    table = [(0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)]
    hsv = rgb_to_hsv(photos32 / 255.0)
    saturations = []
    for s, (a, b) in enumerate(table, start=1):
        out = corrupt(photos32, "saturate", s, 0)
        expected = (
            hsv_to_rgb(np.stack([hsv[..., 0], np.clip(hsv[..., 1] * a + b, 0, 1), hsv[..., 2]], -1)) * 255
        )
        assert np.abs(out - expected).max() <= 0.5 + 1e-6
        saturations.append(rgb_to_hsv(out / 255.0)[..., 1].mean())
    clean = hsv[..., 1].mean()
    assert saturations[1] < saturations[0] < clean < saturations[2] < saturations[3] < saturations[4]
    for s in (1, 2, 3):
        np.testing.assert_array_equal(corrupt(digits28, "saturate", s, 0), digits28)
    mads = _mads(digits28, "saturate")
    assert 0 < mads[3] < mads[4]


# ----------------------------------------------------------------------------- values


def test_brightness_against_matplotlib(photos32):
    """Brightness adds c = .05, .1, .15, .2, .3 to the HSV value (clipped at 1)."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(photos32 / 255.0)
    for s, c in enumerate([0.05, 0.1, 0.15, 0.2, 0.3], start=1):
        expected = hsv_to_rgb(np.stack([hsv[..., 0], hsv[..., 1], np.clip(hsv[..., 2] + c, 0, 1)], -1)) * 255
        assert np.abs(corrupt(photos32, "brightness", s, 0) - expected).max() <= 0.5 + 1e-6


def _mid_tones(images, low, high):
    return (images >= low) & (images <= high)


def test_noise_statistics(photos32):
    """Noise moments match the CIFAR-10-C model on pixels far enough from 0 and 255 not to clip.

    gaussian: y - x ~ N(0, σ²), σ = .08 at severity 3; shot: y ~ Poisson(λx)/λ, λ = 100, so
    Var(y - x) = x/λ; speckle: y - x = x·N(0, σ²), σ = .12; impulse: a fraction .03 of the values
    become 0 or 1, half each. Tolerances are 4 standard errors over ~30k values (plus the 1/12
    gray-level² rounding variance).
    """
    x = photos32.astype(np.float64) / 255.0
    rounding = 1.0 / 12.0 / 255.0**2
    mask = _mid_tones(photos32, 90, 165)
    residual = corrupt(photos32, "gaussian_noise", 3, 0) / 255.0 - x
    n = mask.sum()
    assert n > 10_000
    assert abs(residual[mask].mean()) < 4 * 0.08 / np.sqrt(n)
    assert abs(residual[mask].var() / (0.08**2 + rounding) - 1) < 4 * np.sqrt(2 / n)

    mask = _mid_tones(photos32, 30, 150)
    residual = corrupt(photos32, "shot_noise", 3, 0) / 255.0 - x
    ratio = (residual[mask] ** 2).sum() / (x[mask] / 100 + rounding).sum()
    assert abs(ratio - 1) < 4 * np.sqrt(2 / mask.sum())

    mask = _mid_tones(photos32, 30, 150)
    residual = corrupt(photos32, "speckle_noise", 3, 0) / 255.0 - x
    ratio = (residual[mask] ** 2).sum() / ((x[mask] * 0.12) ** 2 + rounding).sum()
    assert abs(ratio - 1) < 4 * np.sqrt(2 / mask.sum()) * 1.5  # x² weights inflate the error

    mask = _mid_tones(photos32, 1, 254)
    out = corrupt(photos32, "impulse_noise", 3, 0)[mask]
    n = mask.sum()
    for value in (0, 255):
        frac = np.mean(out == value)
        assert abs(frac - 0.015) < 4 * np.sqrt(0.015 / n), (value, frac)


def test_gaussian_blur_against_torch(photos32):
    """Gaussian blur (σ = .4, .6, .7, .8, 1) equals a torch convolution with the truncated kernel.

    The kernel has radius int(4σ + 0.5) (scikit-image/scipy truncation), edge pixels repeated.
    """
    import torch
    import torch.nn.functional as F

    x = torch.tensor(photos32, dtype=torch.float64).permute(0, 3, 1, 2) / 255.0
    for s, sigma in enumerate([0.4, 0.6, 0.7, 0.8, 1.0], start=1):
        radius = int(4 * sigma + 0.5)
        taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
        g = torch.exp(-(taps**2) / (2 * sigma**2))
        g = g / g.sum()
        kernel = (g[:, None] * g[None, :]).expand(3, 1, -1, -1)
        padded = F.pad(x, (radius,) * 4, mode="replicate")
        expected = F.conv2d(padded, kernel, groups=3).permute(0, 2, 3, 1).numpy() * 255.0
        assert np.abs(corrupt(photos32, "gaussian_blur", s, 0) - expected).max() <= 0.5 + 1e-6


@pytest.mark.parametrize(
    "name",
    ["defocus_blur", "zoom_blur", "contrast", "gaussian_blur", "pixelate", "jpeg_compression", "brightness"],
)
def test_grayscale_equals_gray_rgb(name, digits28):
    """A grayscale image is corrupted as the RGB image with three equal channels (channel mean back)."""
    gray = corrupt(digits28, name, 4, 0)
    rgb = corrupt(np.repeat(digits28, 3, axis=-1), name, 4, 0).astype(np.float64)
    difference = np.abs(rgb.mean(-1, keepdims=True) - gray)
    # Sums taken in another order may round a value on the other side of .5: one gray level, rarely.
    # JPEG codes an RGB gray image through YCbCr, whose rounding differs from coding the gray plane.
    assert difference.max() <= (2 if name == "jpeg_compression" else 1)
    assert np.mean(difference > 0.5) < 0.01


def test_clipped_zoom_against_scipy_zoom():
    """The centre zoom of zoom blur and snow (a linear map per axis) equals crop + scipy zoom + trim."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for shape in [(4, 28, 28, 1), (3, 8, 8, 3), (2, 16, 24, 3), (32, 32, 1)]:
        x = rng.random(shape)
        h, w = shape[-3], shape[-2]
        for factor in [1.0, 1.01, 1.07, 1.13, 1.25, 1.75, 2.25]:
            ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
            top, left = (h - ch) // 2, (w - cw) // 2
            crop = x[..., top : top + ch, left : left + cw, :]
            zoomed = ndimage.zoom(crop, (1.0,) * (x.ndim - 3) + (factor, factor, 1.0), order=1)
            trim_top, trim_left = (zoomed.shape[-3] - h) // 2, (zoomed.shape[-2] - w) // 2
            expected = zoomed[..., trim_top : trim_top + h, trim_left : trim_left + w, :]
            np.testing.assert_allclose(corruptions._clipped_zoom(x, factor), expected, rtol=0, atol=1e-12)
