"""SCAFFOLD: the control-variate algebra against a hand computation, the server's
control update, client controls kept on disk (1,000 clients), and digits training."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emberfl.contrib import (
    ClientStateStore,
    FedAvgDownlinkPackage,
    ParameterLayout,
    ScaffoldBaseClientTrainer,
    ScaffoldClientUpdate,
    ScaffoldDownlinkPackage,
    ScaffoldProcessPoolClientTrainer,
    ScaffoldServerHandler,
    ScaffoldThreadPoolClientTrainer,
    ScaffoldUplinkPackage,
)
from emberfl.contrib.scaffold import CONTROL_KEY
from emberfl.core import IPCMode, serialize_model
from emberfl.core.fold import InProcessFold
from emberfl.data import iid, load_digits
from emberfl.models import ZooModelSelector
from emberfl.simulation import write_store

# Bitwise comparisons need one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


W0 = np.array([[0.2, -0.1], [0.05, 0.3]], dtype=np.float32)
B0 = np.array([0.01, -0.02], dtype=np.float32)
X = np.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.7]], dtype=np.float32)
Y = np.array([0, 1, 1])


class TinySelector:
    def select_model(self, name: str) -> nn.Module:
        model = nn.Linear(2, 2)
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(W0))
            model.bias.copy_(torch.from_numpy(B0))
        return model


def _numpy_steps(
    w: np.ndarray, b: np.ndarray, correction: np.ndarray, steps: int, lr: float
) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch SGD on mean cross-entropy with a constant gradient correction."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    onehot = np.eye(2)[Y]
    for _ in range(steps):
        logits = X @ w.T + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / len(Y)
        w = w - lr * (g.T @ X + correction[:4].reshape(2, 2))
        b = b - lr * (g.sum(axis=0) + correction[4:])
    return w, b


def test_client_update_matches_a_hand_computation(tmp_path: Path) -> None:
    state = ClientStateStore(tmp_path / "state")
    c = np.array([0.1, -0.2, 0.05, 0.0, 0.3, -0.1], dtype=np.float32)
    c_i = np.array([0.0, 0.1, -0.05, 0.2, 0.1, 0.0], dtype=np.float32)
    state.save(7, {CONTROL_KEY: torch.from_numpy(c_i)})
    x0 = np.concatenate([W0.ravel(), B0])
    payload = ScaffoldDownlinkPackage(torch.from_numpy(x0.copy()), control=torch.from_numpy(c))
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)), batch_size=3)
    epochs, lr = 2, 0.5
    package = ScaffoldClientUpdate()(
        cid=7,
        model=TinySelector().select_model("tiny"),
        payload=payload,
        loader=loader,
        device="cpu",
        epochs=epochs,
        lr=lr,
        state=state,
    )
    assert isinstance(package, ScaffoldUplinkPackage)
    w, b = _numpy_steps(W0, B0, c - c_i, epochs, lr)
    y = np.concatenate([w.ravel(), b])
    np.testing.assert_allclose(package.model_parameters.numpy(), y, rtol=0, atol=1e-6)
    expected_control = c_i - c + (x0 - y) / (epochs * lr)
    np.testing.assert_allclose(
        package.control_delta.numpy(), expected_control - c_i, rtol=0, atol=1e-5
    )
    stored = state.load(7)
    assert stored is not None
    np.testing.assert_allclose(stored[CONTROL_KEY].numpy(), expected_control, rtol=0, atol=1e-5)
    assert package.data_size == 3
    assert package.metadata is not None and package.metadata["steps"] == 2

    # A client without a state file starts from c_i = 0.
    fresh = ScaffoldClientUpdate()(
        cid=8,
        model=TinySelector().select_model("tiny"),
        payload=payload,
        loader=loader,
        device="cpu",
        epochs=1,
        lr=lr,
        state=state,
    )
    w, b = _numpy_steps(W0, B0, c, 1, lr)
    np.testing.assert_allclose(
        fresh.model_parameters.numpy(), np.concatenate([w.ravel(), b]), rtol=0, atol=1e-6
    )
    assert state.clients() == [7, 8]


def test_client_update_needs_state_and_a_scaffold_payload(tmp_path: Path) -> None:
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)), batch_size=3)
    x0 = torch.from_numpy(np.concatenate([W0.ravel(), B0]))
    common: dict[str, Any] = {
        "cid": 0,
        "model": TinySelector().select_model("t"),
        "loader": loader,
        "device": "cpu",
        "epochs": 1,
        "lr": 0.1,
    }
    with pytest.raises(ValueError, match="state_dir"):
        ScaffoldClientUpdate()(
            payload=ScaffoldDownlinkPackage(x0, control=torch.zeros(6)), **common
        )
    with pytest.raises(TypeError, match="ScaffoldDownlinkPackage"):
        ScaffoldClientUpdate()(
            payload=FedAvgDownlinkPackage(x0), state=ClientStateStore(tmp_path), **common
        )
    with pytest.raises(ValueError, match="server control"):
        ScaffoldClientUpdate()(
            payload=ScaffoldDownlinkPackage(x0, control=torch.zeros(5)),
            state=ClientStateStore(tmp_path),
            **common,
        )
    with pytest.raises(ValueError, match="state_dir"):
        ScaffoldBaseClientTrainer(TinySelector(), "t", None, "cpu", 4, 1, 2, 0.1, 0)


def test_process_trainer_takes_fedavg_arguments_and_blazefl2_keywords(tmp_path: Path) -> None:
    # num_parallels=0: built, not run, so no worker process is started.
    trainer = ScaffoldProcessPoolClientTrainer(
        model_selector=TinySelector(), model_name="t", share_dir=tmp_path / "share",
        state_dir=tmp_path / "controls", dataset=None, device="cpu", num_clients=4,
        epochs=1, batch_size=2, lr=0.1, seed=0, num_parallels=0, ipc_mode="SHARED_MEMORY",
    )  # fmt: skip
    trainer.close()
    assert trainer.ipc_mode is IPCMode.SHARED_MEMORY
    assert isinstance(trainer.client_update, ScaffoldClientUpdate)
    assert trainer.get_client_config(2).state_path == tmp_path / "controls" / "2.safetensors"


def test_server_averages_models_and_moves_the_control(tmp_path: Path) -> None:
    handler = ScaffoldServerHandler(TinySelector(), "t", None, 3, 4, 0.5, "cpu", 8, 0)
    assert torch.equal(handler.control, torch.zeros(6))
    down = handler.downlink_package()
    assert isinstance(down, ScaffoldDownlinkPackage) and torch.equal(down.control, torch.zeros(6))
    y1, y2 = torch.arange(6.0), torch.full((6,), 2.0)
    d1, d2 = torch.linspace(-1, 1, 6), torch.full((6,), 0.5)
    handler.load(ScaffoldUplinkPackage(0, y1, 1, control_delta=d1))
    handler.load(ScaffoldUplinkPackage(3, y2, 3, control_delta=d2))
    assert handler.round == 1
    torch.testing.assert_close(serialize_model(handler.model), (y1 + 3 * y2) / 4)
    # c += sum(delta c_i) / N over all N = 4 clients of the federation.
    torch.testing.assert_close(handler.control, (d1 + d2) / 4)
    handler.load(ScaffoldUplinkPackage(1, y1, 1, control_delta=d2))
    handler.load(ScaffoldUplinkPackage(2, y1, 1, control_delta=d2))
    torch.testing.assert_close(handler.control, (d1 + d2) / 4 + 2 * d2 / 4)

    bad = d1.clone()
    bad[2] = float("nan")
    handler.load(ScaffoldUplinkPackage(0, y1, 1, control_delta=d1))
    with pytest.raises(ValueError, match=r"control updates of clients \[2\]"):
        handler.load(ScaffoldUplinkPackage(2, y1, 1, control_delta=bad))


def test_folding_moves_model_and_control_exactly_like_averaging() -> None:
    gen = torch.Generator().manual_seed(1)
    uplinks = [
        ScaffoldUplinkPackage(cid, torch.randn(6, generator=gen), size, control_delta=d)
        for cid, size, d in [(0, 2, torch.randn(6, generator=gen)), (3, 7, torch.randn(6))]
    ]
    classic = ScaffoldServerHandler(TinySelector(), "t", None, 3, 4, 0.5, "cpu", 8, 0)
    folding = ScaffoldServerHandler(TinySelector(), "t", None, 3, 4, 0.5, "cpu", 8, 0)
    for p in uplinks:
        classic.load(p)
    fold = InProcessFold(folding.uplink_fold(), len(uplinks))
    for i in reversed(range(len(uplinks))):
        fold.add(i, uplinks[i])
    fold.finish()
    for stand_in in fold.stand_ins:
        assert stand_in.control_delta.is_meta and stand_in.model_parameters.is_meta
        folding.load(stand_in)
    assert torch.equal(folding.control, classic.control)
    assert not torch.equal(folding.control, torch.zeros(6))
    assert torch.equal(serialize_model(folding.model), serialize_model(classic.model))


def test_global_lr_scales_the_model_step() -> None:
    handler = ScaffoldServerHandler(
        TinySelector(), "t", None, 3, 2, 0.5, "cpu", 8, 0, global_lr=0.5
    )
    x = serialize_model(handler.model).clone()
    y = torch.ones(6)
    handler.load(ScaffoldUplinkPackage(0, y, 1, control_delta=torch.zeros(6)))
    torch.testing.assert_close(serialize_model(handler.model), x + 0.5 * (y - x))


def test_layout_keeps_buffers_out_of_the_parameter_vector() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    layout = ParameterLayout.of(model)
    # weight 6, bias 2, bn weight 2, bn bias 2, running_mean 2, running_var 2, count 1
    assert layout.size == 17 and layout.num_params == 12 and not layout.dense
    state = torch.arange(17.0)
    params = layout.gather(state)
    assert params.tolist() == list(range(12))
    out = layout.scatter_(torch.zeros(17), params + 100)
    assert out[:12].tolist() == [v + 100.0 for v in range(12)] and out[12:].sum() == 0
    assert [tuple(p.shape) for p in layout.parameters(model)] == [(2, 3), (2,), (2,), (2,)]


@pytest.fixture(scope="module")
def digits_1000(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, int]:
    data = load_digits(seed=0)
    clients = 1000
    store = write_store(
        tmp_path_factory.mktemp("digits1000") / "store", data, iid(data.train_y, clients, seed=0)
    )
    return store, ZooModelSelector(data.in_shape, data.num_classes, seed=0), clients


@pytest.mark.slow
def test_a_thousand_client_controls_live_on_disk_not_in_memory(
    digits_1000: Any, tmp_path: Path
) -> None:
    dataset, selector, clients = digits_1000
    handler = ScaffoldServerHandler(selector, "2nn", dataset, 20, clients, 0.05, "cpu", 512, 0)
    control_bytes = handler.layout.num_params * 4
    state_dir = tmp_path / "controls"
    trainer = ScaffoldThreadPoolClientTrainer(
        selector, "2nn", dataset, "cpu", clients, 1, 10, 0.05, 0, 2,
        state_dir=state_dir, progress=False,
    )  # fmt: skip
    process = psutil.Process(os.getpid())
    with trainer:
        # Warm-up round: allocator pools and the model pool settle.
        trainer.local_process(handler.downlink_package(), list(range(50)))
        for p in trainer.uplink_package():
            handler.load(p)
        gc.collect()
        rss_before = process.memory_info().rss
        for start in range(50, clients, 50):
            trainer.local_process(handler.downlink_package(), list(range(start, start + 50)))
            for p in trainer.uplink_package():
                handler.load(p)
        gc.collect()
        rss_after = process.memory_info().rss
    store = ClientStateStore(state_dir)
    assert store.clients() == list(range(clients))
    one = store.load(999)
    assert one is not None and one[CONTROL_KEY].shape == (handler.layout.num_params,)
    assert handler.round == clients // 50
    # Holding 950 controls in RAM would take 950 * 221 kB = 210 MB; a round's uplinks
    # (50 models and control deltas) are the only transient.
    held_in_ram = 950 * control_bytes
    assert rss_after - rss_before < held_in_ram / 3, (rss_after - rss_before, held_in_ram)
    assert not any(isinstance(v, torch.Tensor) and v.numel() > 1000 for v in vars(trainer).values())


def test_two_rounds_on_digits_improve_accuracy(tmp_path: Path) -> None:
    data = load_digits(seed=0)
    dataset = write_store(tmp_path / "store", data, iid(data.train_y, 6, seed=0))
    selector = ZooModelSelector(data.in_shape, data.num_classes, seed=0)
    handler = ScaffoldServerHandler(selector, "mlp", dataset, 2, 6, 0.5, "cpu", 512, 0)
    start = handler.get_summary()["server_acc"]
    trainer = ScaffoldBaseClientTrainer(
        selector, "mlp", dataset, "cpu", 6, 2, 10, 0.1, 0, state_dir=tmp_path / "s", progress=False
    )
    while not handler.is_stopped():
        trainer.local_process(handler.downlink_package(), handler.sample_clients())
        for p in trainer.uplink_package():
            handler.load(p)
    assert handler.get_summary()["server_acc"] > max(0.5, start + 0.3)
    assert handler.control.abs().sum() > 0
    assert len(ClientStateStore(tmp_path / "s")) >= 3
