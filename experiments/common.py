"""The stages of the Bayesian transfer pipeline, shared by the experiment entry points.

Stages and what each caches in the work dir (``config.workdir``):

* ``data/`` — the prepared arrays (source train split, few-shot target train/validation, target test
  split, the corrupted test images), one ``.npz`` per dataset and setting;
* ``source-<hash>/`` — pre-training checkpoints (orbax, every ``checkpoint_every`` steps, the latest
  kept) and ``final``;
* ``prior-<hash>/`` — the SWAG prior (a :class:`fpbma.LowRankGaussian`) fitted along SGD on the source;
* ``seed<s>/<method>-<hash>/`` — the train state of one method (checkpoints and ``final``) and its
  evaluation ``metrics.json``.

``<hash>`` digests the config fields a stage depends on, so a changed config never reuses a stale
stage; a method's digest holds its *resolved* hyperparameters (:func:`method_settings`) and no path, so
changing SAM's ρ never retrains FP-BMA and a moved work dir reuses every stage. Per-step randomness is
``fold_in(key, step)`` and the data order of epoch e is ``np.random.default_rng([seed, e])``, so a run killed at any point and restarted finishes with the same
result as an uninterrupted one.

References:
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664, §4–5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from fpbma import transfer
from fpbma import methods
from fpbma.models import partition
from fpbma.models.checkpoints import restore_checkpoint, save_checkpoint

PyTree = Any

# ----------------------------------------------------------------------------------------------
# Validation: every error is raised before any work or file write.


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the fix."""


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"config.{name}={value!r} must be a positive integer.")


def _items(value) -> tuple:
    """A tuple from a tuple/list/str field; comma-separated strings are split (``--config.methods=fpbma,sgd``
    arrives as ``("fpbma,sgd",)`` when the field's default is a tuple)."""
    if isinstance(value, (str, int, np.integer)):
        value = (value,)
    return tuple(s.strip() for v in value for s in str(v).split(",") if s.strip())


def methods_of(config, stage: str) -> tuple:
    if stage in ("train", "evaluate"):
        return (config.method,)
    return _items(config.methods)


def seeds_of(config, stage: str) -> tuple:
    if stage in ("train", "evaluate"):
        return (int(config.seed),)
    seeds = _items(config.seeds)
    bad = [s for s in seeds if not s.isdigit()]
    if bad:
        raise ConfigError(f"config.seeds has non-integer entries {bad}; pass e.g. --config.seeds=0,1,2.")
    return tuple(int(s) for s in seeds)


def corruptions_of(config) -> tuple:
    from fpbma.data import corruptions

    spec = config.eval.corruptions
    if spec in ("none", "", None):
        return ()
    if spec == "all":
        return tuple(corruptions.CORRUPTIONS)
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [n for n in names if n not in corruptions.CORRUPTIONS]
    if unknown:
        raise ConfigError(f"config.eval.corruptions has unknown corruption(s) {unknown}; choose from "
                          f"{list(corruptions.CORRUPTIONS)}, 'all' or 'none'.")
    return names


def validate(config, stage: str) -> None:
    """Checks a config for ``stage`` ∈ {pretrain, prior, train, evaluate, transfer}; raises ConfigError."""
    chosen = methods_of(config, stage)
    unknown = [m for m in chosen if m not in methods.names()]
    if unknown or not chosen:
        raise ConfigError(f"unknown method(s) {unknown or chosen}; choose from {list(methods.names())} "
                          "(e.g. --config.method=fpbma or --config.methods=fpbma,sgd).")
    if "rho" in config:
        raise ConfigError("config.rho is gone: every method has its own, e.g. --config.hparams.fpbma.rho=0.05 "
                          "--config.hparams.sam.rho=0.05.")
    sections = list(config.get("hparams", None) or {})
    stray = [m for m in sections if m not in methods.names()]
    if stray:
        raise ConfigError(f"config.hparams has section(s) {stray} of no registered method; the methods are "
                          f"{list(methods.names())}.")
    settings = {m: method_settings(config, m) for m in chosen}
    if config.transfer.scheme not in partition.SCHEMES:
        raise ConfigError(f"config.transfer.scheme={config.transfer.scheme!r}; choose one of {partition.SCHEMES}.")
    if not config.transfer.alpha > 0:
        raise ConfigError(f"config.transfer.alpha={config.transfer.alpha!r} must be > 0 (new head variance).")
    if not (config.prior.min_var > 0 and config.transfer.kl_min_var > 0):
        raise ConfigError(f"config.prior.min_var={config.prior.min_var!r} and config.transfer.kl_min_var={config.transfer.kl_min_var!r} must be > 0.")
    for name in ("pretrain.steps", "prior.steps", "transfer.steps", "pretrain.batch_size", "prior.batch_size",
                 "transfer.batch_size", "eval.num_samples", "eval.corruption_num_samples", "checkpoint_every",
                 "data.k_shot", "prior.rank", "prior.collect_every"):
        section, field = name.split(".") if "." in name else (None, name)
        _check_positive_int(config[section][field] if section else config[field], name)
    if config.prior.rank < 2:
        raise ConfigError(f"config.prior.rank={config.prior.rank} must be >= 2 (SWAG's 1/(K-1)).")
    if config.prior.steps < 2 * config.prior.collect_every:
        raise ConfigError(f"config.prior.steps={config.prior.steps} collects fewer than 2 SWAG models with "
                          f"collect_every={config.prior.collect_every}; raise steps or lower collect_every.")
    if any(int(s) not in (1, 2, 3, 4, 5) for s in config.eval.severities):
        raise ConfigError(f"config.eval.severities={tuple(config.eval.severities)} must lie in 1..5.")
    frac = config.data.get("test_from_train", None) or 0.0
    if not (isinstance(frac, (int, float)) and 0.0 <= frac < 1.0):
        raise ConfigError(f"config.data.test_from_train={frac!r} must lie in [0, 1): the share of every class "
                          "of the target's train split moved to the test set (0: none).")
    _check_selection(config)
    corruptions_of(config)
    seeds_of(config, stage)
    check_resources(config)
    if stage in ("train", "evaluate", "transfer"):
        counts = target_class_counts(config)
        k = int(config.data.k_shot)
        # k training + k validation examples per class (temperature scaling needs the validation split).
        if counts.min() < 2 * k:
            c = int(np.argmin(counts))
            raise ConfigError(f"config.data.k_shot={k} is too large: class {c} of {config.data.target!r} has "
                              f"{int(counts[c])} training examples (after test_from_train), fewer than k "
                              f"training + k validation = {2 * k}. Use --config.data.k_shot <= "
                              f"{int(counts.min()) // 2} or a smaller --config.data.test_from_train.")
        # Every value check of each method's constructors, run now on a probe problem (N = k per class).
        for m, (hp, shared) in settings.items():
            try:
                methods.get(m).check(hp, num_data=k * counts.size, **_training_kwargs(shared))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"config.hparams.{m}: {e}") from None
    if stage in ("prior",) and not os.path.isdir(os.path.join(stage_dir(config, "source"), "final")):
        raise ConfigError(f"missing pre-trained source checkpoint {stage_dir(config, 'source')}/final; run "
                          "`python -m experiments.pretrain` with the same config first.")
    if stage in ("train",) and not os.path.isdir(os.path.join(stage_dir(config, "prior"), "final")):
        raise ConfigError(f"missing prior checkpoint {stage_dir(config, 'prior')}/final; run "
                          "`python -m experiments.prior` (after `experiments.pretrain`) with the same config first.")
    if stage == "evaluate":
        path = os.path.join(method_dir(config, config.method, int(config.seed)), "final")
        if not os.path.isdir(path):
            raise ConfigError(f"missing checkpoint {path}; run `python -m experiments.train "
                              f"--config.method={config.method}` with the same config first.")


