"""ResNets in Flax linen with torchvision's architecture and parameter layout.

Three families share one set of blocks:

* ``ResNet`` with the ImageNet stem (7×7/2 convolution, BatchNorm, ReLU, 3×3/2 max-pool) and four
  stages of ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50, stride on the 3×3
  convolution as in torchvision's "v1.5") — :func:`resnet18`, :func:`resnet34`, :func:`resnet50`;
* the same networks with a small-image stem (3×3/1 convolution, no max-pool) for 28–32 px inputs —
  ``stem="small"``;
* ``CifarResNet``: the compact CIFAR ResNet-6n+2 of He et al. (2016) §4.2 with widths 16/32/64,
  e.g. ResNet-20 (n = 3), which trains in minutes on two CPU cores.

Module names follow torchvision's state-dict keys (``conv1``, ``bn1``, ``layer2_0``,
``downsample_conv``/``downsample_bn``) so the checkpoint loader is a rename; the classifier is
``head`` and every normalisation layer has ``bn`` in its name, which is what
:func:`fpbma.models.partition.split` keys on for the "nl_ll" subset (docs page :doc:`/transfer`).

BatchNorm (:class:`BatchNorm`) reproduces ``torch.nn.BatchNorm2d`` exactly:

* ``train=False`` normalises with the stored running statistics ``batch_stats``;
* ``train=True`` normalises with the biased batch variance and updates the running statistics as
  ``r ← (1 − m)·r + m·s`` with torch's momentum ``m = 0.1``, where ``s`` is the batch mean and the
  *unbiased* batch variance (``n/(n−1)`` times the biased one, as torch does). Call it as
  ``logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])`` and carry
  ``updates["batch_stats"]`` forward; forgetting ``mutable`` raises flax's usual error.

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
  Lim et al. Flat Posterior Does Matter For Bayesian Model Averaging. arXiv 2406.15664.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` over the channel (last) axis of NHWC inputs.

    y = (x − μ) / sqrt(v + ε) · scale + bias, with (μ, v) the batch statistics in train mode and
    the running statistics otherwise. Running statistics follow torch:
    r_μ ← (1 − m) r_μ + m μ_B,  r_v ← (1 − m) r_v + m · n/(n − 1) · v_B.

    Attributes:
      momentum: torch's momentum m (weight of the new batch), 0.1 by default.
      epsilon: ε added to the variance, 1e-5 as in torch.
      axis_name: optional ``pmap``/``shard_map`` axis to average batch statistics over.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if train:
            axes = tuple(range(x.ndim - 1))
            n = x.size // features
            if self.axis_name is None:
                mean = jnp.mean(x, axes)
                var = jnp.mean(jnp.square(x - mean), axes)  # two-pass: no cancellation
            else:
                mean, mean_sq = jax.lax.pmean((jnp.mean(x, axes), jnp.mean(jnp.square(x), axes)),
                                              self.axis_name)
                var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
                n = n * jax.lax.psum(1, self.axis_name)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / jnp.maximum(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        return (x - mean) * inv + bias


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_conv_init,
                   name=name)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with an identity or 1×1-projection shortcut (torchvision BasicBlock)."""

    features: int
    stride: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = _conv(self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(BatchNorm(name="bn1")(y, train))
        y = _conv(self.features, 3, 1, "conv2")(y)
        y = BatchNorm(name="bn2")(y, train)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, "downsample_conv")(x)
            x = BatchNorm(name="downsample_bn")(x, train)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided) → 1×1 convolutions, 4× expansion (torchvision Bottleneck, "v1.5")."""

    features: int
    stride: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = self.features * self.expansion
        y = _conv(self.features, 1, 1, "conv1")(x)
        y = nn.relu(BatchNorm(name="bn1")(y, train))
        y = _conv(self.features, 3, self.stride, "conv2")(y)
        y = nn.relu(BatchNorm(name="bn2")(y, train))
        y = _conv(out, 1, 1, "conv3")(y)
        y = BatchNorm(name="bn3")(y, train)
        if self.stride != 1 or x.shape[-1] != out:
            x = _conv(out, 1, self.stride, "downsample_conv")(x)
            x = BatchNorm(name="downsample_bn")(x, train)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """torchvision ResNet: stem, four stages (base widths 64–512), global mean pool, ``head``.

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block: ``"basic"`` or ``"bottleneck"``.
      num_classes: outputs of the ``head`` Dense layer.
      stem: ``"imagenet"`` (7×7/2 conv + 3×3/2 max-pool) or ``"small"`` (3×3/1 conv, no pool).
    """

    stage_sizes: Sequence[int]
    block: str
    num_classes: int
    stem: str = "imagenet"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
        if self.stem == "imagenet":
            x = _conv(64, 7, 2, "conv1")(x)
            x = nn.relu(BatchNorm(name="bn1")(x, train))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        elif self.stem == "small":
            x = _conv(64, 3, 1, "conv1")(x)
            x = nn.relu(BatchNorm(name="bn1")(x, train))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {self.stem!r}.")
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = block_cls(64 * 2**i, stride, name=f"layer{i + 1}_{j}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): 3×3 stem of width w, stages of n BasicBlocks (w, 2w, 4w), ``head``.

    Shortcuts that change shape are 1×1 projections with BatchNorm (He et al. option B).

    Attributes:
      num_blocks: n, blocks per stage (3 → ResNet-20, 5 → ResNet-32, 9 → ResNet-56).
      num_classes: outputs of ``head``.
      width: w, channels of the first stage (16 in the paper).
    """

    num_blocks: int
    num_classes: int
    width: int = 16

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.width, 3, 1, "conv1")(x)
        x = nn.relu(BatchNorm(name="bn1")(x, train))
        for i in range(3):
            for j in range(self.num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = BasicBlock(self.width * 2**i, stride, name=f"layer{i + 1}_{j}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def resnet18(num_classes: int, stem: str = "imagenet") -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2)."""
    return ResNet((2, 2, 2, 2), "basic", num_classes, stem)


def resnet34(num_classes: int, stem: str = "imagenet") -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3)."""
    return ResNet((3, 4, 6, 3), "basic", num_classes, stem)


def resnet50(num_classes: int, stem: str = "imagenet") -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3)."""
    return ResNet((3, 4, 6, 3), "bottleneck", num_classes, stem)


def resnet20(num_classes: int, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-20 (3 BasicBlocks per stage, widths 16/32/64)."""
    return CifarResNet(3, num_classes, width)
