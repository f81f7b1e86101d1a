"""The batched runtime: K clients trained as one model, each as it would be alone.

Agreement with the per-client path is checked within ``rtol=1e-5, atol=1e-6``, not
bitwise: the batched matrix products sum in another order than one client's, so
results differ in the last bits (about 6e-8 on the digits MLP after two epochs).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from emberfl.config import SimulationConfig
from emberfl.contrib import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgBatchedClientTrainer,
    FedAvgClientUpdate,
    FedProxBaseClientTrainer,
    FedProxBatchedClientTrainer,
    LocalRun,
    make_client_trainer,
)
from emberfl.contrib.fedavg.batched import check_batchable
from emberfl.contrib.registry import TrainerClasses
from emberfl.data import Partition, load_digits
from emberfl.models import ZooModelSelector
from emberfl.simulation import Simulation, write_store

pytestmark = pytest.mark.usefixtures("one_thread")

CLIENTS = 6  # the digits fixture's (tests/conftest.py)


def _close(a: list[Any], b: list[Any]) -> None:
    assert [p.cid for p in a] == [p.cid for p in b]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.model_parameters, y.model_parameters, rtol=1e-5, atol=1e-6)
        assert x.data_size == y.data_size
        assert x.metadata["steps"] == y.metadata["steps"]
        assert x.metadata["loss"] == pytest.approx(y.metadata["loss"], rel=1e-5)


def _round(trainer: Any, payload: Any, cids: list[int]) -> list[Any]:
    trainer.local_process(payload, cids)
    out: list[Any] = trainer.uplink_package()
    return out


def _payload(digits: Any) -> Any:
    dataset, selector = digits
    handler = FedAvgBaseServerHandler(selector, "mlp", dataset, 1, CLIENTS, 1.0, "cpu", 512, 7)
    return handler.downlink_package()


def test_each_client_trains_as_it_would_alone(digits: Any) -> None:
    dataset, selector = digits
    args = (selector, "mlp", dataset, "cpu", CLIENTS, 2, 10, 0.1, 7)
    payload = _payload(digits)
    cids = [4, 0, 5, 2, 1]
    alone = _round(FedAvgBaseClientTrainer(*args, progress=False), payload, cids)
    # Groups of 2: the last group holds one client.
    batched = _round(FedAvgBatchedClientTrainer(*args, batch_clients=2), payload, cids)
    _close(batched, alone)
    # Bitwise repeatable with itself, and independent of how clients are grouped here.
    again = _round(FedAvgBatchedClientTrainer(*args, batch_clients=2), payload, cids)
    assert all(
        torch.equal(x.model_parameters, y.model_parameters)
        for x, y in zip(batched, again, strict=True)
    )
    whole = _round(FedAvgBatchedClientTrainer(*args, batch_clients=8), payload, cids)
    _close(whole, alone)


def test_fedprox_batched_matches_fedprox_alone(digits: Any) -> None:
    dataset, selector = digits
    args = (selector, "mlp", dataset, "cpu", CLIENTS, 2, 10, 0.1, 7)
    payload = _payload(digits)
    alone = _round(FedProxBaseClientTrainer(*args, mu=0.5, progress=False), payload, [1, 3])
    batched = _round(FedProxBatchedClientTrainer(*args, mu=0.5), payload, [1, 3])
    _close(batched, alone)
    plain = _round(FedAvgBatchedClientTrainer(*args), payload, [1, 3])
    assert not torch.equal(plain[0].model_parameters, batched[0].model_parameters)


def test_padded_clients_of_1_7_and_50_samples(tmp_path: Path) -> None:
    data = load_digits(seed=0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.train_y))
    sizes = [1, 7, 50]
    starts = np.cumsum([0, *sizes])
    partition = Partition(tuple(np.sort(order[a:b]) for a, b in itertools.pairwise(starts)))
    dataset = write_store(tmp_path / "store", data, partition)
    selector = ZooModelSelector(data.in_shape, data.num_classes, seed=0)
    # Batch 10: the 7- and 50-sample clients have partial or full batches, and the
    # 1-sample client is done after one step of each epoch while the others go on.
    args = (selector, "mlp", dataset, "cpu", 3, 2, 10, 0.1, 7)
    handler = FedAvgBaseServerHandler(selector, "mlp", dataset, 1, 3, 1.0, "cpu", 512, 7)
    payload = handler.downlink_package()
    batched = _round(FedAvgBatchedClientTrainer(*args), payload, [0, 1, 2])
    for cid in range(3):
        alone = _round(FedAvgBaseClientTrainer(*args, progress=False), payload, [cid])
        _close([batched[cid]], alone)
    assert [p.data_size for p in batched] == sizes
    assert [p.metadata["steps"] for p in batched] == [2.0, 2.0, 10.0]


def test_folded_batched_rounds_equal_their_lists(digits: Any) -> None:
    dataset, selector = digits
    args = (selector, "mlp", dataset, "cpu", CLIENTS, 1, 10, 0.1, 7)
    models = []
    for fold in (False, True):
        handler = FedAvgBaseServerHandler(selector, "mlp", dataset, 2, CLIENTS, 0.5, "cpu", 64, 7)
        trainer = FedAvgBatchedClientTrainer(*args, batch_clients=2)
        if fold:
            trainer.uplink_fold = handler.uplink_fold()
        while not handler.is_stopped():
            trainer.local_process(handler.downlink_package(), handler.sample_clients())
            for package in trainer.uplink_package():
                handler.load(package)
        models.append(handler.downlink_package().model_parameters)
    assert torch.equal(models[0], models[1])


class _Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


class _Dropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class _PerClientOnly(FedAvgClientUpdate):
    """A client step with a hook of its own: the batched runtime cannot run it."""

    def begin(self, run: LocalRun) -> None:
        run.extra["seen"] = True


def test_models_and_steps_that_cannot_be_batched_are_refused(digits: Any) -> None:
    x, y = torch.zeros(1, 8, 8), torch.tensor(3)
    with pytest.raises(ValueError, match=r"module 'body\.2' \(BatchNorm1d\) updates running"):
        check_batchable(_Normed(), x, y)
    with pytest.raises(ValueError, match="cannot be trained batched"):
        check_batchable(_Dropout(), x, y)
    check_batchable(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x, y)
    dataset, selector = digits
    with pytest.raises(ValueError, match="FedAvg's, FedProx's and SCAFFOLD's client steps only"):
        FedAvgBatchedClientTrainer(
            selector, "mlp", dataset, "cpu", CLIENTS, 1, 10, 0.1, 7,
            client_update=_PerClientOnly(),
        )  # fmt: skip
    with pytest.raises(ValueError, match="batch_clients"):
        FedAvgBatchedClientTrainer(
            selector, "mlp", dataset, "cpu", CLIENTS, 1, 10, 0.1, 7, batch_clients=0
        )
    assert TrainerClasses.__dataclass_fields__["batched"].default is None
    config = SimulationConfig(algorithm="scaffold", runtime="batched")
    with pytest.raises(ValueError, match="no batched runtime"):
        make_client_trainer("scaffold", "batched", selector, dataset, config, state_dir=Path("."))


def test_emberfl_run_with_the_batched_runtime(tmp_path: Path) -> None:
    config = SimulationConfig(
        runtime="batched", rounds=3, clients=20, batch_clients=4, progress=False,
    )  # fmt: skip
    with Simulation(config, tmp_path / "run") as simulation:
        result = simulation.run()
    assert len(result.metrics) == 3 and result.final_accuracy > 0.3
    assert (tmp_path / "run" / "model.safetensors").is_file()
