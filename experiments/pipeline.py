"""The stages of the Bayesian transfer pipeline and the main job that runs them all.

    pretrain → prior → (train → evaluate) for every method and seed → report

* ``pretrain`` — the source network (:func:`experiments.training.pretrain`);
* ``prior`` — the SWAG prior over its non-head weights (:func:`experiments.training.fit_prior`);
* ``train`` — one method (``config.method``) on the few-shot target of ``config.seed``;
* ``evaluate`` — its BMA metrics in-domain and under corruption (:mod:`experiments.evaluation`);
* ``transfer`` — the main job: every method of ``config.methods`` × every seed of ``config.seeds``, then
  ``results.md`` (:mod:`experiments.report`).

Each stage caches its result in the work dir (:mod:`experiments.workdir`), so running ``transfer`` after
``pretrain`` reuses the source network, and a killed run resumes where it stopped.

References:
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664, §4–5.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import logging

from experiments import config_checks, report, training
from experiments.config_checks import ConfigError, corruptions_of, methods_of, seeds_of
from experiments.evaluation import evaluate_method
from experiments.input_pipeline import corrupted_data
from experiments.workdir import check_cache_files, enable_compilation_cache, method_dir, stage_dir

STAGES = ("pretrain", "prior", "train", "evaluate", "transfer")


def validate(config, stage: str) -> None:
    """Every check of ``stage`` before any work: the config (:func:`experiments.config_checks.check`) and,
    for a stage that reads an earlier one's result, that it exists."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}.")
    config_checks.check(config, stage)
    check_cache_files(config)
    for name in ("source", "prior"):  # the stages every later one restores
        final = os.path.join(stage_dir(config, name), "final")
        if os.path.isdir(final):
            training.check_checkpoint(final)
    needs = {"prior": ("source", "experiments.pretrain"), "train": ("prior", "experiments.prior` (after "
                                                                    "`experiments.pretrain")}
    if stage in needs:
        name, command = needs[stage]
        if not os.path.isdir(os.path.join(stage_dir(config, name), "final")):
            raise ConfigError(f"missing {'pre-trained source' if name == 'source' else name} checkpoint "
                              f"{stage_dir(config, name)}/final; run `python -m {command}` with the same config "
                              "first.")
    if stage == "evaluate":
        path = os.path.join(method_dir(config, config.method, int(config.seed)), "final")
        if not os.path.isdir(path):
            raise ConfigError(f"missing checkpoint {path}; run `python -m experiments.train "
                              f"--config.method={config.method}` with the same config first.")


def run_pipeline(config) -> dict:
    """The main job on a validated config: every method × seed trained, evaluated and reported.

    Returns ``{method: {seed: metrics}}`` (empty, or partial, when ``config.max_steps`` stopped a stage).
    """
    start = time.perf_counter()
    source_variables = training.pretrain(config)
    if not training.source_finished(config):
        return {}
    prior = training.fit_prior(config, source_variables)
    results: dict = {}
    for seed in seeds_of(config, "transfer"):
        run = training.setup_transfer(config, seed, prior, source_variables)
        corrupted = corrupted_data(config, run.data["test_raw"], run.data["test_label"]) \
            if corruptions_of(config) else None
        for method in methods_of(config, "transfer"):
            t0 = time.perf_counter()
            trained = training.train_method(config, method, seed, run)
            if not trained.finished:
                return results
            t1 = time.perf_counter()
            metrics = evaluate_method(config, method, trained.posterior, run, corrupted)
            results.setdefault(method, {})[seed] = metrics
            ind = metrics["in_domain"]["raw"]
            print(f"[seed {seed}] {method:8s} acc {ind['acc']:.4f} nll {ind['nll']:.4f} ece {ind['ece']:.4f} "
                  f"(train {t1 - t0:.0f}s, eval {time.perf_counter() - t1:.0f}s)", flush=True)
    if jax.process_index() == 0:
        report.write_report(config, results, time.perf_counter() - start)
    return results


def run_stage(stage: str, config) -> None:
    """``python -m experiments.<stage>``: validates once, then runs the stage."""
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint write at INFO
    validate(config, stage)
    enable_compilation_cache(config)
    if stage == "pretrain":
        training.pretrain(config)
    elif stage == "prior":
        training.fit_prior(config)
    elif stage == "train":
        trained = training.train_method(config, config.method, int(config.seed))
        print(f"{config.method}: {int(trained.state.step)} steps"
              f"{'' if trained.finished else ' (stopped early by max_steps)'}")
    elif stage == "evaluate":
        seed = int(config.seed)
        run = training.setup_transfer(config, seed)
        trained = training.train_method(config, config.method, seed, run)
        corrupted = corrupted_data(config, run.data["test_raw"], run.data["test_label"]) \
            if corruptions_of(config) else None
        result = evaluate_method(config, config.method, trained.posterior, run, corrupted)
        print(json.dumps({"in_domain": result["in_domain"], "corruption_mean": result.get("corruption_mean")},
                         indent=1))
    elif stage == "transfer":
        run_pipeline(config)
        path = os.path.join(config.workdir, "results.md")
        if os.path.exists(path) and jax.process_index() == 0:
            with open(path) as f:
                print(f.read())
