"""A dataset store: training data written once, memory-mapped by every worker.

A store is a directory of tensor-store files (see :mod:`emberfl.store`):

* ``<split>.safetensors`` for every split (e.g. ``train``, ``test``): a ``features``
  tensor of any supported dtype (uint8 images stay uint8 on disk) and an int64
  ``labels`` tensor;
* ``_manifest.safetensors``: for every partition type (e.g. ``train`` per client,
  ``val`` per client over the train split) one int64 ``<type>/indices`` tensor with
  every client's sample indices back to back and one int64 ``<type>/offsets`` tensor
  (client ``c`` owns ``indices[offsets[c]:offsets[c + 1]]``), plus metadata naming
  the splits, which split each partition type indexes, and the normalisation.

The manifest is written last, so a directory without one is not a store, and all
files carry one store id, so a store caught half-rewritten is detected.

Opening maps the files (privately, copy-on-write): every process shares the page
cache's single copy of the data, and opening costs no reading. Each process opens a
store once (:meth:`DatasetStore.open` caches per directory); a
:class:`StorePartitionedDataset` pickles as its directory and a few settings, so
tasks sent to workers never carry data.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from emberfl import store

__all__ = [
    "ClientPartition",
    "DatasetStore",
    "MappedArrayDataset",
    "MappedDataLoader",
    "Normalization",
    "StorePartitionedDataset",
    "iter_batches",
]

logger = logging.getLogger(__name__)

FORMAT = "emberfl.datastore/1"
MANIFEST_NAME = "_manifest.safetensors"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

TensorLike: TypeAlias = "torch.Tensor | np.ndarray"
PathLike: TypeAlias = "str | os.PathLike[str]"
IndexList: TypeAlias = "Sequence[int] | np.ndarray | torch.Tensor"
Transform: TypeAlias = "Callable[[Any], Any]"


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not a valid name: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _type_key(type_: object) -> str:
    """The string behind a partition type: a str, a StrEnum member or a (str, Enum) member."""
    if isinstance(type_, Enum):
        type_ = type_.value
    if not isinstance(type_, str):
        raise TypeError(f"partition type must be a str or str-valued Enum, got {type_!r}")
    # str(StrEnum member) is its value, but a plain str subclass may override __str__;
    # str.__str__ gives the characters themselves.
    return str.__str__(type_)


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _as_index_tensor(value: object, what: str) -> torch.Tensor:
    """``value`` as a 1-D int64 tensor (lists, numpy arrays and tensors of integers)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{what}: expected a sequence of integers ({exc})") from exc
        if array.size == 0:
            array = array.astype(np.int64)
        if array.dtype.kind not in "iu":
            raise TypeError(f"{what}: expected integers, got dtype {array.dtype}")
        t = torch.from_numpy(array.astype(np.int64, copy=False))
    if not _is_integer_dtype(t.dtype):
        raise TypeError(f"{what}: expected integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D list of indices, got shape {tuple(t.shape)}")
    return t.to(torch.int64).contiguous()


