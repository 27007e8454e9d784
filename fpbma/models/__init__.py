"""Backbones for Bayesian transfer learning: Flax ResNets, ViTs and EfficientNet-Lite0.

Entry points (README "Models and pre-trained checkpoints")::

    model, variables = fpbma.models.create("resnet20", 10, key=key)
    model, variables = fpbma.models.from_pretrained("resnet50", "r50.safetensors", num_classes=10)
    images = fpbma.models.preprocess("resnet50", uint8_images)        # NHWC uint8 → float32
    logits = model.apply(variables, images, train=False)
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

``variables`` is ``{"params": ..., "batch_stats": ...}`` for BatchNorm networks and
``{"params": ...}`` for ViTs. In every model the classifier is the module ``head`` and normalisation layers carry
``bn``/``norm`` in their names; :func:`fpbma.models.partition.split` returns the paper's "nl_ll"
Bayesian subset (normalisation scales/biases + head) and the frozen rest.

Names: ``resnet18``, ``resnet34``, ``resnet50`` (ImageNet stem, 224 px), ``resnet18_small``,
``resnet34_small``, ``resnet50_small`` (3×3 stem without max-pool, 32 px), ``resnet20`` (CIFAR
ResNet-20, width 16, 32 px), ``vit_ti16``, ``vit_s16``, ``vit_b16`` (224 px), and
``efficientnet_lite0`` when :mod:`fpbma.models.efficientnet` is present.

References:
  Lim et al. Flat Posterior Does Matter For Bayesian Model Averaging. arXiv 2406.15664.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fpbma.models import checkpoints, partition, resnet, vit
from fpbma.models.checkpoints import (
    CheckpointMismatchError,
    restore_checkpoint,
    save_checkpoint,
)
from fpbma.models.partition import merge, split
from fpbma.models.resnet import BatchNorm, CifarResNet, ResNet
from fpbma.models.vit import ViT, resample_pos_embed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build, load and feed one named model.

    Attributes:
      build: ``(num_classes, image_size) -> flax module``.
      family: checkpoint family, ``"resnet"``, ``"vit"`` or ``"efficientnet"``.
      image_size: default input side.
      mean: per-channel mean of the [0, 1] pixels the weights expect (subtracted).
      std: per-channel standard deviation of those pixels (divided by).
      crop_fraction: centre-crop fraction before resizing to ``image_size`` (None: plain resize,
        skipped when the input already has that size).
    """

    build: Callable[[int, int], Any]
    family: str
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_fraction: float | None = 0.875


def _resnet_spec(fn, stem):
    size = 224 if stem == "imagenet" else 32
    return ModelSpec(lambda nc, _: fn(nc, stem=stem), "resnet", size,
                     crop_fraction=0.875 if stem == "imagenet" else None)


def _vit_spec(variant):
    return ModelSpec(lambda nc, size: vit.vit(variant, nc, 16, size), "vit", 224,
                     INCEPTION_MEAN, INCEPTION_STD, 0.9)


def _efficientnet_spec():
    try:
        from fpbma.models import efficientnet  # provided separately; optional at import time
    except ImportError as e:
        raise ValueError("efficientnet_lite0 needs fpbma/models/efficientnet.py, which is not "
                         f"installed in this checkout ({e}).") from e
    # Normalisation and crop are delegated to efficientnet.preprocess_efficientnet_lite0.
    return ModelSpec(lambda nc, _: efficientnet.EfficientNetLite0(num_classes=nc), "efficientnet",
                     224, crop_fraction=224 / (224 + efficientnet.CROP_PADDING))


_SPECS: dict[str, ModelSpec] = {
    "resnet18": _resnet_spec(resnet.resnet18, "imagenet"),
    "resnet34": _resnet_spec(resnet.resnet34, "imagenet"),
    "resnet50": _resnet_spec(resnet.resnet50, "imagenet"),
    "resnet18_small": _resnet_spec(resnet.resnet18, "small"),
    "resnet34_small": _resnet_spec(resnet.resnet34, "small"),
    "resnet50_small": _resnet_spec(resnet.resnet50, "small"),
    "resnet20": ModelSpec(lambda nc, _: resnet.resnet20(nc), "resnet", 32, crop_fraction=None),
    "vit_ti16": _vit_spec("ti"),
    "vit_s16": _vit_spec("s"),
    "vit_b16": _vit_spec("b"),
}
_LAZY_SPECS: dict[str, Callable[[], ModelSpec]] = {"efficientnet_lite0": _efficientnet_spec}

