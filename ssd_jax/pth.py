"""PyTorch `.pth` files read without PyTorch: their tensors come back as NumPy arrays.

`torch.save` writes one of two layouts (torch/serialization.py):

- zip (PyTorch >= 1.6): `<archive>/data.pkl`, a pickle of the object, whose storages are
  persistent ids ("storage", <dtype class>, key, location, numel) naming the raw little-endian
  bytes in `<archive>/data/<key>`;
- legacy (older files, e.g. 2017-2020 checkpoints): on one stream, the pickles of a magic
  number, a protocol version and system info, then the object's pickle (persistent ids
  ("storage", <dtype class>, key, location, numel, view)), then the pickle of the sorted
  storage keys, then each storage as an int64 element count and its bytes.

A tensor is pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
(`_rebuild_tensor` in old files). The unpickler here is restricted: it builds only tensors,
dicts, lists, tuples and plain values, and stands in an inert placeholder for every other
class a file names (optimizer or logger objects in training checkpoints), so reading a file
never runs code from it.

`write_pth` writes the zip layout (or the legacy one) for a dict of arrays, for tests and to
hand weights to PyTorch.
"""
import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
DTYPE_STORAGES = {np.dtype(dtype): name for name, dtype in STORAGE_DTYPES.items()
                  if name != "UntypedStorage"}


class _StorageType:
    """What a file's `torch.FloatStorage` (etc.) global becomes: its element dtype."""

    def __init__(self, name: str):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
    """One storage's elements, filled when its bytes are read (at the end, in legacy files)."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype, self.numel, self.array = dtype, numel, None

    def fill(self, data: bytes) -> None:
        if len(data) != self.numel * self.dtype.itemsize:
            raise ValueError(f"a storage of {self.numel} {self.dtype} elements holds "
                             f"{len(data)} bytes: the file is truncated or corrupt")
        self.array = np.frombuffer(data, self.dtype.newbyteorder("<")).astype(self.dtype)


class _Tensor:
    """A tensor view of a storage, made into an array once every storage is read."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_array(self) -> np.ndarray:
        flat = self.storage.array
        needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
        if 0 not in self.size and needed > len(flat):
            raise ValueError(f"a tensor of shape {self.size} reads past its storage's "
                             f"{len(flat)} elements: the file is corrupt")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], self.size, [s * flat.itemsize for s in self.stride])
        return np.array(view)  # a copy: contiguous, and not tied to the file's bytes


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


class _Placeholder:
    """Stands in for a class the file names that is not needed for its tensors."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{self.qualname} (not read)>"


_ALLOWED = {
    # A state dict is an OrderedDict with a _metadata attribute, which a plain dict refuses.
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        return type(name, (_Placeholder,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise ValueError(f"unsupported persistent id {pid!r} (only tensor storages are)")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"unknown storage type {storage_type!r}")
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def _arrays(value):
    """`value` with every tensor made an array (containers rebuilt, other values kept)."""
    if isinstance(value, _Tensor):
        return value.to_array()
    if isinstance(value, dict):
        return {key: _arrays(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_arrays(item) for item in value)
    return value


def read_pth(path):
    """The object a `.pth` file holds (typically a state dict, or a dict around one), its
    tensors as NumPy arrays. Raises ValueError for a file in neither of torch.save's layouts."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _arrays(_read_zip(path))
        with path.open("rb") as f:
            return _arrays(_read_legacy(f, path))
    except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a PyTorch file this reader understands: "
                         f"{type(error).__name__}: {error}") from None


