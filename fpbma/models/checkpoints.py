"""Torch-free checkpoint loading for the Flax ResNets/ViTs, and orbax save/restore of our own trees.

Reading (no torch import, no ``pickle.load`` on user files):

* ``.safetensors`` — :func:`safetensors.numpy.load_file`;
* ``.pth``/``.pt``/``.bin`` — :func:`fpbma.models.torch_pickle.load_state_dict`, a restricted
  unpickler that only rebuilds tensors and ordered dicts;
* ``.npz`` — :func:`numpy.load` with ``allow_pickle=False``.

Converting: :func:`convert_torchvision_resnet`, :func:`convert_timm_vit` and
:func:`convert_big_vision_vit` rename a source state dict to our variable paths and re-lay tensors
out (torch conv ``(O, I, kh, kw)`` → Flax ``(kh, kw, I, O)``, torch Linear ``(out, in)`` → Flax
``(in, out)``, big_vision's per-head q/k/v kernels → one fused ``qkv``).

Assigning: :func:`assign_variables` fills a model's variable tree from the converted arrays and is
strict — every missing, unexpected or shape-mismatched entry is collected and reported in one
:class:`CheckpointMismatchError` — except for the paths listed in ``dont_load`` (the replaced
``head``, initialised to zero as big_vision's ``head_zeroinit`` and the paper's transfer scheme do)
and for ``pos_embed``, whose patch grid is resampled when the image size changed.

References:
  Lim et al. Flat Posterior Does Matter For Bayesian Model Averaging. arXiv 2406.15664, §4.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]

TORCH_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists every missing, unexpected and mis-shaped key."""


# ----------------------------------------------------------------------------------------- reading

