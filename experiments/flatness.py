r"""Posterior flatness of every trained transfer method, and whether flatter samples give better BMA.

    python -m experiments.transfer                    # first: train and evaluate every method
    python -m experiments.flatness                    # then, with the SAME config and overrides
    python -m experiments.flatness --config=experiments/configs/tiny.py --config.workdir=/tmp/fpbma_tiny

Reuses the transfer pipeline's work dir: for every method in ``config.methods`` and seed in
``config.seeds`` it restores the ``final`` checkpoint (no retraining) and the BMA metrics of
``<method_dir>/metrics.json``; a missing one stops the run before any work with an error naming the
``python -m experiments.transfer`` command to run first.

For S samples w_s = (w_S, w_F) of each posterior (the Bayesian subset w_S from the trained method,
the frozen weights w_F from the prior, exactly as BMA draws them, :func:`fpbma.transfer.sample_weights`),
the Hessian of the mean training cross-entropy over the few-shot train split (BatchNorm in eval mode
with the source statistics, as in training) with respect to the subset weights only,

    H_s = ∇²_{w_S} (1/N) Σᵢ CE(f(xᵢ; w_S, w_F), yᵢ) |_{w_s},

gives λ₁ ≥ … ≥ λ_k (Lanczos, :func:`fpbma.flatness.hessian_top_eigenvalues`), λ₁/λ_k and tr H_s
(Hutchinson, :func:`fpbma.flatness.hessian_trace`), reported as mean ± std over the S samples.

Claim (2) of the paper — flatter posteriors give better BMA — is tested within each posterior: its S
samples are ranked by λ_max and the BMA of the ⌊S/2⌋ flattest is compared with that of the ⌊S/2⌋
sharpest (ACC / NLL / ECE on the target test split).

Settings (``config.flatness``; defaults below when the config has no such section):
``num_samples`` S (10), ``num_eigenvalues`` k (5), ``lanczos_iterations`` (20), ``trace_probes`` (10).

Writes ``<workdir>/flatness.json``, ``flatness.md`` (also printed) and ``flatness_scatter.png``.

References:
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664, §3 and §5.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
from absl import logging
import jax.numpy as jnp
import numpy as np

from experiments import analysis, cli, report, config_checks, input_pipeline, models, pipeline, training, workdir
from fpbma import bma, flatness, transfer
from fpbma.models import partition

DEFAULTS = {"num_samples": 10, "num_eigenvalues": 5, "lanczos_iterations": 20, "trace_probes": 10}
_KEY_STREAM = 0x464C4154  # folded into PRNGKey(seed): the flatness samples never reuse the BMA keys

# ----------------------------------------------------------------------------------------------
# Settings and preconditions (all checked before any work or file write).


def settings(config) -> dict:
    """``config.flatness`` merged over :data:`DEFAULTS`; raises ConfigError on a bad value."""
    given = config.get("flatness", None)
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise config_checks.ConfigError(f"config.flatness has unknown field(s) {unknown}; the fields are {sorted(DEFAULTS)}.")
    out = {**DEFAULTS, **given}
    for name in DEFAULTS:
        config_checks.check_positive_int(out[name], f"flatness.{name}")
    if out["num_samples"] < 2:
        raise config_checks.ConfigError(f"config.flatness.num_samples={out['num_samples']} must be >= 2 (the flattest and "
                                 "the sharpest half of the samples are compared).")
    if out["trace_probes"] < 2:
        raise config_checks.ConfigError(f"config.flatness.trace_probes={out['trace_probes']} must be >= 2 (Hutchinson's "
                                 "standard error needs two probes).")
    if out["lanczos_iterations"] < out["num_eigenvalues"]:
        raise config_checks.ConfigError(f"config.flatness.lanczos_iterations={out['lanczos_iterations']} must be >= "
                                 f"config.flatness.num_eigenvalues={out['num_eigenvalues']}.")
    return out


def check_trained(config) -> None:
    """Every (method, seed) has its ``final`` checkpoint and ``metrics.json``; else one ConfigError."""
    missing = [os.path.join(workdir.stage_dir(config, stage), "final") for stage in ("source", "prior")]
    for seed in config_checks.seeds_of(config, "transfer"):
        for method in config_checks.methods_of(config, "transfer"):
            directory = workdir.method_dir(config, method, seed)
            missing += [os.path.join(directory, "final"), os.path.join(directory, "metrics.json")]
    missing = [p for p in missing if not os.path.exists(p)]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise config_checks.ConfigError(
            f"the transfer pipeline has not trained and evaluated every method of this config: missing {shown}. "
            "Run `python -m experiments.transfer` with the same --config and overrides first (it reuses "
            "whatever is cached), then this command again.")


def validate(config) -> dict:
    """The transfer config's checks, the flatness settings and the trained checkpoints; returns the settings."""
    pipeline.validate(config, "transfer")
    out = settings(config)
    check_trained(config)
    return out


