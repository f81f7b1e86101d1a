"""The tensor store: safetensors files written and memory-mapped by the Rust core.

Files are standard safetensors, laid out so that

* the data section starts on a 4096-byte boundary (the JSON header is padded with
  spaces, which the format allows), so mapped tensors come back page-aligned;
* tensors are grouped by dtype (widest first, so every tensor is naturally aligned)
  and keep their given order inside a group: all float32 tensors of a model form one
  contiguous byte range that the aggregation kernels treat as one flat vector;
* every write goes to a temporary file in the target directory that is renamed over
  the target, so a published file is complete and never modified again.

Loading maps a file privately (copy-on-write) and hands out torch tensors that are
views of the mapping: no bytes are copied on the CPU, and writing into a returned
tensor never reaches the file. A mapping is only as safe as the file's writer: a file
that another program truncates or rewrites in place while it is mapped kills the
reader with SIGBUS. emberfl's own files are never rewritten (see above), so the large
ones (the server's per-round downlink, the workers' sum files) are mapped; files up to
2 MiB are always read into memory (copying them costs about what mapping does), and
``copy=True`` reads any file into memory, for files from elsewhere whose writer no one
can vouch for. The Rust core validates the whole header before any tensor is handed
out (shapes numpy can hold, at most 100,000 tensors, bounded metadata, offsets that
tile the data section); any problem, including a path that is a FIFO, a directory or
a device, raises :class:`StoreError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch

from emberfl import _core
from emberfl._core import StoreError

__all__ = [
    "MappedFile",
    "StoreError",
    "TensorLike",
    "load",
    "load_model",
    "open_file",
    "save",
    "save_model",
]

TensorLike: TypeAlias = "torch.Tensor | np.ndarray"
PathLike: TypeAlias = "str | os.PathLike[str]"

# torch dtypes -> safetensors dtype names. bfloat16 has no numpy twin: it travels
# through numpy as its raw uint16 bits.
_TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def as_cpu_tensor(value: object, what: str) -> torch.Tensor:
    """``value`` (a torch tensor or numpy array) as a detached CPU tensor; ``TypeError``
    naming ``what`` for anything else."""
    if isinstance(value, np.ndarray):
        try:
            value = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as exc:
            raise TypeError(f"{what}: unsupported numpy dtype {value.dtype}") from exc
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{what}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}"
        )
    return value.detach().cpu()


def _as_contiguous_tensor(name: str, value: object) -> torch.Tensor:
    value = as_cpu_tensor(value, f"tensor {name!r}")
    if value.dtype not in _TORCH_TO_ST:
        raise StoreError(f"tensor {name!r}: unsupported dtype {value.dtype}")
    if value.is_sparse or value.layout != torch.strided:
        raise StoreError(f"tensor {name!r}: only dense (strided) tensors can be stored")
    return value.contiguous()


def _byte_view(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a 1-D uint8 numpy array, without copying."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8).numpy()


def save(
    path: PathLike,
    tensors: Mapping[str, TensorLike],
    metadata: Mapping[str, str] | None = None,
    durable: bool = False,
) -> None:
    """Write ``tensors`` to ``path`` as a safetensors file, atomically.

    ``durable=True`` also fsyncs the file and its directory before returning, so the
    file survives a power cut once ``save`` has returned.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"tensors must be a mapping of names to tensors, got {type(tensors).__name__}"
        )
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[list[int]] = []
    buffers: list[np.ndarray] = []
    keep_alive: list[torch.Tensor] = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        t = _as_contiguous_tensor(name, value)
        keep_alive.append(t)
        names.append(name)
        dtypes.append(_TORCH_TO_ST[t.dtype])
        shapes.append(list(t.shape))
        buffers.append(_byte_view(t))
    meta = None if metadata is None else [(str(k), str(v)) for k, v in metadata.items()]
    _core.save_file(os.fspath(path), names, dtypes, shapes, buffers, meta, durable)


