r"""Stage 4: BMA evaluation of one trained method, in-domain and on every corruption × severity.

    python -m experiments.evaluate                                   # the offline default config
    python -m experiments.evaluate --config=experiments/configs/default.py --config.hparams.fpbma.rho=0.1

Writes into ``config.workdir`` (default ``./workdir/transfer``); a killed run resumes from its last
checkpoint. See :mod:`experiments.pipeline` for the stages and :mod:`experiments.workdir` for the work-dir layout;
``--workdir=DIR`` is the same as ``--config.workdir=DIR``.
"""

from experiments import cli

if __name__ == "__main__":
    cli.stage_main("evaluate")