# ----------------------------------------------------------------------------------------------
# The compiled pieces: module-level jits whose arguments are pytrees (functions as Partial), so every
# sample, method and seed of one run reuses one compilation per input shape.


def mean_cross_entropy(apply_fn, extra, frozen, images, labels, subset):
    """The training loss as a function of the subset weights: ℓ(w_S) = (1/N) Σᵢ −log softmax(f(xᵢ; w_S ∪ w_F))_{yᵢ}.

    Args:
      apply_fn: ``(variables, images) -> logits`` in eval mode (:func:`experiments.models.eval_apply`).
      extra: the other variable collections (BatchNorm ``batch_stats``), constants of the loss.
      frozen: the frozen weights w_F of this sample.
      images, labels: the few-shot training split (normalised images, integer labels).
      subset: the Bayesian-subset weights w_S.

    Returns:
      The mean cross-entropy, a float32 scalar.
    """
    logits = apply_fn({**extra, "params": transfer.full_params(subset, frozen)}, images)
    return transfer.cross_entropy(logits.astype(jnp.float32), labels)


@jax.jit
def _subset_hvp(apply_fn, extra, frozen, images, labels, subset, v):
    return flatness.hvp(functools.partial(mean_cross_entropy, apply_fn, extra, frozen, images, labels), subset, v)


@jax.jit
def _per_sample_log_probs(apply_fn, samples, images):
    return jax.lax.map(lambda w: jax.nn.log_softmax(apply_fn(w, images).astype(jnp.float32), axis=-1), samples)


def draw_samples(config, scheme, posterior, extra, seed: int) -> dict:
    """S weight samples of a trained posterior, drawn exactly as BMA draws them.

    w_s = sample_weights(k_s) (:func:`fpbma.transfer.sample_weights`): w_S from the posterior (a stored
    sample chosen uniformly for MCMC / point estimates), w_F from the prior (or its mean when
    ``config.transfer.sample_frozen`` is False), with k_s = split(key, S)[s] and a key that depends only
    on ``seed`` — every method is measured at the same random numbers.

    Args:
      config: the transfer config (``flatness.num_samples``, ``transfer.sample_frozen``).
      scheme, posterior, extra: from :func:`experiments.training.setup_transfer` / ``train_method``.
      seed: the transfer seed.

    Returns:
      Variables ``{"batch_stats", "params"}`` with every leaf stacked on a leading axis of size S.
    """
    s = settings(config)["num_samples"]
    sampler = transfer.sample_weights(scheme, posterior, extra, bool(config.transfer.sample_frozen))
    draw_key, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), _KEY_STREAM))
    # Eagerly, one key at a time: the sampler's random primitives are then compiled once per leaf shape
    # and shared by every method (all draw the same frozen weights), whereas a jitted sampler would be
    # recompiled whole for every posterior family (tens of seconds each on a 2-core CPU).
    draws = [sampler(k) for k in jax.random.split(draw_key, s)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *draws)


def sample_log_probs(config, apply_fn, samples, images) -> np.ndarray:
    """log softmax f(x; w_s) for every sample and test image, (S, N, C), in padded batches (one shape)."""
    bs = min(int(config.eval.batch_size), images.shape[0])
    out = []
    for start in range(0, images.shape[0], bs):
        x = images[start:start + bs]
        n = x.shape[0]
        if n < bs:
            x = np.concatenate([x, np.zeros((bs - n,) + x.shape[1:], x.dtype)])
        out.append(np.asarray(_per_sample_log_probs(apply_fn, samples, x))[:, :n])
    return np.concatenate(out, axis=1)


def bma_of(log_probs: np.ndarray, labels: np.ndarray, which) -> dict:
    """BMA metrics over the samples ``which``: log p̄ = logsumexp_{s ∈ which} log p_s − log |which|."""
    lp = jax.nn.logsumexp(jnp.asarray(log_probs[np.asarray(which)]), axis=0) - math.log(len(which))
    return bma.evaluate(lp, labels)


# ----------------------------------------------------------------------------------------------
# One method.