def pretrained_of(config) -> str:
    """``config.model.pretrained`` ("" or None: pre-train from scratch)."""
    return config.model.get("pretrained", None) or ""


def model_image_size(config) -> int:
    """Input side of a pre-trained model (``config.model.image_size``, else the model's native size)."""
    import fpbma.models

    return int(config.model.get("image_size", None) or fpbma.models.spec(config.model.name).image_size)


def check_resources(config) -> None:
    """The pre-trained checkpoint and the TFDS datasets exist; one ConfigError naming what is missing."""
    import fpbma.data
    import fpbma.models
    from fpbma.data import builders

    name, path = config.model.name, pretrained_of(config)
    if name != "cifar_resnet" and name not in fpbma.models.MODEL_NAMES:
        raise ConfigError(f"config.model.name={name!r}; choose 'cifar_resnet' or one of {fpbma.models.MODEL_NAMES}.")
    if path:
        if name == "cifar_resnet":
            raise ConfigError("config.model.pretrained is set but config.model.name='cifar_resnet' is always "
                              "pre-trained from scratch; pass --config.model.pretrained='' or a name of fpbma.models.")
        if path == "package":
            if fpbma.models.spec(name).family != "efficientnet":
                raise ConfigError(f"config.model.pretrained='package' only exists for efficientnet_lite0, not {name!r}; "
                                  "pass the checkpoint file path.")
            from fpbma.models import efficientnet
            try:
                efficientnet.efficientnet_lite0_weights_path()
            except (ModuleNotFoundError, FileNotFoundError) as e:
                raise ConfigError(f"config.model.pretrained='package': {e}") from None
        elif not os.path.isfile(path):
            raise ConfigError(f"config.model.pretrained={path!r}: checkpoint file not found; download it first "
                              "(see the config's docstring) and pass --config.model.pretrained=/path/to/file.")
    elif name != "cifar_resnet" and fpbma.models.spec(name).image_size >= 224:
        raise ConfigError(f"config.model.name={name!r} is an ImageNet backbone and needs its pre-trained weights: "
                          "pass --config.model.pretrained=/path/to/checkpoint (see the config's docstring).")
    for field in ("source", "target"):
        dataset = config.data[field]
        if dataset == "fashion_mnist":
            source_dir = config.data.get("source_dir") or os.environ.get("FPBMA_FASHION_MNIST_DIR") \
                or builders.FASHION_MNIST_DEFAULT_DIR
            try:
                builders.check_fashion_mnist_source(source_dir)
            except builders.MissingSourceError as e:
                raise ConfigError(f"config.data.{field}='fashion_mnist': {e}") from None
        elif dataset.split("/")[0] not in fpbma.data.OFFLINE_DATASETS:
            try:  # TFDS datasets must be prepared already; the loader's message says how
                fpbma.data.load(dataset, "train", data_dir=config.data.data_dir)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"config.data.{field}={dataset!r} is not available: {e}") from None
    shift = config.eval.get("corrupted_dataset", None)
    if shift and corruptions_of(config):
        name0 = f"{shift}/{corruptions_of(config)[0]}_{int(config.eval.severities[0])}"
        try:
            fpbma.data.load(name0, "test", data_dir=config.data.data_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config.eval.corrupted_dataset={shift!r}: {name0!r} is not available ({e}); "
                              "prepare it or pass --config.eval.corrupted_dataset='' to corrupt the test split "
                              "on the fly.") from None


def target_class_counts(config) -> np.ndarray:
    import fpbma.data

    src = fpbma.data.load(config.data.target, "train", data_dir=config.data.data_dir)
    counts = np.bincount(np.asarray(src.labels), minlength=src.info.num_classes)
    held = np.ceil(test_from_train_of(config) * counts).astype(counts.dtype)  # stratified_holdout's share
    return counts - held


# ----------------------------------------------------------------------------------------------
# Work-dir layout.


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _section(config, *names) -> dict:
    return {n: config[n].to_dict() if hasattr(config[n], "to_dict") else config[n] for n in names}


# Fields added after the first release enter the stage digest only when set, so older caches stay valid.
_OPTIONAL_DIGEST_FIELDS = {"data": ("source_size",), "model": ("pretrained", "image_size")}


def _digest_fields(section: str, fields: dict) -> dict:
    optional = _OPTIONAL_DIGEST_FIELDS[section]
    return {k: v for k, v in fields.items() if not (k in optional and not v)}


def _stage_digest(config, stage: str) -> str:
    data = {k: config.data[k] for k in ("source", "image_size", "source_size") if k in config.data}
    base = {"seed": int(config.seed), "data": _digest_fields("data", data),
            "model": _digest_fields("model", config.model.to_dict()), "pretrain": config.pretrain.to_dict()}
    if stage == "source":
        return _digest(base)
    if stage == "prior":
        return _digest({**base, "prior": config.prior.to_dict()})
    raise ValueError(stage)


