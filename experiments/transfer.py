r"""The whole pipeline: pre-train, SWAG prior, then every method × seed trained, BMA-evaluated and reported.

    python -m experiments.transfer                                   # the offline default config
    python -m experiments.transfer --config=experiments/configs/default.py --config.hparams.fpbma.rho=0.1

Writes into ``config.workdir`` (default ``./workdir/transfer``); a killed run resumes from its last
checkpoint. See :mod:`experiments.pipeline` for the stages and :mod:`experiments.workdir` for the work-dir layout;
``--workdir=DIR`` is the same as ``--config.workdir=DIR``.
"""

from experiments import cli

if __name__ == "__main__":
    cli.stage_main("transfer")