def method_flatness(config, method: str, seed: int, run, posterior) -> dict:
    """λ₁ ≥ … ≥ λ_k and tr H at S samples of one trained posterior, and the BMA of its flattest / sharpest half.

    At each sample, H_s = ∇²_{w_S} ℓ(w_S; w_F) (:func:`mean_cross_entropy`) is only touched through
    Hessian-vector products (one compiled forward-over-reverse program shared by all samples and
    methods): Lanczos gives the top k eigenvalues, Hutchinson the trace. The samples are ranked by λ_max;
    the flattest ⌊S/2⌋ and the sharpest ⌊S/2⌋ (the median one left out for odd S) are averaged as BMA,
    log p̄ = logsumexp_{s∈half} log softmax f(x; w_s) − log|half|, on the target test split.

    Args:
      config: the transfer config with its flatness settings (:func:`settings`).
      method, seed: which trained method; its ``metrics.json`` supplies the transfer run's BMA metrics.
      run: the :class:`experiments.training.TransferRun` of the seed.
      posterior: the method's trained posterior (``train_method(...).posterior``).

    Returns:
      A JSON-ready dict: per-sample ``eigenvalues`` (S × k), ``lambda_max``, ``eigenvalue_ratio``,
      ``trace``, ``trace_stderr``; their ``summary`` (mean, std); ``bma`` (metrics.json, raw);
      ``all_samples`` / ``flattest_half`` / ``sharpest_half`` (indices and acc/nll/ece/brier).
    """
    opts = settings(config)
    data, model, extra, scheme = run.data, run.model, run.extra, run.scheme
    apply_fn = models.eval_apply(model)
    images = jnp.asarray(input_pipeline.normalise(data["train_image"]))
    labels = jnp.asarray(data["train_label"])
    samples = draw_samples(config, scheme, posterior, extra, seed)
    subset, frozen = partition.split(samples["params"], scheme.scheme)
    collections = {k: v for k, v in samples.items() if k != "params"}  # batch_stats, held fixed
    _, hess_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), _KEY_STREAM))
    s_count = opts["num_samples"]
    eigs, traces, errs = [], [], []
    for s, key in enumerate(jax.random.split(hess_key, s_count)):
        w_s = jax.tree.map(lambda x: x[s], subset)
        f_s = jax.tree.map(lambda x: x[s], frozen)
        e_s = jax.tree.map(lambda x: x[s], collections)
        hvp_fn = functools.partial(_subset_hvp, apply_fn, e_s, f_s, images, labels, w_s)
        lanczos_key, trace_key = jax.random.split(key)
        eigs.append(flatness.hessian_top_eigenvalues(None, w_s, opts["num_eigenvalues"], key=lanczos_key,
                                                     num_iterations=opts["lanczos_iterations"], hvp_fn=hvp_fn))
        tr = flatness.hessian_trace(None, w_s, key=trace_key, num_samples=opts["trace_probes"], hvp_fn=hvp_fn)
        traces.append(tr.trace)
        errs.append(tr.stderr)
    result = flatness.FlatnessResult(np.stack(eigs), np.asarray(traces), np.asarray(errs))

    log_probs = sample_log_probs(config, apply_fn, samples, input_pipeline.normalise(data["test_image"]))
    order = np.argsort(result.lambda_max, kind="stable")
    half = s_count // 2
    flat_idx, sharp_idx = np.sort(order[:half]), np.sort(order[-half:])
    with open(os.path.join(workdir.method_dir(config, method, seed), "metrics.json")) as f:
        transfer_metrics = json.load(f)
    return {
        "subset_size": int(partition.count(jax.tree.map(lambda x: x[0], subset))),
        "eigenvalues": result.eigenvalues.tolist(),
        "lambda_max": result.lambda_max.tolist(),
        "eigenvalue_ratio": result.eigenvalue_ratio.tolist(),
        "trace": result.trace.tolist(),
        "trace_stderr": result.trace_stderr.tolist(),
        "summary": {k: list(v) for k, v in result.summary().items()},
        "bma": transfer_metrics["in_domain"]["raw"],
        "all_samples": {"indices": list(range(s_count)), **bma_of(log_probs, data["test_label"], range(s_count))},
        "flattest_half": {"indices": flat_idx.tolist(), **bma_of(log_probs, data["test_label"], flat_idx)},
        "sharpest_half": {"indices": sharp_idx.tolist(), **bma_of(log_probs, data["test_label"], sharp_idx)},
    }


# ----------------------------------------------------------------------------------------------
# Aggregation and the report.


