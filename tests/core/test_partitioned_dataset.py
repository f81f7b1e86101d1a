"""The PartitionedDataset protocol and FilteredDataset (BlazeFL's API)."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from emberfl.core.partitioned_dataset import FilteredDataset, PartitionedDataset, PartitionType


class Part(str, Enum):
    """A partition type that works on Python 3.10 (no enum.StrEnum there)."""

    TRAIN = "train"
    TEST = "test"


class ListPartitioned(PartitionedDataset[Part]):
    """A minimal user implementation, as a BlazeFL user would write one."""

    def __init__(self, data: list[int], parts: dict[int, list[int]]) -> None:
        self.data = data
        self.parts = parts
        self.custom: dict[tuple[Part, int | None], Dataset[Any]] = {}

    def get_dataset(self, type_: Part, cid: int | None) -> Dataset[Any]:
        if (type_, cid) in self.custom:
            return self.custom[(type_, cid)]
        indices = self.parts[cid] if cid is not None else list(range(len(self.data)))
        return FilteredDataset(indices, self.data, [d % 2 for d in self.data])

    def set_dataset(self, type_: Part, cid: int | None, dataset: Dataset[Any]) -> None:
        self.custom[(type_, cid)] = dataset

    def get_dataloader(
        self,
        type_: Part,
        cid: int | None,
        batch_size: int | None,
        generator: torch.Generator | None,
    ) -> DataLoader[Any]:
        dataset = self.get_dataset(type_, cid)
        return DataLoader(dataset, batch_size=batch_size or 1, generator=generator)


def test_partition_type_accepts_str_enums_on_every_supported_python() -> None:
    assert PartitionType.__bound__ is str
    assert PartitionType.__contravariant__
    assert isinstance(Part.TRAIN, PartitionType.__bound__)
    if sys.version_info >= (3, 11):
        from enum import StrEnum

        class Modern(StrEnum):
            TRAIN = "train"

        assert isinstance(Modern.TRAIN, PartitionType.__bound__)


def test_user_partitioned_dataset_works_through_the_protocol() -> None:
    pd = ListPartitioned(list(range(10)), {0: [1, 3, 5], 1: [0, 2]})
    assert [pd.get_dataset(Part.TRAIN, 0)[i] for i in range(3)] == [(1, 1), (3, 1), (5, 1)]
    batches = list(pd.get_dataloader(Part.TRAIN, 1, 2, None))
    assert len(batches) == 1
    assert batches[0][0].tolist() == [0, 2]
    replacement = FilteredDataset([0], [42])
    pd.set_dataset(Part.TEST, None, replacement)
    assert pd.get_dataset(Part.TEST, None) is replacement


def test_filtered_dataset_selects_data_and_targets() -> None:
    data = ["a", "b", "c", "d"]
    targets = [10, 11, 12, 13]
    ds = FilteredDataset([2, 0, 2], data, targets)
    assert len(ds) == 3
    assert ds.data == ["c", "a", "c"]
    assert ds.targets == [12, 10, 12]
    assert [ds[i] for i in range(3)] == [("c", 12), ("a", 10), ("c", 12)]


def test_filtered_dataset_without_targets_returns_items_only() -> None:
    ds = FilteredDataset([1], ["x", "y"], transform=str.upper)
    assert not hasattr(ds, "targets")
    assert ds[0] == "Y"


def test_filtered_dataset_applies_transforms() -> None:
    ds = FilteredDataset(
        [0, 1], [1, 2], [3, 4], transform=lambda v: v * 10, target_transform=lambda t: -t
    )
    assert [ds[0], ds[1]] == [(10, -3), (20, -4)]
    # The transform runs at access time, not at construction.
    ds.transform = None
    assert ds[1] == (2, -4)


def test_filtered_dataset_over_arrays_collates_like_blazefl() -> None:
    images = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2)
    labels = np.array([0, 1, 2, 3, 4])
    ds = FilteredDataset([4, 1], images, labels, transform=torch.from_numpy)
    xb, yb = next(iter(DataLoader(ds, batch_size=2)))
    assert torch.equal(xb, torch.from_numpy(images[[4, 1]]))
    assert yb.tolist() == [4, 1]


def test_filtered_dataset_negative_indices_follow_sequence_rules() -> None:
    ds = FilteredDataset([-1, -4], [1, 2, 3, 4])
    assert [ds[0], ds[1]] == [4, 1]


def test_filtered_dataset_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        FilteredDataset([0], [1, 2, 3], [1, 2])
    with pytest.raises(IndexError, match=r"indices\[1\] = 3 is out of range for 3 items"):
        FilteredDataset([0, 3], [1, 2, 3])
    with pytest.raises(IndexError, match="out of range"):
        FilteredDataset([-4], [1, 2, 3])
    with pytest.raises(TypeError, match=r"indices\[0\] must be an integer"):
        FilteredDataset([0.5], [1, 2, 3])
