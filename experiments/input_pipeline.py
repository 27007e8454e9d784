"""The input pipeline of the experiments: cached uint8 arrays, normalisation, batch order, host shares.

* :func:`source_data` — the source train split resized to ``config.data.image_size`` (a seeded subset
  with ``config.data.source_size``);
* :func:`target_data` — the few-shot train and validation splits of one transfer seed (k per class each)
  and the in-domain test set (the target's test split plus a fixed stratified share of its train split);
* :func:`corrupted_data` — the corruption × severity sweep of a fixed stratified test subset;
* :func:`batch_indices` — the mini-batch of a step: epoch e is ``default_rng([seed, e])``'s permutation,
  so a resumed run sees the same batches as an uninterrupted one;
* :func:`host_rows` — this host's contiguous share of a global batch (multi-host runs).

Every array set is built once and cached as ``<workdir>/data/*.npz``.

>>> batch_indices(10, 4, seed=0, step=0).shape
(4,)
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

import fpbma.data
from experiments.config_checks import corruptions_of, test_from_train_of
from experiments.progress import progress_bar
from experiments.workdir import cached_arrays, digest


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    x = jax.image.resize(jnp.asarray(images, jnp.float32), (images.shape[0], size, size, images.shape[-1]),
                         "bilinear", antialias=True)
    return np.asarray(jnp.clip(jnp.round(x), 0, 255)).astype(np.uint8)


def _arrays(src) -> tuple[np.ndarray, np.ndarray]:
    examples = src.get_batch(list(range(len(src))))
    return (np.stack([np.asarray(e["image"]) for e in examples]).astype(np.uint8),
            np.asarray([e["label"] for e in examples], np.int32))


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) → float32 in [−1, 1]."""
    return (np.asarray(images, np.float32) / 255.0 - 0.5) / 0.5


def source_data(config) -> dict:
    size = int(config.data.image_size)
    kwargs = {"source_dir": config.data.source_dir} if config.data.source_dir else None

    limit = int(config.data.get("source_size", None) or 0)

    def build():
        src = fpbma.data.load(config.data.source, "train", data_dir=config.data.data_dir, builder_kwargs=kwargs)
        if 0 < limit < len(src):  # a fixed random subset (large sources such as ImageNet)
            src = src.subset(np.sort(np.random.default_rng(int(config.seed)).permutation(len(src))[:limit]))
        if None in src.info.image_shape[:2]:  # images of varying size: central square, resized one by one
            images, labels = [], []
            for start in range(0, len(src), 1024):
                for e in src.get_batch(list(range(start, min(start + 1024, len(src))))):
                    h, w = e["image"].shape[:2]
                    top, left = (h - min(h, w)) // 2, (w - min(h, w)) // 2
                    images.append(_resize(e["image"][None, top:top + min(h, w), left:left + min(h, w)], size)[0])
                    labels.append(e["label"])
            return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}
        x, y = _arrays(src)
        return {"image": _resize(x, size), "label": y}

    name = config.data.source.replace("/", "_").replace(":", "_") + (f"-{limit}" if limit else "")
    return cached_arrays(os.path.join(config.workdir, "data", f"{name}-train-{size}px.npz"), build)


HOLDOUT_SEED = 0x7E57  # the held-out images are the same for every transfer seed


def target_data(config, seed: int) -> dict:
    """Few-shot train/validation (k per class each, by ``seed``) and the test set, resized.

    The test set is the target's test split plus, when ``config.data.test_from_train`` = f > 0, a fixed
    ⌈f · n_c⌉ images of every class c of its train split (:func:`fpbma.data.stratified_holdout`, the same
    for every seed); the few-shot draws come from the rest of the train split.
    """
    size, k, frac = int(config.data.image_size), int(config.data.k_shot), test_from_train_of(config)

    def build():
        train_src = fpbma.data.load(config.data.target, "train", data_dir=config.data.data_dir)
        held = fpbma.data.stratified_holdout(train_src, frac, HOLDOUT_SEED) if frac > 0 else None
        split = fpbma.data.few_shot_split(train_src, k, seed, val_per_class=k, exclude=held)
        x, y = _arrays(train_src)
        xt, yt = _arrays(fpbma.data.load(config.data.target, "test", data_dir=config.data.data_dir))
        if held is not None:
            xt, yt = np.concatenate([xt, x[held]]), np.concatenate([yt, y[held]])
        return {"train_image": _resize(x[split.train], size), "train_label": y[split.train],
                "val_image": _resize(x[split.validation], size), "val_label": y[split.validation],
                "test_image": _resize(xt, size), "test_label": yt, "test_raw": xt}

    name = config.data.target.replace("/", "_").replace(":", "_") + (f"-holdout{frac:g}" if frac > 0 else "")
    return cached_arrays(os.path.join(config.workdir, "data", f"{name}-{k}shot-seed{seed}-{size}px.npz"), build)


def corruption_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """A fixed stratified subset of test positions: the first ``per_class`` of every class (0: all)."""
    if per_class <= 0:
        return np.arange(labels.shape[0])
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def corrupted_data(config, test_raw: np.ndarray, test_label: np.ndarray) -> dict:
    """Corrupted copies of the test subset: rows equal those of ``<target>_corrupted/<c>_<s>`` (same seed)."""
    size, per_class = int(config.data.image_size), int(config.eval.corruption_per_class)
    names, severities = corruptions_of(config), tuple(int(s) for s in config.eval.severities)
    idx = corruption_subset(test_label, per_class)
    key = digest([names, severities, per_class, size, config.data.target])

    shift = config.eval.get("corrupted_dataset", None)
    if shift:
        key = digest([key, shift])

    def build_from_tfds():
        # A prepared corrupted test set (e.g. TFDS cifar10_corrupted): row i is test example i corrupted.
        out = {"index": idx, "label": test_label[idx]}
        for name in names:
            for s in severities:
                src = fpbma.data.load(f"{shift}/{name}_{s}", "test", data_dir=config.data.data_dir)
                x, y = _arrays(src.subset(idx))
                if not np.array_equal(y, test_label[idx]):
                    raise ValueError(f"{shift}/{name}_{s} is not row-aligned with the {config.data.target} test split.")
                out[f"{name}_{s}"] = _resize(x, size)
        return out

    def build():
        if shift:
            return build_from_tfds()
        out = {"index": idx, "label": test_label[idx]}
        with progress_bar(config, len(names) * len(severities), "corrupting test images") as tick:
            for name in names:
                for s in severities:
                    bad = fpbma.data.corrupt_images(test_raw[idx], name, s, idx)
                    out[f"{name}_{s}"] = _resize(bad, size)
                    tick()
        return out

    return cached_arrays(os.path.join(config.workdir, "data", f"{config.data.target}-corrupted-{key}.npz"), build)


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the mini-batch of ``step``: epoch e = step // (N // B) is ``default_rng([seed, e])``'s permutation."""
    per_epoch = max(num_examples // batch_size, 1)
    epoch, b = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[b * batch_size:(b + 1) * batch_size]




def host_rows(batch: dict) -> dict:
    """This host's share of a global batch: rows [p·B/P, (p+1)·B/P) of host p of P (all of it on one host).

    :func:`fpbma.parallel.shard_batch` assembles the global array from every host's share.
    """
    p, n = jax.process_index(), jax.process_count()
    if n == 1:
        return batch
    return {k: np.array_split(np.asarray(v), n)[p] for k, v in batch.items()}
