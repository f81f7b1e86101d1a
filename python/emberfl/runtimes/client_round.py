"""One client's round in this process: its context, seeded generators and data loader.

What the FedAvg-family trainers share to run a client where they are (the serial
trainer, :mod:`emberfl.runtimes.serial`; the batched one,
:mod:`emberfl.runtimes.batched`) or to build its loader in a worker (the pools,
:mod:`emberfl.runtimes.thread`, :mod:`emberfl.runtimes.process.steps`): every client's
batch order comes from the generator of ``(seed, cid, round)``
(:func:`emberfl.core.current_client`), so all of them see the same batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from emberfl.core.context import ClientContext, client_scope
from emberfl.core.model_packages import (
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgPartitionType,
)
from emberfl.reproducibility import seed_client
from emberfl.runtimes.settings import FedAvgTrainerSettings

__all__ = ["as_payload", "client_loader", "client_round"]


def client_loader(
    dataset: FedAvgPartitionedDataset, cid: int, batch_size: int, generator: torch.Generator
) -> DataLoader[Any]:
    """Client ``cid``'s training loader, its batch order drawn from ``generator``."""
    return dataset.get_dataloader(
        type_=FedAvgPartitionType.TRAIN, cid=cid, batch_size=batch_size, generator=generator
    )


@contextlib.contextmanager
def client_round(
    settings: FedAvgTrainerSettings, cid: int, round_index: int
) -> Iterator[DataLoader[Any]]:
    """Client ``cid``'s round in this process: its context (:func:`current_client`), the
    global generators seeded from ``(seed, cid, round)`` and its loader, whose batch
    order comes from the client's own generator -- as the worker processes do it."""
    ctx = ClientContext(cid=cid, round=round_index, seed=settings.seed, device=settings.device)
    with client_scope(ctx):
        seed_client(settings.seed, cid, round_index)
        yield client_loader(settings.dataset, cid, settings.batch_size, ctx.rng.torch_cpu)


def as_payload(payload: FedAvgDownlinkPackage | torch.Tensor) -> FedAvgDownlinkPackage:
    """``payload`` as a downlink package (BlazeFL's serial trainer takes the bare
    parameter vector)."""
    if isinstance(payload, torch.Tensor):
        return FedAvgDownlinkPackage(payload)
    return payload