def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a flat ``{name: array}`` dict from a ``.safetensors``, torch zip ``.pth`` or ``.npz``.

    Args:
      path: the checkpoint file; its suffix selects the reader.

    Returns:
      Dict from the file's tensor names to NumPy arrays.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    readers = (".safetensors", ".npz") + TORCH_PICKLE_SUFFIXES
    if suffix not in readers:
        raise ValueError(f"Cannot read checkpoint {path!r}: suffix {suffix!r} is not one of "
                         f"{readers}. Rename the file or convert it to .safetensors.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file {path!r} does not exist.")
    if suffix == ".safetensors":
        from safetensors.numpy import load_file
        return dict(load_file(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    from fpbma.models import torch_pickle  # restricted unpickler, never pickle.load
    return dict(torch_pickle.load_state_dict(path))


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


# -------------------------------------------------------------------------------------- converting

class Converted(dict):
    """``{flax path: array}`` plus the source key of each entry and the source keys left unused."""

    def __init__(self):
        super().__init__()
        self.source: dict[Path, str] = {}
        self.unused: list[str] = []

    def put(self, path: Path, value: np.ndarray, source: str):
        """Stores ``value`` (as float32) at the Flax ``path`` and remembers the checkpoint key it came from."""
        self[path] = _f32(value)
        self.source[path] = source


def _torch_leaf(collection_path: tuple[str, ...], leaf: str, value: np.ndarray, out: Converted,
                key: str) -> bool:
    """Maps one torch tensor (module path, leaf name) to its Flax path and layout."""
    mods = collection_path
    if leaf == "weight" and value.ndim == 4:
        out.put(("params", *mods, "kernel"), np.transpose(value, (2, 3, 1, 0)), key)
    elif leaf == "weight" and value.ndim == 2:
        out.put(("params", *mods, "kernel"), value.T, key)
    elif leaf == "weight" and value.ndim == 1:
        out.put(("params", *mods, "scale"), value, key)
    elif leaf == "bias":
        out.put(("params", *mods, "bias"), value, key)
    elif leaf == "running_mean":
        out.put(("batch_stats", *mods, "mean"), value, key)
    elif leaf == "running_var":
        out.put(("batch_stats", *mods, "var"), value, key)
    elif leaf == "num_batches_tracked":
        pass  # only used by torch when momentum=None; carries no model state.
    else:
        return False
    return True


def convert_torchvision_resnet(state_dict: Mapping[str, np.ndarray]) -> Converted:
    """torchvision ``ResNet`` state dict → :class:`fpbma.models.resnet.ResNet` variable paths.

    ``layer{i}.{j}.*`` → ``layer{i}_{j}/*``, ``downsample.0``/``downsample.1`` →
    ``downsample_conv``/``downsample_bn``, ``fc`` → ``head``; BatchNorm ``weight``/``bias`` →
    ``params/.../scale|bias`` and ``running_mean``/``running_var`` → ``batch_stats/.../mean|var``.
    """
    out = Converted()
    for key, value in state_dict.items():
        name = re.sub(r"^layer(\d+)\.(\d+)\.", r"layer\1_\2.", key)
        name = name.replace(".downsample.0.", ".downsample_conv.")
        name = name.replace(".downsample.1.", ".downsample_bn.")
        name = re.sub(r"^fc\.", "head.", name)
        *mods, leaf = name.split(".")
        if not mods or not _torch_leaf(tuple(mods), leaf, np.asarray(value), out, key):
            out.unused.append(key)
    return out


def convert_timm_vit(state_dict: Mapping[str, np.ndarray]) -> Converted:
    """timm ``VisionTransformer`` state dict → :class:`fpbma.models.vit.ViT` variable paths.

    ``blocks.{i}.*`` → ``blocks_{i}/*``, ``patch_embed.proj`` → ``patch_embed``; ``cls_token`` and
    ``pos_embed`` keep their names and shapes; LayerNorm ``weight`` → ``scale``.
    """
    out = Converted()
    for key, value in state_dict.items():
        value = np.asarray(value)
        if key in ("cls_token", "pos_embed"):
            out.put(("params", key), value, key)
            continue
        name = re.sub(r"^blocks\.(\d+)\.", r"blocks_\1.", key)
        name = re.sub(r"^patch_embed\.proj\.", "patch_embed.", name)
        *mods, leaf = name.split(".")
        if (not mods or leaf not in ("weight", "bias")
                or not _torch_leaf(tuple(mods), leaf, value, out, key)):
            out.unused.append(key)
    return out


_BV_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_BV_BLOCK_RENAME = {
    "LayerNorm_0": "norm1",
    "LayerNorm_2": "norm2",
    "MlpBlock_3/Dense_0": "mlp/fc1",
    "MlpBlock_3/Dense_1": "mlp/fc2",
    "MultiHeadDotProductAttention_1/out": "attn/proj",
}


def convert_big_vision_vit(arrays: Mapping[str, np.ndarray]) -> Converted:
    """Google ViT / big_vision ``.npz`` arrays → :class:`fpbma.models.vit.ViT` variable paths.

    Handles the published layout (``embedding``, ``cls``, ``Transformer/encoderblock_{i}/
    {LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,out}, LayerNorm_2,
    MlpBlock_3/Dense_{0,1}}``, ``Transformer/encoder_norm``, ``head``) with the position embedding
    either as ``Transformer/posembed_input/pos_embedding`` of shape (1, 1+N, D) (class-token entry
    first) or as big_vision's newer top-level ``pos_embedding`` of shape (1, N, D) that is added
    before the class token is prepended (its class-token entry is therefore zero). Per-head
    ``query/key/value`` kernels (D, H, d_h) and biases (H, d_h) are fused into ``qkv`` (D, 3D);
    ``out`` (H, d_h, D) becomes ``proj`` (D, D). An optional ``params/`` prefix is ignored.
    """
    out = Converted()
    arrays = {re.sub(r"^params/", "", k): np.asarray(v) for k, v in arrays.items()}
    qkv: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
    for key, value in arrays.items():
        if key in ("embedding/kernel", "embedding/bias"):
            out.put(("params", "patch_embed", key.split("/")[1]), value, key)
        elif key == "cls":
            out.put(("params", "cls_token"), value, key)
        elif key in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding",
                     "pos_embedding"):
            n = value.shape[1]
            if int(np.sqrt(n)) ** 2 == n:  # no class-token entry: posemb added before [cls].
                value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
            out.put(("params", "pos_embed"), value, key)
        elif key.startswith("Transformer/encoder_norm/"):
            out.put(("params", "norm", key.rsplit("/", 1)[1]), value, key)
        elif key in ("head/kernel", "head/bias"):
            out.put(("params", "head", key.split("/")[1]), value, key)
        elif m := _BV_BLOCK.match(key):
            block, rest = f"blocks_{m.group(1)}", m.group(2)
            module, leaf = rest.rsplit("/", 1)
            qm = re.fullmatch(r"MultiHeadDotProductAttention_1/(query|key|value)", module)
            if qm and leaf in ("kernel", "bias"):
                qkv.setdefault((block, leaf), {})[qm.group(1)] = (key, value)
            elif module in _BV_BLOCK_RENAME and leaf in ("kernel", "scale", "bias"):
                if module.endswith("/out"):
                    value = value.reshape(-1, value.shape[-1]) if leaf == "kernel" else value
                out.put(("params", block, *_BV_BLOCK_RENAME[module].split("/"), leaf), value, key)
            else:
                out.unused.append(key)
        else:
            out.unused.append(key)
    for (block, leaf), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            out.unused.extend(k for k, _ in parts.values())
            continue
        if leaf == "kernel":  # (D, H, d_h) → (D, H·d_h), then q|k|v along the output axis.
            fused = np.concatenate([parts[n][1].reshape(parts[n][1].shape[0], -1)
                                    for n in ("query", "key", "value")], axis=1)
        else:
            fused = np.concatenate([parts[n][1].reshape(-1) for n in ("query", "key", "value")])
        out.put(("params", block, "attn", "qkv", leaf), fused,
                "+".join(parts[n][0] for n in ("query", "key", "value")))
    return out


# --------------------------------------------------------------------------------------- assigning

def _fmt(path: Path) -> str:
    return "/".join(path)


def _matches(path: Path, prefixes: Iterable[Path]) -> bool:
    return any(path[: len(p)] == p or path[1: 1 + len(p)] == p for p in prefixes)


def assign_variables(shapes: Any, converted: Converted, *, dont_load: Iterable[str] = ()) -> dict:
    """Builds a variables dict shaped like ``shapes`` from converted checkpoint arrays.

    Strict: every model entry must be present with the right shape and every checkpoint entry must
    be used, except that (a) entries under a ``dont_load`` module (e.g. ``"head"``) are ignored in
    the checkpoint and initialised to zero, and (b) a ``pos_embed`` whose patch grid differs is
    resampled (:func:`fpbma.models.vit.resample_pos_embed`).

    Args:
      shapes: the model's variables or their ``jax.eval_shape``; ``{"params": ..., ...}``.
      converted: output of one of the ``convert_*`` functions.
      dont_load: top-level module names (``"/"``-separated paths inside a collection) to skip.

    Returns:
      A variables dict of ``jnp`` float32 arrays.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected and shape-mismatched key.
    """
    from fpbma.models.vit import resample_pos_embed

    skip = [tuple(d.split("/")) for d in dont_load]
    expected = traverse_util.flatten_dict(dict(shapes))
    missing, mismatched, result = [], [], {}
    for path, like in expected.items():
        if _matches(path, skip):
            result[path] = jnp.zeros(like.shape, like.dtype)
            continue
        if path not in converted:
            missing.append(_fmt(path))
            continue
        value = converted[path]
        if (path[-1] == "pos_embed" and value.ndim == 3 and len(like.shape) == 3
                and value.shape[2] == like.shape[2] and value.shape != tuple(like.shape)):
            grid = int(round(np.sqrt(like.shape[1] - 1)))
            try:
                value = np.asarray(resample_pos_embed(jnp.asarray(value), (grid, grid)))
            except ValueError:
                pass  # reported as a shape mismatch below
        if value.shape != tuple(like.shape):
            mismatched.append(f"{converted.source[path]} -> {_fmt(path)}: checkpoint "
                              f"{tuple(value.shape)} vs model {tuple(like.shape)}")
            continue
        result[path] = jnp.asarray(value, like.dtype)
    unexpected = sorted(converted.unused) + sorted(
        f"{converted.source[p]} (-> {_fmt(p)})" for p in converted
        if p not in expected and not _matches(p, skip))
    if missing or unexpected or mismatched:
        lines = ["Checkpoint does not match the model:"]
        for title, items in (("missing in checkpoint", missing), ("unexpected in checkpoint",
                             unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        lines.append("Pass num_classes to replace the head, or check that the checkpoint is for "
                     "this architecture.")
        raise CheckpointMismatchError("\n".join(lines))
    return traverse_util.unflatten_dict(result)


# ------------------------------------------------------------------------------ our own checkpoints

def save_checkpoint(path: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> str:
    """Saves a pytree (model variables, a posterior such as ``fpbma.DiagGaussian``) with orbax.

    Args:
      path: target directory; made absolute.
      tree: any pytree of arrays.
      overwrite: replace an existing non-empty ``path``; refused otherwise.

    Returns:
      The absolute path written.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise FileExistsError(f"Checkpoint target {path!r} exists and is not empty; pass "
                              "overwrite=True to replace it or choose another path.")
    tree = jax.tree_util.tree_map(jnp.asarray, tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=True)
        ckptr.wait_until_finished()
    return path


def restore_checkpoint(path: str | os.PathLike, like: Any = None) -> Any:
    """Restores a tree saved by :func:`save_checkpoint`.

    Args:
      path: the directory :func:`save_checkpoint` wrote.
      like: a tree (arrays or ``jax.ShapeDtypeStruct``) with the saved structure — e.g. an
        ``fpbma.DiagGaussian`` — to restore into that type; without it nested dicts/lists come back.

    Returns:
      The restored tree.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No checkpoint directory at {path!r}.")
    target = None if like is None else jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype)
        if not isinstance(x, jax.ShapeDtypeStruct) else x, like)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)
