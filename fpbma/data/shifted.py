"""Cached corrupted test sets of the offline datasets (distribution shift, CIFAR-10-C / MNIST-C style).

``load("digits_corrupted/gaussian_noise_3", "test")`` builds, once, the TFDS dataset
``fpbma_digits_corrupted/gaussian_noise_3`` (array_record) whose example i is example i of the clean
``digits`` test split passed through ``fpbma.data.corruptions.corrupt(images, "gaussian_noise", 3,
seed=SEED)``, and reads it back afterwards. Same labels and ``id`` as the clean example, same image
shape and dtype. The corruption is applied to the whole split in one call with the fixed ``SEED``, so
the cached data is a deterministic function of (dataset, corruption, severity) and every severity of
a corruption uses the same random numbers.

References:
  Hendrycks & Dietterich (2019), ImageNet-C / CIFAR-10-C; Mu & Gilmer (2019), MNIST-C; the shift
  evaluation of arXiv 2406.15664.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from fpbma.data import builders as _builders

SEED = 0
SEVERITIES = (1, 2, 3, 4, 5)


def _corruptions_module():
    try:
        from fpbma.data import corruptions  # lazy: the suite is heavier than the loaders
    except ImportError as e:  # pragma: no cover - only without the corruption suite
        raise ImportError("fpbma.data.corruptions is required to build corrupted datasets.") from e
    return corruptions


def parse_config(config: str) -> tuple[str, int]:
    """``"gaussian_noise_3"`` → ``("gaussian_noise", 3)``, validated against the corruption suite."""
    corruption, _, severity = str(config).rpartition("_")
    known = tuple(_corruptions_module().CORRUPTIONS)
    if not corruption or not severity.isdigit() or int(severity) not in SEVERITIES:
        raise ValueError(
            f"Corrupted-dataset config {config!r} must be '<corruption>_<severity>' with severity in "
            f"{SEVERITIES}, e.g. 'gaussian_noise_3'. Corruptions: {', '.join(known)}."
        )
    if corruption not in known:
        raise ValueError(f"Unknown corruption {corruption!r} in {config!r}. Known: {', '.join(known)}.")
    return corruption, int(severity)


class _CorruptedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Corrupted copy of the clean test split of ``BASE``; one config per corruption × severity."""

    VERSION = tfds.core.Version("1.0.0")
    BASE = ""

    def __init__(self, *, config: str, clean_data_dir: str | None = None, **kwargs):
        self.corruption, self.severity = parse_config(config)
        self.clean_data_dir = clean_data_dir if clean_data_dir is not None else kwargs.get("data_dir")
        super().__init__(config=tfds.core.BuilderConfig(name=config), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        clean = _builders.OFFLINE_BUILDERS[self.BASE]
        # The clean builder's info needs no data; borrow its features so the two always agree.
        features = clean(data_dir=self.clean_data_dir or "/nonexistent").info.features
        return tfds.core.DatasetInfo(
            builder=self,
            description=(f"Test split of {self.BASE} under {self.corruption} at severity {self.severity}, "
                         f"fpbma.data.corruptions.corrupt(seed={SEED})."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=features["image"].shape, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(features["label"].names)),
                "id": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"test": self._corrupted_examples()}

    def _corrupted_examples(self):
        from fpbma.data.sources import load

        clean = load(self.BASE, "test", data_dir=self.clean_data_dir)
        records = [clean.raw(i) for i in range(len(clean))]
        images = np.stack([np.asarray(r["image"]) for r in records])
        corrupted = np.asarray(_corruptions_module().corrupt(images, self.corruption, self.severity, SEED))
        if corrupted.shape != images.shape or corrupted.dtype != np.uint8:
            raise ValueError(
                f"corrupt({self.corruption!r}) returned {corrupted.dtype}{corrupted.shape}, expected "
                f"uint8{images.shape}."
            )
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


def corrupted_builder(base: str, config: str, data_dir: str) -> _CorruptedBuilder:
    """The (possibly unprepared) builder of ``<base>_corrupted/<config>`` in ``data_dir``."""
    return CORRUPTED_BUILDERS[base](config=config, data_dir=data_dir, file_format="array_record")


def prepare(builder: _CorruptedBuilder) -> None:
    """Builds the corrupted split once (the clean split first, if needed)."""
    if not builder.is_prepared():
        builder.download_and_prepare()
