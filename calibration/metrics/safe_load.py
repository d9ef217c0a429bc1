"""Read tensors from weight files without ever running code that a file carries.

* ``.safetensors``: parsed by ``safetensors`` (a JSON header plus raw bytes; nothing to execute).
* ``torch.save`` files (zip or legacy pickle): ``torch.load(..., weights_only=True)``, torch's own restricted
  unpickler (torch >= 2.6 is required: older versions let a crafted pickle run code even there).
* TorchScript archives (the format OpenAI ships ``RN50.pt`` / ``ViT-*.pt`` in): ``torch.jit.load`` would compile
  and run the archive's code (a module's ``__setstate__`` runs at load, and TorchScript can write files), so it is
  never called. The archive is a zip; its ``data.pkl`` is read here with a restricted unpickler that knows only
  the tensor-rebuild functions and storage types and builds every TorchScript class as an inert record of its
  attributes. No global outside that list can be named, nothing from ``code/`` is read, and no method of the
  archive is called. The tensors are collected from the module tree by attribute path, which is how
  ``ScriptModule.state_dict()`` names them.

Errors are :class:`~.weights.WeightFileError` naming the file; :class:`UnsafeWeightFile` when the file names
something that is not a tensor (nothing was executed when it is raised).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

import torch

from .weights import WeightFileError

SAFETENSORS_SUFFIX = ".safetensors"

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class UnsafeWeightFile(WeightFileError):
    """The file refers to code (a Python global that is not a tensor constructor); it was not loaded."""


class ScriptObjectRecord:
    """Inert stand-in for a TorchScript class instance: keeps the pickled attributes, runs nothing."""

    type_name = ""
    state = None

    def __setstate__(self, state):  # BUILD: store, never interpret
        self.state = state


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _record_class(type_name: str):
    # NEWOBJ calls cls.__new__(cls) only; a subclass per name keeps the TorchScript type name for messages
    return type("ScriptObject", (ScriptObjectRecord,), {"type_name": type_name})


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise pickle.UnpicklingError("tensor rebuild without a storage")
    try:
        return storage.as_strided(tuple(size), tuple(stride), int(offset))
    except RuntimeError as exc:  # out-of-bounds view: a damaged or crafted file
        raise pickle.UnpicklingError(f"tensor view outside its storage ({exc})") from None


def _rebuild_parameter(data, requires_grad=False, hooks=None, *extra):
    return data


def _identity(value, *extra):
    return value


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
}


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._zip, self._prefix, self._storages, self._classes = archive, prefix, {}, {}
        self._names = set(archive.namelist())

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            key = f"{module}.{name}"
            if key not in self._classes:
                self._classes[key] = _record_class(key)
            return self._classes[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise UnsafeWeightFile(f"refers to '{module}.{name}', which is not part of a weight file")
        return fn

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unexpected storage reference {pid!r:.100}")
        dtype, key, numel = pid[1].dtype, pid[2], pid[4]
        entry = f"{self._prefix}data/{key}"
        if entry not in self._names:
            raise pickle.UnpicklingError(f"storage {key!r} missing from the archive")
        if key not in self._storages:
            raw = read_entry(self._zip, entry)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) % itemsize or (isinstance(numel, int) and numel * itemsize > len(raw)):
                raise pickle.UnpicklingError(f"storage {key!r} has {len(raw)} bytes, expected {numel} x {itemsize}")
            self._storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self._storages[key]


#: data.pkl of a real archive is a few hundred KiB (module tree and tensor records); the tensors are elsewhere.
PICKLE_MAX_BYTES = 64 << 20
CHUNK = 16 << 20


def read_entry(archive: zipfile.ZipFile, name: str, limit: int | None = None) -> bytearray:
    """The bytes of one archive entry, read in chunks into a buffer that grows only by what was actually read: the
    size a zip header claims is never allocated up front (a 404-byte archive claiming 4 GB costs nothing). Entries
    must be stored uncompressed (as ``torch.save``/``torch.jit.save`` write them) and lie inside the archive file,
    so what is read is bounded by the file's real size."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
        raise pickle.UnpicklingError(f"entry {name!r} is compressed; torch archives store tensors uncompressed "
                                     "(the file was repacked or crafted)")
    if limit is not None and info.file_size > limit:
        raise pickle.UnpicklingError(f"entry {name!r} claims {info.file_size:,} bytes (at most {limit:,})")
    raw = bytearray()
    with archive.open(info) as f:
        while len(raw) < info.file_size:
            block = f.read(min(CHUNK, info.file_size - len(raw)))
            if not block:
                raise pickle.UnpicklingError(f"entry {name!r} is truncated ({len(raw):,} of the {info.file_size:,} "
                                             "bytes its header claims)")
            raw += block
    return raw


