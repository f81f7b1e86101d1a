"""Decoding what another rank sent, so that nothing a peer can forge runs code here.

The ranks of a job talk through its c10d store -- torch's ``TCPStore`` listens on every
interface, so any process that reaches its port can write a key -- and through gloo or
NCCL. Everything received from them is decoded here, never with plain ``pickle``:

* headers and lists of stand-ins are JSON (:func:`read_json`), checked field by field;
* lengths and tensor layouts are checked against bounds before any buffer is
  allocated (:func:`check_length`, :func:`check_layout`): no negative size, none over
  :data:`MESSAGE_LIMIT` (byte strings) or :data:`BUFFER_LIMIT` (tensors, sums);
* package skeletons are unpickled by :class:`PeerUnpickler`, which resolves only an
  allow-list of types -- emberfl's packages, plain builtins, ``OrderedDict``, torch
  dtypes, ``torch.Size`` and ``torch.device``, and the types the job declared
  (:func:`allow_peer_types`, or a trainer's generic arguments:
  :func:`declared_package_types`) -- and rebuilds tensors only from the buffers that
  arrived, by dtype and shape.

Anything else raises :class:`PeerDataError` naming the rank, before it is acted on.
"""

from __future__ import annotations

import base64
import binascii
import collections
import importlib
import io
import json
import math
import pickle
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch

from emberfl.core.packages import STORABLE_DTYPES

__all__ = [
    "BUFFER_LIMIT",
    "MESSAGE_LIMIT",
    "Layout",
    "PeerDataError",
    "PeerUnpickler",
    "allow_peer_types",
    "check_layout",
    "check_length",
    "declared_package_types",
    "load_skeleton",
    "read_base64",
    "read_json",
]

#: The largest byte string (a skeleton, a header, a rank's stand-ins) a peer may send.
MESSAGE_LIMIT = 1 << 28
#: The largest tensor data (a model, one term's exact sum) a peer may make a rank allocate.
BUFFER_LIMIT = 1 << 36

#: A package's tensors as they travel: ``[key, dtype, shape]`` each, in order.
Layout = list[tuple[str, str, list[int]]]

_MAX_DIMS = 32

# The dtypes a package's tensors may have (the store's), by the names layouts use.
_DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in STORABLE_DTYPES}


class PeerDataError(ValueError):
    """Another rank (``rank``) sent data that is refused: a type outside the allow-list,
    a length out of bounds, a malformed header."""

    def __init__(self, rank: int, detail: str) -> None:
        self.rank = rank
        self.detail = detail
        super().__init__(f"rank {rank} sent {detail}")

    def __reduce__(self) -> tuple[type[PeerDataError], tuple[int, str]]:
        return (type(self), (self.rank, self.detail))


# -- the allow-list ---------------------------------------------------------------

_BUILTINS: dict[str, type] = {
    t.__name__: t
    for t in (
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        bytearray,
        list,
        tuple,
        dict,
        set,
        frozenset,
        slice,
        range,
    )
}
_TORCH: dict[str, object] = {
    **{n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)},
    "Size": torch.Size,
    "device": torch.device,
}
# The core's package types, imported only when a skeleton names one. An algorithm's
# own package types (SCAFFOLD's, FedNova's) are declared by its module with
# allow_peer_types when it is imported, which every rank does through the registry.
_EMBERFL = frozenset(
    {
        ("emberfl.core.fold", "_Shape"),
        ("emberfl.core.model_packages", "FedAvgUplinkPackage"),
        ("emberfl.core.model_packages", "FedAvgDownlinkPackage"),
    }
)
_declared: dict[tuple[str, str], type] = {}


def _keyed(classes: Iterable[type], where: str) -> dict[tuple[str, str], type]:
    """``classes`` by module and qualified name, as a pickle names them."""
    keyed: dict[tuple[str, str], type] = {}
    for cls in classes:
        if not isinstance(cls, type):
            raise TypeError(f"{where} takes classes, got {cls!r}")
        keyed[(cls.__module__, cls.__qualname__)] = cls
    return keyed


def allow_peer_types(*classes: type) -> None:
    """Let skeletons from other ranks hold instances of ``classes`` (the job's own
    package types); call it on every rank before the first round. A class is allowed
    by its exact module and name; rebuilding an instance may call the class, its
    ``__new__`` or its ``__setstate__`` with what the peer sent, so declare only plain
    data classes (dataclasses, named tuples, enums)."""
    _declared.update(_keyed(classes, "allow_peer_types"))


def declared_package_types(obj: object) -> tuple[type, ...]:
    """The classes among the generic arguments of ``obj``'s class and its bases, such
    as ``MyUplink`` and ``MyDownlink`` of ``class T(BaseClientTrainer[MyUplink,
    MyDownlink])``: the package types a BlazeFL-style trainer declares."""
    found: list[type] = []
    for cls in type(obj).__mro__:
        for base in cls.__dict__.get("__orig_bases__", ()):
            found.extend(a for a in typing.get_args(base) if isinstance(a, type) and a not in found)
    return tuple(found)


