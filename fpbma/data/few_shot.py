"""Few-shot splits: k examples per class, a disjoint validation split, and CoOp's split files.

References:
  The few-shot transfer protocol of arXiv 2406.15664 follows CoOp (Zhou et al., 2022, "Learning to
  Prompt for Vision-Language Models"), whose ``split_zhou_<Dataset>.json`` files fix train/val/test.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, NamedTuple, Sequence

import numpy as np


class FewShotSplit(NamedTuple):
    """Indices into one source: ``train`` (k per class) and ``validation`` (disjoint from train)."""

    train: np.ndarray
    validation: np.ndarray


def _labels_of(src) -> np.ndarray:
    labels = getattr(src, "labels", None)
    if labels is None:
        labels = [src[i]["label"] for i in range(len(src))]
    return np.asarray(labels, np.int64)


def _num_classes(src, labels: np.ndarray) -> int:
    meta = getattr(src, "info", None)
    n = getattr(meta, "num_classes", None)
    return int(n) if n is not None else int(labels.max()) + 1


def few_shot_split(src, k: int, seed: int, *, val_per_class: int | None = None,
                   val_fraction: float | None = None, exclude: Sequence[int] | None = None) -> FewShotSplit:
    """k training examples per class and a disjoint validation split, deterministic by ``seed``.

    For every class c, the candidate positions {i : label_i = c, i ∉ exclude} are permuted with
    ``np.random.default_rng(seed)`` (classes in increasing order); the first k are training examples and
    the next v_c validation examples, with v_c = ``val_per_class`` (default k) or
    v_c = ⌈val_fraction · (n_c − k)⌉ of the remaining ones. The training indices equal
    ``few_shot(src, k, seed, exclude=exclude)`` whatever the validation size.

    Args:
      src: a ``Source`` (or any sequence of ``{"label": int}`` dicts; ``src.labels`` is used if present).
      k: examples per class, ≥ 1.
      seed: integer seed.
      val_per_class: validation examples per class (exclusive with ``val_fraction``).
      val_fraction: fraction in [0, 1] of each class's non-training examples used for validation.
      exclude: positions that must not be drawn (e.g. a test split carved out of the same source).

    Returns:
      ``FewShotSplit(train, validation)``: sorted int64 positions into ``src``.

    Raises:
      ValueError: when a class has fewer than k (+ validation) candidates, naming the class.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if val_per_class is not None and val_fraction is not None:
        raise ValueError("Pass at most one of val_per_class and val_fraction.")
    if val_fraction is not None and not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1], got {val_fraction}.")
    if val_per_class is None and val_fraction is None:
        val_per_class = int(k)
    if val_per_class is not None and val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}.")
    labels = _labels_of(src)
    num_classes = _num_classes(src, labels)
    allowed = np.ones(labels.shape[0], bool)
    if exclude is not None:
        exclude = np.asarray(exclude, np.int64)
        if exclude.size and (exclude.min() < 0 or exclude.max() >= labels.shape[0]):
            raise ValueError(f"exclude holds positions outside [0, {labels.shape[0]}).")
        allowed[exclude] = False
    candidates = [np.flatnonzero((labels == c) & allowed) for c in range(num_classes)]
    counts = []
    for c, cand in enumerate(candidates):
        v = val_per_class if val_per_class is not None else math.ceil(val_fraction * max(cand.size - k, 0))
        if cand.size < k + v:
            raise ValueError(
                f"Class {c} has {cand.size} available examples, fewer than k={k} training + {v} validation. "
                "Use a smaller k / validation size or a larger split."
            )
        counts.append(v)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cand, v in zip(candidates, counts):
        perm = rng.permutation(cand)
        train.append(perm[:k])
        val.append(perm[k:k + v])
    return FewShotSplit(np.sort(np.concatenate(train)), np.sort(np.concatenate(val)))


def few_shot(src, k: int, seed: int, *, exclude: Sequence[int] | None = None) -> np.ndarray:
    """k indices per class of ``src``, deterministic by ``seed`` (see ``few_shot_split``).

    Args:
      src: a ``Source``.
      k: examples per class.
      seed: integer seed; the same seed gives the same indices.
      exclude: positions that must not be drawn.

    Returns:
      Sorted int64 positions, k · num_classes of them.
    """
    return few_shot_split(src, k, seed, val_per_class=0, exclude=exclude).train


