"""Read PyTorch checkpoints without torch and without unpickling arbitrary objects.

`torch.save` writes a pickle whose tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
calls and whose storages are "persistent ids" pointing at raw bytes stored next to the pickle. We unpickle with an
allow-list: the few torch globals a state dict needs are mapped to small placeholders here, every other global is
refused (a pickle global can name any callable, e.g. `os.system`). After unpickling, each tensor placeholder is
replaced by a numpy array copied out of its storage bytes.

Two container formats exist:
- zip (torch >= 1.6): `<archive>/data.pkl`, `<archive>/data/<key>` (raw storage bytes), `<archive>/byteorder`.
- legacy (older torchvision files): five pickles/blobs in one stream: magic number, protocol version, sys info,
  the object, the sorted list of storage keys; then per key an 8-byte little-endian element count and the bytes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from zoo.weights.errors import CorruptCheckpointError, UnsafeCheckpointError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_NATIVE = "<" if sys.byteorder == "little" else ">"


def _bfloat16() -> np.dtype:
    import ml_dtypes  # a jax dependency; numpy has no bfloat16

    return np.dtype(ml_dtypes.bfloat16)


# Storage classes (as named in pickles) -> element dtype; dtype factories so ml_dtypes loads only when needed.
_STORAGE_DTYPES = {
    "FloatStorage": lambda: np.dtype(np.float32),
    "DoubleStorage": lambda: np.dtype(np.float64),
    "HalfStorage": lambda: np.dtype(np.float16),
    "BFloat16Storage": _bfloat16,
    "LongStorage": lambda: np.dtype(np.int64),
    "IntStorage": lambda: np.dtype(np.int32),
    "ShortStorage": lambda: np.dtype(np.int16),
    "CharStorage": lambda: np.dtype(np.int8),
    "ByteStorage": lambda: np.dtype(np.uint8),
    "BoolStorage": lambda: np.dtype(np.bool_),
    # Untyped storages hold bytes; tensors on them (`_rebuild_tensor_v3`) carry their own dtype.
    "UntypedStorage": lambda: np.dtype(np.uint8),
}

# torch dtype globals (`torch.float32`), which appear as the explicit dtype of `_rebuild_tensor_v3`.
_TORCH_DTYPES = {
    "float32": lambda: np.dtype(np.float32),
    "float64": lambda: np.dtype(np.float64),
    "float16": lambda: np.dtype(np.float16),
    "bfloat16": _bfloat16,
    "int64": lambda: np.dtype(np.int64),
    "int32": lambda: np.dtype(np.int32),
    "int16": lambda: np.dtype(np.int16),
    "int8": lambda: np.dtype(np.int8),
    "uint8": lambda: np.dtype(np.uint8),
    "uint16": lambda: np.dtype(np.uint16),
    "uint32": lambda: np.dtype(np.uint32),
    "uint64": lambda: np.dtype(np.uint64),
    "bool": lambda: np.dtype(np.bool_),
}


@dataclass(frozen=True)
class _StorageType:
    """Stands in for a torch storage class such as `torch.FloatStorage`."""

    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A persistent id resolved to the storage `key`; `offset`/`numel` (elements) select a legacy storage view."""

    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0