def _resolve(module: str, name: str, extra: Mapping[tuple[str, str], type]) -> object | None:
    """The object a skeleton names by ``module`` and ``name``, if it is allowed."""
    if module == "builtins":
        return _BUILTINS.get(name)
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "torch":
        return _TORCH.get(name)
    for declared in (extra, _declared):
        cls = declared.get((module, name))
        if cls is not None:
            return cls
    if (module, name) in _EMBERFL:
        found = getattr(importlib.import_module(module), name, None)
        return found if isinstance(found, type) else None
    return None


# -- the unpickler ----------------------------------------------------------------


class _Refused(Exception):
    """A skeleton asks for something the allow-list does not hold."""


# Types that build a container from their argument: called with anything but data
# the pickle already holds (a count, a range) they could allocate without bound.
_COPIERS = (bytes, bytearray, list, tuple, set, frozenset, dict, torch.Size)
_HELD = (str, bytes, bytearray, list, tuple, dict, set, frozenset)
_NEW_COPIERS = (tuple, bytes, frozenset, torch.Size)  # those whose ``__new__`` copies


def _check_call(func: object, args: object, kwargs: object, new: bool) -> None:
    if new:
        copies = any(getattr(func, "__new__", None) is c.__new__ for c in _NEW_COPIERS)
    else:
        copies = any(func is c for c in _COPIERS)
    if not copies:
        return
    held = isinstance(args, tuple) and (not args or (len(args) == 1 and type(args[0]) in _HELD))
    if not held or kwargs:
        name = getattr(func, "__name__", type(func).__name__)
        raise _Refused(f"a call of {name} on {type(args).__name__} arguments that it expands")


def _reduce(u: Any) -> None:
    _check_call(u.stack[-2], u.stack[-1], None, new=False)
    _ORIGINAL[pickle.REDUCE[0]](u)


def _newobj(u: Any) -> None:
    _check_call(u.stack[-2], u.stack[-1], None, new=True)
    _ORIGINAL[pickle.NEWOBJ[0]](u)


def _newobj_ex(u: Any) -> None:
    _check_call(u.stack[-3], u.stack[-2], u.stack[-1], new=True)
    _ORIGINAL[pickle.NEWOBJ_EX[0]](u)


def _build(u: Any) -> None:
    if isinstance(u.stack[-2], type):
        raise _Refused(f"a change to the class {u.stack[-2].__qualname__} itself")
    _ORIGINAL[pickle.BUILD[0]](u)


def _old_instance(u: Any) -> None:
    raise _Refused("a protocol 0/1 instance (INST or OBJ), which emberfl never writes")


def _extension(u: Any) -> None:
    # copyreg's extension codes resolve through a process-wide cache, not find_class.
    raise _Refused("an extension code (EXT1/2/4), which emberfl never writes")


_ORIGINAL = pickle._Unpickler.dispatch


