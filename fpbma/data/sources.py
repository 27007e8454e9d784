"""One entry point to every dataset: ``load(name, split)`` → random-access source, ``info(name)``.

All data goes through tensorflow-datasets' ``array_record`` random-access path
(``DatasetBuilder.as_data_source``), which needs no TensorFlow at run time.

Names (the datasets the project builds itself are looked up in ``fpbma.data.registry``):

* ``"mnist"``, ``"digits"``, ``"fashion_mnist"``: the project's offline builders
  (TFDS names ``fpbma_mnist``, ``fpbma_digits``, ``fpbma_fashion_mnist``, see ``builders.py``). They
  prepare themselves on first load and are reused afterwards. TFDS's own full ``mnist`` /
  ``fashion_mnist`` stay reachable as ``"tfds:mnist"`` / ``"tfds:fashion_mnist"``.
* ``"mnist_corrupted/<corruption>_<severity>"`` (likewise ``digits_corrupted``,
  ``fashion_mnist_corrupted``): corrupted test sets built and cached from the clean test split
  (``shifted.py``).
* The paper's TFDS datasets by their TFDS names (``PAPER_DATASETS``), including configs such as
  ``"cifar10_corrupted/gaussian_noise_3"``. These must already be prepared as ``array_record`` in a data
  directory (``prepare`` does it on a machine with network and TensorFlow).
* ``"tfds:<any TFDS name>"``: any other TFDS dataset prepared as ``array_record``.

Data directory: ``data_dir`` argument, else ``$FPBMA_DATA_DIR``, else
``$XDG_CACHE_HOME/fpbma/tensorflow_datasets`` (``~/.cache/fpbma/tensorflow_datasets``). For TFDS datasets
loaded without ``data_dir``, TFDS's own default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) is
searched as well.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from fpbma.data import builders as _builders  # noqa: F401  (registers the offline datasets)
from fpbma.data import registry as _registry
from fpbma.data import shifted as _shifted  # noqa: F401  (registers the corrupted sets)

# Snapshots of the registry at import; name resolution below always reads the registry itself.
OFFLINE_DATASETS = _registry.names("offline")
SHIFTED_DATASETS = _registry.names("shifted")
PAPER_DATASETS = (
    "cifar10", "cifar100", "cifar10_corrupted",
    "oxford_iiit_pet", "oxford_flowers102", "eurosat", "dtd", "food101",
    "imagenet2012", "imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch",
)
KNOWN_DATASETS = OFFLINE_DATASETS + SHIFTED_DATASETS + PAPER_DATASETS

# Mirror-image flips change the meaning of digits; every other dataset here is flip-invariant.
_NO_FLIP = ("mnist", "digits")


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is not available as array_record in any searched data directory."""


def default_data_dir() -> str:
    """``$FPBMA_DATA_DIR``, else ``<user cache>/fpbma/tensorflow_datasets``."""
    if os.environ.get("FPBMA_DATA_DIR"):
        return os.path.expanduser(os.environ["FPBMA_DATA_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fpbma", "tensorflow_datasets")


def _tfds_default_data_dir() -> str:
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
    """What a model and a pipeline need to know about a dataset.

    Attributes:
      name: the name given to ``load``.
      tfds_name: the TFDS builder name (with config) behind it.
      num_classes: number of labels.
      class_names: label names, index = label.
      image_shape: (H, W, C), with None for sizes that vary between examples.
      splits: split name → number of examples (empty until the data is prepared).
      horizontal_flip: whether a mirror image keeps the label (False for digits).
      offline: True for the project's own builders that need no network.
    """

    name: str
    tfds_name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int | None, ...]
    splits: Mapping[str, int]
    horizontal_flip: bool
    offline: bool


@dataclasses.dataclass(frozen=True)
class _Resolved:
    kind: str  # "offline" | "shifted" | "tfds"
    base: str  # the clean offline dataset (also for a shifted one), or the TFDS name
    config: str | None
    name: str  # the name as given
    key: str | None = None  # the registry name, for offline and shifted datasets


