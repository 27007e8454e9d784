"""Checks of an experiment config, all run once before any work or file write.

Every problem is a :class:`ConfigError` whose message names the field and the fix; the command line
prints it as one line ``error: ...`` and exits with status 2 (:mod:`experiments.cli`). The checks cover the
method registry (``config.methods``, ``config.hparams.<method>.<name>``), the values of every section, the
resources a run reads (the pre-trained checkpoint, the TFDS datasets), the few-shot split sizes and the
device count: every training batch must split evenly over the devices of the ``data`` mesh.

>>> from experiments.configs import tiny
>>> check(tiny.get_config(), "pretrain")
>>> c = tiny.get_config(); c.transfer.alpha = -1.0
>>> check(c, "pretrain")
Traceback (most recent call last):
...
experiments.config_checks.ConfigError: config.transfer.alpha=-1.0 must be a number > 0.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

import jax
import numpy as np

import fpbma.data
import fpbma.models
from fpbma import methods
from fpbma.data import builders, corruptions
from fpbma.models import efficientnet, partition

class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the fix."""


def check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"config.{name}={value!r} must be a positive integer.")


def items(value) -> tuple:
    """A tuple from a tuple/list/str field; comma-separated strings are split (``--config.methods=fpbma,sgd``
    arrives as ``("fpbma,sgd",)`` when the field's default is a tuple)."""
    if isinstance(value, (str, int, np.integer)):
        value = (value,)
    return tuple(s.strip() for v in value for s in str(v).split(",") if s.strip())


def methods_of(config, stage: str) -> tuple:
    if stage in ("train", "evaluate"):
        return (config.method,)
    return items(config.methods)


def seeds_of(config, stage: str) -> tuple:
    if stage in ("train", "evaluate"):
        return (int(config.seed),)
    seeds = items(config.seeds)
    if not seeds:
        raise ConfigError("config.seeds is empty: the main job would train nothing; pass e.g. --config.seeds=0,1,2.")
    bad = [s for s in seeds if not s.isdigit()]
    if bad:
        raise ConfigError(f"config.seeds has non-integer entries {bad}; pass e.g. --config.seeds=0,1,2.")
    seeds = tuple(int(s) for s in seeds)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"config.seeds={seeds} repeats {repeated}: a repeated seed counts one run twice in the "
                          f"paired statistics; pass each seed once, e.g. --config.seeds="
                          f"{','.join(str(s) for s in dict.fromkeys(seeds))}.")
    return seeds


# Numbers that must be > 0 (rates, variances, the KL weight); every other float may be any finite value.
POSITIVE_FIELDS = ("pretrain.learning_rate", "prior.learning_rate", "transfer.learning_rate", "transfer.alpha",
                   "transfer.kl_weight", "prior.min_var", "transfer.kl_min_var")


def check_numbers(config) -> None:
    """Every float anywhere in the config is finite, and those of :data:`POSITIVE_FIELDS` (and every
    ``config.hparams.<method>.learning_rate`` / ``kl_weight`` that is set) are > 0."""
    def walk(node, path):
        for key in node.keys():
            value, name = node[key], f"{path}{key}"
            if hasattr(value, "keys"):
                walk(value, name + ".")
                continue
            for v in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"config.{name}={value!r} is not a finite number; pass a finite value "
                                      f"(e.g. --config.{name}=...).")
    walk(config, "")
    positive = list(POSITIVE_FIELDS)
    for m, section in (config.get("hparams", None) or {}).items():
        positive += [f"hparams.{m}.{f}" for f in ("learning_rate", "kl_weight") if section.get(f, None) is not None]
    for name in positive:
        node = config
        for part in name.split("."):
            node = node[part] if part in node else None
            if node is None:
                break
        if node is not None and not (isinstance(node, (int, float)) and not isinstance(node, bool) and node > 0):
            raise ConfigError(f"config.{name}={node!r} must be a number > 0.")


def check_workdir(config) -> None:
    """``config.workdir`` is, or can be created as, a writable folder (probed by a temporary file in its
    nearest existing folder, which is removed again)."""
    workdir = os.path.abspath(str(config.workdir))
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    hint = "pass --workdir=DIR with a folder you can write to"
    if not os.path.isdir(existing):
        raise ConfigError(f"config.workdir={config.workdir!r} cannot be created: {existing} is a file, not a "
                          f"folder; {hint}.")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".fpbma-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"config.workdir={config.workdir!r} is not writable ({existing}: {e.strerror}); "
                          f"{hint}.") from None


