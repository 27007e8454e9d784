r"""Stage 2: fit the SWAG prior along SGD on the source (needs `experiments.pretrain`).

    python -m experiments.prior                                   # the offline default config
    python -m experiments.prior --config=experiments/configs/default.py --config.hparams.fpbma.rho=0.1

Writes into ``config.workdir`` (default ``./workdir/transfer``); a killed run resumes from its last
checkpoint. See :mod:`experiments.pipeline` for the stages and :mod:`experiments.workdir` for the work-dir layout;
``--workdir=DIR`` is the same as ``--config.workdir=DIR``.
"""

from experiments import cli

if __name__ == "__main__":
    cli.stage_main("prior")