def stage_dir(config, stage: str) -> str:
    return os.path.join(config.workdir, f"{stage}-{_stage_digest(config, stage)}")


def method_settings(config, method: str) -> tuple:
    """``(hyperparameters, shared)`` of ``method``: its defaults updated by ``config.hparams.<method>``, and
    its shared training fields (``learning_rate``, ``steps``, ``kl_weight``, ``schedule``, ``warmup_steps``:
    those of ``Method.shared``), each ``config.transfer``'s unless ``config.hparams.<method>.<field>`` is
    set. An unknown name or a bad schedule raises one ConfigError naming the valid values.

    >>> from experiments.configs import tiny
    >>> method_settings(tiny.get_config(), "sam")[1]
    {'learning_rate': 0.01, 'steps': 6, 'schedule': 'constant', 'warmup_steps': 0}
    """
    m = methods.get(method)
    section = (config.get("hparams", None) or {}).get(method, None) or {}
    section = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    own = {k: v for k, v in section.items() if k not in methods.SHARED_FIELDS}
    stray = sorted(k for k in section if k in methods.SHARED_FIELDS and k not in m.shared)
    try:
        if stray:
            raise ValueError(f"method {method!r} does not use the shared field(s) {stray}; it uses "
                             f"{list(m.shared)}.")
        hp = m.hyperparameters(own)
    except ValueError as e:
        raise ConfigError(f"config.hparams.{method}: {e}") from None
    shared = {f: section[f] if section.get(f) is not None else config.transfer[f] for f in m.shared}
    if "steps" in shared:
        _check_positive_int(shared["steps"], f"hparams.{method}.steps")
    if "schedule" in shared:
        try:
            methods.learning_rate_schedule(float(shared["learning_rate"]), int(shared["steps"]),
                                           shared["schedule"], shared["warmup_steps"])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.hparams.{method} (or config.transfer): {e}") from None
    return hp, shared


def method_hash(config, method: str) -> str:
    """Digest of what a method's training depends on: the prior stage's config, the transfer scheme, the
    target data and the method's resolved hyperparameters (never a path)."""
    hp, shared = method_settings(config, method)
    transfer_fields = {k: v for k, v in config.transfer.to_dict().items() if k not in methods.SHARED_FIELDS}
    # A constant rate without warm-up is what every run did before schedules existed: it keeps those digests.
    shared = {k: v for k, v in shared.items() if (k, v) not in _NEUTRAL_SHARED}
    return _digest({"prior": _stage_digest(config, "prior"), "transfer": transfer_fields,
                    "target": config.data.target, "k": config.data.k_shot, "method": method,
                    **({"test_from_train": test_from_train_of(config)} if test_from_train_of(config) else {}),
                    "hparams": {**hp, **shared}})


_NEUTRAL_SHARED = (("schedule", "constant"), ("warmup_steps", 0))


def _training_kwargs(shared) -> dict:
    """The shared fields of :func:`method_settings` as keyword arguments of ``Method.trainer`` / ``check``."""
    kwargs = dict(learning_rate=float(shared["learning_rate"]), num_steps=int(shared["steps"]),
                  kl_weight=float(shared.get("kl_weight", 1.0)))
    if "schedule" in shared:
        kwargs.update(schedule=str(shared["schedule"]), warmup_steps=int(shared["warmup_steps"]))
    return kwargs


def method_dir(config, method: str, seed: int) -> str:
    return os.path.join(config.workdir, f"seed{seed}", f"{method}-{method_hash(config, method)}")


# ----------------------------------------------------------------------------------------------
# Progress bars.


@contextlib.contextmanager
def progress_bar(config, total: int, desc: str, initial: int = 0):
    if not config.progress:
        yield lambda n=1: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, initial=initial, leave=False, dynamic_ncols=True)
    try:
        yield bar.update
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------
# Data.


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


def _cached(path: str, build: Callable[[], dict]) -> dict:
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = build()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def source_data(config) -> dict:
    import fpbma.data

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
    return _cached(os.path.join(config.workdir, "data", f"{name}-train-{size}px.npz"), build)


def test_from_train_of(config) -> float:
    """``config.data.test_from_train``: the share of every class of the target's train split moved to the test set."""
    return float(config.data.get("test_from_train", None) or 0.0)


_HOLDOUT_SEED = 0x7E57  # the held-out images are the same for every transfer seed


def target_data(config, seed: int) -> dict:
    """Few-shot train/validation (k per class each, by ``seed``) and the test set, resized.

    The test set is the target's test split plus, when ``config.data.test_from_train`` = f > 0, a fixed
    ⌈f · n_c⌉ images of every class c of its train split (:func:`fpbma.data.stratified_holdout`, the same
    for every seed); the few-shot draws come from the rest of the train split.
    """
    import fpbma.data

    size, k, frac = int(config.data.image_size), int(config.data.k_shot), test_from_train_of(config)

    def build():
        train_src = fpbma.data.load(config.data.target, "train", data_dir=config.data.data_dir)
        held = fpbma.data.stratified_holdout(train_src, frac, _HOLDOUT_SEED) if frac > 0 else None
        split = fpbma.data.few_shot_split(train_src, k, seed, val_per_class=k, exclude=held)
        x, y = _arrays(train_src)
        xt, yt = _arrays(fpbma.data.load(config.data.target, "test", data_dir=config.data.data_dir))
        if held is not None:
            xt, yt = np.concatenate([xt, x[held]]), np.concatenate([yt, y[held]])
        return {"train_image": _resize(x[split.train], size), "train_label": y[split.train],
                "val_image": _resize(x[split.validation], size), "val_label": y[split.validation],
                "test_image": _resize(xt, size), "test_label": yt, "test_raw": xt}

    name = config.data.target.replace("/", "_").replace(":", "_") + (f"-holdout{frac:g}" if frac > 0 else "")
    return _cached(os.path.join(config.workdir, "data", f"{name}-{k}shot-seed{seed}-{size}px.npz"), build)