@dataclass(frozen=True)
class _TensorRef:
    """A tensor to build once storages are read: `dtype` elements at `offset`, with `shape` and `stride`."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    # Covers _rebuild_tensor and _rebuild_tensor_v2: (requires_grad, backward_hooks, metadata) are irrelevant here.
    return _make_tensor_ref(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *_ignored):
    return _make_tensor_ref(storage, storage_offset, size, stride, dtype)


def _make_tensor_ref(storage, offset, size, stride, dtype) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise CorruptCheckpointError(f"tensor storage is {type(storage).__name__}, not a storage reference")
    if dtype is not None and not isinstance(dtype, np.dtype):
        raise CorruptCheckpointError(f"tensor dtype is {dtype!r}, not a dtype")
    try:
        shape, strides = tuple(int(n) for n in size), tuple(int(s) for s in stride)
        offset = int(offset)
    except (TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"malformed tensor size/stride/offset: {e}") from None
    if len(shape) != len(strides):
        raise CorruptCheckpointError(f"tensor size {shape} and stride {strides} differ in rank")
    return _TensorRef(storage, offset, shape, strides, dtype if dtype is not None else storage.dtype)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, state=None):
    # nn.Parameter wraps a tensor; the wrapper (and any extra state) carries nothing we need.
    return data


def _torch_size(dims=()) -> tuple:
    return tuple(dims)


def _allowed_global(module: str, name: str) -> Any:
    """The stand-in for an allow-listed global, or None when it is not allowed."""
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "torch._utils":
        return {
            "_rebuild_tensor": _rebuild_tensor,
            "_rebuild_tensor_v2": _rebuild_tensor,
            "_rebuild_tensor_v3": _rebuild_tensor_v3,
            "_rebuild_parameter": _rebuild_parameter,
            "_rebuild_parameter_with_state": _rebuild_parameter,
        }.get(name)
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
        return _StorageType(_STORAGE_DTYPES[name]())
    if module == "torch" and name in _TORCH_DTYPES:
        return _TORCH_DTYPES[name]()
    if (module, name) == ("torch", "Size"):
        return _torch_size
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and turns storage persistent ids into `_StorageRef`s."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file)
        self._source = source
        self.storages: dict[str, _StorageRef] = {}  # root storages by key, in first-seen order

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(module, name)
        if found is None:
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to load global '{module}.{name}': the file is not a plain state dict "
                "and may be unsafe (unpickling would call what it names). If you trust it, convert it once with "
                "torch: `sd = torch.load(path, weights_only=False)`, pick its tensors, "
                "`safetensors.torch.save_file(sd, 'weights.safetensors')`, and load the .safetensors file."
            )
        return found

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or len(pid) < 5:
            raise CorruptCheckpointError(f"{self._source}: unexpected persistent id {pid!r}")
        kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise CorruptCheckpointError(f"{self._source}: unexpected persistent id {pid!r}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        root = self.storages.setdefault(key, _StorageRef(key, storage_type.dtype, int(numel)))
        if view is None:
            return root
        # Legacy files from old torch may hold views of a storage: (view_key, offset, size) in elements.
        _view_key, offset, size = view
        return _StorageRef(key, root.dtype, int(size), root.offset + int(offset))


def _materialize(obj: Any, storages: dict[str, memoryview], byteorder: str, source: str) -> Any:
    """Replace every `_TensorRef` inside `obj` (dicts, lists, tuples) by an owned numpy array."""
    seen: dict[int, Any] = {}

    def tensor(ref: _TensorRef) -> np.ndarray:
        buf = storages.get(ref.storage.key)
        if buf is None:
            raise CorruptCheckpointError(f"{source}: storage '{ref.storage.key}' is missing")
        dtype = ref.dtype
        # The tensor sees the storage (or legacy view) as elements of its own dtype, starting at `offset`.
        start = ref.storage.offset * ref.storage.dtype.itemsize
        stop = start + ref.storage.numel * ref.storage.dtype.itemsize
        if stop > len(buf):
            raise CorruptCheckpointError(
                f"{source}: storage '{ref.storage.key}' has {len(buf)} bytes, expected {stop}"
            )
        if min(ref.shape, default=1) < 0:
            raise CorruptCheckpointError(f"{source}: tensor has negative size {ref.shape}")
        if 0 in ref.shape:
            return np.empty(ref.shape, dtype=ref.dtype)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
        if ref.offset < 0 or min(ref.stride, default=0) < 0 or (last + 1) * dtype.itemsize > stop - start:
            raise CorruptCheckpointError(
                f"{source}: tensor of shape {ref.shape}, stride {ref.stride}, offset {ref.offset} "
                f"does not fit in storage '{ref.storage.key}' ({(stop - start) // dtype.itemsize} elements)"
            )
        flat = np.frombuffer(buf, dtype=dtype, count=last + 1, offset=start)
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset :], ref.shape, tuple(s * dtype.itemsize for s in ref.stride), writeable=False
        )
        out = np.array(view, copy=True, order="C")  # contiguous, owns its memory
        if byteorder != _NATIVE:
            out.byteswap(inplace=True)
        return out

    def walk(x: Any) -> Any:
        if isinstance(x, _TensorRef):
            return tensor(x)
        if id(x) in seen:
            return seen[id(x)]
        if isinstance(x, dict):
            seen[id(x)] = x
            for k in x:
                x[k] = walk(x[k])  # in place, so OrderedDict attributes (e.g. `_metadata`) survive
            return x
        if isinstance(x, list):
            seen[id(x)] = x
            x[:] = [walk(v) for v in x]
            return x
        if isinstance(x, tuple):
            out = tuple(walk(v) for v in x)
            seen[id(x)] = out
            return out
        return x

    return walk(obj)


def _read_zip(path: Path) -> Any:
    source = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise CorruptCheckpointError(f"{source}: zip archive has {len(pkl)} data.pkl entries, expected 1")
            prefix = pkl[0][: -len("data.pkl")]
            byteorder = "<"
            if prefix + "byteorder" in names:  # absent in files from torch < 1.10: those are little-endian
                byteorder = ">" if zf.read(prefix + "byteorder").strip() == b"big" else "<"
            unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), source)
            obj = _unpickle(unpickler, source)
            storages = {}
            for key in unpickler.storages:
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise CorruptCheckpointError(f"{source}: storage '{key}' is missing from the archive")
                storages[key] = memoryview(zf.read(name))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        # zipfile checks CRCs: corrupted bytes end up here.
        if isinstance(e, OSError) and not path.is_file():
            raise
        raise CorruptCheckpointError(f"{source}: corrupt zip checkpoint: {e}") from None
    return _materialize(obj, storages, byteorder, source)


def _unpickle(unpickler: _RestrictedUnpickler, source: str) -> Any:
    try:
        return unpickler.load()
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except Exception as e:  # pickle raises many types on bad bytes (EOFError, UnpicklingError, KeyError, ...)
        raise CorruptCheckpointError(f"{source}: malformed pickle ({type(e).__name__}: {e})") from None


def _read_legacy(f: BinaryIO, source: str) -> Any:
    def small_pickle() -> Any:
        return _unpickle(_RestrictedUnpickler(f, source), source)

    if small_pickle() != _LEGACY_MAGIC:
        raise CorruptCheckpointError(f"{source}: not a zip or legacy PyTorch checkpoint (wrong magic number)")
    if small_pickle() != _LEGACY_PROTOCOL:
        raise CorruptCheckpointError(f"{source}: unsupported legacy checkpoint protocol")
    small_pickle()  # sys info: endianness and C type sizes of the writer; storages are little-endian regardless
    unpickler = _RestrictedUnpickler(f, source)
    obj = _unpickle(unpickler, source)
    keys = small_pickle()
    if not isinstance(keys, list):
        raise CorruptCheckpointError(f"{source}: malformed storage key list")
    storages = {}
    for key in keys:
        key = key.decode() if isinstance(key, bytes) else str(key)
        ref = unpickler.storages.get(key)
        if ref is None:
            raise CorruptCheckpointError(f"{source}: storage '{key}' is listed but never used")
        header = f.read(8)
        if len(header) != 8:
            raise CorruptCheckpointError(f"{source}: file ends before storage '{key}' (truncated?)")
        # torch writes the element count and data little-endian whatever the machine.
        numel = int.from_bytes(header, "little")
        if numel != ref.numel:
            raise CorruptCheckpointError(f"{source}: storage '{key}' has {numel} elements, expected {ref.numel}")
        nbytes = numel * ref.dtype.itemsize
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise CorruptCheckpointError(
                f"{source}: storage '{key}' has {len(data)} bytes, expected {nbytes} (truncated?)"
            )
        storages[key] = memoryview(data)
    return _materialize(obj, storages, "<", source)


def read_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Unpickle a `torch.save` file (zip or legacy format) with tensors as numpy arrays, without torch.

    Only plain containers, `OrderedDict` and tensors/parameters are allowed; any other global raises
    `UnsafeCheckpointError` before anything is called. Truncated or malformed files raise `CorruptCheckpointError`.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
        if head == b"PK\x03\x04":
            if not zipfile.is_zipfile(f):
                raise CorruptCheckpointError(f"{path}: zip archive is truncated or corrupt (no central directory)")
            return _read_zip(path)
        if head[:1] != b"\x80":  # legacy files start with a (protocol >= 2) pickle of the magic number
            raise CorruptCheckpointError(f"{path}: not a zip or legacy PyTorch checkpoint")
        f.seek(0)
        return _read_legacy(f, str(path))


_WRAPPER_KEYS = ("state_dict", "model", "model_state", "state_dict_ema")  # in order of preference


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a flat `{name: array}` state dict from `.safetensors` or a torch checkpoint.

    Training checkpoints that nest the weights under `state_dict`/`model`/... are unwrapped, a `module.` prefix
    on every key (DataParallel) is removed, and non-array entries (python scalars, strings) are dropped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError on bad headers/lengths
            if isinstance(e, OSError) and not path.is_file():
                raise
            raise CorruptCheckpointError(f"{path}: unreadable safetensors file: {e}") from None
    else:
        obj = read_torch_checkpoint(path)
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    arrays = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not arrays:
        raise CorruptCheckpointError(f"{path}: no arrays found (top-level keys: {sorted(map(str, obj))[:10]})")
    if all(k.startswith("module.") for k in arrays):
        arrays = {k[len("module.") :]: v for k, v in arrays.items()}
    return arrays


def save_safetensors_atomic(
    tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write `tensors` to `path` as safetensors via a temp file and rename, so readers never see a partial file."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".part-")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
