"""A script written for BlazeFL 2.0 runs after changing only ``blazefl`` to ``emberfl``.

The first part of this module is such a script, on tiny data: a partitioned dataset
that pickles each client's :class:`FilteredDataset` to disk, a model selector with
string-enum names, a pipeline that loops on ``handler.if_stop()``, and the trainers
built with keyword arguments -- the process pool with BlazeFL 2.x's ``share_dir``
(which does not exist yet) and ``ipc_mode``. The tests below run it on every
execution mode and both IPC modes.
"""

import logging
import math
from collections.abc import Sized
from datetime import datetime
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from emberfl.contrib import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgPartitionType,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
)
from emberfl.core import (
    FilteredDataset,
    IPCMode,
    ModelSelector,
    PartitionedDataset,
    serialize_model,
)
from emberfl.reproducibility import create_rng_suite, setup_reproducibility

# ---------------------------------------------------------------- the BlazeFL 2.0 script


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 image to a normalised CHW float tensor (what ToTensor + Normalize do)."""
    return (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


class PartitionedTinyImages(PartitionedDataset[FedAvgPartitionType]):
    def __init__(self, path: Path, num_clients: int, seed: int) -> None:
        self.path = path
        self.num_clients = num_clients
        self.seed = seed
        self.rng_suite = create_rng_suite(seed)
        self._preprocess()

    def _preprocess(self) -> None:
        rng = self.rng_suite.numpy

        # Four classes told apart by which colour channel is bright.
        def make(n: int) -> tuple[np.ndarray, list[int]]:
            targets = rng.integers(0, 4, size=n)
            images = rng.integers(0, 80, size=(n, 8, 8, 3), dtype=np.uint8)
            for i, t in enumerate(targets):
                images[i, :, :, t % 3] += np.uint8(120 if t < 3 else 60)
            return images, targets.tolist()

        train_data, train_targets = make(24 * self.num_clients)
        test_data, test_targets = make(40)
        for type_ in ["train", "test"]:
            self.path.joinpath(type_).mkdir(parents=True)
        client_dict = {
            cid: np.arange(cid, len(train_targets), self.num_clients)
            for cid in range(self.num_clients)
        }
        for cid, indices in client_dict.items():
            client_trainset = FilteredDataset(
                indices.tolist(), train_data, train_targets, transform=to_tensor
            )
            torch.save(client_trainset, self.path.joinpath("train", f"{cid}.pkl"))
        torch.save(
            FilteredDataset(
                list(range(len(test_targets))), test_data, test_targets, transform=to_tensor
            ),
            self.path.joinpath("test.pkl"),
        )

    def get_dataset(self, type_: FedAvgPartitionType, cid: int | None) -> Dataset:
        match type_:
            case FedAvgPartitionType.TRAIN:
                dataset = torch.load(self.path.joinpath(type_, f"{cid}.pkl"), weights_only=False)
            case FedAvgPartitionType.TEST:
                dataset = torch.load(self.path.joinpath(f"{type_}.pkl"), weights_only=False)
        assert isinstance(dataset, Dataset)
        return dataset

    def set_dataset(self, type_: FedAvgPartitionType, cid: int | None, dataset: Dataset) -> None:
        match type_:
            case FedAvgPartitionType.TRAIN:
                torch.save(dataset, self.path.joinpath(type_, f"{cid}.pkl"))
            case FedAvgPartitionType.TEST:
                torch.save(dataset, self.path.joinpath(f"{type_}.pkl"))

    def get_dataloader(
        self,
        type_: FedAvgPartitionType,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader:
        dataset = self.get_dataset(type_, cid)
        assert isinstance(dataset, Sized)
        batch_size = len(dataset) if batch_size is None else batch_size
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


class TinyModelName(str, Enum):  # BlazeFL 2.x uses StrEnum (Python 3.11)
    CNN = "CNN"


class TinyModelSelector(ModelSelector[TinyModelName]):
    def __init__(self, num_classes: int, seed: int) -> None:
        self.num_classes = num_classes
        self.seed = seed

    def select_model(self, model_name: TinyModelName) -> nn.Module:
        with torch.random.fork_rng([]):
            torch.manual_seed(self.seed)
            match model_name:
                case TinyModelName.CNN:
                    return CNN(num_classes=self.num_classes)


class CNN(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class FedAvgPipeline:
    def __init__(
        self,
        handler: FedAvgBaseServerHandler,
        trainer: FedAvgBaseClientTrainer
        | FedAvgProcessPoolClientTrainer
        | FedAvgThreadPoolClientTrainer,
    ) -> None:
        self.handler = handler
        self.trainer = trainer
        self.summaries: list[dict[str, float]] = []

    def main(self) -> None:
        while not self.handler.if_stop():
            round_ = self.handler.round
            # server side
            sampled_clients = self.handler.sample_clients()
            broadcast = self.handler.downlink_package()

            # client side
            self.trainer.local_process(broadcast, sampled_clients)
            uploads = self.trainer.uplink_package()

            # server side
            for pack in uploads:
                self.handler.load(pack)

            summary = self.handler.get_summary()
            self.summaries.append(summary)
            formatted_summary = ", ".join(f"{k}: {v:.3f}" for k, v in summary.items())
            logging.info(f"round: {round_}, {formatted_summary}")

        logging.info("done!")


def main(
    model_name: TinyModelName = TinyModelName.CNN,
    num_clients: int = 4,
    global_round: int = 2,
    sample_ratio: float = 1.0,
    seed: int = 42,
    epochs: int = 1,
    lr: float = 0.1,
    batch_size: int = 8,
    num_parallels: int = 2,
    dataset_root_dir: Path = Path("/tmp/quickstart-fedavg/dataset"),
    share_dir_base: Path = Path("/tmp/quickstart-fedavg/share"),
    state_dir_base: Path = Path("/tmp/quickstart-fedavg/state"),
    execution_mode: str = "multi-threaded",
    ipc_mode: IPCMode = IPCMode.SHARED_MEMORY,
) -> FedAvgPipeline:
    device = "cpu"

    timestamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    dataset_split_dir = dataset_root_dir / timestamp
    share_dir = share_dir_base / timestamp
    state_dir = state_dir_base / timestamp

    setup_reproducibility(seed)

    dataset = PartitionedTinyImages(path=dataset_split_dir, num_clients=num_clients, seed=seed)
    model_selector = TinyModelSelector(num_classes=4, seed=seed)

    handler = FedAvgBaseServerHandler(
        model_selector=model_selector,
        model_name=model_name,
        dataset=dataset,
        global_round=global_round,
        num_clients=num_clients,
        device=device,
        sample_ratio=sample_ratio,
        batch_size=batch_size,
        seed=seed,
    )
    trainer: (
        FedAvgBaseClientTrainer
        | FedAvgProcessPoolClientTrainer
        | FedAvgThreadPoolClientTrainer
        | None
    ) = None
    match execution_mode:
        case "single-threaded":
            trainer = FedAvgBaseClientTrainer(
                model_selector=model_selector,
                model_name=model_name,
                dataset=dataset,
                device=device,
                num_clients=num_clients,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                seed=seed,
            )
        case "multi-process":
            trainer = FedAvgProcessPoolClientTrainer(
                model_selector=model_selector,
                model_name=model_name,
                dataset=dataset,
                share_dir=share_dir,
                state_dir=state_dir,
                seed=seed,
                device=device,
                num_clients=num_clients,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                num_parallels=num_parallels,
                ipc_mode=ipc_mode,
            )
        case "multi-threaded":
            trainer = FedAvgThreadPoolClientTrainer(
                model_selector=model_selector,
                model_name=model_name,
                dataset=dataset,
                seed=seed,
                device=device,
                num_clients=num_clients,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                num_parallels=num_parallels,
            )
        case _:
            raise ValueError(f"Invalid execution mode: {execution_mode}")
    pipeline = FedAvgPipeline(handler=handler, trainer=trainer)
    pipeline.main()
    return pipeline


# ---------------------------------------------------------------------------- the tests


def _run(tmp_path: Path, execution_mode: str, ipc_mode: IPCMode = IPCMode.SHARED_MEMORY) -> None:
    share_base = tmp_path / "share"
    initial = serialize_model(
        TinyModelSelector(num_classes=4, seed=42).select_model(TinyModelName.CNN)
    )
    pipeline = main(
        dataset_root_dir=tmp_path / "dataset",
        share_dir_base=share_base,
        state_dir_base=tmp_path / "state",
        execution_mode=execution_mode,
        ipc_mode=ipc_mode,
    )
    trainer = pipeline.trainer
    try:
        handler = pipeline.handler
        assert handler.round == 2 and len(pipeline.summaries) == 2
        final = serialize_model(handler.model)
        assert not torch.equal(final, initial), "two rounds of training changed nothing"
        assert bool(torch.isfinite(final).all())
        for summary in pipeline.summaries:
            assert math.isfinite(summary["server_loss"]) and 0.0 <= summary["server_acc"] <= 1.0
        if execution_mode == "multi-process":
            assert isinstance(trainer, FedAvgProcessPoolClientTrainer)
            assert trainer.ipc_mode is ipc_mode
            # The share directory BlazeFL 2.x names did not exist; the pool made it.
            assert trainer.share_dir is not None and Path(trainer.share_dir).is_dir()
    finally:
        close = getattr(trainer, "close", None)
        if close is not None:
            close()
    if execution_mode == "multi-process":
        # Closing removes the round files and the directories the pool made for them.
        assert not share_base.exists() or not any(share_base.rglob("*.safetensors"))


def test_thread_pool_runs_a_blazefl2_script(tmp_path: Path) -> None:
    _run(tmp_path, "multi-threaded")


def test_serial_trainer_runs_a_blazefl2_script(tmp_path: Path) -> None:
    _run(tmp_path, "single-threaded")


@pytest.mark.slow
@pytest.mark.parametrize("ipc_mode", [IPCMode.SHARED_MEMORY, IPCMode.STORAGE])
def test_process_pool_runs_a_blazefl2_script(tmp_path: Path, ipc_mode: IPCMode) -> None:
    _run(tmp_path, "multi-process", ipc_mode)