def _check_range(indices: torch.Tensor, n: int, what: str) -> None:
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{what}: index {bad} is out of range for {n} samples")


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalisation: ``x * (scale / std) - mean / std`` in float32.

    ``scale`` maps raw values to the range ``mean``/``std`` refer to (1/255 for uint8
    images). ``mean`` and ``std`` have one value per channel, or one value for all;
    the channel axis is the first axis of a sample (the second of a batch).
    The two coefficients are applied as separate multiply and add steps, each
    correctly rounded, so a sample comes out bitwise the same alone or in a batch.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0
    _mul: torch.Tensor = field(init=False, repr=False, compare=False)
    _add: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        if not mean or len(mean) != len(std):
            raise ValueError(
                "mean and std need the same, non-zero number of values, "
                f"got {len(mean)} and {len(std)}"
            )
        if not all(math.isfinite(v) for v in mean):
            raise ValueError(f"mean must be finite, got {mean}")
        if not all(math.isfinite(v) and v > 0 for v in std):
            raise ValueError(f"std must be finite and positive, got {std}")
        scale = float(self.scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and positive, got {self.scale}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "scale", scale)
        # Coefficients are computed in float64 and rounded once to float32.
        mul = torch.tensor([scale / s for s in std], dtype=torch.float64).to(torch.float32)
        add = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float64)
        object.__setattr__(self, "_mul", mul)
        object.__setattr__(self, "_add", add.to(torch.float32))

    @property
    def channels(self) -> int:
        return len(self.mean)

    def apply(self, x: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
        """A new float32 tensor: ``x`` normalised along ``channel_dim``."""
        out = x.to(torch.float32, copy=True)
        shape = [1] * out.dim()
        if self.channels > 1:
            if not -out.dim() <= channel_dim < out.dim() or out.shape[channel_dim] != self.channels:
                raise ValueError(
                    f"normalisation has {self.channels} channels but the input has shape "
                    f"{tuple(out.shape)} (channel axis {channel_dim})"
                )
            shape[channel_dim] = self.channels
        out.mul_(self._mul.view(shape)).add_(self._add.view(shape))
        return out

    def to_json(self) -> str:
        return json.dumps({"mean": list(self.mean), "std": list(self.std), "scale": self.scale})

    @classmethod
    def from_json(cls, text: str) -> Normalization:
        obj = json.loads(text)
        return cls(mean=tuple(obj["mean"]), std=tuple(obj["std"]), scale=float(obj["scale"]))


@dataclass(frozen=True)
class ClientPartition:
    """Per-client sample indices into ``split``: ``indices[c]`` belongs to client ``c``."""

    split: str
    indices: Sequence[IndexList]


class MappedArrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset over rows ``indices`` of ``features``/``labels`` (all rows when ``None``).

    ``features`` and ``labels`` are usually memory-mapped tensors from a
    :class:`DatasetStore`; nothing is copied until a sample or batch is read.
    ``__getitem__`` returns ``(x, y)`` as new tensors (``x`` normalised to float32
    when a :class:`Normalization` is given, then passed through ``transform``), and
    :meth:`get_batch` fetches many rows with one indexing operation. A dataset made
    by a store pickles as the store's directory, its split and its indices.
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        indices: IndexList | None = None,
        *,
        transform: Transform | None = None,
        target_transform: Transform | None = None,
        normalization: Normalization | None = None,
    ) -> None:
        if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError("features and labels must be torch tensors")
        if features.dim() < 1:
            raise ValueError("features must have a sample axis (at least one dimension)")
        if labels.dim() != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
        if features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"features and labels differ in length: {features.shape[0]} and {labels.shape[0]}"
            )
        if normalization is not None and not isinstance(normalization, Normalization):
            raise TypeError(
                f"normalization must be a Normalization, got {type(normalization).__name__}"
            )
        self.features = features
        self.labels = labels
        self.indices: torch.Tensor | None = None
        if indices is not None:
            self.indices = _as_index_tensor(indices, "indices")
            _check_range(self.indices, features.shape[0], "indices")
        self.transform = transform
        self.target_transform = target_transform
        self.normalization = normalization
        # (store root, split) when the tensors come from a DatasetStore.
        self._origin: tuple[str, str] | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0]) if self.indices is None else int(self.indices.shape[0])

    def _row(self, index: int) -> int:
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a dataset of {n} samples")
        if i < 0:
            i += n
        return i if self.indices is None else int(self.indices[i])

    def _prepare(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        if self.normalization is not None:
            return self.normalization.apply(x, channel_dim)
        # A fresh tensor: writing into a view would silently change the mapped data
        # that later rounds read.
        return x.clone()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self._row(index)
        x = self._prepare(self.features[row], 0)
        y = self.labels[row].clone()
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y

    def get_batch(self, positions: IndexList) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at ``positions`` (indices into this dataset) as two batch tensors.

        Equal to collating ``[self[i] for i in positions]`` with the default collate
        function, but without per-sample work when no transforms are set.
        """
        pos = _as_index_tensor(positions, "positions")
        n = len(self)
        if pos.numel() and (int(pos.min()) < -n or int(pos.max()) >= n):
            raise IndexError(f"positions out of range for a dataset of {n} samples")
        pos = torch.where(pos < 0, pos + n, pos)
        return self._batch(pos)

    def _batch(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = pos if self.indices is None else self.indices.index_select(0, pos)
        x = self.features.index_select(0, rows)
        x = self.normalization.apply(x, 1) if self.normalization is not None else x
        y = self.labels.index_select(0, rows)
        if self.transform is None and self.target_transform is None:
            return x, y
        # Per-sample transforms run in the order DataLoader would run them (sample by
        # sample, data before target), so random augmentations draw the same values.
        xs: list[Any] = []
        ys: list[Any] = []
        for xi, yi in zip(x.unbind(0), y.unbind(0), strict=True):
            xs.append(self.transform(xi) if self.transform is not None else xi)
            ys.append(self.target_transform(yi) if self.target_transform is not None else yi)
        return default_collate(xs), default_collate(ys)

    def subset(self, positions: IndexList) -> MappedArrayDataset:
        """A dataset over ``self[positions]`` sharing the same tensors and settings."""
        pos = _as_index_tensor(positions, "positions")
        _check_range(pos, len(self), "positions")
        rows = pos if self.indices is None else self.indices.index_select(0, pos)
        out = MappedArrayDataset(
            self.features,
            self.labels,
            rows,
            transform=self.transform,
            target_transform=self.target_transform,
            normalization=self.normalization,
        )
        out._origin = self._origin
        return out

    def __getstate__(self) -> dict[str, Any]:
        if self._origin is None:
            raise TypeError(
                "a MappedArrayDataset not made by a DatasetStore cannot be pickled; "
                "write the data with DatasetStore.create and take datasets from the store"
            )
        root, split = self._origin
        return {
            "root": root,
            "split": split,
            "indices": None if self.indices is None else self.indices.tolist(),
            "normalize": self.normalization is not None,
            "transform": self.transform,
            "target_transform": self.target_transform,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        ds = DatasetStore.open(state["root"])
        features, labels = ds.features(state["split"]), ds.labels(state["split"])
        normalization = ds.normalization if state["normalize"] else None
        fresh = MappedArrayDataset(
            features,
            labels,
            state["indices"],
            transform=state["transform"],
            target_transform=state["target_transform"],
            normalization=normalization,
        )
        fresh._origin = (state["root"], state["split"])
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        where = f"{self._origin[0]}:{self._origin[1]}" if self._origin else "tensors"
        return f"MappedArrayDataset({where}, samples={len(self)})"


def _draw_int64(generator: torch.Generator | None) -> int:
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def iter_batches(
    dataset: MappedArrayDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[list[torch.Tensor]]:
    """Batches ``[x, y]`` of ``dataset``, each fetched with one indexing operation.

    Yields the same batches as ``DataLoader(dataset, batch_size, shuffle=shuffle,
    generator=generator, drop_last=drop_last)`` (``num_workers=0``) and leaves
    ``generator`` (or, without one, torch's global generator) in the same state
    after a full pass: it makes the same draws in the same order (one int64 when the
    iterator is created, the permutation at the first batch, and the sampler's
    second permutation when the data runs out). Runs are therefore identical
    whichever of the two loads the data.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(dataset)
    if shuffle and n == 0:
        raise ValueError("cannot shuffle an empty dataset")
    # DataLoader draws its worker base seed when the iterator is created.
    _draw_int64(generator)
    return _batches(dataset, n, batch_size, shuffle, generator, drop_last)


def _batches(
    dataset: MappedArrayDataset,
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool,
) -> Iterator[list[torch.Tensor]]:
    order: torch.Tensor | None = None
    g = generator
    if shuffle:
        if g is None:
            # RandomSampler without a generator seeds a private one from the global RNG.
            g = torch.Generator()
            g.manual_seed(_draw_int64(None))
        order = torch.randperm(n, generator=g)
    full = n // batch_size
    for b in range(full):
        start = b * batch_size
        pos = (
            order[start : start + batch_size]
            if order is not None
            else torch.arange(start, start + batch_size)
        )
        yield list(dataset._batch(pos))
    if order is not None:
        # RandomSampler draws one more (empty-sliced) permutation once exhausted.
        torch.randperm(n, generator=g)
    rest = n - full * batch_size
    if rest and not drop_last:
        start = full * batch_size
        pos = order[start:] if order is not None else torch.arange(start, n)
        yield list(dataset._batch(pos))


class MappedDataLoader(DataLoader[Any]):
    """A single-process ``DataLoader`` over a :class:`MappedArrayDataset` that
    iterates with :func:`iter_batches`: the same batches and generator draws as
    ``DataLoader``, one indexing operation per batch instead of one call per sample.
    """

    def __init__(
        self,
        dataset: MappedArrayDataset,
        batch_size: int = 1,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        if not isinstance(dataset, MappedArrayDataset):
            raise TypeError(f"dataset must be a MappedArrayDataset, got {type(dataset).__name__}")
        super().__init__(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=drop_last,
            num_workers=0,
        )
        self._shuffle = bool(shuffle)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:  # type: ignore[override]
        dataset = self.dataset
        assert isinstance(dataset, MappedArrayDataset)
        assert self.batch_size is not None
        return iter_batches(
            dataset,
            self.batch_size,
            shuffle=self._shuffle,
            generator=self.generator,
            drop_last=self.drop_last,
        )


@dataclass(frozen=True)
class _Partition:
    split: str
    indices: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_clients(self) -> int:
        return int(self.offsets.shape[0]) - 1


_CACHE: dict[str, tuple[tuple[int, int, int, int], DatasetStore]] = {}
_CACHE_LOCK = threading.Lock()


class DatasetStore:
    """Splits and per-client partitions, memory-mapped from a store directory.

    Create one with :meth:`create` (once, in the driver process) and open it with
    :meth:`open` anywhere else; opening is cached per process and directory.
    """

    def __init__(self, root: PathLike) -> None:
        """Open the store at ``root`` without the per-process cache."""
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.root}: not a dataset store (no {MANIFEST_NAME})")
        manifest = store.open_file(manifest_path)
        meta = manifest.metadata
        if meta.get("format") != FORMAT:
            raise store.StoreError(
                f"{manifest_path}: not a dataset store manifest (format {meta.get('format')!r})"
            )
        try:
            self.store_id = meta["store_id"]
            split_names: list[str] = json.loads(meta["splits"])
            partition_splits: dict[str, str] = json.loads(meta["partitions"])
            norm_text = meta.get("normalization")
            self.normalization = None if norm_text is None else Normalization.from_json(norm_text)
        except (KeyError, ValueError, TypeError) as exc:
            raise store.StoreError(
                f"{manifest_path}: invalid dataset store metadata: {exc}"
            ) from exc

        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._paths: dict[str, Path] = {}
        for name in split_names:
            path = self.root / f"{_check_name(name, 'split')}.safetensors"
            f = store.open_file(path)
            if f.metadata.get("store_id") != self.store_id:
                raise store.StoreError(
                    f"{path}: belongs to another version of the store in {self.root} "
                    "(it is being rewritten, or files were mixed)"
                )
            try:
                features, labels = f["features"], f["labels"]
            except KeyError as exc:
                raise store.StoreError(f"{path}: missing tensor {exc}") from None
            if labels.dtype != torch.int64 or labels.dim() != 1 or features.dim() < 1:
                raise store.StoreError(
                    f"{path}: labels must be 1-D int64 and features at least 1-D"
                )
            if features.shape[0] != labels.shape[0]:
                raise store.StoreError(f"{path}: features and labels differ in length")
            self._splits[name] = (features, labels)
            self._paths[name] = path

        self._partitions: dict[str, _Partition] = {}
        for type_, split in partition_splits.items():
            if split not in self._splits:
                raise store.StoreError(
                    f"{manifest_path}: partition {type_!r} indexes unknown split {split!r}"
                )
            try:
                indices, offsets = manifest[f"{type_}/indices"], manifest[f"{type_}/offsets"]
            except KeyError as exc:
                raise store.StoreError(f"{manifest_path}: missing tensor {exc}") from None
            what = f"{manifest_path}: partition {type_!r}"
            if indices.dtype != torch.int64 or offsets.dtype != torch.int64:
                raise store.StoreError(f"{what}: indices and offsets must be int64")
            if indices.dim() != 1 or offsets.dim() != 1 or offsets.shape[0] < 1:
                raise store.StoreError(f"{what}: indices and offsets must be 1-D")
            if (
                int(offsets[0]) != 0
                or int(offsets[-1]) != indices.shape[0]
                or bool((offsets[1:] < offsets[:-1]).any())
            ):
                raise store.StoreError(f"{what}: offsets are not a valid CSR offset list")
            try:
                _check_range(indices, self._splits[split][0].shape[0], what)
            except IndexError as exc:
                raise store.StoreError(str(exc)) from None
            self._partitions[type_] = _Partition(split, indices, offsets)
        self._manifest_path = manifest_path

    # --- creation ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: PathLike,
        splits: Mapping[str, tuple[TensorLike, TensorLike]],
        partitions: Mapping[str, ClientPartition | Sequence[IndexList] | Any] | None = None,
        *,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        scale: float | None = None,
        overwrite: bool = False,
        durable: bool = False,
    ) -> DatasetStore:
        """Write a store to ``root`` and open it.

        ``splits`` maps split names to ``(features, labels)``; features may have any
        store dtype (first axis: samples; second: channels), labels must be integers.
        ``partitions`` maps partition types to per-client index lists: a plain list
        indexes the split of the same name, a :class:`ClientPartition` names its
        split. ``mean``/``std`` (both or neither) set a per-channel normalisation
        applied when samples are read; ``scale`` defaults to 1/255 for uint8 features
        and 1 otherwise. ``overwrite`` replaces an existing store (processes that
        already mapped it keep reading the old files).
        """
        root = Path(root)
        if not isinstance(splits, Mapping) or not splits:
            raise ValueError(
                "splits must be a non-empty mapping of split names to (features, labels)"
            )
        prepared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, pair in splits.items():
            _check_name(name, "split")
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise TypeError(f"splits[{name!r}] must be a (features, labels) pair")
            features = store.as_cpu_tensor(pair[0], f"splits[{name!r}] features")
            labels = store.as_cpu_tensor(pair[1], f"splits[{name!r}] labels")
            if features.dim() < 1:
                raise ValueError(f"splits[{name!r}] features need a sample axis")
            if labels.dim() != 1:
                raise ValueError(
                    f"splits[{name!r}] labels must be 1-D, got shape {tuple(labels.shape)}"
                )
            if not _is_integer_dtype(labels.dtype):
                raise TypeError(f"splits[{name!r}] labels must be integers, got {labels.dtype}")
            if features.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"splits[{name!r}]: {features.shape[0]} feature rows "
                    f"but {labels.shape[0]} labels"
                )
            prepared[name] = (features, labels.to(torch.int64))

        normalization = cls._make_normalization(prepared, mean, std, scale)

        partition_tensors: dict[str, torch.Tensor] = {}
        partition_splits: dict[str, str] = {}
        for type_, spec in (partitions or {}).items():
            _check_name(type_, "partition type")
            lists: Any
            if isinstance(spec, ClientPartition):
                split, lists = spec.split, spec.indices
            elif hasattr(spec, "indices") and not isinstance(spec, Sequence | np.ndarray):
                # A partition object such as emberfl.data.Partition: its index lists
                # refer to the split of the same name.
                split, lists = type_, spec.indices
            else:
                split, lists = type_, spec
            if split not in prepared:
                raise KeyError(
                    f"partition {type_!r} indexes split {split!r}, which is not in splits"
                )
            if isinstance(lists, str | bytes) or not isinstance(lists, Sequence | np.ndarray):
                raise TypeError(f"partition {type_!r} must be a sequence of per-client index lists")
            n = prepared[split][0].shape[0]
            chunks = []
            for cid, client in enumerate(lists):
                what = f"partition {type_!r}, client {cid}"
                idx = _as_index_tensor(client, what)
                _check_range(idx, n, what)
                chunks.append(idx)
            offsets = torch.zeros(len(chunks) + 1, dtype=torch.int64)
            if chunks:
                torch.cumsum(torch.tensor([c.numel() for c in chunks]), 0, out=offsets[1:])
            partition_tensors[f"{type_}/indices"] = (
                torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)
            )
            partition_tensors[f"{type_}/offsets"] = offsets
            partition_splits[type_] = split

        root.mkdir(parents=True, exist_ok=True)
        manifest_path = root / MANIFEST_NAME
        old_splits: list[str] = []
        if manifest_path.exists():
            if not overwrite:
                raise FileExistsError(f"{root} already holds a dataset store (pass overwrite=True)")
            try:
                old_splits = json.loads(store.open_file(manifest_path).metadata.get("splits", "[]"))
            except (store.StoreError, ValueError):
                old_splits = []

        store_id = uuid.uuid4().hex
        for name, (features, labels) in prepared.items():
            store.save(
                root / f"{name}.safetensors",
                {"features": features, "labels": labels},
                metadata={"format": FORMAT, "store_id": store_id, "split": name},
                durable=durable,
            )
        metadata = {
            "format": FORMAT,
            "store_id": store_id,
            "splits": json.dumps(list(prepared)),
            "partitions": json.dumps(partition_splits),
        }
        if normalization is not None:
            metadata["normalization"] = normalization.to_json()
        # Written last: the store exists once its manifest does.
        store.save(manifest_path, partition_tensors, metadata=metadata, durable=durable)
        for name in old_splits:
            if name not in prepared and isinstance(name, str) and _NAME_RE.fullmatch(name):
                (root / f"{name}.safetensors").unlink(missing_ok=True)
        logger.debug(
            "wrote dataset store %s (splits %s, partitions %s)",
            root,
            list(prepared),
            list(partition_splits),
        )
        return cls.open(root)

    @staticmethod
    def _make_normalization(
        splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        mean: Sequence[float] | float | None,
        std: Sequence[float] | float | None,
        scale: float | None,
    ) -> Normalization | None:
        if mean is None and std is None:
            if scale is not None:
                raise ValueError("scale needs mean and std")
            return None
        if mean is None or std is None:
            raise ValueError("give both mean and std, or neither")
        means = (float(mean),) if isinstance(mean, int | float) else tuple(float(v) for v in mean)
        stds = (float(std),) if isinstance(std, int | float) else tuple(float(v) for v in std)
        if scale is None:
            dtypes = {f.dtype for f, _ in splits.values()}
            scale = 1.0 / 255.0 if dtypes == {torch.uint8} else 1.0
        norm = Normalization(mean=means, std=stds, scale=scale)
        if norm.channels > 1:
            for name, (features, _) in splits.items():
                channels = features.shape[1] if features.dim() >= 2 else 1
                if channels != norm.channels:
                    raise ValueError(
                        f"mean/std have {norm.channels} values but split {name!r} has "
                        f"{channels} channels (features shape {tuple(features.shape)})"
                    )
        return norm

    # --- opening -------------------------------------------------------------------

    @classmethod
    def open(cls, root: PathLike) -> DatasetStore:
        """The store at ``root``, mapped once per process and reused while unchanged."""
        key = os.path.realpath(os.fspath(root))
        try:
            st = os.stat(os.path.join(key, MANIFEST_NAME))
        except FileNotFoundError:
            raise FileNotFoundError(f"{root}: not a dataset store (no {MANIFEST_NAME})") from None
        signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None and hit[0] == signature:
                return hit[1]
            opened = cls(key)
            _CACHE[key] = (signature, opened)
            return opened

    # --- access --------------------------------------------------------------------

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._splits)

    @property
    def partition_types(self) -> tuple[str, ...]:
        return tuple(self._partitions)

    def files(self) -> list[Path]:
        """Every file of the store: the split files, then the manifest."""
        return [*self._paths.values(), self._manifest_path]

    def split_path(self, split: str) -> Path:
        return self._paths[self._split_key(split)]

    def _split_key(self, split: object) -> str:
        key = _type_key(split)
        if key not in self._splits:
            raise KeyError(f"unknown split {key!r} in {self.root} (splits: {list(self._splits)})")
        return key

    def _partition(self, type_: object) -> _Partition:
        key = _type_key(type_)
        part = self._partitions.get(key)
        if part is None:
            raise KeyError(
                f"no per-client partition {key!r} in {self.root} "
                f"(partitions: {list(self._partitions)})"
            )
        return part

    def features(self, split: str) -> torch.Tensor:
        """All features of ``split``: a view of the mapped file."""
        return self._splits[self._split_key(split)][0]

    def labels(self, split: str) -> torch.Tensor:
        """All labels of ``split`` (int64): a view of the mapped file."""
        return self._splits[self._split_key(split)][1]

    def num_clients(self, type_: str) -> int:
        return self._partition(type_).num_clients

    def client_indices(self, type_: str, cid: int) -> torch.Tensor:
        """Client ``cid``'s indices into the split of ``type_``: a view of the manifest."""
        part = self._partition(type_)
        if isinstance(cid, bool):
            raise TypeError("cid must be an int, got bool")
        try:
            c = operator.index(cid)
        except TypeError:
            raise TypeError(f"cid must be an int or None, got {type(cid).__name__}") from None
        if not 0 <= c < part.num_clients:
            raise IndexError(
                f"client id {c} is out of range for partition {_type_key(type_)!r} "
                f"with {part.num_clients} clients"
            )
        return part.indices[int(part.offsets[c]) : int(part.offsets[c + 1])]

    def dataset(
        self,
        type_: str,
        cid: int | None = None,
        *,
        transform: Transform | None = None,
        target_transform: Transform | None = None,
        normalize: bool = True,
    ) -> MappedArrayDataset:
        """Client ``cid``'s part of partition ``type_``, or the whole split ``type_``
        when ``cid`` is ``None``. ``normalize=False`` reads raw values."""
        if cid is None:
            split = self._split_key(type_)
            indices = None
        else:
            split = self._partition(type_).split
            indices = self.client_indices(type_, cid)
        features, labels = self._splits[split]
        out = MappedArrayDataset(
            features,
            labels,
            indices,
            transform=transform,
            target_transform=target_transform,
            normalization=self.normalization if normalize else None,
        )
        out._origin = (str(self.root), split)
        return out

    def __repr__(self) -> str:
        return (
            f"DatasetStore({str(self.root)!r}, splits={list(self._splits)}, "
            f"partitions={ {k: p.num_clients for k, p in self._partitions.items()} })"
        )


