"""Torch-free, restricted reader of PyTorch checkpoint files (``torch.save`` output).

A PyTorch checkpoint is a pickle.  Unpickling runs arbitrary code named by the file
(``GLOBAL os system`` + ``REDUCE`` is all it takes), so this module never calls
``pickle.load``/``torch.load`` on a user file.  Its unpickler resolves a short allow-list
of globals -- ``collections.OrderedDict``, the tensor/parameter rebuild functions of
``torch._utils``, the typed storage classes (``torch.FloatStorage`` ...) and torch dtypes --
to *local* stand-ins, and refuses every other global with :class:`UnsafeCheckpointError`
before anything is called.  Tensors come back as NumPy arrays.

A tensor is a strided view of a flat storage:

    tensor[i_0, ..., i_{n-1}] = storage[offset + sum_k i_k * stride_k]        (element units)

which is rebuilt with ``numpy.lib.stride_tricks.as_strided`` after checking that the
largest index, ``offset + sum_k (size_k - 1) * stride_k``, lies inside the storage, then copied
so every returned array owns contiguous memory (views sharing a storage stay independent).

Two on-disk layouts are read:

* **zip** (``torch.save`` default since 1.6): ``<root>/data.pkl`` holds the object with
  persistent ids ``('storage', StorageType, key, location, numel)``; the raw little- or
  big-endian bytes of storage ``key`` are in ``<root>/data/<key>`` (``<root>/byteorder``
  says which, little when absent).
* **legacy** (``_use_new_zipfile_serialization=False``): five consecutive pickles / blobs --
  magic number ``0x1950a86a20f9469cfc6c``, protocol version ``1001``, a ``sys_info`` dict
  (endianness), the object with persistent ids
  ``('storage', StorageType, key, location, numel, view_metadata)``, the list of storage keys,
  then for each key an int64 element count followed by the raw storage bytes.

This is the loader that lets FP-BMA (arXiv 2406.15664) start from pre-trained torchvision /
EfficientNet-Lite0 weights without importing torch.

>>> from fpbma.models.efficientnet import efficientnet_lite0_weights_path
>>> from fpbma.models.torch_pickle import load_state_dict
>>> state = load_state_dict(efficientnet_lite0_weights_path())   # a real legacy-format .pth, no torch
>>> state["_conv_stem.weight"].shape, state["_conv_stem.weight"].dtype.name
((32, 3, 3, 3), 'float32')
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

__all__ = [
    "UnsafeCheckpointError",
    "load_checkpoint",
    "load_state_dict",
    "flatten_state_dict",
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Typed storage class name -> element dtype (little-endian; byte order fixed up per file).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
    "UntypedStorage": np.dtype("u1"),
}

# torch dtype attribute name -> numpy dtype (used by _rebuild_tensor_v3, which stores the
# tensor dtype separately from an untyped byte storage).
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"),
    "double": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "half": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype("<i8"),
    "long": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "short": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
    "complex64": np.dtype("<c8"),
    "complex128": np.dtype("<c16"),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint references a global outside the tensor/OrderedDict allow-list."""


class _StandIn:
    """Base of the local stand-ins: the pickle may not set their attributes (BUILD)."""

    def __setstate__(self, state):
        raise UnsafeCheckpointError(
            f"checkpoint tries to set the state of a {type(self).__name__.strip('_')} (pickle "
            "BUILD opcode); torch.save never does this, the file is malformed or malicious"
        )


class _StorageType(_StandIn):
    """Stand-in for ``torch.<X>Storage``: only carries the element dtype."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __call__(self, *args, **kwargs):
        raise UnsafeCheckpointError(
            f"checkpoint tries to call torch.{self.name}(...) directly; only storages referenced "
            "by persistent id are supported"
        )


class _TorchDtype(_StandIn):
    """Stand-in for a ``torch.<dtype>`` object."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


