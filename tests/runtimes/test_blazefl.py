"""Code written for BlazeFL 3.0 runs after changing only the import.

The classes below follow BlazeFL's FedAvg example: own ``__init__`` that never calls
the base class's, a ``multiprocessing.Manager().Event()`` as ``stop_event`` kept with
its manager on ``self.manager``, a ``@staticmethod`` worker, and the shared-memory
uplink protocol (``prepare_uplink_package_buffer`` / ``SHMHandle`` /
``convert_buffer_to_uplink``). A second trainer returns its package directly. A third
is written as for BlazeFL 2.x: three type parameters, ``ipc_mode`` and a
``share_dir`` it leaves to the runtime to create.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from emberfl.core import (
    BaseServerHandler,
    FilteredDataset,
    IPCMode,
    ModelSelector,
    PartitionedDataset,
    ProcessPoolClientTrainer,
    SHMHandle,
    deserialize_model,
    serialize_model,
)
from emberfl.core import ipc as core_ipc
from emberfl.reproducibility import create_rng_suite, setup_reproducibility


@dataclass
class FedAvgUplinkPackage:
    cid: int
    model_parameters: torch.Tensor
    data_size: int
    metadata: dict[str, float] | None = None


@dataclass
class FedAvgProcessPoolUplinkPackage:
    cid: int
    model_parameters: torch.Tensor | SHMHandle
    data_size: int
    metadata: dict[str, float] | None = None


@dataclass
class FedAvgDownlinkPackage:
    model_parameters: torch.Tensor


class PartitionType(str, Enum):
    TRAIN = "train"


class ModelName(str, Enum):
    MLP = "mlp"


class Selector(ModelSelector[ModelName]):
    def select_model(self, model_name: ModelName) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


class ToyPartitionedDataset(PartitionedDataset[PartitionType]):
    """Keeps every client's tensors in the object, as simple BlazeFL datasets do."""

    def __init__(self, num_clients: int) -> None:
        g = torch.Generator().manual_seed(7)
        x = torch.randn(num_clients * 10, 5, generator=g)
        y = torch.randint(0, 2, (num_clients * 10,), generator=g)
        self.parts = {
            cid: FilteredDataset(list(range(cid * 10, cid * 10 + 10)), list(x), y.tolist())
            for cid in range(num_clients)
        }

    def get_dataset(self, type_: PartitionType, cid: int | None) -> Any:
        assert cid is not None
        return self.parts[cid]

    def set_dataset(self, type_: PartitionType, cid: int | None, dataset: Any) -> None:
        assert cid is not None
        self.parts[cid] = dataset

    def get_dataloader(
        self,
        type_: PartitionType,
        cid: int | None,
        batch_size: int | None,
        generator: torch.Generator | None,
    ) -> DataLoader[Any]:
        ds = self.get_dataset(type_, cid)
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        ys = torch.tensor([ds[i][1] for i in range(len(ds))])
        return DataLoader(
            TensorDataset(xs, ys), batch_size=batch_size, shuffle=True, generator=generator
        )