def _unknown(name: str) -> ValueError:
    known = _registry.names() + tuple(n for n in PAPER_DATASETS if n not in _registry.REGISTRY)
    return ValueError(
        f"Unknown dataset {name!r}. Known datasets: {', '.join(known)}; "
        "corrupted offline sets as '<base>_corrupted/<corruption>_<severity>'; any other TFDS dataset as "
        "'tfds:<name>'."
    )


def _resolve(name: str) -> _Resolved:
    if not isinstance(name, str) or not name:
        raise _unknown(str(name))
    if name.startswith("tfds:"):
        full = name[len("tfds:"):]
        base, _, config = full.partition("/")
        return _Resolved("tfds", base, config or None, name)
    base, _, config = name.partition("/")
    if base.startswith("fpbma_") and base[len("fpbma_"):] in _registry.names("offline"):
        return _resolve(base[len("fpbma_"):] + (f"/{config}" if config else ""))
    if base in _registry.REGISTRY:
        entry = _registry.get(base)
        if entry.kind == "offline":
            if config:
                raise ValueError(f"{base!r} has no configs; use load({base!r}, split) without '/{config}'.")
            return _Resolved("offline", base, None, name, key=base)
        if not config:
            raise ValueError(
                f"{base!r} needs a corruption and severity, e.g. '{base}/gaussian_noise_3' "
                "(see fpbma.data.corruptions.CORRUPTIONS, severities 1-5)."
            )
        return _Resolved("shifted", entry.base, config, name, key=base)
    if base in PAPER_DATASETS:
        return _Resolved("tfds", base, config or None, name)
    raise _unknown(name)


def _tfds_builder(res: _Resolved, data_dir: str | None):
    full = res.base + (f"/{res.config}" if res.config else "")
    candidates = [data_dir] if data_dir is not None else [default_data_dir(), _tfds_default_data_dir()]
    for d in candidates:
        try:
            builder = tfds.builder(full, data_dir=d)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise _unknown(res.name) from e
        if builder.is_prepared():
            return builder, candidates
    return None, candidates


def _not_prepared(res: _Resolved, candidates: Sequence[str]) -> DatasetNotPreparedError:
    full = res.base + (f"/{res.config}" if res.config else "")
    return DatasetNotPreparedError(
        f"TFDS dataset {full!r} is not prepared in {', '.join(map(repr, candidates))}. Either prepare it once "
        "on a machine with network (preparing most TFDS datasets needs TensorFlow): "
        "`pip install 'fpbma[prepare]'` then "
        f"`python -c \"import fpbma.data as d; d.prepare('{full}', data_dir=DIR)\"` "
        f"(equivalently `tfds build {full} --file_format=array_record --data_dir=DIR`), or point "
        "`data_dir=` / $FPBMA_DATA_DIR at a directory that already holds it (layout "
        f"DIR/{res.base}/{res.config + '/' if res.config else ''}<version>/). A TFRecord copy must first be "
        "converted (with TensorFlow installed): `tfds convert_format --dataset_version_dir=DIR/<name>/<version> "
        "--out_file_format=array_record --out_dir=NEW_DIR/<name>/<version>`."
    )


def _builder(name: str, data_dir: str | None, builder_kwargs: Mapping[str, Any] | None = None,
             prepare: bool = True):
    """Resolves ``name`` to a prepared TFDS builder (preparing offline ones when ``prepare``)."""
    res = _resolve(name)
    builder_kwargs = dict(builder_kwargs or {})
    if res.kind != "offline" and builder_kwargs:
        raise ValueError(
            f"builder_kwargs {sorted(builder_kwargs)} are only accepted by {_registry.names('offline')}.")
    if res.kind in ("offline", "shifted"):
        factory = _registry.get(res.key).factory
        config = {} if res.kind == "offline" else {"config": res.config}
        builder = factory(data_dir=data_dir or default_data_dir(), file_format="array_record",
                          **config, **builder_kwargs)
        if prepare:
            _registry.prepare_builder(builder)
        return res, builder
    builder, candidates = _tfds_builder(res, data_dir)
    if builder is None:
        if not prepare:
            return res, tfds.builder(res.base + (f"/{res.config}" if res.config else ""),
                                     data_dir=candidates[0])
        raise _not_prepared(res, candidates)
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DatasetNotPreparedError(
            f"{res.name!r} in {builder.data_dir!r} is stored as {builder.info.file_format.value}; random access "
            "needs array_record. Convert it (with TensorFlow installed) with `tfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record --out_dir=NEW_DIR/...` "
            "and load from NEW_DIR, or re-prepare it with fpbma.data.prepare."
        )
    return res, builder


