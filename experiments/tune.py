r"""Per-method hyperparameter search on the validation split (Optuna), written into a committed config.

    python -m experiments.tune                                    # every method of the default config
    python -m experiments.tune --config.tune.methods=sgld,emcmc   # only some (the others' entries stay)

For every method, a seeded TPE study (:class:`optuna.samplers.TPESampler`) searches the method's own
``Method.search_space`` (kept beside its defaults in :mod:`fpbma.methods`; e.g. FP-BMA's ρ, a KL radius
in nats, over 0.01 … 10, SAM's Euclidean ρ over 0.01 … 0.5, every learning rate over 1e-3 … 1e-1).
Each trial trains the method on the few-shot train split of the *tuning* seeds ``config.tune.seeds``
(never the reported ``config.seeds``: the few-shot draw, the validation split and the training noise
all differ) and scores it by the validation NLL of its BMA at the selected checkpoint
(``config.transfer.select``, ``select_every`` and ``select_samples``, as in the main job); the median
pruner (:class:`optuna.pruners.MedianPruner`) stops trials whose validation curve is worse than the
median of earlier trials at the same step. The first trial of every study is the method's registry
default, so tuning never returns something worse on validation than the untuned setting.

The studies live in ``<workdir>/tune/`` (an Optuna journal file per method): a killed run resumes, and
raising ``config.tune.trials`` continues a study. The result is the Python file
``config.tune.output`` (``experiments/configs/tuned_default.py``): ``TUNED[method]`` holds the chosen
values and ``RECORDS[method]`` the command, commit, trials, wall time and best validation NLL; the
default config (:mod:`experiments.configs.default`) applies ``TUNED``. Entries of methods not tuned in
this run are kept.

Reference: Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework", KDD 2019.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import pprint
import sys
import time


from absl import logging

from experiments import cli, config_checks, pipeline, training, workdir
from fpbma import methods

_PRUNE_AFTER = 50  # steps of every trial before the pruner may stop it (two selection points at the default)


def tune_settings(config) -> dict:
    """``config.tune`` with its defaults, validated (one ConfigError line naming the field and the fix)."""
    t = config.get("tune", None) or {}
    opts = {"trials": int(t.get("trials", 16)), "seeds": config_checks.items(t.get("seeds", (100,))),
            "methods": config_checks.items(t.get("methods", "")) or config_checks.methods_of(config, "transfer"),
            "sampler_seed": int(t.get("sampler_seed", 0)), "startup_trials": int(t.get("startup_trials", 6)),
            "output": str(t.get("output", "experiments/configs/tuned_default.py"))}
    opts["seeds"] = tuple(int(s) for s in opts["seeds"])
    config_checks.check_positive_int(opts["trials"], "tune.trials")
    unknown = [m for m in opts["methods"] if m not in methods.names()]
    if unknown:
        raise config_checks.ConfigError(f"config.tune.methods has unknown method(s) {unknown}; choose from "
                                 f"{list(methods.names())}.")
    clash = sorted(set(opts["seeds"]) & set(config_checks.seeds_of(config, "transfer")))
    if clash:
        raise config_checks.ConfigError(f"config.tune.seeds {list(opts['seeds'])} overlap the reported seeds "
                                 f"config.seeds at {clash}: tune on other seeds (e.g. --config.tune.seeds=100).")
    if not opts["seeds"]:
        raise config_checks.ConfigError("config.tune.seeds is empty; give at least one tuning seed, e.g. 100.")
    if not opts["output"].endswith(".py"):
        raise config_checks.ConfigError(f"config.tune.output={opts['output']!r} must be a .py file (a config module).")
    return opts


def _suggest(trial, name: str, spec: tuple):
    kind = spec[0]
    if kind == "log_uniform":
        return trial.suggest_float(name, spec[1], spec[2], log=True)
    if kind == "uniform":
        return trial.suggest_float(name, spec[1], spec[2])
    return trial.suggest_categorical(name, list(spec[1]))


def _in_space(value, spec: tuple) -> bool:
    if spec[0] == "choice":
        return value in spec[1]
    return isinstance(value, (int, float)) and spec[1] <= value <= spec[2]


def default_trial(config, method: str) -> dict:
    """The registry defaults (and the config's shared training fields) of the searched names, where in range."""
    m = methods.get(method)
    _, shared = config_checks.method_settings(_untuned(config, method), method)
    values = {**m.defaults, **shared}
    return {k: values[k] for k, spec in m.search_space.items() if k in values and _in_space(values[k], spec)}


def _untuned(config, method: str):
    """``config`` with the searched fields of ``method`` reset to their defaults (what a study starts from)."""
    c = copy.deepcopy(config)
    m = methods.get(method)
    for k in m.search_space:
        if k in m.defaults:
            c.hparams[method][k] = m.defaults[k]
        elif k in c.hparams[method]:
            c.hparams[method][k] = None  # a shared field: back to config.transfer's
    return c


def trial_config(config, method: str, values: dict):
    """The config of one trial: ``values`` set as ``config.hparams.<method>.<name>``, no progress bars."""
    c = _untuned(config, method)
    for k, v in values.items():
        c.hparams[method][k] = v
    c.progress = False
    return c


def study_digest(config, method: str, opts: dict) -> str:
    """What a study depends on (not the searched values, not the trial count): a changed one is a new study."""
    c = _untuned(config, method)
    m = methods.get(method)
    return workdir.digest({"method": workdir.method_hash(c, method), "seeds": opts["seeds"],
                           "space": {k: list(map(str, v)) for k, v in m.search_space.items()},
                           "sampler_seed": opts["sampler_seed"], "startup": opts["startup_trials"]})


def tune_method(config, method: str, opts: dict, runs: dict) -> dict:
    """Runs (or resumes) the study of ``method`` up to ``opts['trials']`` finished trials; returns its record."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    m = methods.get(method)
    directory = os.path.join(config.workdir, "tune")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{method}-{study_digest(config, method, opts)}.journal")
    storage = JournalStorage(JournalFileBackend(path))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage, study_name=method, direction="minimize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=opts["sampler_seed"], n_startup_trials=opts["startup_trials"]),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=opts["startup_trials"], n_warmup_steps=_PRUNE_AFTER))
    if not study.trials:
        study.enqueue_trial(default_trial(config, method))
    steps = int(config_checks.method_settings(config, method)[1]["steps"])

    def objective(trial):
        values = {k: _suggest(trial, k, spec) for k, spec in m.search_space.items()}
        c = trial_config(config, method, values)
        scores = []
        for i, seed in enumerate(opts["seeds"]):
            def report(step, nll, offset=i * steps):
                trial.report(nll if math.isfinite(nll) else 1e6, offset + step)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            try:
                finished = training.train_method(c, method, seed, runs[seed], report=report).finished
            except ValueError as e:  # no posterior at all (a sampler whose every step diverged): worst value
                trial.set_user_attr("failed", str(e))
                return 1e6
            if not finished:
                raise RuntimeError("config.max_steps stopped a tuning trial; leave max_steps at -1 to tune.")
            record = workdir.read_json(os.path.join(workdir.method_dir(c, method, seed), "selection.json"), {})
            scores.append(record.get("val_nll") or math.inf)
        score = float(sum(scores) / len(scores))
        return score if math.isfinite(score) else 1e6  # a diverged trial: worst value, not a failure

    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED)]
    start = time.perf_counter()
    remaining = opts["trials"] - len(finished)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=())
    wall = time.perf_counter() - start
    best = study.best_trial
    counts = {s.name.lower(): sum(t.state == s for t in study.trials)
              for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)}
    return {"values": dict(best.params), "val_nll": float(best.value), "trial": int(best.number),
            "default_val_nll": _default_value(study), "trials": counts, "wall_s": round(wall, 1),
            "seeds": list(opts["seeds"]), "space": {k: list(v) if not isinstance(v[1], tuple) else [v[0], list(v[1])]
                                                    for k, v in m.search_space.items()}}


def _default_value(study):
    first = study.trials[0] if study.trials else None
    return float(first.value) if first is not None and first.value is not None else None


def read_tuned(path: str) -> tuple[dict, dict]:
    """``(TUNED, RECORDS)`` of a tuned config file (empty when it does not exist)."""
    if not os.path.exists(path):
        return {}, {}
    scope: dict = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), scope)  # our own generated file: two dict literals
    return dict(scope.get("TUNED", {})), dict(scope.get("RECORDS", {}))


_HEADER = '''r"""Hyperparameters chosen on validation data by ``experiments.tune`` (generated: do not edit by hand).

Regenerate (all methods, then the default config reads this file):

    python -m experiments.tune --config=experiments/configs/default.py

``TUNED[method]`` are the values of the best trial (lowest validation NLL of the BMA at the selected
checkpoint, mean over the tuning seeds); ``RECORDS[method]`` says how each entry was made: the command,
the commit, the tuning seeds (never the reported ones), the trials (complete / pruned), the wall time
on the machine it ran on, the best and the default trial's validation NLL, and the search space.
"""

'''


def write_tuned(path: str, tuned: dict, records: dict) -> None:
    """Writes the tuned config module (atomically)."""
    body = (_HEADER + "TUNED = " + pprint.pformat(tuned, width=110, sort_dicts=True) + "\n\nRECORDS = "
            + pprint.pformat(records, width=110, sort_dicts=True) + "\n\n\n"
            + "def apply(config):\n"
            + '    """Sets ``config.hparams.<method>.<name>`` to the tuned values (methods the config has)."""\n'
            + "    for method, values in TUNED.items():\n"
            + "        if method in config.hparams:\n"
            + "            for name, value in values.items():\n"
            + "                config.hparams[method][name] = value\n"
            + "    return config\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(body)
    os.replace(tmp, path)


def run(config, argv=()) -> dict:
    """Tunes every method of ``config.tune.methods``; writes ``config.tune.output``; returns the records."""
    pipeline.validate(config, "transfer")
    opts = tune_settings(config)
    for m in opts["methods"]:
        if not methods.get(m).search_space:
            raise config_checks.ConfigError(f"method {m!r} has no search_space to tune; leave it out of config.tune.methods.")
    out_dir = os.path.dirname(os.path.abspath(opts["output"]))
    if not os.path.isdir(out_dir):
        raise config_checks.ConfigError(f"config.tune.output={opts['output']!r}: folder {out_dir} does not exist.")
    tuned, records = read_tuned(opts["output"])
    workdir.enable_compilation_cache(config)  # after validation: a bad config writes nothing
    source = training.pretrain(config)
    prior = training.fit_prior(config, source)
    runs = {s: training.setup_transfer(config, s, prior, source) for s in opts["seeds"]}
    command = "python -m experiments.tune " + " ".join(a for a in argv[1:])
    commit = workdir.code_version()  # of the code this process imported, not of the tree when a method finishes
    for method in opts["methods"]:
        record = tune_method(config, method, opts, runs)
        tuned[method] = record.pop("values")
        records[method] = {**record, "command": command.strip(), "commit": commit,
                           "date": datetime.date.today().isoformat()}
        print(f"{method:15s} val NLL {record['val_nll']:.4f} (default {record['default_val_nll']}) "
              f"{json.dumps(tuned[method])}  [{record['trials']}, {record['wall_s'] / 60:.1f} min]", flush=True)
        write_tuned(opts["output"], tuned, records)  # after every method: a killed run keeps what it finished
    return records


def main(config, argv) -> None:
    """``python -m experiments.tune``."""
    logging.set_verbosity(logging.WARNING)
    del argv  # absl's leftovers; the record keeps the whole command line
    run(config, argv=sys.argv)


if __name__ == "__main__":
    cli.main(main)
