r"""The paper's CIFAR-10 10-shot transfer with an ImageNet ResNet-18 (arXiv 2406.15664, §5).

    python -m experiments.transfer --config=experiments/configs/cifar10_resnet18.py \
        --config.model.pretrained=/path/to/resnet18-f37072fd.safetensors --config.data.data_dir=DIR

Not runnable offline here: it needs a checkpoint and prepared TFDS data, and `validate` stops with one
ConfigError naming whichever is missing, before any work.

Checkpoint: torchvision's ImageNet ResNet-18 state dict, ``.pth`` or ``.safetensors`` (read without torch):
on a machine with network, ``curl -LO https://download.pytorch.org/models/resnet18-f37072fd.pth`` (or
``huggingface-cli download timm/resnet18.tv_in1k`` for a ``.safetensors`` with the same keys), then pass
its path as ``--config.model.pretrained``.

Data (TFDS, array_record): ``pip install 'fpbma[prepare]'`` and, with network,
``python -c "import fpbma.data as d; d.prepare('cifar10', data_dir=DIR); d.prepare('imagenet2012', data_dir=DIR)"``
(ImageNet's archives must be in TFDS's manual dir). For the shift evaluation from TFDS's CIFAR-10-C, also
prepare ``cifar10_corrupted/<corruption>_<severity>`` for every corruption and severity used (19 × 5), or pass
``--config.eval.corrupted_dataset=''`` to corrupt the CIFAR-10 test split on the fly with
:mod:`fpbma.data.corruptions` (the same corruption suite). ``data_dir`` defaults to ``$FPBMA_DATA_DIR``.

Protocol: SWAG prior collected along SGD on ImageNet (``source_size`` random training images at 224 px,
BatchNorm in eval mode with the checkpoint's statistics; the source has the checkpoint's 1000 classes, so
its head is kept and fine-tuned for ``pretrain.steps``), then the "nl_ll" subset (BatchNorm +
new head) trained on 10 + 10 images per class, BMA with S = 30 on the whole test split and on every
corruption × severity. 32 px CIFAR images are resized to 224 px by the checkpoint's preprocessing
(centre 87.5 % crop, ImageNet mean/std).
"""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.workdir = "./workdir/cifar10_resnet18"
    c.data.source = "imagenet2012"
    c.data.source_size = 20000       # ImageNet training images used by the source stage (0: all)
    c.data.target = "cifar10"
    c.data.test_from_train = 0.0     # its test split is large enough
    c.data.image_size = 32           # storage size (CIFAR's own; ImageNet central squares resized to it)
    c.data.k_shot = 10

    c.model.name = "resnet18"
    c.model.pretrained = ""          # required: --config.model.pretrained=/path/to/resnet18.safetensors|.pth
    c.model.image_size = 224

    c.pretrain.steps = 200           # fine-tunes the checkpoint's ImageNet head (backbone fixed)
    c.pretrain.batch_size = 64
    c.pretrain.learning_rate = 0.01
    c.prior.steps = 1000
    c.prior.batch_size = 64
    c.prior.learning_rate = 0.001
    c.prior.collect_every = 100
    c.prior.rank = 10
    c.transfer.steps = 500
    c.transfer.batch_size = 50

    c.eval.num_samples = 30
    c.eval.batch_size = 256
    c.eval.corruptions = "all"
    c.eval.corruption_per_class = 0  # whole test split
    c.eval.corruption_num_samples = 30
    c.eval.corrupted_dataset = "cifar10_corrupted"  # TFDS CIFAR-10-C; '' corrupts on the fly
    return c