def corruptions_of(config) -> tuple:
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


def check(config, stage: str) -> None:
    """Checks a config for ``stage`` ∈ {pretrain, prior, train, evaluate, transfer, tune, flatness}; raises
    :class:`ConfigError`. (Whether earlier stages have run is checked by :func:`experiments.pipeline.validate`.)"""
    check_numbers(config)
    check_workdir(config)
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
        check_positive_int(config[section][field] if section else config[field], name)
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
    check_selection(config)
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
                methods.get(m).check(hp, num_data=k * counts.size, **training_kwargs(shared))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"config.hparams.{m}: {e}") from None
    check_devices(config, stage)


def check_devices(config, stage: str) -> None:
    """Every training batch of ``stage`` splits evenly over this host's devices of the ``data`` mesh.

    The gradient is a mean over equal shards, so training never pads or drops examples; the few-shot batch
    is ``min(config.transfer.batch_size, k · classes)``. Evaluation batches are padded (and masked), so
    ``config.eval.batch_size`` is rounded up to a multiple of the device count instead.
    """
    d = jax.local_device_count()
    if d == 1:
        return
    fields = {"pretrain": ("pretrain",), "prior": ("prior",)}.get(stage, ("pretrain", "prior", "transfer"))
    for field in fields:
        size = int(config[field].batch_size)
        if field == "transfer":
            size = min(size, int(config.data.k_shot) * _num_target_classes(config))
        if size % d:
            lower, upper = size - size % d, size - size % d + d
            options = f"{lower} or {upper}" if lower else f"{upper}"
            raise ConfigError(f"config.{field}.batch_size={int(config[field].batch_size)} gives training batches of "
                              f"{size}, which do not split over the {d} devices of the data mesh: use a multiple "
                              f"of {d} (e.g. --config.{field}.batch_size={options}).")


def _num_target_classes(config) -> int:
    return int(fpbma.data.info(config.data.target, data_dir=config.data.data_dir).num_classes)


def pretrained_of(config) -> str:
    """``config.model.pretrained`` ("" or None: pre-train from scratch)."""
    return config.model.get("pretrained", None) or ""


def model_image_size(config) -> int:
    """Input side of a pre-trained model (``config.model.image_size``, else the model's native size)."""
    return int(config.model.get("image_size", None) or fpbma.models.spec(config.model.name).image_size)


def check_resources(config) -> None:
    """The pre-trained checkpoint and the TFDS datasets exist; one ConfigError naming what is missing."""
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
    src = fpbma.data.load(config.data.target, "train", data_dir=config.data.data_dir)
    counts = np.bincount(np.asarray(src.labels), minlength=src.info.num_classes)
    held = np.ceil(test_from_train_of(config) * counts).astype(counts.dtype)  # stratified_holdout's share
    return counts - held


def test_from_train_of(config) -> float:
    """``config.data.test_from_train``: the share of every class of the target's train split moved to the test set."""
    return float(config.data.get("test_from_train", None) or 0.0)


test_from_train_of.__test__ = False  # a config accessor, not a pytest test




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
        check_positive_int(shared["steps"], f"hparams.{method}.steps")
    if "schedule" in shared:
        try:
            methods.learning_rate_schedule(float(shared["learning_rate"]), int(shared["steps"]),
                                           shared["schedule"], shared["warmup_steps"])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.hparams.{method} (or config.transfer): {e}") from None
    return hp, shared


def training_kwargs(shared) -> dict:
    """The shared fields of :func:`method_settings` as keyword arguments of ``Method.trainer`` / ``check``."""
    kwargs = dict(learning_rate=float(shared["learning_rate"]), num_steps=int(shared["steps"]),
                  kl_weight=float(shared.get("kl_weight", 1.0)))
    if "schedule" in shared:
        kwargs.update(schedule=str(shared["schedule"]), warmup_steps=int(shared["warmup_steps"]))
    return kwargs


SELECTIONS = ("val_nll", "last")


def check_selection(config) -> None:
    t = config.transfer
    select = t.get("select", "last")
    if select not in SELECTIONS:
        raise ConfigError(f"config.transfer.select={select!r}; choose one of {SELECTIONS} (val_nll: the "
                          "checkpoint whose BMA has the lowest validation NLL; last: the final step).")
    for field in ("select_every", "select_samples"):
        if field in t:
            check_positive_int(t[field], f"transfer.{field}")


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
