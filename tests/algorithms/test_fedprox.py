"""FedProx: mu = 0 is FedAvg bit for bit; mu > 0 pulls clients toward the global model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emberfl.contrib import (
    FedAvgBaseServerHandler,
    FedAvgDownlinkPackage,
    FedAvgThreadPoolClientTrainer,
    FedProxBaseClientTrainer,
    FedProxBaseServerHandler,
    FedProxClientUpdate,
    FedProxProcessPoolClientTrainer,
    FedProxThreadPoolClientTrainer,
)
from emberfl.core import IPCMode, serialize_model
from emberfl.data import dirichlet, load_digits
from emberfl.models import ZooModelSelector
from emberfl.simulation import write_store

# Bitwise comparisons need one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

CLIENTS = 6


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ZooModelSelector]:
    data = load_digits(seed=0)
    partition = dirichlet(data.train_y, CLIENTS, alpha=0.3, seed=0)
    store = write_store(tmp_path_factory.mktemp("digits") / "store", data, partition)
    return store, ZooModelSelector(data.in_shape, data.num_classes, seed=0)


def _run(handler: Any, trainer: Any) -> torch.Tensor:
    with trainer:
        while not handler.is_stopped():
            trainer.local_process(handler.downlink_package(), handler.sample_clients())
            for package in trainer.uplink_package():
                handler.load(package)
    return serialize_model(handler.model)


def test_mu_zero_is_fedavg_bitwise_and_mu_positive_is_not(digits: Any) -> None:
    dataset, selector = digits
    args = (selector, "mlp", dataset, "cpu", CLIENTS, 2, 10, 0.1, 3, 2)
    server = (selector, "mlp", dataset, 2, CLIENTS, 0.5, "cpu", 512, 3)
    fedavg = _run(
        FedAvgBaseServerHandler(*server), FedAvgThreadPoolClientTrainer(*args, progress=False)
    )
    prox0 = _run(
        FedProxBaseServerHandler(*server),
        FedProxThreadPoolClientTrainer(*args, mu=0.0, progress=False),
    )
    prox1 = _run(
        FedProxBaseServerHandler(*server),
        FedProxThreadPoolClientTrainer(*args, mu=1.0, progress=False),
    )
    assert torch.equal(fedavg, prox0)
    assert not torch.equal(fedavg, prox1)


def test_proximal_gradient_matches_a_hand_computation() -> None:
    # A one-output model has a single class, so its cross-entropy and the gradient of
    # it are 0: one step changes the weights by exactly -lr * mu * (w - w_global).
    model = nn.Linear(2, 1)
    global_state = torch.tensor([0.5, -0.5, 0.25])
    start = torch.tensor([1.0, 2.0, -1.0])

    class Shifted(FedProxClientUpdate):
        """Moves the client away from the global model it was given, after the
        proximal anchor has been taken."""

        def begin(self, run: Any) -> None:
            super().begin(run)
            with torch.no_grad():
                run.model.weight.copy_(start[:2].view(1, 2))
                run.model.bias.copy_(start[2:])

    loader = DataLoader(
        TensorDataset(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])), batch_size=2
    )
    package = Shifted(mu=0.5)(
        cid=0,
        model=model,
        payload=FedAvgDownlinkPackage(global_state.clone()),
        loader=loader,
        device="cpu",
        epochs=1,
        lr=0.2,
    )
    expected = start.numpy() - 0.2 * 0.5 * (start.numpy() - global_state.numpy())
    np.testing.assert_allclose(package.model_parameters.numpy(), expected, rtol=0, atol=1e-7)


def test_larger_mu_keeps_clients_nearer_the_global_model(digits: Any) -> None:
    dataset, selector = digits
    handler = FedProxBaseServerHandler(selector, "mlp", dataset, 1, CLIENTS, 0.5, "cpu", 512, 3)
    payload = handler.downlink_package()
    distances = []
    for mu in (0.0, 0.5, 5.0):
        trainer = FedProxBaseClientTrainer(
            selector, "mlp", dataset, "cpu", CLIENTS, 3, 10, 0.1, 3, mu=mu, progress=False
        )
        trainer.local_process(payload, [0, 1, 2])
        distances.append(
            sum(
                float((p.model_parameters - payload.model_parameters).norm())
                for p in trainer.uplink_package()
            )
        )
    assert distances[0] > distances[1] > distances[2]


def test_two_rounds_on_digits_improve_accuracy(digits: Any) -> None:
    dataset, selector = digits
    handler = FedProxBaseServerHandler(selector, "mlp", dataset, 2, CLIENTS, 0.5, "cpu", 512, 3)
    start = handler.get_summary()["server_acc"]
    trainer = FedProxBaseClientTrainer(
        selector, "mlp", dataset, "cpu", CLIENTS, 2, 10, 0.1, 3, mu=0.01, progress=False
    )
    while not handler.is_stopped():
        trainer.local_process(handler.downlink_package(), handler.sample_clients())
        for package in trainer.uplink_package():
            handler.load(package)
    assert handler.get_summary()["server_acc"] > max(0.4, start + 0.2)


def test_trainers_take_fedavg_arguments_plus_mu(digits: Any, tmp_path: Path) -> None:
    dataset, selector = digits
    process = FedProxProcessPoolClientTrainer(
        selector, "mlp", tmp_path / "state", dataset, "cpu", CLIENTS, 1, 10, 0.1, 0, 1,
        mu=0.3, progress=False, share_dir=tmp_path / "share", ipc_mode=IPCMode.SHARED_MEMORY,
    )  # fmt: skip
    process.close()
    assert process.mu == 0.3
    assert process.ipc_mode is IPCMode.SHARED_MEMORY
    assert isinstance(process.client_update, FedProxClientUpdate)
    assert process.get_client_config(4).client_update.mu == 0.3
    with pytest.raises(ValueError, match="mu"):
        FedProxClientUpdate(mu=-1.0)
    with pytest.raises(ValueError, match="mu"):
        FedProxClientUpdate(mu=float("nan"))