MODEL_NAMES = tuple(_SPECS) + tuple(_LAZY_SPECS)


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered model name."""
    if name in _SPECS:
        return _SPECS[name]
    if name in _LAZY_SPECS:
        return _LAZY_SPECS[name]()
    raise ValueError(f"Unknown model {name!r}; choose one of {MODEL_NAMES}.")


def _check_classes(num_classes):
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")


def _dummy(size: int) -> jax.Array:
    return jnp.zeros((1, size, size, 3), jnp.float32)


def create(name: str, num_classes: int, *, key: jax.Array, image_size: int | None = None):
    """Builds a named model with randomly initialised variables.

    Args:
      name: one of :data:`MODEL_NAMES`.
      num_classes: outputs of ``head``.
      key: PRNG key for the initialisation.
      image_size: input side used for initialisation (ViT: the size ``pos_embed`` is made for);
        defaults to the model's native size.

    Returns:
      ``(model, variables)`` with ``logits = model.apply(variables, images, train=False)``.
    """
    s = spec(name)
    _check_classes(num_classes)
    size = image_size or s.image_size
    model, init = _compiled_init(name, int(num_classes), size)
    return model, dict(init(key))


@functools.lru_cache(maxsize=32)
def _compiled_init(name: str, num_classes: int, size: int):
    # One compiled init per configuration: ensembles / repeated seeds re-use it.
    model = spec(name).build(num_classes, size)
    return model, jax.jit(lambda key: model.init(key, _dummy(size), train=False))


def from_pretrained(name: str, path: str | os.PathLike, num_classes: int | None = None, *,
                    image_size: int | None = None):
    """Builds a named model and loads pre-trained weights from a file, torch-free.

    ResNets read torchvision state dicts (``.safetensors`` or zip ``.pth``); ViTs read timm
    state dicts (``.safetensors``/``.pth``) or Google/big_vision ``.npz``; ``efficientnet_lite0``
    reads its package's weight file through :mod:`fpbma.models.efficientnet`. See
    :func:`load_pretrained` for head replacement, strictness and position-embedding resampling.

    Args:
      name: one of :data:`MODEL_NAMES`.
      path: checkpoint file (``efficientnet_lite0``: None finds the installed weights package).
      num_classes: classes of the new head; None keeps the checkpoint's head.
      image_size: ViT input side (default: the checkpoint's); ignored by convolutional models.

    Returns:
      ``(model, variables)``.
    """
    s = spec(name)
    if num_classes is not None:
        _check_classes(num_classes)
    if s.family == "efficientnet":
        return _load_efficientnet(path, num_classes)
    if path is None:
        raise ValueError(f"from_pretrained({name!r}, ...) needs a checkpoint path.")
    model = s.build(1000 if num_classes is None else int(num_classes), image_size or s.image_size)
    return load_pretrained(model, path, num_classes, image_size=image_size)


def _load_efficientnet(path, num_classes):
    from fpbma.models import efficientnet
    if path is not None and not os.path.isfile(os.fspath(path)):
        raise FileNotFoundError(f"Checkpoint file {os.fspath(path)!r} does not exist.")
    # The loader replaces a head of another size with a zero-initialised one, strict otherwise.
    variables = efficientnet.load_efficientnet_lite0(path, num_classes)
    model = efficientnet.EfficientNetLite0(
        num_classes=efficientnet.IMAGENET_NUM_CLASSES if num_classes is None else num_classes)
    return model, dict(variables)


def load_pretrained(model, path: str | os.PathLike, num_classes: int | None = None, *,
                    image_size: int | None = None):
    """Loads a checkpoint file into a ResNet/CifarResNet/ViT module of any configuration.

    When ``num_classes`` differs from the checkpoint's head, the head is replaced by a
    zero-initialised one (``dont_load=("head",)``, the paper's transfer initialisation: head mean
    0); otherwise loading is strict: every missing, unexpected or mis-shaped key is listed in one
    :class:`CheckpointMismatchError`. For a ViT whose ``image_size`` (default: the checkpoint's
    grid × patch size) differs from the checkpoint's, position embeddings are resampled bilinearly.

    Args:
      model: a :class:`ResNet`, :class:`CifarResNet` or :class:`ViT`; its ``num_classes`` and
        ``image_size`` are replaced by the ones resolved here.
      path: ``.safetensors``/``.pth`` (torchvision or timm keys) or ``.npz`` (big_vision ViT).
      num_classes: classes of the head; None keeps the checkpoint's.
      image_size: ViT input side.

    Returns:
      ``(model, variables)``.
    """
    if num_classes is not None:
        _check_classes(num_classes)
    path = os.fspath(path)
    is_npz = path.lower().endswith(".npz")
    if isinstance(model, (ResNet, CifarResNet)):
        if is_npz:
            raise ValueError(f"ResNets load torchvision state dicts (.safetensors/.pth), not .npz: "
                             f"{path!r}.")
        family = "resnet"
    elif isinstance(model, ViT):
        family = "vit"
    else:
        raise TypeError(f"load_pretrained supports ResNet, CifarResNet and ViT modules, got "
                        f"{type(model).__name__}; use from_pretrained for other names.")
    tensors = checkpoints.read_tensors(path)
    if family == "resnet":
        converted = checkpoints.convert_torchvision_resnet(tensors)
    elif is_npz:
        converted = checkpoints.convert_big_vision_vit(tensors)
    else:
        converted = checkpoints.convert_timm_vit(tensors)
    size = image_size
    if family == "vit" and size is None:
        size = model.image_size
        if ("params", "pos_embed") in converted:
            grid = int(round(np.sqrt(converted[("params", "pos_embed")].shape[1] - 1)))
            size = grid * model.patch_size

    def build(nc, sz):
        return model.clone(num_classes=nc, image_size=sz) if family == "vit" else \
            model.clone(num_classes=nc)

    return _assign(build, family, converted, num_classes, size or 224)


def _assign(build, family, converted, num_classes, size):
    head_bias = converted.get(("params", "head", "bias"))
    ckpt_classes = None if head_bias is None else int(head_bias.shape[0])
    if num_classes is None:
        if ckpt_classes is None:
            raise ValueError("The checkpoint has no 'head'; pass num_classes.")
        num_classes = ckpt_classes
    model = build(int(num_classes), size)
    # Convolutional nets are size-agnostic; a small dummy keeps eval_shape cheap.
    dummy = _dummy(size if family == "vit" else 32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, train=False))
    dont_load = ("head",) if ckpt_classes != num_classes else ()
    variables = checkpoints.assign_variables(shapes, converted, dont_load=dont_load)
    return model, variables


def preprocess(name: str, uint8_images, *, image_size: int | None = None) -> jax.Array:
    """Turns uint8 RGB images into the float32 NHWC input a named model's weights expect.

    x = (resize(centre_crop(u / 255)) − mean) / std per channel. ImageNet-stem ResNets crop the
    central 87.5 % and resize to 224 px; ViTs crop 90 % and normalise to [−1, 1]; small-input
    models (``*_small``, ``resnet20``) keep the input size unless ``image_size`` asks for another
    (plain resize); EfficientNet-Lite0 uses its TF preprocessing
    (:func:`fpbma.models.efficientnet.preprocess_efficientnet_lite0`).

    Args:
      name: one of :data:`MODEL_NAMES`.
      uint8_images: ``(H, W, 3)`` or ``(N, H, W, 3)`` uint8 array.
      image_size: output side; default the model's native size (small models: unchanged).

    Returns:
      float32 array ``(N, S, S, 3)`` (or ``(S, S, 3)`` for a single image).
    """
    s = spec(name)
    if s.family == "efficientnet":
        from fpbma.models import efficientnet
        return efficientnet.preprocess_efficientnet_lite0(uint8_images, size=image_size or 224)
    x = np.asarray(uint8_images) if not isinstance(uint8_images, jax.Array) else uint8_images
    if x.dtype != np.uint8:
        raise ValueError(f"preprocess expects uint8 images in [0, 255], got dtype {x.dtype}; "
                         "convert with np.asarray(img, np.uint8) (floats are ambiguous in range).")
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"preprocess expects (H, W, 3) or (N, H, W, 3) RGB images, got shape "
                         f"{x.shape}.")
    single = x.ndim == 3
    x = jnp.asarray(x, jnp.float32)[None] if single else jnp.asarray(x, jnp.float32)
    x = x / 255.0
    h, w = x.shape[1:3]
    if s.crop_fraction is None:
        size = image_size
        if size is not None and (h, w) != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=True)
    else:
        size = image_size or s.image_size
        side = min(h, w) * s.crop_fraction
        crop = max(1, int(round(side)))
        top, left = (h - crop) // 2, (w - crop) // 2
        x = x[:, top:top + crop, left:left + crop]
        if crop != size:
            x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=True)
    x = (x - jnp.asarray(s.mean, jnp.float32)) / jnp.asarray(s.std, jnp.float32)
    return x[0] if single else x


__all__ = [
    "BatchNorm", "CheckpointMismatchError", "CifarResNet", "MODEL_NAMES", "ModelSpec", "ResNet",
    "ViT", "checkpoints", "create", "from_pretrained", "load_pretrained", "merge", "partition",
    "preprocess",
    "resample_pos_embed", "resnet", "restore_checkpoint", "save_checkpoint", "spec", "split", "vit",
]
