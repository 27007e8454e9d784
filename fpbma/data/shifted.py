"""Cached corrupted test sets of the offline datasets (distribution shift, CIFAR-10-C / MNIST-C style).

``load("digits_corrupted/gaussian_noise_3", "test")`` builds, once, the TFDS dataset
``fpbma_digits_corrupted/gaussian_noise_3`` (array_record) and reads it back afterwards. Row i of it
(in the order ``load`` returns examples) is row i of the clean ``load("digits", "test")`` passed through
``corrupt_images(images, "gaussian_noise", 3, indices)``, the one route to corrupted offline data: the
same labels and ``id``, the same image shape and dtype. The randomness of row i depends only on
(``SEED``, i, corruption), so the cached data is a deterministic function of (dataset, corruption,
severity), every severity of a corruption uses the same random numbers, and any subset of the test
rows can be corrupted on its own with ``corrupt_images(images[idx], c, s, idx)``.

Every ``<base>_corrupted`` set is registered in ``fpbma.data.registry`` (kind ``"shifted"``); its builder
reads the clean test split through the base's registered builder, not through ``fpbma.data.sources``.

References:
  Hendrycks & Dietterich (2019), ImageNet-C / CIFAR-10-C; Mu & Gilmer (2019), MNIST-C; the shift
  evaluation of arXiv 2406.15664.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from fpbma.data import builders as _builders  # noqa: F401  (registers the clean base datasets first)
from fpbma.data import corruptions
from fpbma.data import registry as _registry

SEED = 0
SEVERITIES = (1, 2, 3, 4, 5)


def parse_config(config: str) -> tuple[str, int]:
    """``"gaussian_noise_3"`` → ``("gaussian_noise", 3)``, validated against the corruption suite."""
    corruption, _, severity = str(config).rpartition("_")
    known = tuple(corruptions.CORRUPTIONS)
    if not corruption or not severity.isdigit() or int(severity) not in SEVERITIES:
        raise ValueError(
            f"Corrupted-dataset config {config!r} must be '<corruption>_<severity>' with severity in "
            f"{SEVERITIES}, e.g. 'gaussian_noise_3'. Corruptions: {', '.join(known)}."
        )
    if corruption not in known:
        raise ValueError(f"Unknown corruption {corruption!r} in {config!r}. Known: {', '.join(known)}.")
    return corruption, int(severity)


def corrupt_images(images: np.ndarray, corruption: str, severity: int, indices: Sequence[int]) -> np.ndarray:
    """Corrupted copies of test images, exactly as the cached ``<base>_corrupted`` sets store them.

    For a registered offline ``base``, with ``test = load(base, "test")`` and
    ``shift = load(f"{base}_corrupted/{corruption}_{severity}", "test")``,
    ``corrupt_images(stack(test[i]["image"] for i in indices), corruption, severity, indices)[j]`` equals
    ``shift[indices[j]]["image"]`` bit for bit. Row j is
    ``corruptions.corrupt(images, corruption, severity, SEED, indices=indices)[j]``: its randomness is
    seeded by (``SEED``, ``indices[j]``, corruption) only, so it does not depend on the other rows, and
    the same call works for any uint8 images (also images of no registered dataset), with ``indices``
    their positions in whatever set they come from.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    >>> y = corrupt_images(x, "gaussian_noise", 3, indices=[0, 1, 2])
    >>> y.shape, y.dtype.name
    ((3, 8, 8, 1), 'uint8')
    >>> bool(np.array_equal(corrupt_images(x[1:], "gaussian_noise", 3, indices=[1, 2]), y[1:]))
    True

    Args:
      images: uint8 array (N, H, W, C), C in {1, 3}, H, W >= 8.
      corruption: one of ``fpbma.data.corruptions.CORRUPTIONS``.
      severity: 1 (mildest) to 5 (strongest).
      indices: N non-negative ints, the positions of the images in their test split.

    Returns:
      uint8 array of the shape of ``images``.

    Raises:
      ValueError: unknown corruption, severity outside 1..5, or not one index per image (also, from
        ``corruptions.corrupt``, a bad image shape); TypeError: images not uint8.
    """
    if not isinstance(corruption, str) or corruption not in corruptions.CORRUPTIONS:
        raise ValueError(f"Unknown corruption {corruption!r}; pass one of fpbma.data.corruptions.CORRUPTIONS: "
                         f"{', '.join(corruptions.CORRUPTIONS)}.")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be an int from 1 (mildest) to 5 (strongest); got {severity!r}.")
    images = np.asarray(images)
    indices = np.asarray(indices)
    if indices.ndim != 1 or images.ndim < 1 or indices.shape[0] != images.shape[0]:
        raise ValueError(
            f"indices must hold one test position per image: got {images.shape[0] if images.ndim else 0} "
            f"image(s) and indices of shape {indices.shape}; pass indices=np.arange(len(images)) for a whole "
            "split, or the positions idx when corrupting images[idx].")
    if indices.size and (not np.issubdtype(indices.dtype, np.integer) or (indices < 0).any()):
        raise ValueError(f"indices must be non-negative integer positions; got dtype {indices.dtype}, "
                         f"min {indices.min()!r}. Pass the images' row numbers in their test split.")
    out = np.asarray(corruptions.corrupt(images, corruption, int(severity), SEED, indices=indices.astype(np.int64)))
    if out.shape != images.shape or out.dtype != np.uint8:
        raise ValueError(f"corrupt({corruption!r}) returned {out.dtype}{out.shape}, expected uint8{images.shape}.")
    return out


def _clean_builder(base: str, data_dir: str | None):
    return _registry.get(base).factory(data_dir=data_dir, file_format="array_record")


class _CorruptedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Corrupted copy of the clean test split of ``BASE``; one config per corruption × severity."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release (rows stored in TFDS's hashed order).",
        "1.1.0": "Rows stored unshuffled: row i is row i of the clean test split, corrupted with index i.",
    }
    BASE = ""

    def __init__(self, *, config: str, clean_data_dir: str | None = None, **kwargs):
        self.corruption, self.severity = parse_config(config)
        self.clean_data_dir = clean_data_dir if clean_data_dir is not None else kwargs.get("data_dir")
        super().__init__(config=tfds.core.BuilderConfig(name=config), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # The clean builder's info needs no data; borrow its features so the two always agree.
        features = _clean_builder(self.BASE, self.clean_data_dir or "/nonexistent").info.features
        return tfds.core.DatasetInfo(
            builder=self,
            description=(f"Test split of {self.BASE} under {self.corruption} at severity {self.severity}, "
                         f"fpbma.data.corrupt_images (seed {SEED}); row i is clean test row i."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=features["image"].shape, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(features["label"].names)),
                "id": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the clean split's row order
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"test": self._corrupted_examples()}

    def _corrupted_examples(self):
        clean = _clean_builder(self.BASE, self.clean_data_dir)
        _registry.prepare_builder(clean)
        ds = clean.as_data_source(split="test")
        records = ds.__getitems__(list(range(len(ds))))
        images = np.stack([np.asarray(r["image"]) for r in records])
        if images.ndim == 3:
            images = images[..., None]
        corrupted = corrupt_images(images, self.corruption, self.severity, np.arange(len(records)))
        for i, r in enumerate(records):
            yield i, {"image": corrupted[i], "label": int(r["label"]), "id": int(r["id"])}

    def _generate_examples(self, *args):
        raise NotImplementedError


class FpbmaMnistCorrupted(_CorruptedBuilder):
    """Corrupted MNIST-subset test set (1,000 images)."""

    BASE = "mnist"


class FpbmaDigitsCorrupted(_CorruptedBuilder):
    """Corrupted sklearn-digits test set (355 images)."""

    BASE = "digits"


class FpbmaFashionMnistCorrupted(_CorruptedBuilder):
    """Corrupted Fashion-MNIST test set (10,000 images)."""

    BASE = "fashion_mnist"


CORRUPTED_BUILDERS = {c.BASE: c for c in (FpbmaMnistCorrupted, FpbmaDigitsCorrupted, FpbmaFashionMnistCorrupted)}

for _base, _cls in CORRUPTED_BUILDERS.items():
    _registry.register(f"{_base}_corrupted", _cls, kind="shifted", base=_base)
del _base, _cls


def corrupted_builder(base: str, config: str, data_dir: str) -> _CorruptedBuilder:
    """The (possibly unprepared) builder of ``<base>_corrupted/<config>`` in ``data_dir``."""
    return _registry.get(f"{base}_corrupted").factory(config=config, data_dir=data_dir, file_format="array_record")


def prepare(builder: _CorruptedBuilder) -> None:
    """Builds the corrupted split once (the clean split first, if needed)."""
    _registry.prepare_builder(builder)