def _read_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip file but not a torch.save archive "
                             "(no single data.pkl in it)")
        prefix = pickles[0][:-len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise ValueError(f"{path} stores big-endian tensors, which this reader does not read")
        storages = {}

        def load_storage(key, dtype, numel):
            if key not in storages:
                storages[key] = _Storage(dtype, numel)
                storages[key].fill(archive.read(f"{prefix}data/{key}"))
            return storages[key]

        return _Unpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


def _read_legacy(f, path: Path):
    def no_storage(*_):
        raise ValueError(f"{path}: a storage in the legacy header")

    # Magic number, protocol, system info: read as restrictedly as the rest.
    header = [_Unpickler(f, no_storage).load() for _ in range(3)]
    if header[0] != LEGACY_MAGIC:
        raise ValueError(f"{path} is neither a zip archive nor a legacy torch.save file "
                         "(wrong magic number)")
    if header[1] != LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy protocol version {header[1]}")
    storages = {}

    def load_storage(key, dtype, numel):
        return storages.setdefault(key, _Storage(dtype, numel))

    value = _Unpickler(f, load_storage).load()
    for key in _Unpickler(f, no_storage).load():
        (numel,) = struct.unpack("<q", f.read(8))
        storage = storages[str(key)]
        storage.fill(f.read(numel * storage.dtype.itemsize))
    return value


class _Global:
    """A global (module, name) the writer names without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable; this is never called
        raise TypeError(f"{self.module}.{self.name} is only named in a written file")


class _StorageRef:
    """The writer's persistent id of its storage number `index`."""

    def __init__(self, index: int):
        self.index = index


class _Pickler(pickle._Pickler):  # the Python pickler: its dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, storages: list, legacy: bool):
        super().__init__(file, protocol=2)
        self.storages, self.legacy = storages, legacy

    def save_named_global(self, value: _Global):
        self.write(pickle.GLOBAL + f"{value.module}\n{value.name}\n".encode())
        self.memoize(value)

    dispatch[_Global] = save_named_global

    def reducer_override(self, value):
        if isinstance(value, np.ndarray):
            self.storages.append(np.ascontiguousarray(value))
            storage = _StorageRef(len(self.storages) - 1)
            return (_Global("torch._utils", "_rebuild_tensor_v2"),
                    (storage, 0, value.shape, _strides(value.shape), False, _EmptyHooks()))
        return NotImplemented

    def persistent_id(self, value):
        if not isinstance(value, _StorageRef):
            return None
        array = self.storages[value.index]
        if array.dtype not in DTYPE_STORAGES:
            raise ValueError(f"write_pth cannot store dtype {array.dtype}")
        pid = ("storage", _Global("torch", DTYPE_STORAGES[array.dtype]), str(value.index),
               "cpu", array.size)
        return pid + (None,) if self.legacy else pid  # legacy ids end with a view (none)


class _EmptyHooks:
    """Pickles as an empty collections.OrderedDict (a tensor's backward hooks)."""

    def __reduce__(self):
        return (_Global("collections", "OrderedDict"), ())


def _strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for side in reversed(shape):
        strides.append(step)
        step *= side
    return tuple(reversed(strides))


def _pickled(value, legacy: bool) -> tuple[bytes, list]:
    buffer, storages = io.BytesIO(), []
    _Pickler(buffer, storages, legacy).dump(value)
    return buffer.getvalue(), storages


def write_pth(path, value, *, legacy: bool = False) -> None:
    """Writes `value` (dicts, lists, tuples and plain values, NumPy arrays as tensors) as
    torch.save does: the zip layout, or the legacy one if `legacy`."""
    data, storages = _pickled(dict(value) if isinstance(value, dict) else value, legacy)
    if legacy:
        with open(path, "wb") as f:
            for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}):
                pickle.dump(header, f, protocol=2)
            f.write(data)
            pickle.dump([str(i) for i in range(len(storages))], f, protocol=2)
            for array in storages:
                f.write(struct.pack("<q", array.size) + _little_endian(array))
        return
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        for i, array in enumerate(storages):
            archive.writestr(f"archive/data/{i}", _little_endian(array))
        archive.writestr("archive/version", "3\n")


def _little_endian(array: np.ndarray) -> bytes:
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
