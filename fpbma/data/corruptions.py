"""Image corruptions of ImageNet-C / CIFAR-10-C for evaluation under distribution shift.

The 15 benchmark corruptions of Hendrycks & Dietterich (2019) plus their 4 held-out extras,
each at severities 1-5, written in numpy/scipy/Pillow (no OpenCV, scikit-image or ImageMagick).
Severity parameters are the CIFAR-10-C tables (``make_cifar_c.py`` of the paper's release),
made for 32x32 images, because the datasets corrupted here are small (8x8 to 32x32); they are
applied at the image's own resolution, in pixel units, except ``elastic_transform`` whose table
is written as fractions of the image side (the side of the image is used instead of 32).

Conventions that differ from the release and why:

* Randomness: image ``i`` of a call draws from its own generator, seeded by
  ``(seed, indices[i], crc32(name))``, so a corruption of a subset equals the corresponding rows
  of a corruption of the whole set (caching in chunks gives identical data). The severity is not
  part of the seed: the five severities of an image share their random draws (common random
  numbers), so they differ only by the strength parameters of the table.
* Grayscale (C=1) images are treated as RGB images with three equal channels. Channel-wise
  corruptions (noise, blurs, contrast, elastic, pixelate, fog, JPEG) run on the single channel
  with one draw of randomness per pixel, which equals corrupting the three equal channels with
  shared randomness; colour-dependent ones (brightness, saturate, snow, frost, spatter) run on
  the RGB image and return the mean of the three channels. ``saturate`` scales the HSV
  saturation, which is 0 for gray pixels, so on grayscale images severities 1-3 are the
  identity and 4-5 add a faint red tint that the channel mean turns into a slight darkening.
* ``frost`` blends with photographs of frost in the release; no such photographs ship here, so a
  procedural texture stands in: a ridged plasma fractal (thin bright veins of ice on a faint
  fractal haze), bluish white, mean about 0.38. The severity table (image and frost weights) is
  the release's.
* Outputs are rounded to the nearest integer (the release truncates with ``np.uint8``).
* The images here are too small for the ImageNet-C tables (made for 224 px), hence CIFAR-10-C's.
* ``motion_blur`` follows ImageMagick's ``MotionBlurImage`` (one-sided Gaussian-weighted streak
  of ``2*ceil(radius)+1`` taps, edge pixels repeated); ``spatter`` re-implements OpenCV's Canny
  edges, distance transform and histogram equalisation with scipy.

Severity ordering. For 12 corruptions the mean absolute pixel change from the clean image grows
strictly with severity (checked on real digits at 28 px and photo patches at 32 px). The CIFAR-10-C
tables of the other seven are ordered only in the measure their design implies, or partly:

* ``glass_blur``: more blur and more swap passes; the blur averages swapped pixels back, so the
  change is ordered only when compared at the one-pixel scale of the swaps (after σ=1 smoothing).
* ``motion_blur``: severities 3 and 4, (radius 6, σ 2) and (radius 8, σ 2), give identical images
  (the extra kernel taps weigh < 1e-9); otherwise ordered.
* ``frost``: the image weight falls (1, 1, .9, .85, .75) as the frost weight rises; correlation
  with the clean image falls strictly, pixel change need not (3 -> 4 only dims the image).
* ``elastic_transform``: the affine jitter shrinks (8% -> 3% of the side) as the elastic field
  grows from 0; pixel change *falls* with severity, the non-affine displacement rises.
* ``spatter``: translucent water at 1-3, opaque mud at 4-5, ordered within each kind only.
* ``saturate``: desaturates at 1-2 (x0.3, x0.1) and oversaturates at 3-5; on grayscale images
  severities 1-3 are the identity.
* ``pixelate`` is ordered at 32 px; at 28 px severities 1 and 2 (grids of 26 and 25 px) are equal
  in strength.

References:
  Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
  Perturbations", ICLR 2019 (arXiv:1903.12261).
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging" (arXiv:2406.15664),
  which evaluates BMA under these corruptions at severities 1-5.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt"]

CORRUPTIONS: tuple[str, ...] = (
    # The 15 benchmark corruptions, in the paper's order.
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
    # The 4 held-out extras.
    "speckle_noise",
    "gaussian_blur",
    "spatter",
    "saturate",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIDE = 8

# CIFAR-10-C severity tables (Hendrycks & Dietterich 2019, make_cifar_c.py).
_GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
_SHOT_NOISE = (500, 250, 100, 75, 50)
_IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
_SPECKLE_NOISE = (0.06, 0.1, 0.12, 0.16, 0.2)
_GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)
_GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
_DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
_MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))
_ZOOM_BLUR_MAX = (1.06, 1.11, 1.16, 1.21, 1.26)
_FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))
_FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
_SNOW = (
    (0.1, 0.2, 1.0, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
_SPATTER = (
    (0.62, 0.1, 0.7, 0.7, 0.5, 0),
    (0.65, 0.1, 0.8, 0.7, 0.5, 0),
    (0.65, 0.3, 1.0, 0.69, 0.5, 0),
    (0.65, 0.1, 0.7, 0.69, 0.6, 1),
    (0.65, 0.1, 0.5, 0.68, 0.6, 1),
)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
_SATURATE = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))
_JPEG_QUALITY = (80, 65, 58, 50, 40)
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
# (elastic amplitude, elastic smoothing, affine jitter) as fractions of the image side.
_ELASTIC = ((0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))

_WATER_RGB = np.array([175.0, 238.0, 238.0]) / 255.0  # pale turquoise
_MUD_RGB = np.array([63.0, 42.0, 20.0]) / 255.0
_FROST_TINT = np.array([0.86, 0.94, 1.0])


# ----------------------------------------------------------------------------- helpers


def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """Gaussian filter over the two spatial axes of an (H, W[, C]) array."""
    if sigma <= 0:
        return x
    sigmas = (sigma, sigma) + (0,) * (x.ndim - 2)
    return ndimage.gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def _zoom_matrix(size: int, factor: float) -> np.ndarray:
    """(size, size) linear map of one axis: centre crop of ceil(size/factor), zoom by factor, centre trim.

    The zoom is linear interpolation with the end points aligned (scipy.ndimage.zoom, order=1):
    output index o of the round(crop*factor) zoomed samples reads input o*(crop-1)/(out-1).
    """
    crop = int(np.ceil(size / factor))
    start = (size - crop) // 2
    out = int(round(crop * factor))
    trim = (out - size) // 2
    positions = np.arange(trim, trim + size) * ((crop - 1) / (out - 1) if out > 1 else 0.0)
    lower = np.minimum(np.floor(positions).astype(int), crop - 1)
    upper = np.minimum(lower + 1, crop - 1)
    frac = positions - lower
    matrix = np.zeros((size, size))
    rows = np.arange(size)
    np.add.at(matrix, (rows, start + lower), 1.0 - frac)
    np.add.at(matrix, (rows, start + upper), frac)
    return matrix


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre of (..., H, W, C) by ``factor`` >= 1, keeping the size H x W."""
    rows = _zoom_matrix(x.shape[-3], factor)
    cols = _zoom_matrix(x.shape[-2], factor)
    channels_first = np.moveaxis(x, -1, -3)
    return np.moveaxis(rows @ channels_first @ cols.T, -3, -1)