class MappedFile(Mapping[str, torch.Tensor]):
    """A validated safetensors file, privately mapped or read into memory.

    Behaves as a read-only mapping of names to CPU tensors that view the file's data
    (the mapping, or the copy). That data stays alive as long as this object or any
    tensor taken from it does. ``copy=True`` reads the file into memory however large
    it is (see the module's docstring); :attr:`mapped` says which one happened.
    """

    def __init__(self, path: PathLike, copy: bool = False) -> None:
        self.path = Path(path)
        self._raw = _core.MappedFile(os.fspath(path), copy)
        self.metadata: dict[str, str] = dict(self._raw.metadata)
        # name -> (index in file order, dtype name, shape, start, end)
        self._entries: dict[str, tuple[int, str, list[int], int, int]] = {
            name: (i, dtype, shape, start, end)
            for i, (name, dtype, shape, start, end) in enumerate(self._raw.entries())
        }
        self._arrays: list[np.ndarray] | None = None

    def _tensor(self, index: int, dtype_name: str) -> torch.Tensor:
        if self._arrays is None:
            # Typed, shaped numpy views built by the core in one call: from_numpy is
            # the cheapest way into torch (one op per tensor, which matters for small
            # models loaded every round).
            self._arrays = self._raw.arrays()
        return self._as_torch(self._arrays[index], dtype_name)

    @staticmethod
    def _as_torch(array: np.ndarray, dtype_name: str) -> torch.Tensor:
        t = torch.from_numpy(array)
        # numpy has no bfloat16: the core hands those bits over as uint16.
        return t.view(torch.bfloat16) if dtype_name == "BF16" else t

    def __getitem__(self, name: str) -> torch.Tensor:
        index, dtype_name, _shape, _start, _end = self._entries[name]
        return self._tensor(index, dtype_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def mapped(self) -> bool:
        """Whether the tensors view a mapping of the file rather than a copy in memory."""
        return self._raw.mapped

    def tensors(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """All tensors in file order; views of the mapping when ``device`` is CPU/None."""
        out = {name: self._tensor(e[0], e[1]) for name, e in self._entries.items()}
        if device is not None and torch.device(device).type != "cpu":
            out = {name: t.to(device) for name, t in out.items()}
        return out

    def flat(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One 1-D view over every tensor of ``dtype``, in file order.

        Raises :class:`StoreError` when those tensors are not one contiguous range
        (files written by other tools may interleave dtypes).
        """
        name = _TORCH_TO_ST.get(dtype)
        if name is None:
            raise StoreError(f"unsupported dtype {dtype}")
        return self._as_torch(self._raw.flat(name), name)

    def byte_range(self, name: str) -> tuple[int, int]:
        """``(start, end)`` of tensor ``name``'s bytes inside the data section."""
        _index, _dtype, _shape, start, end = self._entries[name]
        return start, end

    def names(self, dtype: torch.dtype | None = None) -> list[str]:
        """Tensor names in file order, optionally only those of ``dtype``."""
        if dtype is None:
            return list(self._entries)
        want = _TORCH_TO_ST.get(dtype)
        return [n for n, (_i, d, *_rest) in self._entries.items() if d == want]

    def __repr__(self) -> str:
        return f"MappedFile({str(self.path)!r}, tensors={len(self)})"


def open_file(path: PathLike, copy: bool = False) -> MappedFile:
    """Validate ``path`` and map it (or read it, see :class:`MappedFile`); the handle
    gives tensors, metadata and flat views."""
    return MappedFile(path, copy=copy)


def load(
    path: PathLike, device: str | torch.device | None = None, copy: bool = False
) -> dict[str, torch.Tensor]:
    """Load every tensor of ``path``: on the CPU, views of a private mapping of a large
    file, or of a copy in memory of a small one.

    ``copy=True`` always reads the file into memory: for files from elsewhere, which
    another program might truncate or rewrite in place while they are mapped (that
    kills the reader with SIGBUS).
    """
    return MappedFile(path, copy=copy).tensors(device)


def save_model(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: Mapping[str, str] | None = None,
    durable: bool = False,
) -> None:
    """Write a module's ``state_dict`` (or a state dict) to ``path``."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    save(path, state, metadata=metadata, durable=durable)


def load_model(
    model: torch.nn.Module, path: PathLike, strict: bool = True, copy: bool = False
) -> torch.nn.Module:
    """Copy the tensors of ``path`` into ``model`` (on whatever device it lives);
    ``copy`` as for :func:`load`."""
    state = load(path, copy=copy)
    model.load_state_dict(state, strict=strict)
    return model
