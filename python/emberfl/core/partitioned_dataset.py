"""The partitioned-dataset protocol and a filtering dataset wrapper (BlazeFL's API)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from torch import Generator
from torch.utils.data import DataLoader, Dataset

__all__ = ["FilteredDataset", "PartitionType", "PartitionedDataset"]

# BlazeFL bounds this by enum.StrEnum, which only exists from Python 3.11. Every
# StrEnum member, every ``class X(str, Enum)`` member and every plain string is a
# ``str``, so bounding by ``str`` accepts the same partition types on 3.10.
PartitionType = TypeVar("PartitionType", bound=str, contravariant=True)


class PartitionedDataset(Protocol[PartitionType]):
    """Data split into partition types (e.g. train/test) and per-client parts.

    ``cid=None`` stands for data that belongs to no client, such as the server's
    global test set.
    """

    def get_dataset(self, type_: PartitionType, cid: int | None) -> Dataset[Any]:
        """The dataset of partition ``type_`` for client ``cid``."""
        ...

    def set_dataset(self, type_: PartitionType, cid: int | None, dataset: Dataset[Any]) -> None:
        """Make ``dataset`` the one returned for ``type_`` and ``cid`` from now on."""
        ...

    def get_dataloader(
        self,
        type_: PartitionType,
        cid: int | None,
        batch_size: int | None,
        generator: Generator | None,
    ) -> DataLoader[Any]:
        """A loader over ``get_dataset(type_, cid)``; ``generator`` drives shuffling."""
        ...


class FilteredDataset(Dataset[Any]):
    """The items of ``original_data`` (and ``original_targets``) at ``indices``.

    Items are selected once, at construction. ``__getitem__`` returns
    ``(transform(data), target_transform(target))`` when targets were given and
    ``transform(data)`` otherwise. Indices follow sequence rules: negative values
    count from the end; anything outside ``[-len, len)`` is an error.
    """

    data: list[Any]
    targets: list[Any]  # only set when targets were given (BlazeFL checks hasattr)
    transform: Callable[[Any], Any] | None
    target_transform: Callable[[Any], Any] | None

    def __init__(
        self,
        indices: Sequence[int] | Any,
        original_data: Sequence[Any] | Any,
        original_targets: Sequence[Any] | Any | None = None,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        n = len(original_data)
        if original_targets is not None and len(original_targets) != n:
            raise ValueError(
                "original_data and original_targets must have the same length, "
                f"got {n} and {len(original_targets)}"
            )
        positions: list[int] = []
        for k, raw in enumerate(indices):
            try:
                i = operator.index(raw)
            except TypeError:
                raise TypeError(
                    f"indices[{k}] must be an integer, got {type(raw).__name__}"
                ) from None
            if not -n <= i < n:
                raise IndexError(f"indices[{k}] = {i} is out of range for {n} items")
            positions.append(i)
        self.data = [original_data[i] for i in positions]
        if original_targets is not None:
            self.targets = [original_targets[i] for i in positions]
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        item = self.data[index]
        if self.transform is not None:
            item = self.transform(item)
        if not hasattr(self, "targets"):
            return item
        target = self.targets[index]
        if self.target_transform is not None:
            target = self.target_transform(target)
        return item, target
