"""The one command-line entry point every ``python -m experiments.<stage>`` module calls.

    python -m experiments.transfer --workdir=./workdir/run1 --config=experiments/configs/default.py \
        --config.methods=fpbma,sgd --config.hparams.fpbma.rho=0.1

Flags, as Flax's examples take them: ``--config`` (a Python file with ``get_config()``; every field can
be overridden with ``--config.<field>=...``) and ``--workdir`` (sets ``config.workdir``; the same as
``--config.workdir``). With ``--config.distributed=True`` it calls ``jax.distributed.initialize()`` first,
so one command started on every host of a TPU pod or GPU cluster trains on all of their devices.

A bad config — unknown method or hyperparameter, a value out of range, a batch that does not split over
the devices, a missing earlier stage — prints one line ``error: ...`` naming the fix and exits with
status 2, before any work or file write.
"""

from __future__ import annotations

import sys
from typing import Callable

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments.config_checks import ConfigError, check_command_line, config_help
from experiments.pipeline import run_stage

DEFAULT_CONFIG = "experiments/configs/default.py"


def run_or_exit(fn: Callable, *args) -> None:
    """``fn(*args)``; a :class:`ConfigError` prints one line ``error: ...`` and exits with status 2."""
    try:
        fn(*args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_cli(stage: str, config) -> None:
    """One stage of :mod:`experiments.pipeline` on ``config``, as the command line runs it."""
    run_or_exit(run_stage, stage, config)


def main(runner: Callable[[object, list], None], default_config: str = DEFAULT_CONFIG) -> None:
    """Defines ``--config`` and ``--workdir``, checks the flags, and runs ``runner(config, argv)`` under absl.

    The flags are defined here, when a module runs as ``__main__``, not when it is imported, so every entry
    point can be imported side by side (tests, notebooks).
    """
    check_command_line(sys.argv)
    config_flag = config_flags.DEFINE_config_file("config", default_config, config_help())
    workdir_flag = flags.DEFINE_string("workdir", None, "work dir of the run (sets config.workdir)")

    def _main(argv):
        config = config_flag.value
        if workdir_flag.value:
            config.workdir = workdir_flag.value

        def start():
            if config.get("distributed", False):
                jax.distributed.initialize()  # before any other JAX call
            runner(config, argv)

        run_or_exit(start)

    app.run(_main)


def stage_main(stage: str) -> None:
    """``main`` of ``python -m experiments.<stage>`` for the stages of :mod:`experiments.pipeline`."""
    main(lambda config, argv: run_stage(stage, config))
