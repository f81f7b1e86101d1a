"""Datasets (as numpy arrays) and seeded partitioners that split them among clients."""

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
from emberfl.data.partition import (
    PARTITION_NAMES,
    Partition,
    dirichlet,
    iid,
    quantity_skew,
    shards,
)

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_FASHION_MNIST_DIR",
    "PARTITION_NAMES",
    "Dataset",
    "DatasetError",
    "DatasetNotFoundError",
    "Partition",
    "dirichlet",
    "iid",
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
