"""Datasets over memory-mapped arrays, and loaders that fetch a batch in one step.

A :class:`MappedArrayDataset` reads rows of a ``features`` and a ``labels`` tensor --
usually views of files a :class:`~emberfl.data.DatasetStore` mapped -- copying
nothing until a sample or batch is read, and normalising on the way
(:class:`Normalization`). :func:`iter_batches` and :class:`MappedDataLoader` yield the
same batches as ``torch.utils.data.DataLoader`` with the same generator draws, but
fetch each batch with one indexing operation instead of one call per sample.

A dataset whose tensors can be found again in another process (a
:class:`TensorSource`, such as a store's split) pickles as that source and its row
indices, never its data.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

__all__ = [
    "IndexList",
    "MappedArrayDataset",
    "MappedDataLoader",
    "Normalization",
    "TensorSource",
    "Transform",
    "as_index_tensor",
    "check_range",
    "is_integer_dtype",
    "iter_batches",
]

IndexList: TypeAlias = "Sequence[int] | np.ndarray | torch.Tensor"
Transform: TypeAlias = "Callable[[Any], Any]"


class TensorSource(Protocol):
    """Where a :class:`MappedArrayDataset`'s tensors come from, findable in any process.

    It pickles small (a path and a name, say) and, unpickled in another process,
    maps the same data again. :meth:`~emberfl.data.DatasetStore.dataset` gives its
    datasets one.
    """

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(features, labels)`` tensors."""
        ...

    def normalization(self) -> Normalization | None:
        """The normalisation that goes with them, if any."""
        ...


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds integers (not floating point, complex or bool)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def as_index_tensor(value: object, what: str) -> torch.Tensor:
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
    if not is_integer_dtype(t.dtype):
        raise TypeError(f"{what}: expected integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D list of indices, got shape {tuple(t.shape)}")
    return t.to(torch.int64).contiguous()


def check_range(indices: torch.Tensor, n: int, what: str) -> None:
    """``IndexError`` naming ``what`` unless every index lies in ``[0, n)``."""
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


class MappedArrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset over rows ``indices`` of ``features``/``labels`` (all rows when ``None``).

    ``features`` and ``labels`` are usually memory-mapped tensors from a
    :class:`~emberfl.data.DatasetStore`; nothing is copied until a sample or batch is
    read. ``__getitem__`` returns ``(x, y)`` as new tensors (``x`` normalised to
    float32 when a :class:`Normalization` is given, then passed through
    ``transform``), and :meth:`get_batch` fetches many rows with one indexing
    operation. With a ``source`` (datasets a store makes have one) it pickles as the
    source and its indices; without one it refuses to pickle rather than copy data.
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
        source: TensorSource | None = None,
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
            self.indices = as_index_tensor(indices, "indices")
            check_range(self.indices, features.shape[0], "indices")
        self.transform = transform
        self.target_transform = target_transform
        self.normalization = normalization
        self.source = source

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
        pos = as_index_tensor(positions, "positions")
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
        pos = as_index_tensor(positions, "positions")
        check_range(pos, len(self), "positions")
        rows = pos if self.indices is None else self.indices.index_select(0, pos)
        return MappedArrayDataset(
            self.features,
            self.labels,
            rows,
            transform=self.transform,
            target_transform=self.target_transform,
            normalization=self.normalization,
            source=self.source,
        )

    def __getstate__(self) -> dict[str, Any]:
        if self.source is None:
            raise TypeError(
                "a MappedArrayDataset without a source cannot be pickled (it would copy its "
                "data): write the data with DatasetStore.create and take datasets from the "
                "store, or give the dataset a TensorSource"
            )
        return {
            "source": self.source,
            "indices": None if self.indices is None else self.indices.tolist(),
            "normalize": self.normalization is not None,
            "transform": self.transform,
            "target_transform": self.target_transform,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        source: TensorSource = state["source"]
        features, labels = source.tensors()
        normalization = source.normalization() if state["normalize"] else None
        fresh = MappedArrayDataset(
            features,
            labels,
            state["indices"],
            transform=state["transform"],
            target_transform=state["target_transform"],
            normalization=normalization,
            source=source,
        )
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        where = "tensors" if self.source is None else str(self.source)
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
