"""Packages as store files: a pickled skeleton plus tensors, never pickled tensor data.

Any package -- a dataclass, dict, list, tuple, namedtuple, or any picklable object
nesting those at any depth -- is split by pickling it with a pickler that sets every
``torch.Tensor`` (and every numpy array of a dtype the store supports) aside and leaves
a small reference in its place. The tensors go into one safetensors file written by
the Rust store; the skeleton travels base64-encoded in that file's metadata, so a
file is self-describing and a message that points at it is a few hundred bytes.

Loading maps the file and unpickles the skeleton with the references resolved to
tensors that view the mapping: nothing is copied on the CPU. Parameters come back as
``torch.nn.Parameter`` and tensors that required grad require it again.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import numpy as np
import torch

from emberfl import store

__all__ = [
    "PackageError",
    "join_package",
    "load_package",
    "read_skeleton",
    "save_package",
    "split_package",
]

PathLike: TypeAlias = "str | os.PathLike[str]"
Stage: TypeAlias = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]

_FORMAT_KEY = "emberfl.format"
_FORMAT = "package/1"
_SKELETON_KEY = "emberfl.skeleton"
_ARRAYS_KEY = "emberfl.arrays"

# numpy dtypes the store keeps; arrays of other dtypes (object, complex, ...) stay in
# the skeleton, which is the only way they can travel at all.
_NUMPY_STORABLE = frozenset(
    np.dtype(d)
    for d in (
        np.float64,
        np.float32,
        np.float16,
        np.int64,
        np.int32,
        np.int16,
        np.int8,
        np.uint8,
        np.bool_,
    )
)
#: The torch dtypes a package's tensors may have (the store's).
STORABLE_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)


class PackageError(ValueError):
    """A package cannot be split into a skeleton and tensors, or a file is no package."""


class _SplitPickler(pickle.Pickler):
    """Pickles the skeleton; tensors and storable arrays become persistent references."""

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: dict[str, torch.Tensor | np.ndarray] = {}
        self.arrays: list[str] = []
        self._keys: dict[int, str] = {}
        # Holding every object whose id() is a key keeps that id from being reused
        # by a temporary created during pickling.
        self._alive: list[object] = []

    def _key_for(self, obj: torch.Tensor | np.ndarray) -> tuple[str, bool]:
        key = self._keys.get(id(obj))
        if key is not None:
            return key, False
        key = str(len(self._keys))
        self._keys[id(obj)] = key
        self._alive.append(obj)
        return key, True

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if obj.dtype not in STORABLE_DTYPES:
                raise PackageError(
                    f"package tensor of dtype {obj.dtype} and shape {tuple(obj.shape)} "
                    "cannot be stored (supported: float64/32/16, bfloat16, int64/32/16/8, "
                    "uint8, bool)"
                )
            if obj.layout != torch.strided or obj.device.type == "meta":
                raise PackageError(
                    f"package tensor with layout {obj.layout} on {obj.device} cannot be "
                    "stored: only dense tensors with data can"
                )
            kind = "parameter" if isinstance(obj, torch.nn.Parameter) else "tensor"
            if obj.numel() == 0:
                # No data to store: the skeleton describes it completely.
                return ("emberfl-empty", obj.dtype, tuple(obj.shape), kind, bool(obj.requires_grad))
            key, new = self._key_for(obj)
            if new:
                self.tensors[key] = obj
            return ("emberfl", key, kind, bool(obj.requires_grad))
        # An empty array has no data to set aside; it pickles to a few bytes.
        if isinstance(obj, np.ndarray) and obj.dtype in _NUMPY_STORABLE and obj.size > 0:
            key, new = self._key_for(obj)
            if new:
                self.tensors[key] = obj
                self.arrays.append(key)
            return ("emberfl", key, "ndarray", False)
        return None


class _JoinUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__(io.BytesIO(data))
        self._tensors = tensors
        self._made: dict[str, object] = {}

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "emberfl-empty":
            _tag, dtype, shape, kind, requires_grad = pid
            return _finish(torch.empty(shape, dtype=dtype), kind, requires_grad)
        if not (isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "emberfl"):
            raise pickle.UnpicklingError(f"unknown persistent reference {pid!r}")
        _tag, key, kind, requires_grad = pid
        made = self._made.get(key)
        if made is not None:
            return made
        try:
            tensor = self._tensors[key]
        except KeyError:
            raise PackageError(f"the skeleton refers to tensor {key!r}, which is missing") from None
        value = tensor.numpy() if kind == "ndarray" else _finish(tensor, kind, requires_grad)
        self._made[key] = value
        return value


def _finish(tensor: torch.Tensor, kind: str, requires_grad: bool) -> object:
    if kind == "parameter":
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    if requires_grad:
        return tensor.requires_grad_(True)
    return tensor


def split_package(obj: object) -> tuple[bytes, dict[str, torch.Tensor | np.ndarray], list[str]]:
    """Split ``obj`` into (skeleton bytes, tensors by key, keys that were numpy arrays).

    The skeleton pickles everything but the tensors; its size does not depend on how
    large they are. Raises :class:`PackageError` for tensors the store cannot hold and
    ``TypeError`` naming the problem for objects that cannot be pickled.
    """
    buffer = io.BytesIO()
    pickler = _SplitPickler(buffer)
    try:
        pickler.dump(obj)
    except PackageError:
        raise
    except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as exc:
        raise TypeError(f"cannot pickle the skeleton of a {type(obj).__name__}: {exc}") from exc
    return buffer.getvalue(), pickler.tensors, pickler.arrays


def join_package(skeleton: bytes, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the object that :func:`split_package` split, from its parts."""
    return _JoinUnpickler(skeleton, tensors).load()