def summarize(per_seed: dict) -> dict:
    """One method's row: samples pooled over seeds (mean ± std, ddof 0); BMA metrics averaged over seeds."""
    pooled = {name: np.concatenate([np.asarray(r[name]) for r in per_seed.values()])
              for name in ("lambda_max", "eigenvalue_ratio", "trace")}
    row = {name: [float(np.mean(x)), float(np.std(x))] for name, x in pooled.items()}
    for part in ("bma", "all_samples", "flattest_half", "sharpest_half"):
        row[part] = {m: float(np.mean([r[part][m] for r in per_seed.values()])) for m in ("acc", "nll", "ece")}
    return row


def _spearman(x, y) -> float:
    """Spearman's rank correlation (ties broken by order); NaN when either side is constant."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if np.std(rx) == 0 or np.std(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def claim_two(rows: dict) -> dict:
    """How often the flattest half beats the sharpest half, and the rank correlation of λ_max with BMA across methods."""
    better = {"acc": lambda f, s: f > s, "nll": lambda f, s: f < s, "ece": lambda f, s: f < s}
    out = {f"flat_better_{m}": int(sum(better[m](r["flattest_half"][m], r["sharpest_half"][m]) for r in rows.values()))
           for m in better}
    out["num_methods"] = len(rows)
    lam = [r["lambda_max"][0] for r in rows.values()]
    for m in ("acc", "nll"):
        out[f"spearman_lambda_max_vs_bma_{m}"] = _spearman(lam, [r["bma"][m] for r in rows.values()]) \
            if len(rows) >= 3 else float("nan")
    return out


def claims(per_method: dict) -> dict:
    """The paper's two claims over seeds (:mod:`experiments.analysis`): claim 1 and claim 2(a) on the per-seed
    log of the mean λ_max over samples, claim 2(b) on the BMA accuracy and NLL, all paired by seed."""
    log_lam = {m: {int(s): math.log(max(float(np.mean(r["lambda_max"])), 1e-30)) for s, r in per.items()}
               for m, per in per_method.items()}
    acc = {m: {int(s): r["bma"]["acc"] for s, r in per.items()} for m, per in per_method.items()}
    nll = {m: {int(s): r["bma"]["nll"] for s, r in per.items()} for m, per in per_method.items()}
    return {**analysis.claim_sharpness(log_lam), "claim2_bma": analysis.claim_bma(acc, nll)}


def _claim_lines(c: dict) -> list:
    if not c.get("pairs"):
        return []
    lines = ["", "log λ_max of FP-BMA minus each method, paired over seeds: mean [95 % t interval] "
             "(negative: FP-BMA flatter).", "", "| method | Δ log λ_max | FP-BMA is |", "|---|---|---|"]
    word = {"better": "flatter", "worse": "sharper", "undecided": "undecided"}
    for m, r in c["pairs"].items():
        lines.append(f"| {m} | {analysis.format_interval(r)} | {word[r['comparison']]} |")
    bma = c["claim2_bma"]
    lines += ["", "Verdicts (rules: experiments/analysis.py):",
              f"* Claim 1, approximate-Bayes posteriors ({', '.join(c['claim1']['pairs']) or 'none in this run'}) "
              f"are sharper than FP-BMA's: **{c['claim1']['verdict']}**.",
              f"* Claim 2, FP-BMA is flatter than its ablation vi: **{c['claim2_flatter_than_vi']['verdict']}**; "
              f"its BMA is better than every other method's: on accuracy **{bma['acc']['verdict']}**, on NLL "
              f"**{bma['nll']['verdict']}**."]
    return lines


def _pm(pair) -> str:
    return f"{pair[0]:.4g} ± {pair[1]:.2g}"


def table(config, payload: dict) -> str:
    """The Markdown report: method × flatness (mean ± std over samples) × BMA, and the claim-(2) summary."""
    opts, rows, c2 = payload["settings"], payload["summary"], payload["claim2"]
    k = opts["num_eigenvalues"]
    lk = "λ" + str(k).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))
    any_method = next(iter(payload["methods"].values()))
    subset_size = next(iter(any_method.values()))["subset_size"]
    lines = [f"Flatness of the {config.transfer.scheme} subset ({subset_size} weights) on {config.data.target} "
             f"({config.data.k_shot}-shot train split), seeds {payload['seeds']}: S = {opts['num_samples']} samples "
             f"per method, top-{k} eigenvalues by {opts['lanczos_iterations']} Lanczos steps, trace by "
             f"{opts['trace_probes']} Hutchinson probes; mean ± std over samples. BMA: the transfer run's "
             f"(S = {config.eval.num_samples}); flat / sharp: BMA of the {opts['num_samples'] // 2} samples with the "
             f"smallest / largest λ_max. Wall time {payload['wall_time_s']:.0f} s; code {payload.get('code', '?')}.", "",
             f"| method | λ_max ↓ | λ₁/{lk} | tr H ↓ | ACC ↑ | NLL ↓ | ECE ↓ | flat ACC | flat NLL | flat ECE "
             "| sharp ACC | sharp NLL | sharp ECE |",
             "|---" * 13 + "|"]
    for method, r in rows.items():
        cells = [_pm(r["lambda_max"]), _pm(r["eigenvalue_ratio"]), _pm(r["trace"])]
        cells += [f"{r[part][m]:.4f}" for part in ("bma", "flattest_half", "sharpest_half") for m in ("acc", "nll", "ece")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    m = c2["num_methods"]
    lines += ["", f"Claim (2), within each posterior: the flattest half beats the sharpest half in ACC for "
              f"{c2['flat_better_acc']}/{m} methods, NLL for {c2['flat_better_nll']}/{m}, ECE for "
              f"{c2['flat_better_ece']}/{m}. Across methods: Spearman ρ(mean λ_max, BMA ACC) = "
              f"{c2['spearman_lambda_max_vs_bma_acc']:.2f}, ρ(mean λ_max, BMA NLL) = "
              f"{c2['spearman_lambda_max_vs_bma_nll']:.2f}."]
    if "claims" in payload:
        lines += _claim_lines(payload["claims"])
    return "\n".join(lines) + "\n"


def scatter(config, rows: dict, path: str) -> None:
    """Mean λ_max (± std over samples) against the BMA accuracy, one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    styles = report.method_styles(rows)
    for method, r in rows.items():
        x, dx = r["lambda_max"]
        y = r["bma"]["acc"]
        st = styles[method]
        ax.errorbar([x], [y], xerr=[dx], fmt=st["marker"], color=st["color"], markersize=st["markersize"],
                    capsize=3, label=method, zorder=st["zorder"])
        ax.annotate(method, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if all(r["lambda_max"][0] > 0 for r in rows.values()):
        ax.set_xscale("log")
    ax.set_xlabel("λ_max of the training-loss Hessian (mean ± std over samples)")
    ax.set_ylabel(f"BMA accuracy on {config.data.target} test")
    ax.set_title("Flatter posterior, better BMA? (one point per method)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config) -> dict:
    """The flatness stage: every method × seed of the transfer run, then the report.

    Everything is validated first (:func:`validate`); the files are written only after every method was
    measured.

    Args:
      config: the transfer pipeline's config (the same one, so the same work dir and checkpoints).

    Returns:
      The payload of ``<workdir>/flatness.json``: ``settings``, ``seeds``, per-method per-seed results
      (:func:`method_flatness`), per-method ``summary`` rows (:func:`summarize`) and ``claim2``.
    """
    opts = validate(config)
    workdir.enable_compilation_cache(config)  # after validation: a bad config writes nothing
    start = time.perf_counter()
    methods, seeds = config_checks.methods_of(config, "transfer"), config_checks.seeds_of(config, "transfer")
    per_method: dict = {m: {} for m in methods}
    for seed in seeds:
        run = training.setup_transfer(config, seed)  # restores the source and the prior (check_trained)
        for method in methods:
            t0 = time.perf_counter()
            trained = training.train_method(config, method, seed, run)
            posterior = trained.posterior
            assert trained.finished  # check_trained saw its final checkpoint
            r = method_flatness(config, method, seed, run, posterior)
            per_method[method][seed] = r
            print(f"[seed {seed}] {method:8s} λ_max {_pm(r['summary']['lambda_max'])}  tr H "
                  f"{_pm(r['summary']['trace'])}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    rows = {m: summarize(per_method[m]) for m in methods}
    payload = {"config": config.to_dict(), "settings": opts, "seeds": list(seeds),
               "wall_time_s": time.perf_counter() - start, "devices": [str(d) for d in jax.devices()],
               "code": workdir.code_version(),
               "methods": {m: {str(s): r for s, r in per.items()} for m, per in per_method.items()},
               "summary": rows, "claim2": claim_two(rows), "claims": claims(per_method)}
    wd = config.workdir
    with open(os.path.join(wd, "flatness.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    with open(os.path.join(wd, "flatness.md"), "w") as f:
        f.write(table(config, payload))
    scatter(config, rows, os.path.join(wd, "flatness_scatter.png"))
    return payload


# ----------------------------------------------------------------------------------------------
# Command line.

def main(config, argv) -> None:
    """``python -m experiments.flatness``: the stage, then ``flatness.md`` printed."""
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint restore at INFO
    run(config)
    with open(os.path.join(config.workdir, "flatness.md")) as f:
        print(f.read())


if __name__ == "__main__":
    cli.main(main)