def _metadata(res: _Resolved, builder) -> DatasetMetadata:
    features = builder.info.features
    label = features["label"]
    base = res.base
    return DatasetMetadata(
        name=res.name,
        tfds_name=builder.info.full_name.rsplit("/", 1)[0],
        num_classes=int(label.num_classes),
        class_names=tuple(label.names),
        image_shape=tuple(features["image"].shape),
        splits={k: int(v.num_examples) for k, v in builder.info.splits.items()},
        horizontal_flip=base not in _NO_FLIP,
        offline=res.kind in ("offline", "shifted"),
    )


def info(name: str, data_dir: str | None = None) -> DatasetMetadata:
    """Metadata (classes, image shape, splits) of a dataset, without preparing or reading it.

    Args:
      name: a dataset name accepted by ``load``.
      data_dir: where prepared data lives (only affects ``splits``).

    Returns:
      A ``DatasetMetadata``; ``splits`` is empty when the data is not prepared yet.
    """
    res, builder = _builder(name, data_dir, prepare=False)
    return _metadata(res, builder)


class Source(Sequence):
    """Random-access view of one split: ``len(src)``, ``src[i] → {"image": uint8 HWC, "label": int}``.

    ``src.info`` is the dataset's ``DatasetMetadata``; ``src.labels`` all labels (read once, cached);
    ``src.subset(indices)`` a view on some of the examples; ``src.raw(i)`` every stored feature.
    """

    def __init__(self, data_source, metadata: DatasetMetadata, split: str,
                 indices: np.ndarray | None = None, labels: np.ndarray | None = None,
                 label_source=None):
        self._ds = data_source
        self._label_ds = label_source
        self.info = metadata
        self.split = split
        self._indices = None if indices is None else np.asarray(indices, np.int64)
        self._labels_override = None if labels is None else np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self._ds) if self._indices is None else int(self._indices.shape[0])

    def _storage_index(self, i) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a source of {n} examples.")
        i %= n
        return i if self._indices is None else int(self._indices[i])

    def raw(self, i: int) -> dict:
        """Every stored feature of example ``i`` as TFDS decodes it."""
        return self._ds[self._storage_index(i)]

    def _convert(self, position: int, example: Mapping[str, Any]) -> dict:
        image = np.asarray(example["image"])
        if image.ndim == 2:
            image = image[..., None]
        label = (int(self._labels_override[position]) if self._labels_override is not None
                 else int(example["label"]))
        return {"image": image, "label": label}

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        storage = self._storage_index(i)
        return self._convert(int(i) % len(self), self._ds[storage])

    def get_batch(self, positions: Sequence[int]) -> list[dict]:
        """Examples at ``positions`` (one array_record read for all of them)."""
        positions = [int(p) % len(self) for p in positions]
        storage = [self._storage_index(p) for p in positions]
        records = self._ds.__getitems__(storage)
        return [self._convert(p, r) for p, r in zip(positions, records)]

    def columns(self, *keys: str) -> dict[str, list]:
        """Stored features ``keys`` of every example, in order, read in one pass (chunks of 4,096)."""
        ds = self._ds if "image" in keys or self._label_ds is None else self._label_ds
        storage = list(range(len(ds))) if self._indices is None else self._indices.tolist()
        out: dict[str, list] = {k: [] for k in keys}
        for start in range(0, len(storage), 4096):
            for record in ds.__getitems__(storage[start:start + 4096]):
                for k in keys:
                    out[k].append(record[k])
        return out

    def feature_values(self, key: str) -> list:
        """Values of one stored feature (``file_name``, ``id``…) for every example, in order."""
        return self.columns(key)[key]

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """All labels, int64 (len(src),)."""
        if self._labels_override is not None:
            return self._labels_override
        return np.asarray(self.feature_values("label"), np.int64)

    def subset(self, indices: Sequence[int], labels: Sequence[int] | None = None) -> "Source":
        """A view on ``self[indices[0]], self[indices[1]], …`` (optionally with replacement labels)."""
        indices = np.asarray(indices, np.int64)
        if indices.ndim != 1:
            raise ValueError(f"subset indices must be 1-D, got shape {indices.shape}.")
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"subset indices must lie in [0, {len(self)}).")
        storage = indices if self._indices is None else self._indices[indices]
        if labels is None and self._labels_override is not None:
            labels = self._labels_override[indices]
        return Source(self._ds, self.info, self.split, storage, labels, self._label_ds)

    def __repr__(self) -> str:
        return f"Source({self.info.name!r}, split={self.split!r}, n={len(self)})"


