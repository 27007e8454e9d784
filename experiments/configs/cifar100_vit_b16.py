r"""The paper's CIFAR-100 10-shot transfer with an ImageNet ViT-B/16 (arXiv 2406.15664, §5).

    python -m experiments.transfer --config=experiments/configs/cifar100_vit_b16.py \
        --config.model.pretrained=/path/to/vit_b16.safetensors --config.data.data_dir=DIR

Not runnable offline here: it needs a checkpoint and prepared TFDS data, and `validate` stops with one
ConfigError naming whichever is missing, before any work.

Checkpoint: a timm ViT-B/16 state dict ``.safetensors``, e.g. with network
``huggingface-cli download timm/vit_base_patch16_224.augreg2_in21k_ft_in1k model.safetensors``, or a
Google/big_vision ``.npz`` (``gsutil cp gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz .``);
pass its path as ``--config.model.pretrained``.

Data (TFDS, array_record): ``pip install 'fpbma[prepare]'`` and, with network,
``python -c "import fpbma.data as d; d.prepare('cifar100', data_dir=DIR); d.prepare('imagenet2012', data_dir=DIR)"``
(ImageNet's archives must be in TFDS's manual dir). TFDS has no CIFAR-100-C, so the shift evaluation
corrupts the CIFAR-100 test split on the fly with :mod:`fpbma.data.corruptions` (the CIFAR-10-C suite).

Protocol: SWAG prior along SGD on ImageNet (``source_size`` random training images, the checkpoint's
1000-class head kept and fine-tuned for ``pretrain.steps``), then the "nl_ll" subset (LayerNorms + new head)
on 10 + 10 images per class and BMA with S = 30. 32 px images are resized to 224 px by the checkpoint's
preprocessing (centre 90 % crop, [−1, 1] inputs).
"""

from experiments.configs import cifar10_resnet18


def get_config():
    c = cifar10_resnet18.get_config()
    c.workdir = "./workdir/cifar100_vit_b16"
    c.data.target = "cifar100"
    c.data.test_from_train = 0.0     # its test split is large enough
    c.model.name = "vit_b16"
    c.model.pretrained = ""          # required: --config.model.pretrained=/path/to/vit_b16.safetensors|.npz
    c.eval.corrupted_dataset = ""    # corrupt on the fly (no CIFAR-100-C in TFDS)
    c.transfer.batch_size = 100
    return c
