"""BMA evaluation of a trained method, with the test batches split over every device.

The Bayesian model average of S weight samples w_s (the trained subset from the method's result, the
frozen rest from the prior) is

    log p̄(y | x) = logsumexp_s log softmax f(x; w_s) − log S,

computed by :func:`fpbma.bma.predict` on batches of ``config.eval.batch_size`` images (rounded up to a
multiple of the device count), each split over the ``data`` mesh (:func:`fpbma.parallel.shard_batch`);
the last batch is padded with zeros and its padding dropped, so every batch has one shape and compiles
once. Samples are drawn on device from one key, identically on every device, so the result equals the
one-device BMA. Metrics (:func:`fpbma.bma.evaluate`: accuracy, NLL, ECE, Brier) come raw and after
temperature scaling fitted on the validation split (:func:`fpbma.calibration.fit_temperature`).

References:
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664, §5.
  Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (temperature scaling).
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from experiments.input_pipeline import host_rows, normalise
from experiments.models import eval_apply
from experiments.workdir import method_dir
from fpbma import bma, calibration, parallel


def predict(config, apply, sampler, images: np.ndarray, key, num_samples: int) -> np.ndarray:
    """BMA log-probabilities (N, C) of ``images`` with ``num_samples`` weights, sharded over the devices."""
    mesh = parallel.data_mesh()
    d = jax.device_count()
    bs = -(-int(config.eval.batch_size) // d) * d
    chunk = min(int(config.eval.chunk_size), num_samples)
    out = []
    for start in range(0, images.shape[0], bs):
        x = images[start:start + bs]
        real = x.shape[0]
        if real < bs:  # pad to one shape: one compilation for every batch
            x = np.concatenate([x, np.zeros((bs - real,) + x.shape[1:], x.dtype)])
        lp = bma.predict(apply, sampler, parallel.shard_batch(host_rows({"x": x})["x"], mesh), key=key,
                         num_samples=num_samples, chunk_size=chunk)
        lp = multihost_utils.process_allgather(lp, tiled=True) if jax.process_count() > 1 else np.asarray(lp)
        out.append(lp[:real])
    return np.concatenate(out)


def _metrics(log_probs, labels, temperature) -> dict:
    return {"raw": bma.evaluate(log_probs, labels),
            "ts": bma.evaluate(calibration.apply_temperature(log_probs, temperature), labels)}


def validation_nll(config, trainer, state, run, num_samples: int) -> float:
    """NLL of the BMA (``num_samples`` weights) of ``trainer.finalize(state)`` on the validation split.

    ``inf`` while the state has no posterior yet (a sampler before its first cycle end, a SWAG before two
    collected models) or when its predictions are not finite.
    """
    try:
        posterior = trainer.finalize(state)
    except ValueError:
        return math.inf
    key = jax.random.fold_in(jax.random.PRNGKey(run.seed), 98)
    lp = predict(config, eval_apply(run.model), run.sampler(config, posterior), normalise(run.data["val_image"]),
                 key, num_samples)
    nll = float(bma.evaluate(lp, run.data["val_label"])["nll"])
    return nll if math.isfinite(nll) else math.inf


def evaluate_method(config, method: str, posterior, run, corrupted=None) -> dict:
    """BMA metrics of a trained method: in-domain (raw and temperature-scaled) and per corruption × severity.

    Writes ``metrics.json`` and ``test_log_probs.npy`` into the method's directory and returns the metrics.
    """
    data, seed = run.data, run.seed
    apply, sampler = eval_apply(run.model), run.sampler(config, posterior)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 99)
    s = int(config.eval.num_samples)
    val_lp = predict(config, apply, sampler, normalise(data["val_image"]), key, s)
    temperature = calibration.fit_temperature(val_lp, data["val_label"])
    test_lp = predict(config, apply, sampler, normalise(data["test_image"]), key, s)
    result = {"temperature": float(temperature), "in_domain": _metrics(test_lp, data["test_label"], temperature)}
    if corrupted is not None:
        names = [k for k in corrupted if k not in ("index", "label")]
        labels = corrupted["label"]
        images = np.concatenate([normalise(corrupted[k]) for k in names])
        s_c = int(config.eval.corruption_num_samples)
        # Temperature of the corruption sweep is refitted for its sample count S_c on the same validation split.
        t_c = temperature if s_c == s else calibration.fit_temperature(
            predict(config, apply, sampler, normalise(data["val_image"]), key, s_c), data["val_label"])
        lp = predict(config, apply, sampler, images, key, s_c).reshape(len(names), labels.shape[0], -1)
        per = {k: _metrics(lp[i], labels, t_c) for i, k in enumerate(names)}
        result["corruptions"] = per
        result["corruption_mean"] = {kind: {m: float(np.mean([per[k][kind][m] for k in names]))
                                            for m in ("acc", "nll", "ece", "brier")} for kind in ("raw", "ts")}
    if jax.process_index() == 0:
        directory = method_dir(config, method, seed)
        np.save(os.path.join(directory, "test_log_probs.npy"), test_lp)
        with open(os.path.join(directory, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result