_SPLIT_BASE = re.compile(r"^\s*([A-Za-z0-9_\-]+)")


def load(name: str, split: str, data_dir: str | None = None, *,
         builder_kwargs: Mapping[str, Any] | None = None) -> Source:
    """Random-access source of one split of a dataset.

    Offline datasets (``mnist``, ``digits``, ``fashion_mnist`` and their ``*_corrupted`` sets) are built
    into ``data_dir`` on first use and reused afterwards; TFDS datasets must be prepared already.

    Args:
      name: see the module docstring (e.g. ``"digits"``, ``"cifar10"``,
        ``"digits_corrupted/gaussian_noise_3"``, ``"tfds:mnist"``).
      split: a split name, TFDS slicing allowed (``"train[:80%]"``).
      data_dir: directory of prepared datasets; default ``default_data_dir()``.
      builder_kwargs: extra arguments of an offline builder, e.g. ``{"source_dir": ...}`` for
        ``fashion_mnist``.

    Returns:
      A ``Source``: ``len(src)``, ``src[i] → {"image": uint8 (H, W, C), "label": int}``, ``src.info``.

    References:
      Datasets of arXiv 2406.15664 (FP-BMA), §5 and appendix.
    """
    res, builder = _builder(name, data_dir, builder_kwargs)
    metadata = _metadata(res, builder)
    match = _SPLIT_BASE.match(split) if isinstance(split, str) else None
    if match is None or match.group(1) not in metadata.splits:
        raise ValueError(f"Unknown split {split!r} of {name!r}; available: {sorted(metadata.splits)}.")
    data_source = builder.as_data_source(split=split)
    # A second view that leaves encoded images undecoded reads labels and file names cheaply.
    label_source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return Source(data_source, metadata, split, label_source=label_source)


def prepare(name: str, data_dir: str | None = None, **download_and_prepare_kwargs) -> str:
    """Downloads and prepares a TFDS dataset as array_record (needs network; most need TensorFlow).

    Install the extra first: ``pip install 'fpbma[prepare]'``. ImageNet-2012 needs its archives placed
    in the manual directory (``download_config=tfds.download.DownloadConfig(manual_dir=...)``).

    Args:
      name: a dataset name accepted by ``load``.
      data_dir: target directory; default ``default_data_dir()``.
      **download_and_prepare_kwargs: passed to ``DatasetBuilder.download_and_prepare``.

    Returns:
      The directory of the prepared dataset version.
    """
    res = _resolve(name)
    data_dir = data_dir or default_data_dir()
    if res.kind in ("offline", "shifted"):
        _, builder = _builder(name, data_dir)
        return builder.data_dir
    full = res.base + (f"/{res.config}" if res.config else "")
    builder = tfds.builder(full, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(**download_and_prepare_kwargs)
    return builder.data_dir
