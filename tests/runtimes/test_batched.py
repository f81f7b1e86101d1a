"""The batched runtime: K clients trained as one model, each as it would be alone.

Agreement with the per-client path is checked within ``rtol=1e-5, atol=1e-6``, not
bitwise: the batched matrix products (one batched GEMM over the group) may sum in
another order than one client's, so results can differ in the last bits (about 6e-8
on the digits MLP after two epochs). On one CPU thread the kernels happen to agree
bit for bit on the digits MLP, on two threads they do not (SCAFFOLD: 2e-7 in the
parameters, 4e-8 in the control deltas), and GPUs choose other kernels again; so no
test here relies on the bits. The batched runtime is bitwise repeatable with itself.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from emberfl.cli import main
from emberfl.config import SimulationConfig
from emberfl.contrib import (
    ClientStateStore,
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgBatchedClientTrainer,
    FedAvgClientUpdate,
    FedProxBaseClientTrainer,
    FedProxBatchedClientTrainer,
    LocalRun,
    ScaffoldBaseClientTrainer,
    ScaffoldBatchedClientTrainer,
    ScaffoldDownlinkPackage,
    ScaffoldServerHandler,
    ScaffoldUplinkPackage,
)
from emberfl.contrib.scaffold import CONTROL_KEY
from emberfl.data import Partition, load_digits
from emberfl.metrics import read_metrics
from emberfl.models import ZooModelSelector
from emberfl.runtimes.batched import check_batchable
from emberfl.simulation import (
    Simulation,
    load_checkpoint,
    resume_simulation,
    run_simulation,
    write_store,
)

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


def _uneven(root: Path, sizes: list[int]) -> tuple[Any, ZooModelSelector]:
    """Digits over ``len(sizes)`` clients of ``sizes`` samples, and a selector."""
    data = load_digits(seed=0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.train_y))
    starts = np.cumsum([0, *sizes])
    partition = Partition(tuple(np.sort(order[a:b]) for a, b in itertools.pairwise(starts)))
    dataset = write_store(root / "store", data, partition)
    return dataset, ZooModelSelector(data.in_shape, data.num_classes, seed=0)


def test_padded_clients_of_1_7_and_50_samples(tmp_path: Path) -> None:
    sizes = [1, 7, 50]
    dataset, selector = _uneven(tmp_path, sizes)
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


def test_emberfl_run_with_the_batched_runtime(tmp_path: Path) -> None:
    config = SimulationConfig(
        runtime="batched", rounds=3, clients=20, batch_clients=4, progress=False,
    )  # fmt: skip
    with Simulation(config, tmp_path / "run") as simulation:
        result = simulation.run()
    assert len(result.metrics) == 3 and result.final_accuracy > 0.3
    assert (tmp_path / "run" / "model.safetensors").is_file()


# -- SCAFFOLD: control variates stacked per client ----------------------------------------


def _close_scaffold(a: list[Any], b: list[Any]) -> None:
    _close(a, b)
    for x, y in zip(a, b, strict=True):
        assert isinstance(x, ScaffoldUplinkPackage) and isinstance(y, ScaffoldUplinkPackage)
        torch.testing.assert_close(x.control_delta, y.control_delta, rtol=1e-5, atol=1e-6)


def _controls(state_dir: Path) -> dict[int, torch.Tensor]:
    store = ClientStateStore(state_dir)
    out = {}
    for cid in store.clients():
        state = store.load(cid)
        assert state is not None
        out[cid] = state[CONTROL_KEY].clone()
    return out


def _scaffold_rounds(trainer: Any, handler: ScaffoldServerHandler, rounds: list[list[int]]) -> Any:
    """Run ``rounds`` (each a list of clients); yields each round's uplinks after the
    server has taken them."""
    for cids in rounds:
        ups = _round(trainer, handler.downlink_package(), cids)
        for package in ups:
            handler.load(package)
        yield ups


# Round 2 mixes clients with a control from round 1 (0, 4) and fresh ones (3, 1); groups
# of 3 split each round 3 + 1.
SCAFFOLD_ROUNDS = [[4, 0, 5, 2], [0, 3, 4, 1]]


def _scaffold_run(digits: Any, trainer_cls: type, state_dir: Path, **kw: Any) -> Any:
    dataset, selector = digits
    # int(6 * 0.7) = 4 clients a round, as SCAFFOLD_ROUNDS gives them.
    handler = ScaffoldServerHandler(selector, "mlp", dataset, 2, CLIENTS, 0.7, "cpu", 512, 7)
    args = (selector, "mlp", dataset, "cpu", CLIENTS, 2, 10, 0.1, 7)
    trainer = trainer_cls(*args, state_dir=state_dir, **kw)
    return handler, _scaffold_rounds(trainer, handler, SCAFFOLD_ROUNDS)


def test_scaffold_batched_matches_scaffold_alone_for_two_rounds(
    digits: Any, tmp_path: Path
) -> None:
    alone_h, alone = _scaffold_run(
        digits, ScaffoldBaseClientTrainer, tmp_path / "alone", progress=False
    )
    batched_h, batched = _scaffold_run(
        digits, ScaffoldBatchedClientTrainer, tmp_path / "batched", batch_clients=3
    )
    for round_index, (x, y) in enumerate(zip(batched, alone, strict=True)):
        _close_scaffold(x, y)
        stored_x, stored_y = _controls(tmp_path / "batched"), _controls(tmp_path / "alone")
        assert (
            sorted(stored_x)
            == sorted(stored_y)
            == sorted({c for r in SCAFFOLD_ROUNDS[: round_index + 1] for c in r})
        )
        for cid in stored_y:
            torch.testing.assert_close(stored_x[cid], stored_y[cid], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched_h.control, alone_h.control, rtol=1e-5, atol=1e-6)
        if round_index == 0:
            # Round 2 runs with a server control and client controls that are not zero.
            assert alone_h.control.abs().max() > 1e-3
            assert stored_y[0].abs().max() > 1e-3
    assert batched_h.is_stopped() and alone_h.is_stopped()


def test_scaffold_batched_is_bitwise_repeatable(digits: Any, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        _, rounds = _scaffold_run(
            digits, ScaffoldBatchedClientTrainer, tmp_path / name, batch_clients=3
        )
        runs.append([p for ups in rounds for p in ups])
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x.model_parameters, y.model_parameters)
        assert torch.equal(x.control_delta, y.control_delta)
    a, b = _controls(tmp_path / "a"), _controls(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[c], b[c]) for c in a)


def test_scaffold_padded_clients_of_1_7_and_50_samples(tmp_path: Path) -> None:
    """Each client of a group of 1, 7 and 50 samples trains as it would alone, with
    controls that are not zero: padded steps must neither apply ``c - c_i`` nor count
    in ``K_i``."""
    sizes = [1, 7, 50]
    dataset, selector = _uneven(tmp_path, sizes)
    args = (selector, "mlp", dataset, "cpu", 3, 2, 10, 0.1, 7)
    model = FedAvgBaseServerHandler(selector, "mlp", dataset, 1, 3, 1.0, "cpu", 512, 7)
    x0 = model.downlink_package().model_parameters
    gen = torch.Generator().manual_seed(3)
    num_params = x0.numel()  # the MLP has no buffers
    payload = ScaffoldDownlinkPackage(x0, control=0.05 * torch.randn(num_params, generator=gen))
    # Clients 0 and 1 start from stored controls, client 2 from none (zeros).
    stored = {cid: 0.05 * torch.randn(num_params, generator=gen) for cid in (0, 1)}
    for where in ("alone", "batched"):
        for cid, control in stored.items():
            ClientStateStore(tmp_path / where).save(cid, {CONTROL_KEY: control})
    batched = _round(
        ScaffoldBatchedClientTrainer(*args, state_dir=tmp_path / "batched"), payload, [0, 1, 2]
    )
    for cid in range(3):
        # A new trainer per client: each runs as round 0, as the group does.
        trainer = ScaffoldBaseClientTrainer(*args, state_dir=tmp_path / "alone", progress=False)
        _close_scaffold([batched[cid]], _round(trainer, payload, [cid]))
    assert [p.data_size for p in batched] == sizes
    assert [p.metadata["steps"] for p in batched] == [2.0, 2.0, 10.0]
    alone, together = _controls(tmp_path / "alone"), _controls(tmp_path / "batched")
    assert sorted(together) == [0, 1, 2]
    for cid in range(3):
        torch.testing.assert_close(together[cid], alone[cid], rtol=1e-5, atol=1e-6)
        expected = stored.get(cid, torch.zeros(num_params)) + batched[cid].control_delta
        torch.testing.assert_close(together[cid], expected)


def test_scaffold_batched_needs_its_state_and_payload(digits: Any, tmp_path: Path) -> None:
    dataset, selector = digits
    args = (selector, "mlp", dataset, "cpu", CLIENTS, 1, 10, 0.1, 7)
    with pytest.raises(ValueError, match="needs state_dir"):
        ScaffoldBatchedClientTrainer(*args)
    trainer = ScaffoldBatchedClientTrainer(*args, state_dir=tmp_path / "s")
    with pytest.raises(TypeError, match="ScaffoldDownlinkPackage"):
        trainer.local_process(_payload(digits), [0])
    bad = ScaffoldDownlinkPackage(_payload(digits).model_parameters, control=torch.zeros(5))
    with pytest.raises(ValueError, match="server control has shape"):
        trainer.local_process(bad, [0])
    ClientStateStore(tmp_path / "s").save(2, {"other": torch.zeros(3)})
    good = ScaffoldDownlinkPackage(
        bad.model_parameters, control=torch.zeros(bad.model_parameters.numel())
    )
    with pytest.raises(ValueError, match=r"holds no 'scaffold\.control' tensor"):
        trainer.local_process(good, [0, 2])


def test_emberfl_run_scaffold_batched_from_the_command_line(tmp_path: Path) -> None:
    argv = [
        "run", "--algorithm", "scaffold", "--runtime", "batched", "--batch-clients", "2",
        "--clients", "6", "--sample-ratio", "0.5", "--rounds", "2", "--epochs", "2",
        "--lr", "0.1", "--no-progress", "--threads", "1", "--quiet",
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(argv) == 0
    run_dir = tmp_path / "run"
    assert (run_dir / "model.safetensors").is_file()
    assert read_metrics(run_dir)["round"].tolist() == [1.0, 2.0]
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["algorithm"], config["runtime"]) == ("scaffold", "batched")
    # The client controls belong to the run (and its checkpoints): 3 clients a round.
    assert 3 <= len(ClientStateStore(run_dir / "client_state")) <= 6


def test_scaffold_batched_resumes_bitwise(tmp_path: Path, model_bytes: Any) -> None:
    settings: dict[str, Any] = {
        "algorithm": "scaffold", "runtime": "batched", "batch_clients": 2, "clients": 6,
        "sample_ratio": 0.5, "rounds": 4, "epochs": 1, "lr": 0.1, "threads": 1,
        "progress": False, "checkpoint_every": 2, "seed": 3,
    }  # fmt: skip
    run_simulation(settings, out=str(tmp_path / "ref"))
    with Simulation(SimulationConfig.from_mapping(settings), tmp_path / "run") as simulation:
        for _ in range(3):  # the third round is lost: the run goes on from round 2
            simulation.run_round()
    assert load_checkpoint(tmp_path / "run").round == 2
    resume_simulation(tmp_path / "run")
    assert model_bytes(tmp_path / "run") == model_bytes(tmp_path / "ref")
