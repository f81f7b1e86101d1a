"""Datasets, seeded partitioners, and the memory-mapped store the clients read them from.

* :mod:`emberfl.data.datasets` -- datasets as numpy arrays (MNIST, CIFAR-10, ...);
* :mod:`emberfl.data.partition` -- seeded partitioners that split them among clients;
* :mod:`emberfl.data.registry` -- the data sets and partitioners a run can name, their
  settings and defaults (:data:`DATASETS`, :data:`PARTITIONERS`, :func:`load_dataset`);
* :mod:`emberfl.data.store` -- the dataset store: splits and partitions written once
  and memory-mapped by every worker (:class:`DatasetStore`,
  :class:`StorePartitionedDataset`);
* :mod:`emberfl.data.mapped` -- datasets over mapped arrays and loaders that fetch a
  batch in one indexing operation (:class:`MappedArrayDataset`,
  :class:`MappedDataLoader`).
"""

from emberfl.data.datasets import (
    DEFAULT_FASHION_MNIST_DIR,
    Dataset,
    DatasetError,
    DatasetNotFoundError,
    load_cifar10,
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
    Partition,
    dirichlet,
    iid,
    quantity_skew,
    shards,
)
from emberfl.data.registry import (
    DATA_SETTINGS,
    DATASET_NAMES,
    DATASETS,
    PARTITION_NAMES,
    PARTITIONERS,
    DatasetSpec,
    PartitionerSpec,
    dataset_spec,
    load_dataset,
    partitioner_spec,
)
from emberfl.data.store import ClientPartition, DatasetStore, StorePartitionedDataset

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "DATA_SETTINGS",
    "DEFAULT_FASHION_MNIST_DIR",
    "PARTITIONERS",
    "PARTITION_NAMES",
    "ClientPartition",
    "Dataset",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "DatasetStore",
    "MappedArrayDataset",
    "MappedDataLoader",
    "Normalization",
    "Partition",
    "PartitionerSpec",
    "StorePartitionedDataset",
    "TensorSource",
    "dataset_spec",
    "dirichlet",
    "iid",
    "iter_batches",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "partitioner_spec",
    "quantity_skew",
    "read_idx",
    "shards",
    "synthetic",
]