class FedAvgServerHandler(BaseServerHandler[FedAvgUplinkPackage, FedAvgDownlinkPackage]):
    def __init__(self, global_round: int, num_clients: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = Selector().select_model(ModelName.MLP)
        self.global_round = global_round
        self.num_clients = num_clients
        self.round = 0
        self.client_buffer_cache: list[FedAvgUplinkPackage] = []
        self.rng_suite = create_rng_suite(seed)

    def sample_clients(self) -> list[int]:
        return sorted(self.rng_suite.python.sample(range(self.num_clients), 3))

    def if_stop(self) -> bool:  # the earlier BlazeFL name
        return self.round >= self.global_round

    def load(self, payload: FedAvgUplinkPackage) -> bool:
        self.client_buffer_cache.append(payload)
        if len(self.client_buffer_cache) == 3:
            self.global_update(self.client_buffer_cache)
            self.round += 1
            self.client_buffer_cache = []
            return True
        return False

    def global_update(self, buffer: list[FedAvgUplinkPackage]) -> None:
        total = sum(p.data_size for p in buffer)
        agg = buffer[0].model_parameters.clone().zero_()
        for p in buffer:
            agg.add_(p.model_parameters, alpha=p.data_size / total)
        deserialize_model(self.model, agg)

    def downlink_package(self) -> FedAvgDownlinkPackage:
        return FedAvgDownlinkPackage(serialize_model(self.model))


@dataclass
class FedAvgClientConfig:
    model_selector: ModelSelector[ModelName]
    model_name: ModelName
    dataset: ToyPartitionedDataset
    epochs: int
    batch_size: int
    lr: float
    cid: int
    seed: int


def _fedavg_train(
    model: torch.nn.Module,
    model_parameters: torch.Tensor,
    train_loader: DataLoader[Any],
    device: str,
    epochs: int,
    lr: float,
    stop_event: Any,
) -> tuple[torch.Tensor, int]:
    model.to(device)
    deserialize_model(model, model_parameters)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        if stop_event.is_set():
            break
        for data, target in train_loader:
            loss = criterion(model(data.to(device)), target.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return serialize_model(model), len(train_loader.dataset)  # type: ignore[arg-type]


class FedAvgProcessPoolClientTrainer(
    ProcessPoolClientTrainer[
        FedAvgUplinkPackage,
        FedAvgDownlinkPackage,
        FedAvgClientConfig,
        FedAvgProcessPoolUplinkPackage,
    ]
):
    def __init__(self, dataset: ToyPartitionedDataset, seed: int, num_parallels: int) -> None:
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.device_count = torch.cuda.device_count()
        self.cache: list[FedAvgUplinkPackage] = []
        self.model_selector = Selector()
        self.model_name = ModelName.MLP
        self.dataset = dataset
        self.epochs = 2
        self.batch_size = 4
        self.lr = 0.1
        self.seed = seed
        self.manager = mp.Manager()
        self.stop_event = self.manager.Event()
        self.model_parameters_buffer = serialize_model(
            self.model_selector.select_model(self.model_name)
        )
        self.progress_calls = 0

    def progress_fn(self, it: list[Any]) -> Iterable[Any]:
        self.progress_calls += 1
        return it

    def prepare_uplink_package_buffer(self) -> FedAvgProcessPoolUplinkPackage:
        return FedAvgProcessPoolUplinkPackage(
            cid=-1, model_parameters=self.model_parameters_buffer.clone(), data_size=0
        )

    def convert_buffer_to_uplink(
        self, buffer: FedAvgProcessPoolUplinkPackage
    ) -> FedAvgUplinkPackage:
        assert isinstance(buffer.model_parameters, torch.Tensor)
        return FedAvgUplinkPackage(
            cid=buffer.cid,
            model_parameters=buffer.model_parameters,
            data_size=buffer.data_size,
            metadata=buffer.metadata,
        )

    @staticmethod
    def worker(
        config: FedAvgClientConfig,
        payload: FedAvgDownlinkPackage,
        device: str,
        stop_event: threading.Event,
        *,
        shm_buffer: FedAvgProcessPoolUplinkPackage | None = None,
    ) -> FedAvgProcessPoolUplinkPackage:
        setup_reproducibility(config.seed)
        state = create_rng_suite(config.seed)
        model = config.model_selector.select_model(config.model_name)
        train_loader = config.dataset.get_dataloader(
            type_=PartitionType.TRAIN,
            cid=config.cid,
            batch_size=config.batch_size,
            generator=state.torch_cpu,
        )
        params, data_size = _fedavg_train(
            model,
            payload.model_parameters,
            train_loader,
            device,
            config.epochs,
            config.lr,
            stop_event,
        )
        package = FedAvgProcessPoolUplinkPackage(config.cid, params, data_size)
        if shm_buffer is None or not isinstance(shm_buffer.model_parameters, torch.Tensor):
            raise RuntimeError("shm_buffer must be a pre-allocated shared memory package")
        assert isinstance(package.model_parameters, torch.Tensor)
        shm_buffer.model_parameters.copy_(package.model_parameters)
        package.model_parameters = SHMHandle()
        return package

    def get_client_config(self, cid: int) -> FedAvgClientConfig:
        return FedAvgClientConfig(
            model_selector=self.model_selector,
            model_name=self.model_name,
            dataset=self.dataset,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            cid=cid,
            seed=self.seed + cid,
        )

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        package = self.cache
        self.cache = []
        return package


class DirectClientTrainer(FedAvgProcessPoolClientTrainer):
    """The same client, returning its package without the shared-memory buffer."""

    @staticmethod
    def worker(  # type: ignore[override]
        config: FedAvgClientConfig,
        payload: FedAvgDownlinkPackage,
        device: str,
        stop_event: threading.Event,
        *,
        shm_buffer: FedAvgProcessPoolUplinkPackage | None = None,
    ) -> FedAvgUplinkPackage:
        assert shm_buffer is None
        state = create_rng_suite(config.seed)
        model = config.model_selector.select_model(config.model_name)
        loader = config.dataset.get_dataloader(
            PartitionType.TRAIN, config.cid, config.batch_size, state.torch_cpu
        )
        params, n = _fedavg_train(
            model, payload.model_parameters, loader, device, config.epochs, config.lr, stop_event
        )
        return FedAvgUplinkPackage(config.cid, params, n, {"seen_stop": float(stop_event.is_set())})

    prepare_uplink_package_buffer = ProcessPoolClientTrainer.prepare_uplink_package_buffer  # type: ignore[assignment]
    convert_buffer_to_uplink = ProcessPoolClientTrainer.convert_buffer_to_uplink  # type: ignore[assignment]


def run_pipeline(trainer: Any, handler: FedAvgServerHandler) -> list[list[int]]:
    """BlazeFL's pipeline loop."""
    rounds = []
    while not handler.if_stop():
        cids = handler.sample_clients()
        broadcast = handler.downlink_package()
        trainer.local_process(broadcast, cids)
        uploads = trainer.uplink_package()
        assert [p.cid for p in uploads] == cids
        for pack in uploads:
            handler.load(pack)
        rounds.append(cids)
    return rounds


@pytest.mark.slow
def test_blazefl_style_trainers_run_unchanged_and_agree() -> None:
    dataset = ToyPartitionedDataset(num_clients=6)
    shm_trainer = FedAvgProcessPoolClientTrainer(dataset, seed=3, num_parallels=2)
    direct_trainer = DirectClientTrainer(dataset, seed=3, num_parallels=1)
    manager_pid = shm_trainer.manager._process.pid  # type: ignore[attr-defined]
    try:
        h1 = FedAvgServerHandler(global_round=2, num_clients=6, seed=11)
        rounds1 = run_pipeline(shm_trainer, h1)
        h2 = FedAvgServerHandler(global_round=2, num_clients=6, seed=11)
        rounds2 = run_pipeline(direct_trainer, h2)
        assert rounds1 == rounds2 and len(rounds1) == 2
        assert h1.is_stopped()  # works though only if_stop is defined
        assert shm_trainer.progress_calls == 2  # the progress hook wrapped each round
        # A Manager event reaches the workers as it is; it is set once a round ends.
        assert shm_trainer.stop_event.is_set()
        p1 = serialize_model(h1.model)
        p2 = serialize_model(h2.model)
        assert torch.equal(p1, p2)
        torch.manual_seed(11)
        initial = serialize_model(Selector().select_model(ModelName.MLP))
        assert not torch.equal(p1, initial)
    finally:
        shm_trainer.shutdown()
        direct_trainer.shutdown()
    # shutdown() also stops the Manager, as BlazeFL's does.
    assert not hasattr(shm_trainer, "manager")
    assert not psutil.pid_exists(manager_pid) or (
        psutil.Process(manager_pid).status() == psutil.STATUS_ZOMBIE
    )
    assert shm_trainer.worker_pids == []


class BlazeFL2Trainer(
    ProcessPoolClientTrainer[
        FedAvgProcessPoolUplinkPackage, FedAvgDownlinkPackage, FedAvgClientConfig
    ]
):
    """BlazeFL 2.x's shape: the buffer is an uplink package, no convert step."""

    def __init__(
        self,
        dataset: ToyPartitionedDataset,
        share_dir: Path,
        ipc_mode: IPCMode | str | None,
    ) -> None:
        self.num_parallels = 0
        self.share_dir = share_dir
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[FedAvgProcessPoolUplinkPackage] = []
        if ipc_mode is not None:
            self.ipc_mode = ipc_mode  # type: ignore[assignment]
        self.stop_event = threading.Event()
        self.progress = False
        self.dataset = dataset
        self.model_parameters_buffer = serialize_model(Selector().select_model(ModelName.MLP))

    def get_client_config(self, cid: int) -> FedAvgClientConfig:
        return FedAvgClientConfig(Selector(), ModelName.MLP, self.dataset, 2, 4, 0.1, cid, 3 + cid)

    def prepare_uplink_package_buffer(self) -> FedAvgProcessPoolUplinkPackage:
        return FedAvgProcessPoolUplinkPackage(-1, self.model_parameters_buffer.clone(), 0)

    @staticmethod
    def worker(
        config: FedAvgClientConfig,
        payload: FedAvgDownlinkPackage,
        device: str,
        stop_event: threading.Event,
        *,
        shm_buffer: FedAvgProcessPoolUplinkPackage | None = None,
    ) -> FedAvgProcessPoolUplinkPackage:
        assert shm_buffer is not None and isinstance(shm_buffer.model_parameters, torch.Tensor)
        state = create_rng_suite(config.seed)
        model = config.model_selector.select_model(config.model_name)
        loader = config.dataset.get_dataloader(
            PartitionType.TRAIN, config.cid, config.batch_size, state.torch_cpu
        )
        params, n = _fedavg_train(
            model, payload.model_parameters, loader, device, config.epochs, config.lr, stop_event
        )
        shm_buffer.model_parameters.copy_(params)
        return FedAvgProcessPoolUplinkPackage(config.cid, SHMHandle(), n)


def _ipc_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "ipc_mode=" in r.getMessage()]


def test_a_blazefl_2_trainer_with_ipc_mode_runs_and_makes_its_share_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_ipc, "_told", False)
    caplog.set_level(logging.INFO, logger="emberfl.core")
    dataset = ToyPartitionedDataset(num_clients=6)
    models = []
    for mode in (IPCMode.SHARED_MEMORY, IPCMode.STORAGE):
        share_dir = tmp_path / mode.value / "share"
        with BlazeFL2Trainer(dataset, share_dir, mode) as trainer:
            handler = FedAvgServerHandler(global_round=2, num_clients=6, seed=11)
            assert len(run_pipeline(trainer, handler)) == 2
            share = trainer.share_path
            assert share is not None and share.parent == share_dir
        assert not (tmp_path / mode.value).exists()  # made for the trainer, removed with it
        models.append(serialize_model(handler.model))
    # Either mode moves tensors the same way, so the runs agree bit for bit.
    assert torch.equal(models[0], models[1])
    told = _ipc_records(caplog)
    assert len(told) == 1 and "ipc_mode=SHARED_MEMORY" in told[0]


def test_ipc_mode_is_checked_when_a_round_starts_and_silent_when_unset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_ipc, "_told", False)
    caplog.set_level(logging.INFO, logger="emberfl.core")
    payload = FedAvgDownlinkPackage(serialize_model(Selector().select_model(ModelName.MLP)))
    dataset = ToyPartitionedDataset(num_clients=2)
    with BlazeFL2Trainer(dataset, tmp_path / "bad", "pipes") as trainer:
        message = r"BlazeFL2Trainer\.ipc_mode must be one of STORAGE, SHARED_MEMORY, got 'pipes'"
        with pytest.raises(ValueError, match=message):
            trainer.local_process(payload, [0])
        assert trainer.rounds_run == 0 and trainer.cache == []
    with BlazeFL2Trainer(dataset, tmp_path / "unset", None) as trainer:
        assert trainer.ipc_mode is IPCMode.STORAGE  # the protocol's default, as in BlazeFL
        trainer.local_process(payload, [1])
        assert [p.cid for p in trainer.uplink_package()] == [1]
    assert _ipc_records(caplog) == []  # nothing to say about a setting nobody made
