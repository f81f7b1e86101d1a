"""The model packages of the FedAvg family: what a client receives and sends back.

FedAvg's downlink (the global state vector) and uplink (a client's state vector,
sample count and training metadata), and the partition types of a FedAvg dataset,
with BlazeFL 3.0's names. Algorithms whose clients send more (SCAFFOLD's control
variates) extend them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from emberfl.core.partitioned_dataset import PartitionedDataset

__all__ = [
    "FedAvgDownlinkPackage",
    "FedAvgPartitionType",
    "FedAvgPartitionedDataset",
    "FedAvgUplinkPackage",
]


@dataclass
class FedAvgUplinkPackage:
    """A client's result: its model state vector, sample count and training metadata.

    ``metadata`` holds ``loss`` (mean training cross-entropy), ``steps`` (optimizer
    steps) and ``train_seconds`` (wall time of the client's update).
    """

    cid: int
    model_parameters: torch.Tensor
    data_size: int
    metadata: dict[str, float] | None = None


@dataclass
class FedAvgDownlinkPackage:
    """What every client of a round receives: the global model's state vector."""

    model_parameters: torch.Tensor


class FedAvgPartitionType(str, Enum):
    """The partition types of a FedAvg dataset (BlazeFL's ``StrEnum``, 3.10-compatible)."""

    TRAIN = "train"
    TEST = "test"

    def __str__(self) -> str:
        return self.value


FedAvgPartitionedDataset = PartitionedDataset[FedAvgPartitionType]