def tensor_bytes(obj: Any, depth: int = 0) -> int:
    """Bytes of tensor data in a package (dataclasses, dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if depth > 16:
        return 0
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v, depth + 1) for v in obj)
    return 0


def save_package(path: PathLike, obj: object, *, stage: Stage | None = None) -> int:
    """Write ``obj`` to ``path`` (atomically): its tensors plus its skeleton as metadata.

    ``stage`` may move tensors to the CPU first (the GPU path does so through pinned
    memory); tensors it leaves elsewhere are copied by the store. Returns the size of
    the skeleton in bytes.
    """
    skeleton, tensors, arrays = split_package(obj)
    if stage is not None:
        torch_keys = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor)}
        tensors.update(stage(torch_keys))
    metadata = {
        _FORMAT_KEY: _FORMAT,
        _SKELETON_KEY: base64.b64encode(skeleton).decode("ascii"),
        _ARRAYS_KEY: ",".join(arrays),
    }
    store.save(path, tensors, metadata=metadata)
    return len(skeleton)


def _check_format(path: PathLike, metadata: Mapping[str, str]) -> None:
    fmt = metadata.get(_FORMAT_KEY)
    if fmt != _FORMAT:
        raise PackageError(
            f"{os.fspath(path)}: not an emberfl package file (format {fmt!r}, expected {_FORMAT!r})"
        )


def read_skeleton(path: PathLike) -> bytes:
    """The skeleton bytes stored in the package file ``path``."""
    mapped = store.open_file(path)
    _check_format(path, mapped.metadata)
    return base64.b64decode(mapped.metadata[_SKELETON_KEY])


def load_package(path: PathLike, *, stage: Stage | None = None) -> Any:
    """Map ``path`` and rebuild its package; tensors view the mapping (zero-copy).

    ``stage`` may move the torch tensors (not the numpy arrays) elsewhere, e.g. to a
    GPU, before the package is rebuilt around them.
    """
    mapped = store.open_file(path)
    _check_format(path, mapped.metadata)
    skeleton = base64.b64decode(mapped.metadata[_SKELETON_KEY])
    tensors = mapped.tensors()
    if stage is not None:
        arrays = set(filter(None, mapped.metadata.get(_ARRAYS_KEY, "").split(",")))
        moved = stage({k: t for k, t in tensors.items() if k not in arrays})
        tensors.update(moved)
    return join_package(skeleton, tensors)