def corruption_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """A fixed stratified subset of test positions: the first ``per_class`` of every class (0: all)."""
    if per_class <= 0:
        return np.arange(labels.shape[0])
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def corrupted_data(config, test_raw: np.ndarray, test_label: np.ndarray) -> dict:
    """Corrupted copies of the test subset: rows equal those of ``<target>_corrupted/<c>_<s>`` (same seed)."""
    from fpbma.data import corruptions, shifted

    size, per_class = int(config.data.image_size), int(config.eval.corruption_per_class)
    names, severities = corruptions_of(config), tuple(int(s) for s in config.eval.severities)
    idx = corruption_subset(test_label, per_class)
    key = _digest([names, severities, per_class, size, config.data.target])

    shift = config.eval.get("corrupted_dataset", None)
    if shift:
        key = _digest([key, shift])

    def build_from_tfds():
        # A prepared corrupted test set (e.g. TFDS cifar10_corrupted): row i is test example i corrupted.
        import fpbma.data

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
                    bad = corruptions.corrupt(test_raw[idx], name, s, shifted.SEED, indices=idx)
                    out[f"{name}_{s}"] = _resize(bad, size)
                    tick()
        return out

    return _cached(os.path.join(config.workdir, "data", f"{config.data.target}-corrupted-{key}.npz"), build)


# ----------------------------------------------------------------------------------------------
# Models.

_APPLY_CACHE: dict = {}


@functools.lru_cache(maxsize=None)
def _cifar_resnet(num_blocks: int, num_classes: int, width: int, size: int, in_channels: int):
    # One model and one compiled init per architecture: setup_transfer builds three per call.
    from fpbma.models.resnet import CifarResNet

    model = CifarResNet(num_blocks, num_classes, width)
    return model, jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, in_channels)), train=False))


