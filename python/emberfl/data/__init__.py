"""Datasets, seeded partitioners, and the memory-mapped store the clients read them from.

* :mod:`emberfl.data.datasets` -- datasets as numpy arrays (MNIST, CIFAR-10, ...);
* :mod:`emberfl.data.partition` -- seeded partitioners that split them among clients;
* :mod:`emberfl.data.store` -- the dataset store: splits and partitions written once
  and memory-mapped by every worker (:class:`DatasetStore`,
  :class:`StorePartitionedDataset`);
* :mod:`emberfl.data.mapped` -- datasets over mapped arrays and loaders that fetch a
  batch in one indexing operation (:class:`MappedArrayDataset`,
  :class:`MappedDataLoader`).
"""

from emberfl.data.datasets import (
    DATASET_NAMES,
    DEFAULT_FASHION_MNIST_DIR,
    Dataset,
    DatasetError,
    DatasetNotFoundError,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    read_idx,
    synthetic,
)
from emberfl.data.mapped import (
    MappedArrayDataset,
    MappedDataLoader,
    Normalization,
    TensorSource,
    iter_batches,
)
from emberfl.data.partition import (
    PARTITION_NAMES,
    Partition,
    dirichlet,
    iid,
    quantity_skew,
    shards,
)
from emberfl.data.store import ClientPartition, DatasetStore, StorePartitionedDataset

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_FASHION_MNIST_DIR",
    "PARTITION_NAMES",
    "ClientPartition",
    "Dataset",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetStore",
    "MappedArrayDataset",
    "MappedDataLoader",
    "Normalization",
    "Partition",
    "StorePartitionedDataset",
    "TensorSource",
    "dirichlet",
    "iid",
    "iter_batches",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "quantity_skew",
    "read_idx",
    "shards",
    "synthetic",
]
