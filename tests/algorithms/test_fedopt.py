"""FedAdam, FedYogi and FedAdagrad: server moments against a numpy hand computation,
buffers averaged rather than optimised, and training on digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from emberfl.contrib import (
    FedAdagradServerHandler,
    FedAdamServerHandler,
    FedAvgBaseClientTrainer,
    FedAvgUplinkPackage,
    FedOptServerHandler,
    FedYogiServerHandler,
)
from emberfl.core import serialize_model
from emberfl.data import iid, load_digits
from emberfl.models import ZooModelSelector
from emberfl.simulation import write_store

# Bitwise comparisons need one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

X0 = np.array([0.5, -1.0, 0.25])  # Linear(2, 1): weight (1x2), then bias


class ToySelector:
    def select_model(self, name: str) -> nn.Module:
        model = nn.Linear(2, 1)
        with torch.no_grad():
            model.weight.copy_(torch.tensor(X0[:2], dtype=torch.float32).view(1, 2))
            model.bias.copy_(torch.tensor(X0[2:], dtype=torch.float32))
        return model


def _reference(kind: str, rounds: list[list[tuple[np.ndarray, float]]], **hp: float) -> Any:
    """Reddi et al.'s Algorithm 2 in float64 numpy: returns (x, m, v) after each round."""
    lr, b1, b2, tau = hp["server_lr"], hp["beta1"], hp["beta2"], hp["tau"]
    x, m, v = X0.copy(), np.zeros(3), np.full(3, tau**2)
    history = []
    for uplinks in rounds:
        weights = np.array([w for _, w in uplinks])
        mean = sum(w * y for y, w in uplinks) / weights.sum()
        delta = mean - x
        m = b1 * m + (1 - b1) * delta
        if kind == "adagrad":
            v = v + delta**2
        elif kind == "yogi":
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
        else:
            v = b2 * v + (1 - b2) * delta**2
        x = x + lr * m / (np.sqrt(v) + tau)
        history.append((x.copy(), m.copy(), v.copy()))
    return history


HANDLERS = {
    "adam": FedAdamServerHandler,
    "yogi": FedYogiServerHandler,
    "adagrad": FedAdagradServerHandler,
}


@pytest.mark.parametrize("kind", sorted(HANDLERS))
def test_moments_and_model_match_a_hand_computation(kind: str) -> None:
    hp = {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    handler = HANDLERS[kind](ToySelector(), "toy", None, 2, 4, 0.5, "cpu", 8, 0, **hp)
    assert torch.equal(handler.m, torch.zeros(3))
    torch.testing.assert_close(handler.v, torch.full((3,), 1e-6))
    rounds = [[(np.array([1.0, 0.0, 0.5]), 1.0), (np.array([0.0, -2.0, 0.0]), 3.0)]]
    x1 = _reference(kind, rounds, **hp)[0][0]
    # A small second step (clients end near x1): the squared pseudo-gradient falls
    # below v, so FedYogi's v shrinks (sign +1) as FedAdam's decays; FedAdagrad's grows.
    rounds.append([(x1 + 1e-3, 2.0), (x1 - 2e-3, 2.0)])
    expected = _reference(kind, rounds, **hp)
    shrinks = expected[1][2] < expected[0][2]
    assert not shrinks.any() if kind == "adagrad" else shrinks.all()
    for uplinks, (x, m, v) in zip(rounds, expected, strict=True):
        for cid, (y, w) in enumerate(uplinks):
            handler.load(FedAvgUplinkPackage(cid, torch.tensor(y, dtype=torch.float32), int(w)))
        np.testing.assert_allclose(handler.m.numpy(), m, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(handler.v.numpy(), v, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(serialize_model(handler.model).numpy(), x, rtol=1e-4, atol=1e-5)
    assert handler.round == 2


def test_the_three_optimizers_differ_on_the_same_updates() -> None:
    finals = {}
    for kind, cls in HANDLERS.items():
        handler = cls(ToySelector(), "toy", None, 3, 2, 0.5, "cpu", 8, 0, server_lr=0.1)
        for step in range(3):
            y = torch.tensor(X0 + (1.0 if step < 2 else 1e-4), dtype=torch.float32)
            handler.load(FedAvgUplinkPackage(0, y, 1))
        finals[kind] = serialize_model(handler.model)
    assert not torch.equal(finals["adam"], finals["yogi"])
    assert not torch.equal(finals["adam"], finals["adagrad"])


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class BufferSelector:
    def select_model(self, name: str) -> nn.Module:
        torch.manual_seed(0)
        return WithBuffers()


def test_buffers_take_the_plain_average() -> None:
    handler = FedAdamServerHandler(BufferSelector(), "b", None, 1, 1, 1.0, "cpu", 8, 0)
    layout = handler.layout
    assert not layout.dense and handler.m.numel() == layout.num_params == 10
    state = serialize_model(handler.model).clone()
    target = state + torch.arange(state.numel(), dtype=torch.float32)
    handler.load(FedAvgUplinkPackage(0, target, 4))
    after = serialize_model(handler.model)
    buffer_mask = torch.ones(layout.size, dtype=torch.bool)
    for start, stop in layout.spans:
        buffer_mask[start:stop] = False
    torch.testing.assert_close(after[buffer_mask], target[buffer_mask])
    assert not torch.equal(after[~buffer_mask], target[~buffer_mask])


@pytest.mark.parametrize(
    ("name", "value"),
    [("server_lr", 0.0), ("beta1", 1.0), ("beta2", -0.1), ("tau", 0.0), ("tau", float("inf"))],
)
def test_hyperparameters_are_checked(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        FedAdamServerHandler(ToySelector(), "toy", None, 1, 1, 1.0, "cpu", 8, 0, **{name: value})


def test_base_class_needs_a_second_moment_rule() -> None:
    handler = FedOptServerHandler(ToySelector(), "toy", None, 1, 1, 1.0, "cpu", 8, 0)
    with pytest.raises(NotImplementedError, match="update_second_moment"):
        handler.load(FedAvgUplinkPackage(0, torch.zeros(3), 1))


@pytest.mark.parametrize("kind", sorted(HANDLERS))
def test_two_rounds_on_digits_improve_accuracy(kind: str, tmp_path: Path) -> None:
    data = load_digits(seed=0)
    dataset = write_store(tmp_path / "store", data, iid(data.train_y, 6, seed=0))
    selector = ZooModelSelector(data.in_shape, data.num_classes, seed=0)
    handler = HANDLERS[kind](selector, "mlp", dataset, 2, 6, 0.5, "cpu", 512, 0, server_lr=0.03)
    start = handler.get_summary()["server_acc"]
    trainer = FedAvgBaseClientTrainer(
        selector, "mlp", dataset, "cpu", 6, 2, 10, 0.1, 0, progress=False
    )
    while not handler.is_stopped():
        trainer.local_process(handler.downlink_package(), handler.sample_clients())
        for p in trainer.uplink_package():
            handler.load(p)
    assert handler.get_summary()["server_acc"] > start + 0.2
