r"""Hyperparameters chosen on validation data by ``experiments.tune`` (generated: do not edit by hand).

Regenerate (all methods, then the default config reads this file):

    python -m experiments.tune --config=experiments/configs/default.py

``TUNED[method]`` are the values of the best trial (lowest validation NLL of the BMA at the selected
checkpoint, mean over the tuning seeds); ``RECORDS[method]`` says how each entry was made: the command,
the commit, the tuning seeds (never the reported ones), the trials (complete / pruned), the wall time
on the machine it ran on, the best and the default trial's validation NLL, and the search space.
"""

TUNED = {}

RECORDS = {}


def apply(config):
    """Sets ``config.hparams.<method>.<name>`` to the tuned values (methods the config has)."""
    for method, values in TUNED.items():
        if method in config.hparams:
            for name, value in values.items():
                config.hparams[method][name] = value
    return config
