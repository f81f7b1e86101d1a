"""The serial FedAvg-family client trainer: clients one after another in this process.

:class:`FedAvgBaseClientTrainer` is BlazeFL's serial trainer, with its constructor: it
runs any client step (:class:`~emberfl.core.step.FedAvgClientUpdate`; FedAvg's by
default) and gives bitwise the same uplinks as the process and thread pools
(:mod:`emberfl.runtimes.process.steps`, :mod:`emberfl.runtimes.thread`) for the same
seed: every client's batch order comes from the generator of ``(seed, cid, round)``
(:mod:`emberfl.runtimes.client_round`). Its arguments live in one
:class:`~emberfl.runtimes.settings.FedAvgTrainerSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from emberfl.core.client_trainer import BaseClientTrainer, deliver_uplink
from emberfl.core.fold import InProcessFold, read_fold
from emberfl.core.model_packages import (
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgUplinkPackage,
)
from emberfl.core.model_selector import ModelSelector
from emberfl.core.step import FedAvgClientUpdate
from emberfl.reproducibility import RandomStateSnapshot
from emberfl.runtimes.client_round import as_payload, client_round
from emberfl.runtimes.settings import FedAvgTrainerSettings, SettingsAttributes

__all__ = ["FedAvgBaseClientTrainer"]


class FedAvgBaseClientTrainer(
    SettingsAttributes, BaseClientTrainer[FedAvgUplinkPackage, FedAvgDownlinkPackage]
):
    """Runs the clients one after another in this process (BlazeFL's serial trainer).

    As in the worker processes, the global random generators are seeded from
    ``(seed, cid, round)`` while a client runs, and restored when the round is over.
    Keyword extras: ``state_dir`` (where per-client state files go, for algorithms
    that keep any), ``client_update`` (the client step; FedAvg's by default) and
    ``progress`` (a bar per round).
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        dataset: FedAvgPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        *,
        state_dir: Path | str | None = None,
        client_update: FedAvgClientUpdate | None = None,
        progress: bool = True,
    ) -> None:
        self.settings = FedAvgTrainerSettings(
            model_selector,
            model_name,
            dataset,
            device,
            num_clients,
            epochs,
            batch_size,
            lr,
            seed,
            state_dir=None if state_dir is None else Path(state_dir),
            client_update=FedAvgClientUpdate() if client_update is None else client_update,
            progress=progress,
        )
        self.settings.client_state()  # creates state_dir now, as BlazeFL's trainers do
        self.model = model_selector.select_model(model_name)
        self.model.to(self.device)
        self.cache: list[FedAvgUplinkPackage] = []
        self.round = 0

    def local_process(
        self, payload: FedAvgDownlinkPackage | torch.Tensor, cid_list: list[int]
    ) -> None:
        """Train every client of ``cid_list`` from ``payload``; uplinks go to ``cache``."""
        package = as_payload(payload)
        settings = self.settings
        round_index = self.round
        self.round += 1
        snapshot = RandomStateSnapshot.capture()
        results: list[FedAvgUplinkPackage] = []
        fold = read_fold(self)
        folding = None if fold is None else InProcessFold(fold, len(cid_list))
        try:
            bar = tqdm(cid_list, desc="client", leave=False, disable=not settings.progress)
            for index, cid in enumerate(bar):
                with client_round(settings, cid, round_index) as loader:
                    uplink = self.train(package, loader, cid)
                if folding is not None:
                    uplink = folding.add(index, uplink)
                results.append(deliver_uplink(self, index, uplink))
        finally:
            RandomStateSnapshot.restore(snapshot)
        if folding is not None:
            folding.finish()
        self.cache.extend(results)

    def train(
        self,
        payload: FedAvgDownlinkPackage | torch.Tensor,
        train_loader: DataLoader[Any],
        cid: int,
    ) -> FedAvgUplinkPackage:
        """One client's update from ``payload`` on ``train_loader``."""
        settings = self.settings
        return settings.client_update(
            cid=cid,
            model=self.model,
            payload=as_payload(payload),
            loader=train_loader,
            device=settings.device,
            epochs=settings.epochs,
            lr=settings.lr,
            state=settings.client_state(),
        )

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """The uplinks produced since the last call."""
        package, self.cache = self.cache, []
        return package
