"""Batching iterator over a random-access source: shuffle, augment, normalise, pad, shard.

Training (``train=True``): the order is a permutation drawn from ``(seed, epoch)``, incomplete final
batches are dropped, images get a random crop after zero padding and, where the dataset allows it, a
random horizontal flip. Evaluation (``train=False``): sources are read in order, the last batch is padded
with copies of the first example and ``mask`` marks real examples, so every example is seen exactly once.

Every batch is ``{"image": float32 (..., H, W, C), "label": int32, "mask": bool, "index": int32}`` where
``index`` is each example's position in the source (padding repeats a real position, masked out). With ``layout="stack"``
arrays get a leading device axis ``(num_devices, batch_size // num_devices, ...)`` (for ``jax.pmap`` /
``shard_map``); with ``layout="sharded"`` they are global ``jax.Array`` s split along the batch over a
1-D mesh ``("data",)``; with ``layout="flat"`` they stay ``(batch_size, ...)`` NumPy arrays.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

LAYOUTS = ("stack", "sharded", "flat")


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(size):
        return image
    from PIL import Image

    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
    return out[..., None] if squeeze else out


def _random_crop(image: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    return padded[top:top + h, left:left + w]


def num_batches(num_examples: int, batch_size: int, train: bool) -> int:
    """Batches per epoch: ⌊n / b⌋ for training (drop remainder), ⌈n / b⌉ for evaluation."""
    return num_examples // batch_size if train else -(-num_examples // batch_size)


def _devices(num_devices):
    import jax

    if num_devices is None:
        return jax.local_devices()
    if isinstance(num_devices, int):
        devices = jax.local_devices()
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} local devices are available.")
        return devices[:num_devices]
    return list(num_devices)


def batches(source, batch_size: int, *, train: bool, seed: int = 0, num_epochs: int | None = 1,
            num_devices: int | Sequence | None = None, layout: str = "stack",
            image_size: tuple[int, int] | None = None, mean: Sequence[float] | float = 0.0,
            std: Sequence[float] | float = 1.0, crop_padding: int = 4,
            horizontal_flip: bool | None = None, augment: bool | None = None) -> Iterator[dict]:
    """Iterates over batches of ``source`` (see the module docstring for the layout).

    Pixels become ``(x / 255 − mean) / std`` per channel, after an optional bilinear resize to
    ``image_size``.

    Args:
      source: a ``Source`` (``len``, ``get_batch`` or ``__getitem__``, ``info``).
      batch_size: global batch size (all devices together).
      train: shuffle, drop the remainder and augment (True) or cover every example once (False).
      seed: shuffling and augmentation seed; epoch e uses ``np.random.default_rng([seed, e])``.
      num_epochs: epochs to iterate over in training (None: forever); evaluation always makes one pass.
      num_devices: an int, a list of devices, or None for all local devices.
      layout: ``"stack"``, ``"sharded"`` or ``"flat"``.
      image_size: (H, W) to resize every image to; needed when image sizes vary.
      mean, std: per-channel normalisation on the [0, 1] scale.
      crop_padding: zero padding before the random crop in training (0 disables cropping).
      horizontal_flip: random mirror in training; default ``source.info.horizontal_flip`` (False for digits).
      augment: apply crop/flip; default ``train``.

    Yields:
      ``{"image": float32, "label": int32, "mask": bool, "index": int32}`` batches.

    Raises:
      ValueError: in training when ``batch_size`` is not divisible by the number of devices (evaluation
        rounds the padded batch up to a multiple instead), or for an unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    devices = _devices(num_devices) if layout != "flat" else [None]
    n_dev = len(devices)
    if batch_size % n_dev:
        if train:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by the {n_dev} devices; use a multiple of {n_dev} "
                f"(e.g. {batch_size - batch_size % n_dev or n_dev}) or pass num_devices=."
            )
    padded_size = -(-batch_size // n_dev) * n_dev  # evaluation pads up to a multiple of the devices
    n = len(source)
    if train and n < batch_size:
        raise ValueError(f"Training needs at least one full batch: {n} examples < batch_size={batch_size}.")
    meta = getattr(source, "info", None)
    if horizontal_flip is None:
        horizontal_flip = bool(getattr(meta, "horizontal_flip", False))
    augment = train if augment is None else augment
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if np.any(std <= 0):
        raise ValueError(f"std must be positive, got {std}.")

    sharding = None
    if layout == "sharded":
        import jax

        mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def fetch(positions):
        if hasattr(source, "get_batch"):
            return source.get_batch(positions)
        return [source[int(p)] for p in positions]

    def make(positions, real, rng):
        examples = fetch(positions)
        images = []
        for ex in examples:
            img = np.asarray(ex["image"])
            if img.ndim == 2:
                img = img[..., None]
            if image_size is not None:
                img = _resize(img, image_size)
            if augment:
                if crop_padding:
                    img = _random_crop(img, crop_padding, rng)
                if horizontal_flip and rng.random() < 0.5:
                    img = img[:, ::-1]
            images.append(img)
        try:
            image = np.stack(images).astype(np.float32)
        except ValueError as e:
            raise ValueError("Images of different sizes in one batch: pass image_size=(H, W).") from e
        image = (image / 255.0 - mean) / std
        batch = {"image": image.astype(np.float32),
                 "label": np.asarray([ex["label"] for ex in examples], np.int32),
                 "mask": real,
                 "index": np.asarray(positions, np.int32)}
        if layout == "stack":
            return {k: v.reshape((n_dev, v.shape[0] // n_dev) + v.shape[1:]) for k, v in batch.items()}
        if layout == "sharded":
            import jax

            return {k: jax.device_put(v, sharding) for k, v in batch.items()}
        return batch

    if train:
        epoch = 0
        while num_epochs is None or epoch < num_epochs:
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(n)
            for b in range(n // batch_size):
                positions = order[b * batch_size:(b + 1) * batch_size]
                yield make(positions, np.ones(batch_size, bool), rng)
            epoch += 1
        return
    rng = np.random.default_rng([seed, 0])
    for start in range(0, n, batch_size):
        positions = np.arange(start, min(start + batch_size, n))
        real = np.zeros(padded_size, bool)
        real[:positions.size] = True
        positions = np.concatenate([positions, np.full(padded_size - positions.size, positions[0])])
        yield make(positions, real, rng)
