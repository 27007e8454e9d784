"""The networks of the experiments: a compact CIFAR ResNet trained from scratch, or a pre-trained backbone.

:func:`build_model` gives ``(model, variables)`` for ``config.model``; a pre-trained model is wrapped in
:class:`WithPreprocessing` so that it is fed the pipeline's images with its own preprocessing.
:func:`eval_apply` is the eval-mode forward pass as one function object per model, so every BMA and
selection call on that model reuses one compilation.

>>> from experiments.configs import tiny
>>> model, variables = build_model(tiny.get_config(), num_classes=10, in_channels=1)
>>> "head" in variables["params"]
True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

import fpbma.models
from experiments.config_checks import model_image_size, pretrained_of
from fpbma.models import efficientnet
from fpbma.models.resnet import CifarResNet


@functools.lru_cache(maxsize=None)
def _cifar_resnet(num_blocks: int, num_classes: int, width: int, size: int, in_channels: int):
    # One model and one compiled init per architecture: setup_transfer builds three per call.
    model = CifarResNet(num_blocks, num_classes, width)
    return model, jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, in_channels)), train=False))


@dataclasses.dataclass(frozen=True)
class WithPreprocessing:
    """A pre-trained model fed the pipeline's images: ``apply(variables, x)`` = ``model.apply(variables, P(x))``.

    The pipeline stores uint8 images at ``config.data.image_size`` and feeds u/127.5 − 1 (:func:`normalise`);
    P recovers u = round((x + 1)·127.5) exactly, repeats a grey channel to RGB and applies the weights' own
    preprocessing at ``image_size``: :func:`fpbma.models.preprocess` (ResNet/ViT: centre crop, resize,
    ImageNet/Inception mean and std) or, for EfficientNet-Lite0, the TF resize with (x − 127)/128 and its
    eval crop fraction 224/256 kept at any size (``crop_padding`` = 32·size/224; the fixed padding of 32 px
    would crop a 64 px input to 2/3). Parameters keep the inner model's names (``head``, ``*bn*``).
    """

    model: Any
    name: str
    image_size: int

    def preprocess(self, x):
        u = jnp.clip(jnp.round((jnp.asarray(x, jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
        if u.shape[-1] == 1:
            u = jnp.repeat(u, 3, axis=-1)
        if fpbma.models.spec(self.name).family == "efficientnet":
            padding = int(round(efficientnet.CROP_PADDING * self.image_size / 224))
            return efficientnet.preprocess_efficientnet_lite0(u, self.image_size, crop_padding=padding)
        return fpbma.models.preprocess(self.name, u, image_size=self.image_size)

    def apply(self, variables, x, *args, **kwargs):
        return self.model.apply(variables, self.preprocess(x), *args, **kwargs)


def build_model(config, num_classes: int, in_channels: int):
    """``(model, variables)`` for ``config.model``: a compact CifarResNet, a name of fpbma.models, or, with
    ``config.model.pretrained``, that model's pre-trained weights (a new zero head when ``num_classes``
    differs from the checkpoint's) behind :class:`WithPreprocessing`."""
    key = jax.random.PRNGKey(int(config.seed))
    path = pretrained_of(config)
    if path:
        model, variables = fpbma.models.from_pretrained(config.model.name, None if path == "package" else path,
                                                        num_classes=int(num_classes),
                                                        image_size=model_image_size(config))
        return WithPreprocessing(model, config.model.name, model_image_size(config)), dict(variables)
    if config.model.name == "cifar_resnet":
        model, init = _cifar_resnet(int(config.model.num_blocks), int(num_classes), int(config.model.width),
                                    int(config.data.image_size), int(in_channels))
        return model, dict(init(key))
    return fpbma.models.create(config.model.name, num_classes, key=key)


@functools.lru_cache(maxsize=None)
def eval_apply(model) -> Partial:
    """``(variables, images) -> logits`` in eval mode, one function object per model (one compilation)."""
    return Partial(lambda variables, x: model.apply(variables, x, train=False))