def _plasma_fractals(rngs: list, size: int, decay: float) -> np.ndarray:
    """Diamond-square height maps in [0, 1], one (size, size) map per generator; size a power of two.

    Each refinement halves the step and sets the new points to the mean of their four parents plus
    ``wibble**2 * U(-1, 1)``; ``wibble`` starts at 100 and is divided by ``decay`` per level, so a
    larger decay gives a smoother map. Each generator supplies its own map's noise, in a fixed order.
    """
    n = len(rngs)
    steps = [size >> level for level in range(int(np.log2(size)))]
    noise = np.stack([r.uniform(-1.0, 1.0, sum(3 * (size // st) ** 2 for st in steps)) for r in rngs])
    height = np.zeros((n, size, size))
    used, wibble = 0, 100.0

    def noisy_mean(total: np.ndarray) -> np.ndarray:
        nonlocal used
        k = total.shape[1] * total.shape[2]
        draw = noise[:, used : used + k].reshape(total.shape)
        used += k
        return total / 4 + wibble**2 * draw

    for step in steps:
        half = step // 2
        corners = height[:, 0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        height[:, half:size:step, half:size:step] = noisy_mean(square)
        centres = height[:, half:size:step, half:size:step]
        across = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        height[:, 0:size:step, half:size:step] = noisy_mean(across)
        down = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        height[:, half:size:step, 0:size:step] = noisy_mean(down)
        wibble /= decay
    height -= height.min(axis=(1, 2), keepdims=True)
    return height / height.max(axis=(1, 2), keepdims=True)


def _fractal_size(h: int, w: int) -> int:
    # At least 32 so that small images see the same fractal statistics as CIFAR-10-C.
    return max(32, 1 << int(np.ceil(np.log2(max(h, w)))))


def _motion_streak(x: np.ndarray, radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    """ImageMagick-style motion blur of an (H, W, C) image: out(p) = sum_i k_i x(p + o_i).

    ``k_i`` ∝ exp(-i²/2σ²) for i = 0..2*ceil(radius), ``o_i`` = round(i·(cos a, sin a)) in
    (column, row) order, with edge pixels repeated outside the image.
    """
    width = 2 * int(np.ceil(radius)) + 1
    taps = np.arange(width)
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    angle = np.deg2rad(angle_deg)
    off_col = np.ceil(taps * np.cos(angle) - 0.5).astype(int)
    off_row = np.ceil(taps * np.sin(angle) - 0.5).astype(int)
    pad = int(max(np.abs(off_col).max(), np.abs(off_row).max()))
    h, w = x.shape[:2]
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.zeros_like(x)
    for k, dr, dc in zip(weights, off_row, off_col, strict=False):
        out += k * padded[pad + dr : pad + dr + h, pad + dc : pad + dc + w]
    return out


def _gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of (..., 3), as in OpenCV's RGB2GRAY."""
    return rgb @ np.array([0.299, 0.587, 0.114])


def _box3(x: np.ndarray) -> np.ndarray:
    return ndimage.uniform_filter(x, size=3, mode="mirror")


def _canny(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges of a 2-D uint8 image (L1 Sobel magnitude, 8-connected hysteresis)."""
    f = img.astype(np.float64)
    gx = ndimage.sobel(f, axis=1, mode="nearest")
    gy = ndimage.sobel(f, axis=0, mode="nearest")
    mag = np.abs(gx) + np.abs(gy)
    p = np.pad(mag, 1)
    c = p[1:-1, 1:-1]
    left, right = p[1:-1, :-2], p[1:-1, 2:]
    up, down = p[:-2, 1:-1], p[2:, 1:-1]
    ul, ur, dl, dr = p[:-2, :-2], p[:-2, 2:], p[2:, :-2], p[2:, 2:]
    ax, ay = np.abs(gx), np.abs(gy)
    tan22, tan67 = np.tan(np.deg2rad(22.5)), np.tan(np.deg2rad(67.5))
    horizontal = ay <= ax * tan22
    vertical = ay > ax * tan67
    same_sign = gx * gy > 0
    is_max = np.where(
        horizontal,
        (c > left) & (c >= right),
        np.where(
            vertical,
            (c > up) & (c >= down),
            np.where(same_sign, (c > ul) & (c >= dr), (c > ur) & (c >= dl)),
        ),
    )
    candidate = is_max & (mag > low)
    labels, count = ndimage.label(candidate, structure=np.ones((3, 3)))
    if count == 0:
        return np.zeros(img.shape, np.uint8)
    strong = np.zeros(count + 1, bool)
    strong[np.unique(labels[candidate & (mag > high)])] = True
    strong[0] = False
    return np.where(strong[labels], 255, 0).astype(np.uint8)


def _equalize_hist(img: np.ndarray) -> np.ndarray:
    """OpenCV's equalizeHist for a 2-D uint8 image."""
    hist = np.bincount(img.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = img.size
    if hist[first] == total:
        return np.full_like(img, first)
    scale = 255.0 / (total - hist[first])
    lut = np.zeros(256)
    lut[first + 1 :] = np.cumsum(hist[first + 1 :]) * scale
    return np.clip(np.rint(lut), 0, 255).astype(np.uint8)[img]


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.divide(delta, v, out=np.zeros_like(v), where=v > 0)
    safe = np.where(delta > 0, delta, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return h, s, v


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(int) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1)


# ----------------------------------------------------------------------------- corruptions
# Each takes float images (N, H, W, C) in [0, 1], a severity index s in 0..4 and one generator per
# image, and returns float images of the same shape (clipped later). Colour-dependent ones get C=3.


def _gaussian_noise(x, s, rngs):
    scale = _GAUSSIAN_NOISE[s]
    return x + np.stack([r.normal(0.0, scale, x.shape[1:]) for r in rngs])


def _shot_noise(x, s, rngs):
    rate = _SHOT_NOISE[s]
    return np.stack([r.poisson(xi * rate) for r, xi in zip(rngs, x, strict=False)]) / rate


def _impulse_noise(x, s, rngs):
    amount = _IMPULSE_NOISE[s]
    out = x.copy()
    for r, o in zip(rngs, out, strict=False):
        flipped = r.random(o.shape) < amount
        salt = r.random(o.shape) < 0.5
        o[flipped & salt] = 1.0
        o[flipped & ~salt] = 0.0
    return out


def _speckle_noise(x, s, rngs):
    scale = _SPECKLE_NOISE[s]
    return x + x * np.stack([r.normal(0.0, scale, x.shape[1:]) for r in rngs])


def _gaussian_blur(x, s, rngs):
    del rngs
    return ndimage.gaussian_filter(x, (0, _GAUSSIAN_BLUR[s], _GAUSSIAN_BLUR[s], 0), mode="nearest")


def _glass_blur(x, s, rngs):
    sigma, delta, iterations = _GLASS_BLUR[s]
    n, h, w = x.shape[:3]
    blurred = ndimage.gaussian_filter(x, (0, sigma, sigma, 0), mode="nearest")
    # The release quantises to uint8 (truncating) before shuffling pixels; the small offset keeps
    # k/255*255 from truncating to k-1 through floating-point error.
    out = np.floor(blurred * 255.0 + 1e-6) / 255.0
    rows = np.arange(h - delta, delta, -1)
    cols = np.arange(w - delta, delta, -1)
    # Like the release, offsets are drawn from [-delta, delta) (upper bound excluded).
    shifts = np.stack([r.integers(-delta, delta, (iterations, rows.size, cols.size, 2)) for r in rngs])
    batch = np.arange(n)
    # Swaps are sequential (a pixel may move several times), vectorised over the batch only.
    for it in range(iterations):
        for i, row in enumerate(rows):
            for j, col in enumerate(cols):
                dx, dy = shifts[:, it, i, j, 0], shifts[:, it, i, j, 1]
                r2, c2 = row + dy, col + dx
                here = out[batch, row, col].copy()
                out[batch, row, col] = out[batch, r2, c2]
                out[batch, r2, c2] = here
    return ndimage.gaussian_filter(out, (0, sigma, sigma, 0), mode="nearest")


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    support = np.arange(-8, 9) if radius <= 8 else np.arange(-int(radius), int(radius) + 1)
    xx, yy = np.meshgrid(support, support)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    ksize = 1 if radius <= 8 else 2  # OpenCV 3x3 resp. 5x5 Gaussian anti-aliasing
    taps = np.arange(-ksize, ksize + 1)
    g = np.exp(-(taps**2) / (2.0 * alias_blur**2))
    g /= g.sum()
    kernel = ndimage.correlate1d(
        ndimage.correlate1d(disk, g, axis=0, mode="mirror"), g, axis=1, mode="mirror"
    )
    nonzero_rows = np.flatnonzero(np.abs(kernel).sum(1) > 1e-12)
    lo, hi = nonzero_rows[0], nonzero_rows[-1] + 1
    return kernel[lo:hi, lo:hi]


def _defocus_blur(x, s, rngs):
    del rngs
    kernel = _disk_kernel(*_DEFOCUS_BLUR[s])
    return ndimage.correlate(x, kernel[None, :, :, None], mode="mirror")


def _motion_blur(x, s, rngs):
    radius, sigma = _MOTION_BLUR[s]
    return np.stack(
        [_motion_streak(xi, radius, sigma, r.uniform(-45, 45)) for r, xi in zip(rngs, x, strict=False)]
    )


def _zoom_blur(x, s, rngs):
    del rngs
    factors = np.arange(1.0, _ZOOM_BLUR_MAX[s], 0.01)
    total = x.copy()
    for factor in factors:
        total += _clipped_zoom(x, factor)
    return total / (len(factors) + 1)


def _fog(x, s, rngs):
    strength, decay = _FOG[s]
    n, h, w = x.shape[:3]
    size = _fractal_size(h, w)
    haze = _plasma_fractals(rngs, size, decay)[:, :h, :w, None]
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + strength * haze) * max_val / (max_val + strength)


def _frost_textures(rngs: list, h: int, w: int) -> np.ndarray:
    size = _fractal_size(h, w)
    veins = (1.0 - np.abs(2.0 * _plasma_fractals(rngs, size, 1.6) - 1.0)) ** 6
    haze = _plasma_fractals(rngs, size, 2.5)
    gray = np.clip(0.1 + 0.75 * veins + 0.25 * haze, 0.0, 1.0)[:, :h, :w]
    return gray[..., None] * _FROST_TINT


def _frost(x, s, rngs):
    keep, weight = _FROST[s]
    return keep * x + weight * _frost_textures(rngs, *x.shape[1:3])


def _snow(x, s, rngs):
    loc, scale, zoom, threshold, radius, sigma, keep = _SNOW[s]
    h, w = x.shape[1:3]
    flakes = []
    for r in rngs:
        layer = r.normal(loc, scale, (h, w, 1))
        layer = _clipped_zoom(layer, zoom)
        layer[layer < threshold] = 0.0
        # The release passes the layer through an 8-bit PNG before ImageMagick's motion blur.
        layer = np.floor(np.clip(layer, 0.0, 1.0) * 255.0 + 1e-6) / 255.0
        flakes.append(_motion_streak(layer, radius, sigma, r.uniform(-135, -45)))
    flakes = np.stack(flakes)
    brightened = np.maximum(x, _gray(x)[..., None] * 1.5 + 0.5)
    x = keep * x + (1.0 - keep) * brightened
    return x + flakes + np.rot90(flakes, k=2, axes=(1, 2))


def _water(liquid: np.ndarray, strength: float) -> np.ndarray:
    """Shaded water drops from the thresholded liquid layer (2-D), in [0, strength]."""
    layer = (np.clip(liquid, 0.0, 1.0) * 255.0).astype(np.uint8)
    edges = _canny(layer, 50, 150)
    if edges.any():
        dist = ndimage.distance_transform_edt(edges == 0)
    else:
        dist = np.full(layer.shape, 20.0)
    dist = _box3(np.minimum(dist, 20.0)).astype(np.uint8)
    dist = _equalize_hist(dist).astype(np.float64)
    emboss = np.array([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])
    dist = np.clip(np.rint(ndimage.correlate(dist, emboss, mode="mirror")), 0, 255)
    dist = _box3(dist)
    m = layer * dist
    peak = m.max()
    return m / peak * strength if peak > 0 else np.zeros_like(m)


def _spatter(x, s, rngs):
    loc, scale, sigma, threshold, strength, mud = _SPATTER[s]
    h, w = x.shape[1:3]
    out = np.empty_like(x)
    for k, r in enumerate(rngs):
        liquid = _gaussian(r.normal(loc, scale, (h, w)), sigma)
        liquid[liquid < threshold] = 0.0
        if not mud:
            out[k] = x[k] + _water(liquid, strength)[..., None] * _WATER_RGB
        else:
            m = _gaussian((liquid > threshold).astype(np.float64), strength)
            m[m < 0.8] = 0.0
            out[k] = x[k] * (1.0 - m[..., None]) + m[..., None] * _MUD_RGB
    return out


def _contrast(x, s, rngs):
    del rngs
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * _CONTRAST[s] + means


def _brightness(x, s, rngs):
    del rngs
    h, sat, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(h, sat, np.clip(v + _BRIGHTNESS[s], 0.0, 1.0))


def _saturate(x, s, rngs):
    del rngs
    scale, shift = _SATURATE[s]
    h, sat, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(h, np.clip(sat * scale + shift, 0.0, 1.0), v)


def _to_pil_arrays(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _pil_mode(c: int) -> str:
    return "L" if c == 1 else "RGB"


def _jpeg_compression(x, s, rngs):
    del rngs
    quality = _JPEG_QUALITY[s]
    c = x.shape[-1]
    out = []
    for img in _to_pil_arrays(x):
        buffer = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if c == 1 else img, _pil_mode(c)).save(
            buffer, "JPEG", quality=quality
        )
        decoded = np.asarray(Image.open(buffer).convert(_pil_mode(c)), dtype=np.float64)
        out.append(decoded.reshape(img.shape) / 255.0)
    return np.stack(out)


def _pixelate(x, s, rngs):
    del rngs
    h, w, c = x.shape[1:]
    small = (int(w * _PIXELATE[s]), int(h * _PIXELATE[s]))
    out = []
    for img in _to_pil_arrays(x):
        pil = Image.fromarray(img.squeeze(-1) if c == 1 else img, _pil_mode(c))
        pil = pil.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX)
        out.append(np.asarray(pil, dtype=np.float64).reshape(img.shape) / 255.0)
    return np.stack(out)


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix A with dst = A @ [src, 1] for three (x, y) point pairs."""
    design = np.concatenate([src, np.ones((3, 1))], axis=1)
    return np.linalg.solve(design, dst).T


def _elastic_fields(rng: np.random.Generator, h: int, w: int, s: int):
    """Random affine jitter and smooth displacement field of ``elastic_transform``.

    Three points at the centre ± side/3 move by U(-jitter, jitter) each; the affine map between the
    old and new points warps the image. Then every pixel moves by (dy, dx) = alpha * (G_smooth *
    U(-1, 1)), a uniform noise field smoothed by a Gaussian of width ``smooth`` (pixels).

    Returns:
      (inverse, dy, dx): the 3x3 map from output to input (x, y) of the affine warp, and the two
      (h, w) displacement fields of the elastic part.
    """
    side = min(h, w)
    alpha, smooth, jitter = (side * f for f in _ELASTIC[s])
    centre = np.array([w // 2, h // 2], dtype=np.float64)
    half = side // 3
    src = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    dst = src + rng.uniform(-jitter, jitter, src.shape)
    forward = np.vstack([_affine_from_points(src, dst), [0.0, 0.0, 1.0]])
    dx = _gaussian(rng.uniform(-1, 1, (h, w)), smooth, mode="reflect", truncate=3.0) * alpha
    dy = _gaussian(rng.uniform(-1, 1, (h, w)), smooth, mode="reflect", truncate=3.0) * alpha
    return np.linalg.inv(forward), dy, dx


def _elastic_transform(x, s, rngs):
    n, h, w, c = x.shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.empty_like(x)
    for k, r in enumerate(rngs):
        inverse, dy, dx = _elastic_fields(r, h, w, s)
        # scipy works in (row, col, channel): swap the x/y roles of the inverse map.
        matrix = np.array(
            [[inverse[1, 1], inverse[1, 0], 0.0], [inverse[0, 1], inverse[0, 0], 0.0], [0.0, 0.0, 1.0]]
        )
        offset = np.array([inverse[1, 2], inverse[0, 2], 0.0])
        warped = ndimage.affine_transform(x[k], matrix, offset, order=1, mode="mirror")
        coords = np.stack([rows + dy, cols + dx])
        for ch in range(c):
            out[k, ..., ch] = ndimage.map_coordinates(warped[..., ch], coords, order=1, mode="reflect")
    return out


_Fn = Callable[[np.ndarray, int, list], np.ndarray]
# name -> (function, needs RGB). Functions that do not need RGB act on every channel alike.
_REGISTRY: dict[str, tuple[_Fn, bool]] = {
    "gaussian_noise": (_gaussian_noise, False),
    "shot_noise": (_shot_noise, False),
    "impulse_noise": (_impulse_noise, False),
    "defocus_blur": (_defocus_blur, False),
    "glass_blur": (_glass_blur, False),
    "motion_blur": (_motion_blur, False),
    "zoom_blur": (_zoom_blur, False),
    "snow": (_snow, True),
    "frost": (_frost, True),
    "fog": (_fog, False),
    "brightness": (_brightness, True),
    "contrast": (_contrast, False),
    "elastic_transform": (_elastic_transform, False),
    "pixelate": (_pixelate, False),
    "jpeg_compression": (_jpeg_compression, False),
    "speckle_noise": (_speckle_noise, False),
    "gaussian_blur": (_gaussian_blur, False),
    "spatter": (_spatter, True),
    "saturate": (_saturate, True),
}
assert tuple(_REGISTRY) == CORRUPTIONS


def _validate(images, name, severity, seed, indices) -> np.ndarray:
    if not isinstance(images, np.ndarray):
        raise TypeError(
            "images must be a numpy array of dtype uint8 and shape (N, H, W, C); "
            f"got {type(images).__name__}."
        )
    if images.dtype != np.uint8:
        raise TypeError(
            f"images must have dtype uint8 (pixel values 0-255); got {images.dtype}. "
            "Convert with np.clip(np.rint(x), 0, 255).astype(np.uint8) first."
        )
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must have shape (N, H, W, C) with C in (1, 3); got shape {images.shape}. "
            "Add a channel axis to grayscale images with images[..., None]."
        )
    if min(images.shape[1:3]) < MIN_SIDE:
        raise ValueError(
            f"images must be at least {MIN_SIDE}x{MIN_SIDE} pixels; "
            f"got {images.shape[1]}x{images.shape[2]}."
        )
    if name not in _REGISTRY:
        raise ValueError(f"Unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}.")
    if (
        isinstance(severity, bool)
        or not isinstance(severity, (int, np.integer))
        or severity not in SEVERITIES
    ):
        raise ValueError(f"severity must be an int in {list(SEVERITIES)}; got {severity!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}.")
    if indices is None:
        return np.arange(images.shape[0])
    indices = np.asarray(indices)
    if (
        indices.shape != (images.shape[0],)
        or not np.issubdtype(indices.dtype, np.integer)
        or (indices < 0).any()
    ):
        raise ValueError(
            f"indices must be {images.shape[0]} non-negative integers (one per image, the images' "
            f"positions in the full dataset); got an array of shape {indices.shape} "
            f"and dtype {indices.dtype}."
        )
    return indices


def corrupt(
    images: np.ndarray,
    name: str,
    severity: int,
    seed: int,
    *,
    indices: np.ndarray | None = None,
) -> np.ndarray:
    """Apply one ImageNet-C corruption at one severity to a batch of uint8 images.

    With x = images / 255 the corruption computes y = clip(f_{name,severity}(x; ξ_i), 0, 1) and
    returns round(255 y) as uint8, where ξ_i is the randomness of image i, drawn from a generator
    seeded by (seed, indices[i], crc32(name)) and shared by the five severities. Parameters follow
    the CIFAR-10-C tables of Hendrycks & Dietterich (2019); see the module docstring for the
    conventions (grayscale images, procedural frost texture, rounding) and for the corruptions
    whose table is not ordered in plain pixel change.

    >>> images = np.zeros((2, 28, 28, 1), np.uint8)
    >>> corrupt(images, "gaussian_noise", severity=3, seed=0).shape
    (2, 28, 28, 1)

    Args:
      images: uint8 array (N, H, W, C) with C in {1, 3} and H, W >= 8.
      name: one of ``CORRUPTIONS``.
      severity: 1 (mildest) to 5 (strongest), as the table of the release defines them.
      seed: non-negative int; the same seed gives identical output.
      indices: optional positions of the images in the full dataset (default ``arange(N)``), so
        that ``corrupt(images[idx], ..., indices=idx)`` equals ``corrupt(images, ...)[idx]``.

    Returns:
      uint8 array of the same shape as ``images``.

    Raises:
      TypeError: ``images`` is not a uint8 numpy array.
      ValueError: bad shape, unknown name, severity outside 1-5, negative seed or bad indices.

    References:
      Hendrycks & Dietterich, ICLR 2019 (arXiv:1903.12261); used for the shift evaluation of
      FP-BMA (arXiv:2406.15664).
    """
    indices = _validate(images, name, severity, seed, indices)
    fn, needs_rgb = _REGISTRY[name]
    if images.shape[0] == 0:
        return images.copy()
    name_key = zlib.crc32(name.encode())
    rngs = [np.random.default_rng(np.random.SeedSequence([int(seed), int(i), name_key])) for i in indices]
    x = images.astype(np.float64) / 255.0
    gray = images.shape[-1] == 1
    if gray and needs_rgb:
        x = np.repeat(x, 3, axis=-1)
    y = fn(x, int(severity) - 1, rngs)
    if gray and needs_rgb:
        y = y.mean(axis=-1, keepdims=True)
    return np.clip(np.rint(np.clip(y, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
