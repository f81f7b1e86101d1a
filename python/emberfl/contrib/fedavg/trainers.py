"""FedAvg's three client trainers, with BlazeFL's constructors.

Serial (:class:`FedAvgBaseClientTrainer`), worker processes
(:class:`FedAvgProcessPoolClientTrainer`) and threads
(:class:`FedAvgThreadPoolClientTrainer`). All three give bitwise identical uplinks for
the same seed: every client's batch order comes from the generator of
``(seed, cid, round)`` (:func:`emberfl.core.current_client`). Their shared arguments
live in one :class:`~emberfl.contrib.fedavg.FedAvgTrainerSettings`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from emberfl.contrib.client_state import ClientStateStore
from emberfl.contrib.fedavg.packages import (
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgPartitionType,
    FedAvgUplinkPackage,
)
from emberfl.contrib.fedavg.settings import FedAvgTrainerSettings, SettingsAttributes
from emberfl.contrib.fedavg.update import FedAvgClientUpdate
from emberfl.core import (
    BaseClientTrainer,
    ClientContext,
    IPCMode,
    ModelSelector,
    ProcessPoolClientTrainer,
    ThreadPoolClientTrainer,
    accept_ipc_mode,
    client_scope,
    current_client,
    deliver_uplink,
)
from emberfl.core.fold import InProcessFold, read_fold
from emberfl.reproducibility import RandomStateSnapshot, seed_client

__all__ = [
    "FedAvgBaseClientTrainer",
    "FedAvgClientConfig",
    "FedAvgProcessPoolClientTrainer",
    "FedAvgThreadPoolClientTrainer",
]


def client_loader(
    dataset: FedAvgPartitionedDataset, cid: int, batch_size: int, generator: torch.Generator
) -> DataLoader[Any]:
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
    # BlazeFL's serial trainer takes the bare parameter vector.
    if isinstance(payload, torch.Tensor):
        return FedAvgDownlinkPackage(payload)
    return payload


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


class FedAvgThreadPoolClientTrainer(
    SettingsAttributes, ThreadPoolClientTrainer[FedAvgUplinkPackage, FedAvgDownlinkPackage]
):
    """Runs clients in ``num_parallels`` threads of this process (BlazeFL's arguments).

    The payload is shared as it is. Batch orders come from each client's own
    generator, so results equal the process pool's bit for bit. Keyword extras:
    ``state_dir``, ``client_update`` and ``progress``.
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
        num_parallels: int,
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
        self.num_parallels = num_parallels
        self.device_count = torch.cuda.device_count()
        self.cache: list[FedAvgUplinkPackage] = []
        self.stop_event = threading.Event()
        self._models = _ModelPool()

    def worker(
        self,
        cid: int,
        device: str,
        payload: FedAvgDownlinkPackage,
        stop_event: threading.Event,
    ) -> FedAvgUplinkPackage:
        """Train client ``cid`` in a worker thread."""
        settings = self.settings
        loader = client_loader(
            settings.dataset, cid, settings.batch_size, current_client().rng.torch_cpu
        )
        with self._models.borrow(settings.model_selector, settings.model_name, device) as model:
            return settings.client_update(
                cid=cid,
                model=model,
                payload=payload,
                loader=loader,
                device=device,
                epochs=settings.epochs,
                lr=settings.lr,
                stop_event=stop_event,
                state=settings.client_state(),
            )

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """The uplinks produced since the last call."""
        package, self.cache = self.cache, []
        return package


class _ModelPool:
    """Models lent to worker threads, one per concurrent client and reused afterwards.

    Building a model per client costs more than training it for small clients; the
    weights are overwritten from the payload anyway. Models of another selector or
    name than the one asked for (the trainer's settings changed) are dropped.
    """

    def __init__(self) -> None:
        self._free: dict[str, list[nn.Module]] = {}
        self._made_by: tuple[ModelSelector[Any] | None, str | None] = (None, None)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self, selector: ModelSelector[Any], name: str, device: str) -> Iterator[nn.Module]:
        with self._lock:
            made_by = self._made_by
            if made_by[0] is not selector or made_by[1] != name:
                self._free = {}
                self._made_by = (selector, name)
            free = self._free.setdefault(device, [])
            model = free.pop() if free else None
        if model is None:
            model = selector.select_model(name).to(device)
        try:
            yield model
        finally:
            with self._lock:
                if self._made_by[0] is selector and self._made_by[1] == name:
                    self._free.setdefault(device, []).append(model)
