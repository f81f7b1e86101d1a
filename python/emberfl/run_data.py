"""A run's data, from its configuration: the dataset loaded, split among the clients
(seeded: every rank of a multi-rank job makes the same split) and written to the
memory-mapped dataset store its trainers read.

The data set and the partitioner are looked up in :mod:`emberfl.data.registry`, and
each reads its settings from the configuration by name."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from emberfl.config import ConfigError, SimulationConfig
from emberfl.core.setting import Setting
from emberfl.data import (
    Dataset,
    DatasetStore,
    Partition,
    StorePartitionedDataset,
    dataset_spec,
    partitioner_spec,
)

__all__ = ["load_run_data", "write_store"]


def load_run_data(config: SimulationConfig) -> tuple[Dataset, Partition]:
    """The dataset ``config`` names and its split among ``config.clients`` clients."""
    try:
        spec = dataset_spec(config.dataset_key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    options = _options(config, spec.settings)
    data = spec.load(config.data_dir, config.seed, config.clients, options)
    partition = _partition(config, data)
    if partition.num_clients != config.clients:
        raise ConfigError(
            f"the partition has {partition.num_clients} clients, expected {config.clients}"
        )
    return data, partition


def _partition(config: SimulationConfig, data: Dataset) -> Partition:
    name = config.partition_name
    if name == "natural":
        # Not a partitioner: the split the data set comes with.
        if data.partition is None:
            raise ConfigError(f"dataset {config.dataset_key!r} has no built-in client split")
        return data.partition
    try:
        spec = partitioner_spec(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return spec.split(
            data.train_y, config.clients, config.seed, _options(config, spec.settings)
        )
    except ValueError as exc:
        raise ConfigError(f"cannot partition {config.dataset_key}: {exc}") from exc


def _options(config: SimulationConfig, settings: Iterable[Setting]) -> dict[str, Any]:
    """The values of ``settings`` in ``config``, by setting name."""
    return {s.name: getattr(config, s.name) for s in settings}


def write_store(
    root: str | os.PathLike[str], data: Dataset, partition: Partition, *, overwrite: bool = False
) -> StorePartitionedDataset:
    """Write ``data`` (splits ``train`` and ``test``) and the clients' ``partition`` of its
    training split to a dataset store at ``root``; returns the store as a
    :class:`~emberfl.core.PartitionedDataset` whose samples come out normalised.
    """
    DatasetStore.create(
        root,
        {"train": (data.train_x, data.train_y), "test": (data.test_x, data.test_y)},
        {"train": partition},
        mean=data.mean,
        std=data.std,
        scale=1.0,  # a Dataset keeps mean/std in the units of the stored values
        overwrite=overwrite,
    )
    return StorePartitionedDataset(root)