class PeerUnpickler(pickle._Unpickler):
    """Unpickles a skeleton another rank (``sender``) sent.

    ``find_class`` resolves only allowed types (no function, no module, no dotted
    path); calls that could expand a small pickle into a large object are refused; a
    tensor reference resolves only to a buffer in ``tensors`` (an empty tensor: to a
    checked dtype and shape). The pure-Python unpickler is used because its opcodes
    can be checked one by one and its memo is a dict (the C one sizes an array by
    the index a pickle names); skeletons are small.
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = {
        **_ORIGINAL,
        pickle.REDUCE[0]: _reduce,
        pickle.NEWOBJ[0]: _newobj,
        pickle.NEWOBJ_EX[0]: _newobj_ex,
        pickle.BUILD[0]: _build,
        pickle.INST[0]: _old_instance,
        pickle.OBJ[0]: _old_instance,
        pickle.EXT1[0]: _extension,
        pickle.EXT2[0]: _extension,
        pickle.EXT4[0]: _extension,
    }

    def __init__(
        self,
        data: bytes,
        tensors: Mapping[str, torch.Tensor],
        *,
        sender: int,
        types: Iterable[type] = (),
    ) -> None:
        super().__init__(io.BytesIO(data))
        self.sender = sender
        self._tensors = tensors
        self._extra = _keyed(types, "types")
        self._made: dict[str, object] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _resolve(module, name, self._extra)
        if found is None:
            raise PeerDataError(
                self.sender,
                f"a package naming {module}.{name}, which is not an allowed type "
                "(declare the job's own package types on every rank with "
                "emberfl.distributed.peer_codec.allow_peer_types)",
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "emberfl-empty":
            _tag, dtype, shape, kind, requires_grad = pid
            if (
                dtype not in _DTYPES.values()
                or not _is_shape(shape)
                or math.prod(shape) != 0
                or kind not in ("tensor", "parameter")
                or not isinstance(requires_grad, bool)
            ):
                raise _Refused(f"an empty-tensor reference {pid!r} that is not one")
            return _finish(torch.empty(shape, dtype=dtype), kind, requires_grad)
        if not (isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "emberfl"):
            raise _Refused(f"an unknown persistent reference {pid!r}")
        _tag, key, kind, requires_grad = pid
        if not isinstance(key, str) or kind not in ("tensor", "parameter"):
            raise _Refused(f"a tensor reference {pid!r} that is not one")
        made = self._made.get(key)
        if made is not None:
            return made
        tensor = self._tensors.get(key)
        if tensor is None:
            raise _Refused(f"a reference to tensor {key!r}, which it did not send")
        value = _finish(tensor, kind, bool(requires_grad))
        self._made[key] = value
        return value


def _finish(tensor: torch.Tensor, kind: str, requires_grad: bool) -> object:
    if kind == "parameter":
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(True) if requires_grad else tensor


def _is_shape(shape: object) -> bool:
    return (
        isinstance(shape, tuple | list)
        and len(shape) <= _MAX_DIMS
        and all(type(n) is int and n >= 0 for n in shape)
    )


def load_skeleton(
    data: bytes,
    tensors: Mapping[str, torch.Tensor],
    *,
    sender: int,
    types: Iterable[type] = (),
) -> Any:
    """The package rank ``sender`` split into ``data`` (its skeleton) and ``tensors``
    (the buffers received for it), rebuilt through :class:`PeerUnpickler`; ``types``
    are allowed besides those :func:`allow_peer_types` declared."""
    check_length(len(data), sender, "a package skeleton", MESSAGE_LIMIT)
    unpickler = PeerUnpickler(data, tensors, sender=sender, types=types)
    try:
        return unpickler.load()
    except PeerDataError:
        raise
    except _Refused as exc:
        raise PeerDataError(sender, f"a package skeleton holding {exc}") from None
    except Exception as exc:  # a malformed pickle: any error of the opcodes it holds
        raise PeerDataError(
            sender, f"a package skeleton that is not one ({type(exc).__name__}: {exc})"
        ) from None


# -- JSON, lengths and layouts ----------------------------------------------------


def check_length(value: int, sender: int, what: str, limit: int) -> int:
    """``value``, a length ``sender`` announced for ``what``, once it is known to be
    within ``[0, limit]`` -- checked before anything of that size is allocated."""
    if value < 0:
        raise PeerDataError(sender, f"{what} of {value} bytes: a negative length")
    if value > limit:
        raise PeerDataError(sender, f"{what} of {value} bytes, over the limit of {limit}")
    return value


def read_json(data: bytes, sender: int, what: str) -> Any:
    """``data`` (``what``, from ``sender``) decoded as JSON."""
    check_length(len(data), sender, what, MESSAGE_LIMIT)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise PeerDataError(sender, f"{what} that is not JSON ({exc})") from None


def read_base64(text: object, sender: int, what: str) -> bytes:
    """``text`` (``what``, from ``sender``) decoded from base64."""
    if not isinstance(text, str):
        raise PeerDataError(sender, f"{what} that is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PeerDataError(sender, f"{what} that is not base64 ({exc})") from None


def check_layout(layout: object, sender: int, limit: int = BUFFER_LIMIT) -> Layout:
    """``layout`` (a package's tensors: ``[key, dtype, shape]`` each, from ``sender``)
    checked: distinct string keys, storable dtypes, non-negative dimensions, and at
    most ``limit`` bytes in all."""
    if not isinstance(layout, list):
        raise PeerDataError(sender, f"a tensor layout that is a {type(layout).__name__}")
    checked: Layout = []
    seen: set[str] = set()
    total = 0
    for entry in layout:
        if not (isinstance(entry, list | tuple) and len(entry) == 3):
            raise PeerDataError(sender, f"a tensor layout entry {entry!r}")
        key, dtype, shape = entry
        if not isinstance(key, str) or key in seen:
            raise PeerDataError(sender, f"a tensor layout with the key {key!r} (twice, or no str)")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise PeerDataError(sender, f"a tensor {key!r} of dtype {dtype!r}, not a stored one")
        if not _is_shape(shape):
            raise PeerDataError(sender, f"a tensor {key!r} of shape {shape!r}, which is not one")
        seen.add(key)
        total += math.prod(shape) * _DTYPES[dtype].itemsize
        check_length(total, sender, "a package's tensors", limit)
        checked.append((key, dtype, list(shape)))
    return checked
