"""A run's data, from its configuration: the dataset loaded, split among the clients
(seeded: every rank of a multi-rank job makes the same split) and written to the
memory-mapped dataset store its trainers read."""

from __future__ import annotations

import os
from typing import Any

from emberfl.config import ConfigError, SimulationConfig
from emberfl.data import Dataset, DatasetStore, Partition, StorePartitionedDataset, load_dataset
from emberfl.data import dirichlet as dirichlet_partition
from emberfl.data import iid as iid_partition
from emberfl.data import quantity_skew as quantity_partition
from emberfl.data import shards as shards_partition

__all__ = ["load_run_data", "write_store"]


def load_run_data(config: SimulationConfig) -> tuple[Dataset, Partition]:
    """The dataset ``config`` names and its split among ``config.clients`` clients."""
    options: dict[str, Any] = {}
    if config.dataset_key == "synthetic":
        options = {
            "alpha": config.synthetic_alpha,
            "beta": config.synthetic_beta,
            "num_clients": config.clients,
        }
    data = load_dataset(config.dataset_key, config.data_dir, config.seed, **options)
    partition = _partition(config, data)
    if partition.num_clients != config.clients:
        raise ConfigError(
            f"the partition has {partition.num_clients} clients, expected {config.clients}"
        )
    return data, partition


def _partition(config: SimulationConfig, data: Dataset) -> Partition:
    name = config.partition_name
    labels = data.train_y
    if name == "natural":
        if data.partition is None:
            raise ConfigError(f"dataset {config.dataset_key!r} has no built-in client split")
        return data.partition
    try:
        if name == "iid":
            return iid_partition(labels, config.clients, seed=config.seed)
        if name == "dirichlet":
            return dirichlet_partition(labels, config.clients, config.alpha, seed=config.seed)
        if name == "shards":
            return shards_partition(
                labels, config.clients, config.shards_per_client, seed=config.seed
            )
        return quantity_partition(labels, config.clients, config.sigma, seed=config.seed)
    except ValueError as exc:
        raise ConfigError(f"cannot partition {config.dataset_key}: {exc}") from exc


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