class _Storage(_StandIn):
    """A flat storage whose bytes may be filled in after unpickling (legacy layout)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, int(numel)
        self.data: np.ndarray | None = None  # flat, native byte order, set by the reader


class _TensorRef(_StandIn):
    """A tensor described during unpickling and materialised once storages are read."""

    def __init__(self, storage, offset, size, stride, dtype=None):
        if not isinstance(storage, (_Storage, _StorageView)):
            raise UnsafeCheckpointError(
                f"tensor rebuild got a {type(storage).__name__} instead of a storage"
            )
        self.storage, self.offset = storage, int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)
        self.dtype = dtype  # None: the storage's dtype

    def materialise(self) -> np.ndarray:
        flat = self.storage.array()
        if self.dtype is not None and self.dtype != flat.dtype:
            # _rebuild_tensor_v3 over an untyped (uint8) storage: reinterpret the bytes.
            flat = flat.view(self.dtype)
        if len(self.size) != len(self.stride):
            raise pickle.UnpicklingError(
                f"tensor with size {self.size} has stride {self.stride} of another rank"
            )
        if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise pickle.UnpicklingError(
                f"negative size/stride/offset in tensor (size={self.size}, stride={self.stride}, "
                f"offset={self.offset})"
            )
        if 0 in self.size:
            return np.zeros(self.size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= flat.size:
            raise pickle.UnpicklingError(
                f"tensor (size={self.size}, stride={self.stride}, offset={self.offset}) reaches "
                f"element {last} of a storage with {flat.size} elements; the file is corrupt"
            )
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.array(view, copy=True, order="C")


class _StorageView(_StandIn):
    """Legacy storage view ``root[offset : offset + size]`` (pre-1.0 files)."""

    def __init__(self, root: _Storage, offset: int, size: int):
        self.root, self.offset, self.size = root, int(offset), int(size)

    def array(self) -> np.ndarray:
        flat = self.root.array()
        if self.offset < 0 or self.offset + self.size > flat.size:
            raise pickle.UnpicklingError(f"storage view out of bounds of storage {self.root.key}")
        return flat[self.offset:self.offset + self.size]


def _storage_array(self: _Storage) -> np.ndarray:
    if self.data is None:
        raise pickle.UnpicklingError(f"storage {self.key!r} has no data in the file")
    return self.data


_Storage.array = _storage_array  # type: ignore[attr-defined]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, *unused):
    if not isinstance(dtype, _TorchDtype):
        raise UnsafeCheckpointError(f"_rebuild_tensor_v3 got dtype {dtype!r}, not a torch dtype")
    return _TensorRef(storage, storage_offset, size, stride, dtype=dtype.dtype)


def _rebuild_parameter(data, *unused):
    if not isinstance(data, _TensorRef):
        raise UnsafeCheckpointError(f"_rebuild_parameter got {type(data).__name__}, not a tensor")
    return data


_ALLOWED_FUNCTIONS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only the allow-listed globals, to local stand-ins."""

    def __init__(self, file, storage_for_id):
        super().__init__(file)
        self._storage_for_id = storage_for_id

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_FUNCTIONS:
            return _ALLOWED_FUNCTIONS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(name, _TORCH_DTYPES[name])
        raise UnsafeCheckpointError(
            f"refused global {module}.{name}: this checkpoint reader only rebuilds tensors and "
            "(ordered) dicts. The file may execute code when loaded with torch.load/pickle; if you "
            "trust it, re-save its state_dict with torch.save(model.state_dict(), path)."
        )

    def persistent_load(self, pid):
        if self._storage_for_id is None:
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r} in a metadata pickle")
        return self._storage_for_id(pid)


def _restricted_load(file, storage_for_id=None):
    return _RestrictedUnpickler(file, storage_for_id).load()