@dataclasses.dataclass(frozen=True)
class WithPreprocessing:
    """A pre-trained model fed the pipeline's images: ``apply(variables, x)`` = ``model.apply(variables, P(x))``.

    The pipeline stores uint8 images at ``config.data.image_size`` and feeds u/127.5 − 1 (:func:`normalise`);
    P recovers u = round((x + 1)·127.5) exactly, repeats a grey channel to RGB and applies the weights' own
    preprocessing at ``image_size``: :func:`fpbma.models.preprocess` (ResNet/ViT: centre crop, resize,
    ImageNet/Inception mean and std) or, for EfficientNet-Lite0, the TF resize with (x − 127)/128 and its
    eval crop fraction 224/256 kept at any size (``crop_padding`` = 32·size/224; the fixed padding of 32 px
    would crop a 64 px input to 2/3). Parameters keep the inner model's names (``head``, ``*bn*``).
    """

    model: Any
    name: str
    image_size: int

    def preprocess(self, x):
        import fpbma.models

        u = jnp.clip(jnp.round((jnp.asarray(x, jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
        if u.shape[-1] == 1:
            u = jnp.repeat(u, 3, axis=-1)
        if fpbma.models.spec(self.name).family == "efficientnet":
            from fpbma.models import efficientnet

            padding = int(round(efficientnet.CROP_PADDING * self.image_size / 224))
            return efficientnet.preprocess_efficientnet_lite0(u, self.image_size, crop_padding=padding)
        return fpbma.models.preprocess(self.name, u, image_size=self.image_size)

    def apply(self, variables, x, *args, **kwargs):
        return self.model.apply(variables, self.preprocess(x), *args, **kwargs)


def build_model(config, num_classes: int, in_channels: int):
    """``(model, variables)`` for ``config.model``: a compact CifarResNet, a name of fpbma.models, or, with
    ``config.model.pretrained``, that model's pre-trained weights (a new zero head when ``num_classes``
    differs from the checkpoint's) behind :class:`WithPreprocessing`."""
    import fpbma.models

    key = jax.random.PRNGKey(int(config.seed))
    path = pretrained_of(config)
    if path:
        model, variables = fpbma.models.from_pretrained(config.model.name, None if path == "package" else path,
                                                        num_classes=int(num_classes),
                                                        image_size=model_image_size(config))
        return WithPreprocessing(model, config.model.name, model_image_size(config)), dict(variables)
    if config.model.name == "cifar_resnet":
        model, init = _cifar_resnet(int(config.model.num_blocks), int(num_classes), int(config.model.width),
                                    int(config.data.image_size), int(in_channels))
        return model, dict(init(key))
    return fpbma.models.create(config.model.name, num_classes, key=key)


def eval_apply(model) -> Partial:
    """``(variables, images) -> logits`` in eval mode, one function object per model (one compilation)."""
    if model not in _APPLY_CACHE:
        _APPLY_CACHE[model] = Partial(lambda variables, x: model.apply(variables, x, train=False))
    return _APPLY_CACHE[model]


# ----------------------------------------------------------------------------------------------
# Resumable training loop.


def _checkpoints(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(d[5:]) for d in os.listdir(directory) if d.startswith("step_") and d[5:].isdigit())


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the mini-batch of ``step``: epoch e = step // (N // B) is ``default_rng([seed, e])``'s permutation."""
    per_epoch = max(num_examples // batch_size, 1)
    epoch, b = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[b * batch_size:(b + 1) * batch_size]


def run_loop(config, directory: str, init_state, step_fn, data: dict, *, num_steps: int, batch_size: int,
             seed: int, desc: str, on_step: Optional[Callable[[int, Any], None]] = None, on_step_every: int = 0):
    """Runs ``step_fn(state, batch, fold_in(key, t))`` for t = t₀ … num_steps − 1, resuming from the latest checkpoint.

    ``on_step(t + 1, state)`` runs after every ``on_step_every``-th step and after the last one (checkpoint
    selection on validation data); it may raise to stop the run (e.g. a pruned tuning trial).

    Returns:
      ``(state, finished)``; ``finished`` is False when ``config.max_steps`` stopped the run early.
    """
    os.makedirs(directory, exist_ok=True)
    done = _checkpoints(directory)
    state, start = init_state, 0
    if done:
        start = done[-1]
        state = restore_checkpoint(os.path.join(directory, f"step_{start}"), like=init_state)
    key = jax.random.PRNGKey(seed)
    step = jax.jit(step_fn)
    n = next(iter(data.values())).shape[0]
    batch_size = min(batch_size, n)
    every = int(config.checkpoint_every)
    with progress_bar(config, num_steps, desc, initial=start) as tick:
        for t in range(start, num_steps):
            if config.max_steps >= 0 and t >= config.max_steps:
                return state, False
            idx = batch_indices(n, batch_size, seed, t)
            state = step(state, {k: v[idx] for k, v in data.items()}, jax.random.fold_in(key, t))
            if (t + 1) % every == 0 or t + 1 == num_steps:
                save_checkpoint(os.path.join(directory, f"step_{t + 1}"), state, overwrite=True)
                for old in _checkpoints(directory)[:-1]:
                    shutil.rmtree(os.path.join(directory, f"step_{old}"), ignore_errors=True)
            if on_step is not None and ((on_step_every > 0 and (t + 1) % on_step_every == 0) or t + 1 == num_steps):
                on_step(t + 1, state)
            tick()
    return state, True


# ----------------------------------------------------------------------------------------------
# Stage 1: pre-training on the source.


def pretrain(config) -> dict:
    """Trains the network on the source data (SGD, BatchNorm in train mode); returns its variables."""
    directory = stage_dir(config, "source")
    final = os.path.join(directory, "final")
    data = source_data(config)
    num_classes = int(data["label"].max()) + 1
    model, variables = build_model(config, num_classes, data["image"].shape[-1])
    if os.path.isdir(final):
        return restore_checkpoint(final, like=variables)
    if pretrained_of(config):
        return _train_source_head(config, model, variables, data)
    c = config.pretrain
    tx = optax.chain(optax.add_decayed_weights(c.weight_decay),
                     optax.sgd(optax.cosine_decay_schedule(c.learning_rate, c.steps), momentum=c.momentum))

    def step(state, batch, key):
        del key

        def loss(p):
            logits, updates = model.apply({"params": p, "batch_stats": state["batch_stats"]},
                                          batch["image"], train=True, mutable=["batch_stats"])
            return transfer.cross_entropy(logits, batch["label"]), updates["batch_stats"]

        grads, stats = jax.grad(loss, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                "batch_stats": stats, "opt_state": opt_state}

    init = {"step": jnp.zeros([], jnp.int32), "params": variables["params"],
            "batch_stats": variables["batch_stats"], "opt_state": tx.init(variables["params"])}
    images = normalise(data["image"])
    state, finished = run_loop(config, directory, init, step, {"image": images, "label": data["label"]},
                               num_steps=c.steps, batch_size=c.batch_size, seed=int(config.seed),
                               desc="pre-train source")
    out = {"params": state["params"], "batch_stats": state["batch_stats"]}
    if finished:
        save_checkpoint(final, out, overwrite=True)
    return out


def _train_source_head(config, model, variables, data) -> dict:
    """The source stage of a pre-trained backbone: the loaded weights, with the source ``head`` trained.

    ``from_pretrained`` gives a zero head when the source classes differ from the checkpoint's; the SWAG
    prior then needs a head that fits the source task, so only the head is trained here (``pretrain.steps``
    of SGD with momentum, cosine rate, weight decay), every other weight and the checkpoint's BatchNorm
    running statistics fixed (BatchNorm in eval mode, no dropout). A checkpoint head of the source's size
    is fine-tuned the same way.
    """
    directory, c = stage_dir(config, "source"), config.pretrain
    extra = {k: v for k, v in variables.items() if k != "params"}
    body, head = transfer._split_head(variables["params"])
    tx = optax.chain(optax.add_decayed_weights(c.weight_decay),
                     optax.sgd(optax.cosine_decay_schedule(c.learning_rate, c.steps), momentum=c.momentum))

    def step(state, batch, key):
        del key

        def loss(h):
            logits = model.apply({**extra, "params": {**body, **h}}, batch["image"], train=False)
            return transfer.cross_entropy(logits, batch["label"])

        updates, opt_state = tx.update(jax.grad(loss)(state["head"]), state["opt_state"], state["head"])
        return {"step": state["step"] + 1, "head": optax.apply_updates(state["head"], updates),
                "opt_state": opt_state}

    init = {"step": jnp.zeros([], jnp.int32), "head": head, "opt_state": tx.init(head)}
    state, finished = run_loop(config, directory, init, step,
                               {"image": normalise(data["image"]), "label": data["label"]},
                               num_steps=c.steps, batch_size=c.batch_size, seed=int(config.seed),
                               desc="train source head")
    out = {**variables, "params": {**body, **state["head"]}}
    if finished:
        save_checkpoint(os.path.join(directory, "final"), out, overwrite=True)
    return out


# ----------------------------------------------------------------------------------------------
# Stage 2: the SWAG prior.


def fit_prior(config, source_variables=None):
    """The SWAG prior over the non-head weights, fitted along SGD on the source data (cached)."""
    directory = stage_dir(config, "prior")
    final = os.path.join(directory, "final")
    data = source_data(config)
    num_classes = int(data["label"].max()) + 1
    model, variables = build_model(config, num_classes, data["image"].shape[-1])
    body, _ = transfer._split_head(variables["params"])
    rank = int(config.prior.rank)
    from fpbma import posterior as post
    like = post.LowRankGaussian(body, body, jax.tree.map(lambda x: jnp.zeros((rank,) + x.shape, x.dtype), body))
    if os.path.isdir(final):
        return restore_checkpoint(final, like=like)
    if source_variables is None:
        source_variables = restore_checkpoint(os.path.join(stage_dir(config, "source"), "final"), like=variables)
    images = normalise(data["image"])
    if pretrained_of(config):
        extra = {k: v for k, v in source_variables.items() if k != "params"}

        def loss(p, batch):
            # A pre-trained backbone keeps its checkpoint's running statistics (eval-mode BatchNorm, no
            # dropout), as in the target stage: SWAG moves the weights around the loaded ones, while
            # batch statistics of small source batches would not describe the checkpoint's network.
            return transfer.cross_entropy(model.apply({**extra, "params": p}, batch[0], train=False), batch[1])
    else:
        stats = source_variables["batch_stats"]

        def loss(p, batch):
            # SWAG follows the source training: BatchNorm in train mode (batch statistics); the running
            # statistics are not updated, the source ones are kept for the target (module docstring).
            logits, _ = model.apply({"params": p, "batch_stats": stats}, batch[0], train=True,
                                    mutable=["batch_stats"])
            return transfer.cross_entropy(logits, batch[1])

    c = config.prior
    seed = int(config.seed) + 1
    batches = ((images[i], data["label"][i]) for i in
               (batch_indices(images.shape[0], c.batch_size, seed, t) for t in range(c.steps)))
    with progress_bar(config, c.steps, "SWAG prior") as tick:
        prior = transfer.fit_swag_prior(loss, source_variables["params"], batches, learning_rate=c.learning_rate,
                                        rank=rank, collect_every=c.collect_every, min_var=c.min_var,
                                        progress=lambda i: tick())
    save_checkpoint(final, prior, overwrite=True)
    return prior


# ----------------------------------------------------------------------------------------------
# Stage 3: one method on the target.


def setup_transfer(config, seed: int, prior=None, source_variables=None):
    """The target data, model, source BatchNorm statistics and :class:`fpbma.transfer.TransferScheme`."""
    data = target_data(config, seed)
    num_classes = int(max(data["train_label"].max(), data["test_label"].max())) + 1
    model, variables = build_model(config, num_classes, data["train_image"].shape[-1])
    src = source_data(config)
    src_model, src_vars = build_model(config, int(src["label"].max()) + 1, src["image"].shape[-1])
    if source_variables is None:
        source_variables = restore_checkpoint(os.path.join(stage_dir(config, "source"), "final"), like=src_vars)
    if prior is None:
        prior = fit_prior(config, source_variables)
    scheme = transfer.make_scheme(prior, variables["params"], config.transfer.scheme, config.transfer.alpha,
                                  kl_min_var=config.transfer.kl_min_var)
    extra = {k: v for k, v in source_variables.items() if k != "params"}  # BatchNorm statistics, if any
    return data, model, extra, scheme


def make_method_trainer(config, method, model, extra, scheme, data):
    apply = eval_apply(model)
    x, y = normalise(data["train_image"]), data["train_label"]
    hp, shared = method_settings(config, method)
    return transfer.make_trainer(
        method, scheme, lambda p, im: apply({**extra, "params": p}, im), num_data=x.shape[0],
        sample_frozen_weights=bool(config.transfer.sample_frozen),
        features_fn=lambda p, im: transfer.head_features(model, {**extra, "params": p}, im),
        train_data=(x, y), hyperparameters=hp, **_training_kwargs(shared))


SELECTIONS = ("val_nll", "last")


def _check_selection(config) -> None:
    t = config.transfer
    select = t.get("select", "last")
    if select not in SELECTIONS:
        raise ConfigError(f"config.transfer.select={select!r}; choose one of {SELECTIONS} (val_nll: the "
                          "checkpoint whose BMA has the lowest validation NLL; last: the final step).")
    for field in ("select_every", "select_samples"):
        if field in t:
            _check_positive_int(t[field], f"transfer.{field}")


def validation_nll(config, trainer, state, setup, seed: int, num_samples: int) -> float:
    """NLL of the BMA (``num_samples`` weights) of ``trainer.finalize(state)`` on the validation split.

    ``inf`` while the state has no posterior yet (a sampler before its first cycle end, a SWAG
    before two collected models) or when its predictions are not finite.
    """
    from fpbma import bma

    data, model, extra, scheme = setup
    try:
        posterior = trainer.finalize(state)
    except ValueError:
        return math.inf
    sampler = transfer.sample_weights(scheme, posterior, extra, bool(config.transfer.sample_frozen))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 98)
    lp = _predict(config, eval_apply(model), sampler, normalise(data["val_image"]), key, num_samples)
    nll = float(bma.evaluate(lp, data["val_label"])["nll"])
    return nll if math.isfinite(nll) else math.inf


def _read_json(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def train_method(config, method: str, seed: int, setup=None, report: Optional[Callable[[int, float], None]] = None):
    """Trains ``method`` on the few-shot target (resumable); returns ``(posterior, state, finished)``.

    With ``config.transfer.select = "val_nll"`` (the paper's protocol) the validation NLL of the BMA
    with ``config.transfer.select_samples`` weights is computed every ``config.transfer.select_every``
    steps and at the end, and the returned state is the one where it was lowest (``selection.json`` in
    the method's directory keeps the curve and the chosen step); ``"last"`` returns the final step.
    ``report(step, nll)`` is called with every validation NLL (a tuner's pruning hook).
    """
    setup = setup or setup_transfer(config, seed)
    data, model, extra, scheme = setup
    trainer = make_method_trainer(config, method, model, extra, scheme, data)
    directory = method_dir(config, method, seed)
    final = os.path.join(directory, "final")
    init = trainer.init()
    if os.path.isdir(final):
        state = restore_checkpoint(final, like=init)
        return trainer.finalize(state), state, True
    select = config.transfer.get("select", "last")
    on_step, every = None, 0
    record_path = os.path.join(directory, "selection.json")
    record = _read_json(record_path, {"curve": [], "step": None, "val_nll": None})
    if select == "val_nll":
        every = int(config.transfer.select_every)
        samples = int(config.transfer.select_samples)

        def on_step(step, state):
            nll = validation_nll(config, trainer, state, setup, seed, samples)
            record["curve"].append([int(step), nll if math.isfinite(nll) else None])
            if math.isfinite(nll) and (record["val_nll"] is None or nll < record["val_nll"]):
                save_checkpoint(os.path.join(directory, "best"), state, overwrite=True)
                record.update(step=int(step), val_nll=nll)
            _write_json(record_path, record)
            if report is not None:
                report(int(step), nll)

    os.makedirs(directory, exist_ok=True)
    batch = {"image": normalise(data["train_image"]), "label": data["train_label"]}
    state, finished = run_loop(config, directory, init, trainer.step, batch,
                               num_steps=int(method_settings(config, method)[1]["steps"]),
                               batch_size=int(config.transfer.batch_size),
                               seed=1000 * seed + 17, desc=f"train {method} (seed {seed})",
                               on_step=on_step, on_step_every=every)
    if not finished:
        return None, state, False
    if record["step"] is not None and record["step"] != int(state.step):
        state = restore_checkpoint(os.path.join(directory, "best"), like=init)
    save_checkpoint(final, state, overwrite=True)
    return trainer.finalize(state), state, True


# ----------------------------------------------------------------------------------------------
# Stage 4: BMA evaluation.


def _predict(config, apply, sampler, images, key, num_samples):
    from fpbma import bma

    bs = int(config.eval.batch_size)
    out = []
    for start in range(0, images.shape[0], bs):
        x = images[start:start + bs]
        mask = np.zeros(bs, bool)
        mask[:x.shape[0]] = True
        if x.shape[0] < bs:  # pad to one shape: one compilation for every batch
            x = np.concatenate([x, np.zeros((bs - x.shape[0],) + x.shape[1:], x.dtype)])
        out.append(np.asarray(bma.predict(apply, sampler, x, key=key, num_samples=num_samples,
                                          chunk_size=min(int(config.eval.chunk_size), num_samples), mask=mask)))
    return np.concatenate(out)


def _metrics(log_probs, labels, temperature) -> dict:
    from fpbma import bma, calibration

    return {"raw": bma.evaluate(log_probs, labels),
            "ts": bma.evaluate(calibration.apply_temperature(log_probs, temperature), labels)}


def evaluate_method(config, method: str, seed: int, posterior, setup, corrupted=None) -> dict:
    """BMA metrics of a trained method: in-domain (raw and temperature-scaled) and per corruption × severity."""
    from fpbma import calibration

    data, model, extra, scheme = setup
    apply = eval_apply(model)
    sampler = transfer.sample_weights(scheme, posterior, extra, bool(config.transfer.sample_frozen))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 99)
    s = int(config.eval.num_samples)
    val_lp = _predict(config, apply, sampler, normalise(data["val_image"]), key, s)
    temperature = calibration.fit_temperature(val_lp, data["val_label"])
    test_lp = _predict(config, apply, sampler, normalise(data["test_image"]), key, s)
    result = {"temperature": float(temperature), "in_domain": _metrics(test_lp, data["test_label"], temperature)}
    directory = method_dir(config, method, seed)
    np.save(os.path.join(directory, "test_log_probs.npy"), test_lp)
    if corrupted is not None:
        names = [k for k in corrupted if k not in ("index", "label")]
        labels = corrupted["label"]
        images = np.concatenate([normalise(corrupted[k]) for k in names])
        s_c = int(config.eval.corruption_num_samples)
        # Temperature of the corruption sweep is refitted for its sample count S_c on the same validation split.
        t_c = temperature if s_c == s else calibration.fit_temperature(
            _predict(config, apply, sampler, normalise(data["val_image"]), key, s_c), data["val_label"])
        lp = _predict(config, apply, sampler, images, key, s_c).reshape(len(names), labels.shape[0], -1)
        per = {k: _metrics(lp[i], labels, t_c) for i, k in enumerate(names)}
        result["corruptions"] = per
        result["corruption_mean"] = {kind: {m: float(np.mean([per[k][kind][m] for k in names]))
                                            for m in ("acc", "nll", "ece", "brier")} for kind in ("raw", "ts")}
    with open(os.path.join(directory, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


# ----------------------------------------------------------------------------------------------
# Reporting.


def _lookup(result: dict, path: tuple):
    """``result[path[0]][path[1]]…``, or None where a key is missing (e.g. no corruption sweep)."""
    for key in path:
        result = result.get(key) if isinstance(result, dict) else None
    return result


def write_report(config, results: dict, wall_time: float) -> None:
    """``results.json``, ``results.md`` and PNG plots in the work dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wd = config.workdir
    payload = {"config": config.to_dict(), "wall_time_s": wall_time, "devices": [str(d) for d in jax.devices()],
               "results": results}
    with open(os.path.join(wd, "results.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)

    def values(method, path):
        return [v for v in (_lookup(r, path) for r in results[method].values()) if v is not None]

    def mean(method, path):
        vals = values(method, path)
        return np.mean(vals) if vals else float("nan")

    def cell(method, path):
        """mean, or mean ± standard deviation over seeds when there are several."""
        vals = values(method, path)
        if not vals:
            return "nan"
        return f"{np.mean(vals):.4f}" + (f" ± {np.std(vals, ddof=1):.4f}" if len(vals) > 1 else "")

    seeds = sorted({s for r in results.values() for s in r})
    n_test = int(target_data(config, seeds[0])["test_label"].shape[0])
    lines = [f"Transfer {config.data.source} → {config.data.target} ({config.data.k_shot}-shot, scheme "
             f"{config.transfer.scheme}), seeds {seeds}, wall time {wall_time / 60:.1f} min, "
             f"S = {config.eval.num_samples} in-domain ({n_test} test images) / "
             f"{config.eval.corruption_num_samples} under shift; code {code_version()}; "
             f"checkpoint selection {config.transfer.get('select', 'last')}. Mean ± std over seeds.", "",
             "| method | ACC ↑ | NLL ↓ | ECE ↓ | ACC (TS) | NLL (TS) | ECE (TS) | shift ACC ↑ | shift NLL ↓ "
             "| shift ECE ↓ | shift NLL (TS) | shift ECE (TS) |",
             "|---" * 12 + "|"]
    for m in results:
        row = [cell(m, ("in_domain", k, x)) for k in ("raw", "ts") for x in ("acc", "nll", "ece")]
        row += [cell(m, ("corruption_mean", "raw", x)) for x in ("acc", "nll", "ece")]
        row += [cell(m, ("corruption_mean", "ts", x)) for x in ("nll", "ece")]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += [""] + paired_report(results)
    with open(os.path.join(wd, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    from fpbma import calibration

    for m in results:
        seed = seeds[0] if seeds[0] in results[m] else next(iter(results[m]))
        lp = np.load(os.path.join(method_dir(config, m, seed), "test_log_probs.npy"))
        labels = target_data(config, seed)["test_label"]
        calibration.reliability_diagram(lp, labels, os.path.join(wd, f"reliability_{m}.png"),
                                        title=f"{m}: BMA on {config.data.target} test")
    severities = tuple(int(s) for s in config.eval.severities)
    if any("corruptions" in r for res in results.values() for r in res.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in results:
            accs = [mean(m, ("in_domain", "raw", "acc"))]
            for s in severities:
                vals = [v["raw"]["acc"] for r in results[m].values() for k, v in r.get("corruptions", {}).items()
                        if k.endswith(f"_{s}")]
                accs.append(np.mean(vals) if vals else np.nan)
            ax.plot((0,) + severities, accs, marker="o", label=m)
        ax.set_xlabel("corruption severity (0 = clean)")
        ax.set_ylabel("BMA accuracy (mean over corruptions)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(wd, "accuracy_vs_severity.png"), dpi=120)
        plt.close(fig)


def code_version() -> str:
    """``git describe``-like short commit of the code (``-dirty`` with uncommitted tracked changes)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def paired_report(results: dict) -> list[str]:
    """Lines of results.md: FP-BMA minus every method, paired over seeds (95 % t interval), and claim 2(b)."""
    from experiments import analysis

    if analysis.REFERENCE not in results:
        return []
    metric_paths = {"acc": ("in_domain", "raw", "acc"), "nll": ("in_domain", "raw", "nll"),
                    "shift acc": ("corruption_mean", "raw", "acc"), "shift nll": ("corruption_mean", "raw", "nll")}

    values = {name: {m: {s: v for s, v in ((s, _lookup(r, path)) for s, r in per.items()) if v is not None}
                     for m, per in results.items()} for name, path in metric_paths.items()}
    values = {k: v for k, v in values.items() if v.get(analysis.REFERENCE)}
    tables = {k: analysis.paired_table(v, k.split()[-1]) for k, v in values.items()}
    n = len(values["acc"][analysis.REFERENCE])
    lines = [f"FP-BMA minus each method, paired over the {n} seeds: mean [95 % t interval]; "
             "(+) FP-BMA better, (−) worse, (?) undecided.", "",
             "| method | " + " | ".join(f"Δ {k.upper()}" for k in tables) + " |", "|---" * (len(tables) + 1) + "|"]
    mark = {"better": "(+)", "worse": "(−)", "undecided": "(?)"}
    for m in tables["acc"]:
        cells = [f"{analysis.format_interval(t[m])} {mark[t[m]['comparison']]}" if m in t else "" for t in tables.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    claim = analysis.claim_bma(values["acc"], values["nll"])
    lines += ["", "Verdicts (rules: experiments/analysis.py; a claim holds when FP-BMA is better than more than half "
              "of the other methods and worse than none, does not hold when it is worse than at least half):",
              f"* Claim 2, FP-BMA's BMA is better: on accuracy **{claim['acc']['verdict']}**, on NLL "
              f"**{claim['nll']['verdict']}** ({n} seeds).",
              "* Claim 1 (approximate-Bayes posteriors are sharp) and the flatness half of claim 2 need the "
              "Hessians: see flatness.md (`python -m experiments.flatness` with the same config)."]
    return lines


def run_pipeline(config, stage: str = "transfer") -> dict:
    """pretrain → prior → (train → evaluate) for every method and seed → report."""
    validate(config, stage)
    start = time.perf_counter()
    source_variables = pretrain(config)
    if not os.path.isdir(os.path.join(stage_dir(config, "source"), "final")):
        return {}
    prior = fit_prior(config, source_variables)
    results: dict = {}
    for seed in seeds_of(config, stage):
        setup = setup_transfer(config, seed, prior, source_variables)
        corrupted = None
        if corruptions_of(config):
            corrupted = corrupted_data(config, setup[0]["test_raw"], setup[0]["test_label"])
        for method in methods_of(config, stage):
            t0 = time.perf_counter()
            posterior, _, finished = train_method(config, method, seed, setup)
            if not finished:
                return results
            t1 = time.perf_counter()
            metrics = evaluate_method(config, method, seed, posterior, setup, corrupted)
            results.setdefault(method, {})[seed] = metrics
            ind = metrics["in_domain"]["raw"]
            print(f"[seed {seed}] {method:8s} acc {ind['acc']:.4f} nll {ind['nll']:.4f} ece {ind['ece']:.4f} "
                  f"(train {t1 - t0:.0f}s, eval {time.perf_counter() - t1:.0f}s)", flush=True)
    write_report(config, results, time.perf_counter() - start)
    return results


def check_command_line(argv) -> None:
    """Checks ``--config.hparams.<method>.<name>`` flags against the registry before absl parses them.

    An unknown method or hyperparameter prints one line ``error: ...`` naming the valid ones and exits
    with status 2 (absl would raise a KeyError traceback while parsing); so does the removed ``--config.rho``.
    """
    for arg in argv[1:]:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        try:
            if name == "config.rho":
                raise ConfigError("--config.rho is gone: every method has its own, e.g. "
                                  "--config.hparams.fpbma.rho=0.05 --config.hparams.sam.rho=0.05.")
            if not name.startswith("config.hparams."):
                continue
            parts = name.split(".")[2:]
            if not parts or parts[0] not in methods.names():
                raise ConfigError(f"--{name}: unknown method {parts[0] if parts else ''!r}; the methods are "
                                  f"{list(methods.names())}.")
            m = methods.get(parts[0])
            valid = sorted(m.defaults) + list(m.shared)
            if len(parts) != 2 or parts[1] not in valid:
                raise ConfigError(f"--{name}: method {m.name!r} has no hyperparameter "
                                  f"{'.'.join(parts[1:])!r}; its names are {valid}.")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


def config_help() -> str:
    """Help text of the ``--config`` flag: the registered methods and how to set their hyperparameters."""
    return ("experiment config (a Python file with get_config()); methods: " + ", ".join(methods.names())
            + "; every hyperparameter is --config.hparams.<method>.<name>, e.g. --config.hparams.fpbma.rho=0.05")


def run_cli(stage: str, config) -> None:
    """:func:`main` for the command line: a bad config prints one line ``error: ...`` and exits with status 2."""
    try:
        main(stage, config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def enable_compilation_cache(config) -> None:
    """JAX's persistent compilation cache in ``<workdir>/jax_cache`` (``config.compilation_cache=False``: off).

    The train steps of a method compile to the same program for every transfer seed (the data are
    arguments), so seeds after the first, and reruns, load it instead of compiling again.
    """
    if not config.get("compilation_cache", True):
        return
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(config.workdir, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(stage: str, config) -> None:
    """Entry point of ``python -m experiments.<stage>``: validates first, then runs the stage."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint write at INFO
    validate(config, stage)
    enable_compilation_cache(config)
    if stage == "pretrain":
        pretrain(config)
    elif stage == "prior":
        fit_prior(config)
    elif stage == "train":
        _, state, finished = train_method(config, config.method, int(config.seed))
        print(f"{config.method}: {int(state.step)} steps{'' if finished else ' (stopped early by max_steps)'}")
    elif stage == "evaluate":
        seed = int(config.seed)
        setup = setup_transfer(config, seed)
        posterior, _, _ = train_method(config, config.method, seed, setup)
        corrupted = corrupted_data(config, setup[0]["test_raw"], setup[0]["test_label"]) \
            if corruptions_of(config) else None
        result = evaluate_method(config, config.method, seed, posterior, setup, corrupted)
        print(json.dumps({"in_domain": result["in_domain"], "corruption_mean": result.get("corruption_mean")},
                         indent=1))
    elif stage == "transfer":
        run_pipeline(config, stage)
        with open(os.path.join(config.workdir, "results.md")) as f:
            print(f.read())
    else:
        raise ValueError(f"unknown stage {stage!r}.")
