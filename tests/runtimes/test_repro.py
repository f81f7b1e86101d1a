"""Bitwise reproducibility: process pool (1, 2, 4 workers) = in-process = thread pool = serial.

A tiny FedAvg on CPU: every client trains a small MLP for one epoch on its own
synthetic data, shuffled and perturbed with its own generators; the server averages
with the Rust kernel in the order of the client list. The final global model must be
the same bits however the clients were scheduled.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from emberfl import aggregate, reproducibility
from emberfl.core import (
    ProcessPoolClientTrainer,
    ThreadPoolClientTrainer,
    current_client,
    deserialize_model,
    serialize_model,
)

SEED = 1234
ROUNDS = 3
CLIENTS = 6
# A different order (and subset) every round, as a sampler would give.
SCHEDULE = [[0, 1, 2, 3, 4, 5], [4, 1, 5, 0], [2, 5, 3, 0, 1]]


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0.25), torch.nn.Linear(8, 3)
    )


def client_data(cid: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + cid)
    n = 12 + 2 * cid
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def train_client(
    params: torch.Tensor, cid: int, rng: reproducibility.RNGSuite | None
) -> dict[str, Any]:
    """One local epoch. ``rng=None`` draws from the global generators instead."""
    model = make_model()
    deserialize_model(model, params)
    x, y = client_data(cid)
    if rng is None:
        model.train()  # dropout draws from the global generator
        x = x + 0.01 * torch.randn(x.shape)
        loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    else:
        model.eval()  # no dropout: every draw below comes from the client's suite
        x = x + 0.01 * torch.randn(x.shape, generator=rng.torch_cpu)
        loader = DataLoader(
            TensorDataset(x, y), batch_size=4, shuffle=True, generator=rng.torch_cpu
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for xb, yb in loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return {"cid": cid, "params": serialize_model(model), "n": len(y)}


def initial_params() -> torch.Tensor:
    torch.manual_seed(0)
    return serialize_model(make_model())


def fedavg(params: torch.Tensor, uplinks: list[dict[str, Any]]) -> torch.Tensor:
    out = aggregate.weighted_mean([u["params"] for u in uplinks], [float(u["n"]) for u in uplinks])
    assert isinstance(out, torch.Tensor)
    return out


class ProcessTrainer(ProcessPoolClientTrainer[dict, dict, dict, dict]):
    def __init__(self, num_parallels: int, global_rng: bool) -> None:
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[dict] = []
        self.stop_event = threading.Event()
        self.seed = SEED
        self.progress = False
        self.global_rng = global_rng
        # One torch import in the fork server instead of one per worker (7 here);
        # results do not depend on how workers start (spawn is tested elsewhere).
        self.start_method = "forkserver"

    def get_client_config(self, cid: int) -> dict:
        return {"cid": cid, "global_rng": self.global_rng}

    @staticmethod
    def worker(
        config: dict, payload: dict, device: str, stop_event: Any, *, shm_buffer: Any = None
    ) -> dict:
        rng = None if config["global_rng"] else current_client().rng
        return train_client(payload["params"], config["cid"], rng)


class ThreadTrainer(ThreadPoolClientTrainer[dict, dict]):
    def __init__(self, num_parallels: int) -> None:
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[dict] = []
        self.stop_event = threading.Event()
        self.seed = SEED
        self.progress = False

    def worker(self, cid: int, device: str, payload: dict, stop_event: threading.Event) -> dict:
        return train_client(payload["params"], cid, current_client().rng)


def simulate(trainer: Any) -> torch.Tensor:
    trainer.rounds_run = 0  # trainers are reused across tests: restart the streams
    params = initial_params()
    for cids in SCHEDULE:
        trainer.local_process({"params": params}, cids)
        uplinks = trainer.uplink_package()
        assert [u["cid"] for u in uplinks] == cids
        params = fedavg(params, uplinks)
    return params


def simulate_serial(seed: int) -> torch.Tensor:
    """The same federation in a plain loop, no framework at all."""
    params = initial_params()
    for r, cids in enumerate(SCHEDULE):
        uplinks = [
            train_client(params, cid, reproducibility.client_rng_suite(seed, cid, r))
            for cid in cids
        ]
        params = fedavg(params, uplinks)
    return params


@pytest.fixture(scope="module")
def process_trainers() -> Iterator[dict[int, ProcessTrainer]]:
    # Built together so that their workers start up concurrently.
    trainers = {n: ProcessTrainer(n, global_rng=False) for n in (1, 2, 4)}
    yield trainers
    for t in trainers.values():
        t.close()


@pytest.mark.slow
def test_final_model_is_bitwise_identical_however_clients_are_scheduled(
    process_trainers: dict[int, ProcessTrainer],
) -> None:
    serial = simulate_serial(SEED)
    assert not torch.equal(serial, initial_params())  # it trained
    assert not torch.equal(serial, simulate_serial(SEED + 1))  # and the seed matters

    results = {f"process-{n}": simulate(t) for n, t in process_trainers.items()}
    with ProcessTrainer(0, global_rng=False) as inline:
        results["in-process"] = simulate(inline)
    for n in (1, 3):
        with ThreadTrainer(n) as threads:
            results[f"threads-{n}"] = simulate(threads)
    for name, params in results.items():
        assert torch.equal(params, serial), name


def test_global_rng_code_is_reproducible_in_worker_processes(
    process_trainers: dict[int, ProcessTrainer],
) -> None:
    results = {}
    for n in (1, 2, 4):
        trainer = process_trainers[n]
        trainer.global_rng = True
        try:
            results[n] = simulate(trainer)
        finally:
            trainer.global_rng = False
    with ProcessTrainer(0, global_rng=True) as inline:
        results[0] = simulate(inline)
    assert torch.equal(results[1], results[2])
    assert torch.equal(results[1], results[4])
    assert torch.equal(results[1], results[0])
    assert not torch.equal(results[1], simulate_serial(SEED))  # dropout did draw
