r"""Stage 4: BMA evaluation of one trained method, in-domain and on every corruption × severity.

    python -m experiments.evaluate                                   # the offline default config
    python -m experiments.evaluate --config=experiments/configs/default.py --config.hparams.fpbma.rho=0.1

Writes into ``config.workdir`` (default ``./workdir/transfer``); a killed run resumes from its last
checkpoint. See :mod:`experiments.common` for the stages and the work-dir layout.
"""

from __future__ import annotations

import sys

from absl import app
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", common.config_help())


def main(argv):
    del argv
    common.run_cli("evaluate", _CONFIG.value)


if __name__ == "__main__":
    common.check_command_line(sys.argv)
    app.run(main)
