r"""Stage 3: train one method (`--config.method=NAME`) on the few-shot target (needs `experiments.prior`).

    python -m experiments.train                                   # the offline default config
    python -m experiments.train --config=experiments/configs/default.py --config.hparams.fpbma.rho=0.1

Writes into ``config.workdir`` (default ``./workdir/transfer``); a killed run resumes from its last
checkpoint. See :mod:`experiments.pipeline` for the stages and :mod:`experiments.workdir` for the work-dir layout;
``--workdir=DIR`` is the same as ``--config.workdir=DIR``.
"""

from experiments import cli

if __name__ == "__main__":
    cli.stage_main("train")
