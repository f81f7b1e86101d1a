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
:class:`StorePartitionedDataset` pickles as its directory and a few settings, and the
:class:`~emberfl.data.MappedArrayDataset` objects it hands out as their directory,
split and indices, so tasks sent to workers never carry data.

Its ~600 lines are one concept, the store's on-disk format: writing it, validating it
on open (ids, offsets, index ranges) and serving its partitions; the datasets and
loaders over mapped arrays are :mod:`emberfl.data.mapped`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from emberfl import store
from emberfl.data.mapped import (
    IndexList,
    MappedArrayDataset,
    MappedDataLoader,
    Normalization,
    Transform,
    as_index_tensor,
    check_range,
    is_integer_dtype,
)
from emberfl.reproducibility import check_client_id

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "ClientPartition",
    "DatasetStore",
    "StorePartitionedDataset",
]

logger = logging.getLogger(__name__)

# The on-disk format's name: stores written by earlier versions carry it, so it stays.
FORMAT = "emberfl.datastore/1"
MANIFEST_NAME = "_manifest.safetensors"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

TensorLike: TypeAlias = "torch.Tensor | np.ndarray"
PathLike: TypeAlias = "str | os.PathLike[str]"


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


@dataclass(frozen=True)
class ClientPartition:
    """Per-client sample indices into ``split``: ``indices[c]`` belongs to client ``c``."""

    split: str
    indices: Sequence[IndexList]


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
                check_range(indices, self._splits[split][0].shape[0], what)
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
            if not is_integer_dtype(labels.dtype):
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
                idx = as_index_tensor(client, what)
                check_range(idx, n, what)
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
        c = check_client_id(cid, "cid")
        if c >= part.num_clients:
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
        return MappedArrayDataset(
            features,
            labels,
            indices,
            transform=transform,
            target_transform=target_transform,
            normalization=self.normalization if normalize else None,
            source=_StoreSplit(str(self.root), split),
        )

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
        return None if cid is None else check_client_id(cid, "cid")

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


@dataclass(frozen=True)
class _StoreSplit:
    """One split of a store, as a :class:`~emberfl.data.mapped.TensorSource`: pickles as
    its directory and name and maps the store again (once per process) when read."""

    root: str
    split: str

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        ds = DatasetStore.open(self.root)
        return ds.features(self.split), ds.labels(self.split)

    def normalization(self) -> Normalization | None:
        return DatasetStore.open(self.root).normalization

    def __str__(self) -> str:
        return f"{self.root}:{self.split}"
