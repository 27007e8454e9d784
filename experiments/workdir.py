"""The work dir: one directory per stage, named by a digest of what the stage depends on.

Layout under ``config.workdir``:

* ``data/`` — the prepared arrays (source train split, few-shot target train/validation, target test
  split, the corrupted test images), one ``.npz`` per dataset and setting;
* ``source-<hash>/`` — pre-training checkpoints (orbax, every ``checkpoint_every`` steps, the latest
  kept) and ``final``;
* ``prior-<hash>/`` — the SWAG prior (a :class:`fpbma.LowRankGaussian`) fitted along SGD on the source;
* ``seed<s>/<method>-<hash>/`` — the train state of one method (checkpoints, ``best``, ``final``), its
  ``selection.json`` and its evaluation ``metrics.json``;
* ``jax_cache/`` — JAX's persistent compilation cache;
* in every stage's directory: ``tensorboard/`` (TensorBoard event files of the per-step metrics),
  ``metrics.jsonl`` (the same values, one JSON line per logged step) and ``loop.json``.

``<hash>`` digests the config fields a stage depends on, so a changed config never reuses a stale stage;
a method's digest holds its *resolved* hyperparameters (:func:`experiments.config_checks.method_settings`)
and no path, so changing SAM's ρ never retrains FP-BMA and a moved work dir reuses every stage.

>>> from experiments.configs import tiny
>>> os.path.basename(stage_dir(tiny.get_config(), "source")).startswith("source-")
True
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import zipfile
from typing import Callable

import jax
import numpy as np

from experiments.config_checks import ConfigError, method_settings, test_from_train_of
from fpbma import methods

# The layout of a method's train state (fpbma.types.TrainState); raised when it changes so that no run
# restores a checkpoint of another layout (2: the state carries model_state and the step's metrics; 3: FP-BMA
# and VI keep their optimizer state on flat buffers).
STATE_FORMAT = 3


def digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


# Fields added after the first release enter the stage digest only when set, so older caches stay valid.
_OPTIONAL_DIGEST_FIELDS = {"data": ("source_size",), "model": ("pretrained", "image_size")}


def _digest_fields(section: str, fields: dict) -> dict:
    optional = _OPTIONAL_DIGEST_FIELDS[section]
    return {k: v for k, v in fields.items() if not (k in optional and not v)}


def stage_digest(config, stage: str) -> str:
    data = {k: config.data[k] for k in ("source", "image_size", "source_size") if k in config.data}
    base = {"seed": int(config.seed), "data": _digest_fields("data", data),
            "model": _digest_fields("model", config.model.to_dict()), "pretrain": config.pretrain.to_dict()}
    if stage == "source":
        return digest(base)
    if stage == "prior":
        return digest({**base, "prior": config.prior.to_dict()})
    raise ValueError(stage)


def stage_dir(config, stage: str) -> str:
    return os.path.join(config.workdir, f"{stage}-{stage_digest(config, stage)}")


def method_hash(config, method: str) -> str:
    """Digest of what a method's training depends on: the prior stage's config, the transfer scheme, the
    target data and the method's resolved hyperparameters (never a path)."""
    hp, shared = method_settings(config, method)
    transfer_fields = {k: v for k, v in config.transfer.to_dict().items() if k not in methods.SHARED_FIELDS}
    # A constant rate without warm-up is what every run did before schedules existed: it keeps those digests.
    shared = {k: v for k, v in shared.items() if (k, v) not in _NEUTRAL_SHARED}
    return digest({"prior": stage_digest(config, "prior"), "state": STATE_FORMAT, "transfer": transfer_fields,
                    "target": config.data.target, "k": config.data.k_shot, "method": method,
                    **({"test_from_train": test_from_train_of(config)} if test_from_train_of(config) else {}),
                    "hparams": {**hp, **shared}})


_NEUTRAL_SHARED = (("schedule", "constant"), ("warmup_steps", 0))


def method_dir(config, method: str, seed: int) -> str:
    return os.path.join(config.workdir, f"seed{seed}", f"{method}-{method_hash(config, method)}")


def checkpoints(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(d[5:]) for d in os.listdir(directory) if d.startswith("step_") and d[5:].isdigit())



def read_json(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_arrays(path: str) -> dict:
    """The arrays of a cache file; a damaged file is one :class:`ConfigError` line naming it and the fix."""
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise ConfigError(f"cache file {path} is damaged ({type(e).__name__}: {e}); delete it (rm '{path}') and "
                          "run again: it is rebuilt from the dataset.") from None


def cached_arrays(path: str, build: Callable[[], dict]) -> dict:
    """``build()``'s arrays, saved once as ``path`` (an ``.npz``) and read from it afterwards."""
    if os.path.exists(path):
        return read_arrays(path)
    arrays = build()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"  # hosts sharing the work dir write in turn
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def code_version() -> str:
    """``git describe``-like short commit of the code (``-dirty`` with uncommitted tracked changes)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def enable_compilation_cache(config) -> None:
    """JAX's persistent compilation cache in ``<workdir>/jax_cache`` (``config.compilation_cache=False``: off).

    The train steps of a method compile to the same program for every transfer seed (the data are
    arguments), so seeds after the first, and reruns, load it instead of compiling again.
    """
    if not config.get("compilation_cache", True):
        return
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(config.workdir, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)




def check_cache_files(config) -> None:
    """Every cached array file under ``<workdir>/data`` reads back whole (one ConfigError line otherwise)."""
    directory = os.path.join(config.workdir, "data")
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".npz") and ".tmp." not in name:
                read_arrays(os.path.join(directory, name))