def _check_storage_pid(pid, length: int):
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] == "storage"):
        raise UnsafeCheckpointError(
            f"unsupported persistent id {pid!r}; expected ('storage', StorageType, key, ...)"
        )
    storage_type = pid[1]
    if not isinstance(storage_type, _StorageType):
        raise UnsafeCheckpointError(f"persistent id names {storage_type!r}, not a torch storage type")
    return storage_type


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(
                f"{path} is a zip file but not a torch.save archive: expected one "
                f"'<root>/data.pkl', found {pickles or 'none'}"
            )
        root = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if root + "byteorder" in names:
            byteorder = archive.read(root + "byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def storage_for_id(pid):
            storage_type = _check_storage_pid(pid, 5)
            key = str(pid[2])
            if key not in storages:
                entry = f"{root}data/{key}"
                if entry not in names:
                    raise pickle.UnpicklingError(f"{path}: storage {entry!r} is missing")
                dtype = storage_type.dtype
                if byteorder == "big" and dtype.itemsize > 1:
                    dtype = dtype.newbyteorder(">")
                raw = archive.read(entry)
                if len(raw) % dtype.itemsize:
                    raise pickle.UnpicklingError(
                        f"{path}: storage {key!r} has {len(raw)} bytes, not a multiple of "
                        f"{dtype.itemsize}"
                    )
                storage = _Storage(key, storage_type.dtype, len(raw) // dtype.itemsize)
                storage.data = np.frombuffer(raw, dtype).astype(storage_type.dtype, copy=False)
                storages[key] = storage
            return storages[key]

        with archive.open(pickles[0]) as f:
            obj = _restricted_load(io.BytesIO(f.read()), storage_for_id)
    return obj


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        stream = io.BytesIO(f.read())
    try:
        magic = _restricted_load(stream)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # not a pickle at all
        raise ValueError(
            f"{path} is neither a torch.save zip archive nor a legacy torch pickle ({e})"
        ) from None
    if magic != _LEGACY_MAGIC:
        raise ValueError(
            f"{path} is not a torch checkpoint: legacy files start with magic number "
            f"{_LEGACY_MAGIC:#x}, got {magic!r} (very old tar-format files are not supported)"
        )
    protocol = _restricted_load(stream)
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy protocol version {protocol!r}")
    sys_info = _restricted_load(stream)
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

    storages: dict[str, _Storage] = {}

    def storage_for_id(pid):
        storage_type = _check_storage_pid(pid, 6)
        _, _, key, _location, numel, view_metadata = pid
        key = str(key)
        if key not in storages:
            storages[key] = _Storage(key, storage_type.dtype, int(numel))
        root = storages[key]
        if view_metadata is not None:
            _view_key, offset, size = view_metadata
            return _StorageView(root, offset, size)
        return root

    obj = _restricted_load(stream, storage_for_id)
    keys = _restricted_load(stream)
    if not isinstance(keys, list):
        raise pickle.UnpicklingError(f"{path}: storage key list is a {type(keys).__name__}")
    raw = stream.getbuffer()
    pos = stream.tell()
    for key in keys:
        key = str(key)
        if key not in storages:
            raise pickle.UnpicklingError(f"{path}: storage {key!r} is not referenced by any tensor")
        storage = storages[key]
        if pos + 8 > len(raw):
            raise pickle.UnpicklingError(f"{path}: truncated before storage {key!r}")
        numel = int(np.frombuffer(raw, "<i8" if little else ">i8", 1, pos)[0])
        pos += 8
        dtype = storage.dtype if little else storage.dtype.newbyteorder(">")
        nbytes = numel * dtype.itemsize
        if numel < 0 or pos + nbytes > len(raw):
            raise pickle.UnpicklingError(f"{path}: truncated storage {key!r} ({numel} elements)")
        storage.data = np.frombuffer(raw, dtype, numel, pos).astype(storage.dtype)
        storage.numel = numel
        pos += nbytes
    return obj


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        return obj.materialise()
    if isinstance(obj, Mapping):
        return {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    if isinstance(obj, (_Storage, _StorageView, _StorageType, _TorchDtype)):
        raise pickle.UnpicklingError(
            f"checkpoint holds a bare {type(obj).__name__.strip('_')} outside any tensor; "
            "only tensors are supported"
        )
    return obj


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Reads a ``torch.save`` file without torch, with tensors as NumPy arrays.

    Args:
      path: a file written by ``torch.save`` (zip archive or legacy pickle format).

    Returns:
      The saved object with the same nesting (dicts -- ``OrderedDict`` becomes ``dict`` --,
      lists, tuples, Python scalars/strings) and every tensor replaced by a C-contiguous
      ``np.ndarray`` of the tensor's dtype (``bfloat16`` via ``ml_dtypes``), bit-exact.

    Raises:
      FileNotFoundError: the path does not exist.
      UnsafeCheckpointError: the pickle references any global other than
        ``collections.OrderedDict``, ``torch._utils._rebuild_tensor*``/``_rebuild_parameter*``,
        a ``torch.<X>Storage`` type or a torch dtype. Nothing named by the file is executed.
      ValueError: the file is not a torch checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if zipfile.is_zipfile(path):
        obj = _load_zip(path)
    else:
        obj = _load_legacy(path)
    return _materialise(obj)


def flatten_state_dict(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Flattens nested dicts/lists of arrays into ``{"a.b.c": array}``; other leaves are dropped.

    Args:
      obj: output of :func:`load_checkpoint`.
      prefix: key path prepended to every key (joined with ``.``).

    Returns:
      A flat dict whose keys are the ``.``-joined path of dict keys / list indices to each array,
      e.g. ``{"state_dict": {"conv1.weight": w}, "epoch": 3}`` -> ``{"state_dict.conv1.weight": w}``.

    Raises:
      ValueError: two different paths flatten to the same key.
    """
    out: dict[str, np.ndarray] = {}

    def visit(node, path):
        if isinstance(node, np.ndarray):
            if path in out:
                raise ValueError(f"two entries of the checkpoint flatten to the same key {path!r}")
            out[path] = node
        elif isinstance(node, Mapping):
            for k, v in node.items():
                visit(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(v, f"{path}.{i}" if path else str(i))

    visit(obj, prefix)
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a PyTorch state dict as ``{name: np.ndarray}`` without torch and without code execution.

    A plain state dict keeps its keys (``"layer1.0.conv1.weight"``). A nested checkpoint such as
    ``{"state_dict": {...}, "epoch": 3}`` or ``{"model": {...}, "optimizer": {...}}`` is flattened
    with the key path joined by ``.`` (``"state_dict.layer1.0.conv1.weight"``); non-tensor leaves
    (epochs, strings, hyper-parameters) are dropped. Strip the prefix you need with
    ``{k.removeprefix("state_dict."): v ...}``.

    Args:
      path: a file written by ``torch.save`` (zip or legacy format).

    Returns:
      A flat dict of C-contiguous arrays, bit-exact copies of the saved tensors (views, offsets,
      transposes and shared storages resolved; each array owns its memory).

    Raises:
      UnsafeCheckpointError: the file references a global outside the tensor/OrderedDict
        allow-list (the message names it); nothing it names is run.
      FileNotFoundError / ValueError: missing file / not a torch checkpoint.
    """
    return flatten_state_dict(load_checkpoint(path))
