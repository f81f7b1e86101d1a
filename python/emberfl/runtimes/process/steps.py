"""FedAvg-family clients in the process pool: BlazeFL's process-pool trainer and its tasks.

:class:`FedAvgProcessPoolClientTrainer` is the process pool
(:class:`~emberfl.runtimes.process.trainer.ProcessPoolClientTrainer`) running a client
step (:class:`~emberfl.core.step.FedAvgClientUpdate`; FedAvg's by default), with
BlazeFL's constructor. Each task is a :class:`FedAvgClientConfig`, pickled small; a
worker process keeps the model it built for its last client and reloads only the
weights. Uplinks are bitwise those of the serial and thread-pool trainers for the same
seed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emberfl.core.client_state import ClientStateStore
from emberfl.core.context import current_client
from emberfl.core.ipc import IPCMode, accept_ipc_mode
from emberfl.core.model_packages import (
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgUplinkPackage,
)
from emberfl.core.model_selector import ModelSelector
from emberfl.core.step import FedAvgClientUpdate
from emberfl.runtimes.client_round import client_loader
from emberfl.runtimes.process.trainer import ProcessPoolClientTrainer
from emberfl.runtimes.settings import FedAvgTrainerSettings, SettingsAttributes

__all__ = ["FedAvgClientConfig", "FedAvgProcessPoolClientTrainer"]


@dataclass
class FedAvgClientConfig:
    """Everything a worker process needs to run one client (pickled per task).

    ``dataset`` should pickle small (a :class:`~emberfl.data.StorePartitionedDataset`
    pickles as its directory). ``seed`` is the run's seed: the runtime seeds each
    client's generators from ``(seed, cid, round)``.
    """

    model_selector: ModelSelector[Any]
    model_name: str
    dataset: FedAvgPartitionedDataset
    epochs: int
    batch_size: int
    lr: float
    cid: int
    seed: int
    state_path: Path
    client_update: FedAvgClientUpdate
    state_dir: Path | None = None


# A worker process runs one client at a time, so it can keep the model it built for
# the last client and reload only the weights. Keyed by selector, name and device;
# a selector that is not hashable (or compares by identity) is simply not reused.
_WORKER_MODELS: dict[tuple[Any, str, str], nn.Module] = {}
_WORKER_MODELS_MAX = 4


def _worker_model(selector: ModelSelector[Any], name: str, device: str) -> nn.Module:
    key = (selector, name, device)
    try:
        model = _WORKER_MODELS.get(key)
    except TypeError:
        return selector.select_model(name).to(device)
    if model is None:
        model = selector.select_model(name).to(device)
        if len(_WORKER_MODELS) >= _WORKER_MODELS_MAX:
            _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = model
    return model


class FedAvgProcessPoolClientTrainer(
    SettingsAttributes,
    ProcessPoolClientTrainer[
        FedAvgUplinkPackage, FedAvgDownlinkPackage, FedAvgClientConfig, FedAvgUplinkPackage
    ],
):
    """Runs clients in ``num_parallels`` persistent worker processes (BlazeFL's arguments).

    The payload is written once per round to a file every worker maps; each uplink
    comes back mapped from the file its worker wrote, so the server averages the
    clients' models without copying them. ``state_dir`` holds per-client state files
    (for algorithms that keep any). Keyword extras: ``client_update`` (the client
    step; FedAvg's by default), ``progress`` (a bar per round), ``share_dir``
    (where round files go; default: the system's temporary directory),
    ``torch_threads`` (intra-op threads of each worker; default 1, so that the bits
    do not depend on the number of workers) and
    ``ipc_mode`` (BlazeFL 2.x's transport choice, accepted for its scripts: both modes
    move tensors through memory-mapped files here).
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        state_dir: Path | str,
        dataset: FedAvgPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        num_parallels: int,
        *,
        client_update: FedAvgClientUpdate | None = None,
        progress: bool = True,
        share_dir: Path | str | None = None,
        torch_threads: int | None = None,
        ipc_mode: IPCMode | str | None = None,
    ) -> None:
        if state_dir is None:
            raise TypeError(
                f"{type(self).__name__} needs state_dir: the directory for per-client state"
            )
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
            state_dir=Path(state_dir),
            client_update=FedAvgClientUpdate() if client_update is None else client_update,
            progress=progress,
        )
        self.settings.client_state()  # creates state_dir now, as BlazeFL's trainers do
        mode = accept_ipc_mode(ipc_mode)
        if mode is not None:  # otherwise the protocol's default, IPCMode.STORAGE
            self.ipc_mode = mode
        self.num_parallels = num_parallels
        self.device_count = torch.cuda.device_count()
        self.cache: list[FedAvgUplinkPackage] = []
        self.stop_event = threading.Event()
        self.share_dir = share_dir
        if torch_threads is not None:
            self.torch_threads = torch_threads

    def get_client_config(self, cid: int) -> FedAvgClientConfig:
        """The settings of client ``cid``'s task."""
        settings = self.settings
        assert settings.state_dir is not None
        return FedAvgClientConfig(
            model_selector=settings.model_selector,
            model_name=settings.model_name,
            dataset=settings.dataset,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            cid=cid,
            seed=settings.seed,
            state_path=ClientStateStore(settings.state_dir).path(cid),
            client_update=settings.client_update,
            state_dir=settings.state_dir,
        )

    @staticmethod
    def worker(
        config: FedAvgClientConfig,
        payload: FedAvgDownlinkPackage,
        device: str,
        stop_event: Any,
        *,
        shm_buffer: FedAvgUplinkPackage | None = None,
    ) -> FedAvgUplinkPackage:
        """Train one client in a worker process and return its uplink."""
        model = _worker_model(config.model_selector, config.model_name, device)
        loader = client_loader(
            config.dataset, config.cid, config.batch_size, current_client().rng.torch_cpu
        )
        return config.client_update(
            cid=config.cid,
            model=model,
            payload=payload,
            loader=loader,
            device=device,
            epochs=config.epochs,
            lr=config.lr,
            stop_event=stop_event,
            state=None if config.state_dir is None else ClientStateStore(config.state_dir),
        )

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """The uplinks produced since the last call (their tensors map worker files)."""
        package, self.cache = self.cache, []
        return package