def stratified_holdout(src, fraction: float, seed: int = 0) -> np.ndarray:
    """A fixed ⌈fraction · n_c⌉ positions of every class c, to hold out of a split (e.g. as extra test data).

    For every class (in increasing order) its positions are permuted by ``np.random.default_rng(seed)``
    and the first ⌈fraction · n_c⌉ are taken. Pass the result as ``exclude=`` of :func:`few_shot_split`
    so the few-shot draws of every seed come from the rest and never touch the held-out images.

    >>> import numpy as np
    >>> src = [{"label": c} for c in (0, 0, 0, 1, 1, 1, 1)]
    >>> held = stratified_holdout(src, 0.5, seed=0)
    >>> [int(np.sum(np.asarray([src[i]["label"] for i in held]) == c)) for c in (0, 1)]
    [2, 2]

    Args:
      src: a ``Source`` (or any sequence of ``{"label": int}`` dicts).
      fraction: in [0, 1); 0 holds out nothing.
      seed: integer seed of the permutation (independent of the few-shot seeds).

    Returns:
      Sorted int64 positions into ``src``.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
        raise ValueError(f"fraction={fraction!r} must lie in [0, 1) (the share of every class held out).")
    labels = _labels_of(src)
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(labels == c))[:math.ceil(fraction * np.sum(labels == c))]
            for c in range(_num_classes(src, labels))]
    return np.sort(np.concatenate(held)).astype(np.int64)


class CoopEntry(NamedTuple):
    """One line of a CoOp ``split_zhou_*.json`` file: image path, label and class name."""

    path: str
    label: int
    classname: str


def read_coop_split(path: str | os.PathLike) -> dict[str, list[CoopEntry]]:
    """Parses a CoOp split file ``split_zhou_<Dataset>.json``.

    Format: ``{"train": [[path, label, classname], ...], "val": [...], "test": [...]}``.

    Returns:
      ``{"train": [...], "val": [...], "test": [...]}`` of ``CoopEntry(path, label, classname)``.
    """
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or not {"train", "val", "test"} <= set(raw):
        raise ValueError(f"{path}: a CoOp split file is a JSON object with keys 'train', 'val', 'test'.")
    out = {}
    for split in ("train", "val", "test"):
        entries = []
        for j, item in enumerate(raw[split]):
            if (not isinstance(item, (list, tuple)) or len(item) != 3 or not isinstance(item[0], str)
                    or not isinstance(item[1], int) or not isinstance(item[2], str)):
                raise ValueError(f"{path}: {split}[{j}] = {item!r} is not [path, label, classname].")
            entries.append(CoopEntry(*item))
        out[split] = entries
    return out


def _key(value) -> str:
    if isinstance(value, bytes):
        value = value.decode()
    return os.path.splitext(os.path.basename(str(value)))[0]


def coop_subsets(split_file: str | os.PathLike, sources: Mapping[str, object], key: str = "file_name"):
    """Maps a CoOp split file onto TFDS sources, matching file names.

    CoOp pools and re-splits the original data, so each CoOp example is looked up, by the stem of its
    base name (``"jpg/image_04488.jpg"`` → ``"image_04488"``), in every given source's ``key`` feature.
    Labels and class names come from the split file.

    Args:
      split_file: path of ``split_zhou_<Dataset>.json``.
      sources: e.g. ``{"train": load(name, "train"), "test": load(name, "test")}``, all of one dataset.
      key: feature holding the file name (``"file_name"``; ``"filename"`` for eurosat).

    Returns:
      ``({"train": Source, "val": Source, "test": Source}, class_names)`` where each Source is a view on one
      of the given sources when all its examples lie in that source, else a ``ConcatSource``.

    Raises:
      KeyError: listing (up to five) CoOp paths that no source contains.
    """
    entries = read_coop_split(split_file)
    where: dict[str, tuple[str, int]] = {}
    for split_name, src in sources.items():
        for pos, value in enumerate(src.feature_values(key)):
            where.setdefault(_key(value), (split_name, pos))
    class_names: dict[int, str] = {}
    out = {}
    for split, items in entries.items():
        missing = [e.path for e in items if _key(e.path) not in where]
        if missing:
            raise KeyError(f"{len(missing)} {split} entries of {split_file} are in none of the sources "
                           f"{sorted(sources)} (matched by {key!r}), e.g. {missing[:5]}.")
        for e in items:
            class_names.setdefault(e.label, e.classname)
        parts = [where[_key(e.path)] for e in items]
        labels = np.array([e.label for e in items], np.int64)
        names = {p[0] for p in parts}
        if len(names) == 1:
            (name,) = names
            out[split] = sources[name].subset([p[1] for p in parts], labels=labels)
        else:
            out[split] = ConcatSource([sources[p[0]].subset([p[1]]) for p in parts], labels)
    names = tuple(class_names[i] for i in sorted(class_names))
    return out, names


class ConcatSource:
    """Examples gathered from several one-example views (CoOp splits that span TFDS splits)."""

    def __init__(self, parts, labels):
        self._parts = list(parts)
        self.labels = np.asarray(labels, np.int64)
        self.info = self._parts[0].info if self._parts else None

    def __len__(self):
        return len(self._parts)

    def __getitem__(self, i):
        ex = self._parts[int(i)][0]
        return {"image": ex["image"], "label": int(self.labels[int(i)])}

    def get_batch(self, positions):
        """The examples at ``positions`` (grain / TFDS random-access protocol)."""
        return [self[p] for p in positions]