def _tensors_of(obj, prefix: str, out: dict, depth: int = 0) -> None:
    """Tensors of a TorchScript module tree keyed like ``state_dict()`` (attribute path)."""
    if depth > 64:
        raise pickle.UnpicklingError("module tree nested deeper than 64 levels")
    state = obj.state if isinstance(obj, ScriptObjectRecord) else obj
    if not isinstance(state, dict):
        return  # a custom __getstate__ tuple (or anything else): not module attributes
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, ScriptObjectRecord):
            _tensors_of(value, f"{prefix}{name}.", out, depth + 1)


def is_torchscript_archive(names: list[str]) -> bool:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive's module tree, read without running the archive."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        data_pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(data_pkl) != 1:
            raise WeightFileError(f"{path}: not a TorchScript archive (no single <name>/data.pkl)")
        prefix = data_pkl[0][: -len("data.pkl")]
        try:
            root = _ArchiveUnpickler(bytes(read_entry(archive, data_pkl[0], PICKLE_MAX_BYTES)), archive, prefix).load()
        except UnsafeWeightFile as exc:
            raise UnsafeWeightFile(f"{path} {exc}; refusing to load it (nothing from the file was run). "
                                   "Use the original file from its publisher.") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                RuntimeError, zipfile.BadZipFile, OverflowError, MemoryError) as exc:
            raise WeightFileError(f"{path}: damaged TorchScript archive ({type(exc).__name__}: {exc})") from None
    out: dict[str, torch.Tensor] = {}
    _tensors_of(root, "", out)
    return out  # views of per-storage buffers read from the archive (like torch.load's shared storages)


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def read_weights(path: str | os.PathLike, what: str = "weight file") -> dict:
    """The object stored in a weight file (a state dict, or a checkpoint dict holding one), read without running
    code from the file. TorchScript archives give the flat tensor dict of their module tree."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{what}: {path} is not a file")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                torchscript = is_torchscript_archive(z.namelist())
            if torchscript:
                return read_torchscript_tensors(path)
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except WeightFileError as exc:
        if isinstance(exc, UnsafeWeightFile):
            raise UnsafeWeightFile(f"{what}: {exc}") from None
        raise WeightFileError(f"{what}: {exc}") from None
    except pickle.UnpicklingError as exc:  # torch's weights-only unpickler refused a global: code, not weights
        raise UnsafeWeightFile(
            f"{what}: {path} is not a plain weight file and was not loaded (nothing from it was run): "
            f"{str(exc).splitlines()[0][:300]}") from None
    except Exception as exc:  # truncated zip, foreign format, bad safetensors header: name the file and why
        raise WeightFileError(f"{what}: cannot read {path} ({type(exc).__name__}: {str(exc)[:300]})") from None


def state_dict_of(obj, path: Path, what: str) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from what :func:`read_weights` returned (unwraps ``{"state_dict": ...}`` and the
    ``module.`` prefix of DataParallel checkpoints)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        for k, v in obj.items()):
        raise WeightFileError(f"{what}: {path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


__all__ = ["read_weights", "state_dict_of", "read_torchscript_tensors", "UnsafeWeightFile", "ScriptObjectRecord"]