class StorePartitionedDataset:
    """A :class:`~emberfl.core.PartitionedDataset` backed by a :class:`DatasetStore`.

    Pickles as the store directory plus its settings: unpickling in a worker opens
    (maps) the store lazily, once per process. ``shuffle`` names the partition types
    whose loaders shuffle (with the generator given to :meth:`get_dataloader`).
    ``transforms``/``target_transforms`` map partition types to per-sample
    transforms (they are pickled with the settings, so they must be picklable).
    Datasets given to :meth:`set_dataset` replace the store's in this object and are
    pickled along with it: keep them small (subsets of store datasets pickle as
    their indices).
    """

    def __init__(
        self,
        root: PathLike,
        *,
        shuffle: Iterable[str] = ("train",),
        drop_last: bool = False,
        transforms: Mapping[str, Transform] | None = None,
        target_transforms: Mapping[str, Transform] | None = None,
        normalize: bool = True,
    ) -> None:
        self.root = str(root)
        if isinstance(shuffle, str):
            raise TypeError("shuffle must be a collection of partition types, not one string")
        self.shuffle = frozenset(_type_key(t) for t in shuffle)
        self.drop_last = bool(drop_last)
        self.transforms = {_type_key(k): v for k, v in (transforms or {}).items()}
        self.target_transforms = {_type_key(k): v for k, v in (target_transforms or {}).items()}
        self.normalize = bool(normalize)
        self._overrides: dict[tuple[str, int | None], Dataset[Any]] = {}
        self._store: DatasetStore | None = DatasetStore.open(self.root)  # fail early

    @property
    def store(self) -> DatasetStore:
        if self._store is None:
            self._store = DatasetStore.open(self.root)
        return self._store

    @staticmethod
    def _cid(cid: object) -> int | None:
        if cid is None:
            return None
        if isinstance(cid, bool):
            raise TypeError("cid must be an int or None, got bool")
        try:
            return operator.index(cid)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"cid must be an int or None, got {type(cid).__name__}") from None

    def get_dataset(self, type_: str, cid: int | None) -> Dataset[Any]:
        key = (_type_key(type_), self._cid(cid))
        override = self._overrides.get(key)
        if override is not None:
            return override
        return self.store.dataset(
            key[0],
            key[1],
            transform=self.transforms.get(key[0]),
            target_transform=self.target_transforms.get(key[0]),
            normalize=self.normalize,
        )

    def set_dataset(self, type_: str, cid: int | None, dataset: Dataset[Any]) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a torch Dataset, got {type(dataset).__name__}")
        self._overrides[(_type_key(type_), self._cid(cid))] = dataset

    def get_dataloader(
        self,
        type_: str,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader[Any]:
        """A loader over ``get_dataset(type_, cid)``; ``batch_size=None`` means one
        batch with every sample. Shuffles when ``type_`` is in ``shuffle``."""
        dataset = self.get_dataset(type_, cid)
        n = len(dataset)  # type: ignore[arg-type]
        if batch_size is None:
            batch_size = max(n, 1)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        # An empty dataset has nothing to shuffle (and RandomSampler rejects it).
        shuffle = _type_key(type_) in self.shuffle and n > 0
        if isinstance(dataset, MappedArrayDataset):
            return MappedDataLoader(
                dataset,
                batch_size=batch_size,
                shuffle=shuffle,
                generator=generator,
                drop_last=self.drop_last,
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=self.drop_last,
            num_workers=0,
        )

    def num_clients(self, type_: str) -> int:
        return self.store.num_clients(type_)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None  # reopened (from the per-process cache) on first use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"StorePartitionedDataset({self.root!r})"
