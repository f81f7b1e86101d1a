"""FedNova: the normalized update against a direct implementation of the paper's rule
on hand-made clients of clearly different step counts, FedAvg when the step counts
agree, the server rule's edge cases (no step, no data, buffers), the uplink fields
across folding and ranks, and ``emberfl run`` on every runtime, bit for bit, resumed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from cli_run import emberfl
from emberfl.contrib.fedavg import (
    FedAvgBaseServerHandler,
    FedAvgClientUpdate,
    FedAvgUplinkPackage,
)
from emberfl.contrib.fednova import (
    FEDNOVA,
    FedNovaBatchedStep,
    FedNovaClientUpdate,
    FedNovaServerHandler,
    FedNovaUplinkPackage,
    nova_uplink,
)
from emberfl.core import serialize_model
from emberfl.core.fold import InProcessFold
from emberfl.distributed.trainer import read_stand_ins, write_stand_ins

pytestmark = pytest.mark.usefixtures("one_thread")

W0 = torch.tensor([[0.2, -0.1], [0.05, 0.3]])
B0 = torch.tensor([0.01, -0.02])
BATCH, EPOCHS, LR = 2, 2, 0.5


class TinySelector:
    def select_model(self, name: str) -> nn.Module:
        model = nn.Linear(2, 2)
        with torch.no_grad():
            model.weight.copy_(W0)
            model.bias.copy_(B0)
        return model


def _clients(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for n in sizes:
        x = torch.randn(n, 2, generator=gen)
        y = (x[:, 0] + 0.5 * torch.randn(n, generator=gen) > 0).long()
        out.append((x, y))
    return out


def _handler(
    cls: type[FedAvgBaseServerHandler], clients: int, rounds: int = 10
) -> FedAvgBaseServerHandler:
    return cls(TinySelector(), "tiny", None, rounds, clients, 1.0, "cpu", 8, 0)


def _train(
    handler: FedAvgBaseServerHandler,
    update: FedAvgClientUpdate,
    clients: list[tuple[torch.Tensor, torch.Tensor]],
    rounds: int,
    *,
    fold: bool = False,
) -> torch.Tensor:
    """``rounds`` rounds of every client, as a serial trainer runs them."""
    for _ in range(rounds):
        payload = handler.downlink_package()
        uplinks = [
            update(
                cid=cid,
                model=TinySelector().select_model("tiny"),
                payload=payload,
                loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
                device="cpu",
                epochs=EPOCHS,
                lr=LR,
            )
            for cid, (x, y) in enumerate(clients)
        ]
        if fold:
            folding = InProcessFold(handler.uplink_fold(), len(uplinks))
            uplinks = [folding.add(i, p) for i, p in reversed(list(enumerate(uplinks)))][::-1]
            folding.finish()
        for p in uplinks:
            handler.load(p)
    return serialize_model(handler.model)


def _direct(
    clients: list[tuple[torch.Tensor, torch.Tensor]], rounds: int, *, nova: bool
) -> torch.Tensor:
    """The paper's rule in plain float64 torch (FedAvg's mean with ``nova=False``)."""
    w, b = W0.double(), B0.double()
    sizes = torch.tensor([float(len(y)) for _, y in clients], dtype=torch.float64)
    p = sizes / sizes.sum()
    for _ in range(rounds):
        x = torch.cat([w.reshape(-1), b])
        ys, taus = [], []
        for data, target in clients:
            wi, bi, tau = w.clone(), b.clone(), 0
            for _ in range(EPOCHS):
                for s in range(0, len(target), BATCH):
                    wr, br = wi.requires_grad_(), bi.requires_grad_()
                    loss = F.cross_entropy(
                        data[s : s + BATCH].double() @ wr.T + br, target[s : s + BATCH]
                    )
                    gw, gb = torch.autograd.grad(loss, (wr, br))
                    wi, bi = (wr - LR * gw).detach(), (br - LR * gb).detach()
                    tau += 1
            ys.append(torch.cat([wi.reshape(-1), bi]))
            taus.append(float(tau))
        if nova:
            d = [(x - y) / t for y, t in zip(ys, taus, strict=True)]
            tau_eff = sum(pi * t for pi, t in zip(p, taus, strict=True))
            x = x - tau_eff * sum(pi * di for pi, di in zip(p, d, strict=True))
        else:
            x = sum(pi * y for pi, y in zip(p, ys, strict=True))
        w, b = x[:4].reshape(2, 2), x[4:]
    return torch.cat([w.reshape(-1), b])


def test_the_rule_matches_the_paper_on_clients_of_different_step_counts() -> None:
    # 2, 5 and 9 samples in batches of 2 over 2 epochs: tau = 2, 6 and 10.
    clients = _clients([2, 5, 9])
    rounds = 3
    got = _train(_handler(FedNovaServerHandler, 3), FedNovaClientUpdate(), clients, rounds)
    want = _direct(clients, rounds, nova=True)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    # Folded where the clients train: the same bits.
    folded = _train(
        _handler(FedNovaServerHandler, 3), FedNovaClientUpdate(), clients, rounds, fold=True
    )
    assert torch.equal(folded, got)
    # FedAvg goes elsewhere, by far more than the tolerance.
    fedavg = _train(_handler(FedAvgBaseServerHandler, 3), FedAvgClientUpdate(), clients, rounds)
    torch.testing.assert_close(
        fedavg.double(), _direct(clients, rounds, nova=False), rtol=0, atol=2e-6
    )
    assert (fedavg - got).abs().max() > 1e-2


def test_equal_step_counts_give_fedavg() -> None:
    # 3 and 4 samples (different weights) in batches of 2: tau = 4 for all.
    def both(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        clients = _clients(sizes)
        nova = _train(_handler(FedNovaServerHandler, 3), FedNovaClientUpdate(), clients, 3)
        fedavg = _train(_handler(FedAvgBaseServerHandler, 3), FedAvgClientUpdate(), clients, 3)
        return nova, fedavg

    torch.testing.assert_close(*both([3, 4, 4]), rtol=1e-6, atol=1e-6)
    # One client of 9 samples (tau = 10) among them, and they part.
    nova, fedavg = both([3, 4, 9])
    assert (nova - fedavg).abs().max() > 1e-2


def test_the_uplink_reports_steps_and_weight() -> None:
    x, y = _clients([5])[0]
    up = FedNovaClientUpdate()(
        cid=4,
        model=TinySelector().select_model("tiny"),
        payload=_handler(FedNovaServerHandler, 1).downlink_package(),
        loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        device="cpu",
        epochs=EPOCHS,
        lr=LR,
    )
    assert isinstance(up, FedNovaUplinkPackage)
    r = float(torch.tensor(1 / 6, dtype=torch.float32))
    assert torch.equal(up.nova_counts, torch.tensor([1.0, 6.0, r]))
    assert up.nova_weight == 5 * r and type(up.nova_weight) is float
    assert up.metadata is not None and up.metadata["steps"] == 6.0
    none = nova_uplink(FedAvgUplinkPackage(1, torch.zeros(6), 0), 0)
    assert none.nova_weight == 0.0 and torch.equal(none.nova_counts, torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="steps"):
        nova_uplink(FedAvgUplinkPackage(1, torch.zeros(6), 3), -1)


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.register_buffer("stat", torch.zeros(3))


class BufferSelector:
    def select_model(self, name: str) -> nn.Module:
        torch.manual_seed(0)
        return WithBuffer()


def test_no_step_no_data_and_buffers() -> None:
    handler = FedNovaServerHandler(BufferSelector(), "b", None, 5, 4, 1.0, "cpu", 8, 0)
    x = serialize_model(handler.model).double()
    assert handler.layout.spans == ((3, 7), (7, 9))  # stat (3), then fc.weight, fc.bias
    gen = torch.Generator().manual_seed(7)
    ys = [torch.randn(9, generator=gen) for _ in range(2)]
    # Client 2 took no step (y = x); client 3 has no data and a wild model.
    ups = [
        (0, ys[0], 3, 2),
        (1, ys[1], 7, 5),
        (2, x.float(), 4, 0),
        (3, torch.full((9,), 1e3), 0, 0),
    ]
    for cid, y, n, tau in ups:
        handler.load(nova_uplink(FedAvgUplinkPackage(cid, y, n), tau))
    p = torch.tensor([3.0, 7.0, 4.0], dtype=torch.float64) / 14
    taus = [2.0, 5.0, 0.0]
    d = [(x - ys[0].double()) / 2, (x - ys[1].double()) / 5, torch.zeros(9, dtype=torch.float64)]
    tau_eff = sum(pi * t for pi, t in zip(p, taus, strict=True))
    params = x - tau_eff * sum(pi * di for pi, di in zip(p, d, strict=True))
    fedavg = p[0] * ys[0].double() + p[1] * ys[1].double() + p[2] * x
    got = serialize_model(handler.model).double()
    torch.testing.assert_close(got[3:], params[3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:3], fedavg[:3], rtol=0, atol=1e-6)  # the buffer

    # A round in which nobody took a step leaves the parameters; buffers take the mean.
    before = serialize_model(handler.model)
    stats = torch.cat([torch.tensor([1.0, 2.0, 3.0]), before[3:]])
    for cid in range(4):
        handler.load(nova_uplink(FedAvgUplinkPackage(cid, stats, 1 + cid), 0))
    assert torch.equal(serialize_model(handler.model), stats)


def test_stand_ins_keep_the_fields_across_ranks() -> None:
    fold = _handler(FedNovaServerHandler, 2).uplink_fold()
    up = nova_uplink(FedAvgUplinkPackage(5, torch.randn(6), 11, {"loss": 0.5}), 7)
    stand_in = fold.stand_in(up)
    assert stand_in.nova_weight == up.nova_weight and stand_in.nova_counts.is_meta
    wire = write_stand_ins([(0, fold.wire_skeleton(up), ())])
    [(position, peer, bad)] = read_stand_ins(wire, 1, [0], [t.name for t in fold.terms])
    assert (position, bad) == (0, ())
    assert type(peer) is FedNovaUplinkPackage
    assert (peer.cid, peer.data_size, peer.nova_weight) == (5, 11, up.nova_weight)
    assert peer.nova_counts.is_meta and peer.nova_counts.shape == (3,)


def test_the_batched_form_and_no_settings() -> None:
    assert type(FedNovaClientUpdate().batched_step()) is FedNovaBatchedStep

    class Other(FedNovaClientUpdate):
        pass

    assert Other().batched_step() is None
    assert FEDNOVA.name == "fednova" and FEDNOVA.settings == ()
    assert isinstance(FEDNOVA.client({}), FedNovaClientUpdate)


# -- emberfl run, as a user runs it -----------------------------------------------

# A quantity partition: clients of clearly different sizes, hence step counts.
COMMAND = [
    "run", "--clients", "20", "--sample-ratio", "0.5", "--rounds", "4", "--epochs", "1",
    "--seed", "5", "--partition", "quantity", "--no-progress", "--quiet",
]  # fmt: skip


def _run(out: Path, *flags: str, algorithm: str = "fednova") -> None:
    done = emberfl(*COMMAND, "--algorithm", algorithm, *flags, "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fedavg") / "run"
    _run(out, "--runtime", "serial", algorithm="fedavg")
    return out


@pytest.mark.slow
def test_every_runtime_gives_the_same_bits(
    tmp_path: Path, fedavg_run: Path, model_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    layouts = {
        "workers1": ["--workers", "1"],
        "workers2": ["--workers", "2"],
        "thread": ["--runtime", "thread"],
        "serial": ["--runtime", "serial"],
    }
    models = {}
    for name, flags in layouts.items():
        _run(tmp_path / name, *flags)
        models[name] = model_bytes(tmp_path / name)
    differ = [name for name, model in models.items() if model != models["serial"]]
    assert not differ, f"{differ} differ from the serial runtime's model"
    assert models["serial"] != model_bytes(fedavg_run)
    # Batched: the same rule, to float tolerance (its GEMMs sum in another order).
    _run(tmp_path / "batched", "--runtime", "batched")
    from emberfl import store

    batched = store.load(tmp_path / "batched" / "model.safetensors")
    serial = store.load(tmp_path / "serial" / "model.safetensors")
    for key, value in serial.items():
        torch.testing.assert_close(batched[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_resumed_run_gives_the_same_bits(
    tmp_path: Path, fedavg_run: Path, model_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    _run(tmp_path / "whole", "--workers", "1")
    cut = tmp_path / "cut"
    flags = ["--workers", "1", "--checkpoint-every", "2", "--out", str(cut)]
    killed = emberfl(*COMMAND, "--algorithm", "fednova", *flags, crash="checkpoint.latest:1")
    assert killed.returncode == -9, killed.stderr
    assert (cut / "latest").read_text().strip() == "checkpoint-2"
    resumed = emberfl("resume", str(cut), "--no-progress")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert model_bytes(cut) == model_bytes(tmp_path / "whole")
    assert model_bytes(cut) != model_bytes(fedavg_run)
