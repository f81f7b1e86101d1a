"""A multi-rank round on real gloo groups of 2-3 local ranks: its collectives, the
distributed trainer driven by the library loop, and the rank watch."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from conftest import DIGITS_CLIENTS
from emberfl import store
from emberfl.contrib import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgThreadPoolClientTrainer,
)
from emberfl.core.errors import RankFailedError
from emberfl.data import iid, load_digits
from emberfl.distributed.collectives import assign_clients, broadcast_package, combine_sums
from emberfl.distributed.rank_watch import RankWatch
from emberfl.distributed.trainer import DistributedClientTrainer
from emberfl.models import ZooModelSelector
from emberfl.simulation import write_store
from emberfl.streaming import StreamingSum


def test_assignment_balances_costs_deterministically() -> None:
    cids = [7, 3, 9, 1, 4, 8]
    costs = [600, 10, 300, 290, 20, 5]
    shares = assign_clients(cids, costs, 2)
    assert shares == assign_clients(cids, costs, 2)
    assert sorted(c for share in shares for c in share) == sorted(cids)
    loads = [sum(costs[cids.index(c)] for c in share) for share in shares]
    assert loads == [615, 610]  # 600 + 10 + 5 against 300 + 290 + 20
    for share in shares:  # each share keeps the round's order
        assert share == [c for c in cids if c in share]
    assert assign_clients(cids, None, 3) == [[7, 1], [3, 4], [9, 8]]
    assert assign_clients([1], None, 3) == [[1], [], []]
    with pytest.raises(ValueError, match="world_size"):
        assign_clients(cids, None, 0)
    with pytest.raises(ValueError, match="2 costs for 6 clients"):
        assign_clients(cids, [1, 2], 2)
    with pytest.raises(ValueError, match="finite"):
        assign_clients([1], [float("nan")], 2)


@dataclass
class _Package:
    round: int
    weights: torch.Tensor
    counts: torch.Tensor
    half: torch.Tensor
    note: str


def _contributions() -> list[list[tuple[str, torch.Tensor, float]]]:
    g = torch.Generator().manual_seed(3)
    return [
        [
            ("model", torch.randn(5001, generator=g), float(10 + i)),
            ("control", torch.randn(77, generator=g), 1.0),
        ]
        for i in range(7)
    ]


def _rank_main(rank: int, world: int, tmp: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world
    )
    try:
        package = None
        if rank == 0:
            package = _Package(
                3,
                torch.linspace(-1, 1, 1000).view(10, 100),
                torch.arange(6, dtype=torch.int64),
                torch.ones(4, dtype=torch.bfloat16),
                "global",
            )
        got = broadcast_package(package, src=0, types=[_Package])  # the test's own type
        assert (got.round, got.note) == (3, "global")
        # Every rank folds the clients assigned to it; the last rank may fold nothing.
        contributions = _contributions()
        cids = list(range(len(contributions)))
        shares = assign_clients(cids, [float(i % 3 + 1) for i in cids], world)
        local = StreamingSum()
        for cid in shares[rank]:
            local.add(contributions[cid], label=cid)
        partial = StreamingSum()
        if rank != world // 2:  # this rank folds nothing here (a receiver in the tree at 5)
            partial.merge(local)
        empty = combine_sums(partial, ["model", "control"])
        total = combine_sums(local, ["model", "control"])
        assert (total is None) == (empty is None) == (rank != 0)
        if rank == 0:
            assert total is not None and empty is not None
            store.save(
                Path(tmp) / "combined.safetensors",
                {
                    "model": total.mean("model"),
                    "control": total.sum("control"),
                    "count": torch.tensor([total.count, empty.count]),
                    "empty_model": empty.mean("model"),
                },
            )
        store.save(
            Path(tmp) / f"rank{rank}.safetensors",
            {"weights": got.weights, "counts": got.counts, "half": got.half},
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 5])
def test_broadcast_and_combined_sums_match_one_process(tmp_path: Path, world: int) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * world
    whole = StreamingSum()
    whole.add_many(_contributions())
    # The same contributions, without the share of rank world // 2.
    shares = assign_clients(list(range(7)), [float(i % 3 + 1) for i in range(7)], world)
    partial = StreamingSum()
    for cid in sorted(c for r, share in enumerate(shares) if r != world // 2 for c in share):
        partial.add(_contributions()[cid])
    for rank in range(world):
        got = store.load(tmp_path / f"rank{rank}.safetensors")
        assert torch.equal(got["weights"], torch.linspace(-1, 1, 1000).view(10, 100))
        assert torch.equal(got["counts"], torch.arange(6))
        assert got["half"].dtype == torch.bfloat16 and torch.equal(
            got["half"].float(), torch.ones(4)
        )
    got = store.load(tmp_path / "combined.safetensors")
    assert torch.equal(got["model"], whole.mean("model"))
    assert torch.equal(got["control"], whole.sum("control"))
    assert got["count"].tolist() == [7, partial.count]
    assert torch.equal(got["empty_model"], partial.mean("model"))


# -- the distributed trainer, from the library loop -------------------------------


def _digits(tmp: Path) -> tuple[Any, Any]:
    data = load_digits(seed=0)
    dataset = write_store(tmp / "store", data, iid(data.train_y, DIGITS_CLIENTS, 0))
    return dataset, ZooModelSelector(data.in_shape, data.num_classes, seed=0)


def _fedavg(dataset: Any, selector: Any, kind: str) -> Any:
    args = (selector, "mlp", dataset, "cpu", DIGITS_CLIENTS, 1, 16, 0.1, 7)
    if kind == "thread":
        return FedAvgThreadPoolClientTrainer(*args, 2, progress=False)
    return FedAvgBaseClientTrainer(*args, progress=False)


def _handler(dataset: Any, selector: Any) -> FedAvgBaseServerHandler:
    return FedAvgBaseServerHandler(selector, "mlp", dataset, 3, DIGITS_CLIENTS, 0.7, "cpu", 512, 7)


def _trainer_rank(rank: int, world: int, tmp: str, port: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    dataset, selector = _digits(Path(tmp) / f"rank{rank}")
    # Each rank may run another local runtime: the sums are exact.
    trainer = DistributedClientTrainer(
        _fedavg(dataset, selector, "thread" if rank % 2 else "serial"),
        watch=RankWatch(rank, world, timeout=5.0),
        client_cost=lambda cid: float(cid + 1),
    )
    try:
        if trainer.is_server:
            handler = _handler(dataset, selector)
            trainer.uplink_fold = handler.uplink_fold()
            while not handler.is_stopped():
                cids = handler.sample_clients()
                trainer.local_process(handler.downlink_package(), cids)
                packages = trainer.uplink_package()
                assert [p.cid for p in packages] == cids
                assert all(p.metadata["steps"] > 0 for p in packages)
                for package in packages:
                    handler.load(package)
            assert trainer.round_wire_bytes > 0
            store.save_model(handler.model, Path(tmp) / "model.safetensors")
        else:
            assert trainer.follow() == 3
    finally:
        trainer.close()
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_the_library_loop_on_ranks_gives_the_bits_of_one_process(
    tmp_path: Path, digits: Any, one_thread: None, world: int
) -> None:
    """Rank 0 runs BlazeFL's loop unchanged; the other ranks follow; the model is the
    one-process serial run's, bit for bit."""
    dataset, selector = digits
    handler = _handler(dataset, selector)
    serial = _fedavg(dataset, selector, "serial")
    while not handler.is_stopped():
        serial.local_process(handler.downlink_package(), handler.sample_clients())
        for package in serial.uplink_package():
            handler.load(package)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_trainer_rank, args=(r, world, str(tmp_path), port))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0] * world
    got = store.load(tmp_path / "model.safetensors")
    for name, value in handler.model.state_dict().items():
        assert torch.equal(got[name], value), name


# -- the rank watch ---------------------------------------------------------------


def test_the_watch_names_a_silent_rank_and_a_failed_one() -> None:
    server = dist.TCPStore("127.0.0.1", 0, 3, True, wait_for_workers=False)
    make = lambda rank: RankWatch(rank, 3, store=server, timeout=0.6, interval=0.1)  # noqa: E731
    zero, one = make(0), make(1)  # rank 2 never starts
    try:
        with pytest.raises(RankFailedError, match=r"rank 2 has been silent") as info:
            zero.meet("a", "meeting")
        assert info.value.rank == 2
        one.fail("ValueError: bad data")
        with pytest.raises(RankFailedError, match=r"rank 1 failed \(ValueError: bad data\)"):
            zero.get("never", 1, "waiting")
        with pytest.raises(ValueError, match="exceed"):
            RankWatch(0, 2, store=server, timeout=0.1, interval=0.1)
    finally:
        zero.close()
        one.close()


def test_the_watch_lets_ranks_meet_and_post() -> None:
    server = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    watches = [RankWatch(r, 2, store=server, timeout=5.0, interval=0.1) for r in range(2)]
    try:
        watches[0].post("key", "value")
        assert watches[1].get("key", 0, "waiting") == b"value"
        other = threading.Thread(target=watches[1].meet, args=("step", "meeting"))
        other.start()
        watches[0].meet("step", "meeting")
        other.join(timeout=10)
        assert not other.is_alive()
    finally:
        for w in watches:
            w.close()


def test_a_broken_collective_is_blamed_on_the_rank_that_went_silent() -> None:
    """gloo reports a peer that died in a collective as a RuntimeError ("Connection
    reset by peer"); the trainer asks the watch which rank went silent and names it."""

    class _Watch:
        def __init__(self, cause: RankFailedError | None) -> None:
            self.cause = cause

        def explain(self, what: str) -> RankFailedError | None:
            return self.cause

    def broken() -> None:
        raise RuntimeError("Read error [127.0.0.1]:23971: Connection reset by peer")

    trainer = object.__new__(DistributedClientTrainer)
    trainer.watch = _Watch(RankFailedError(2, "has been silent for 3 s", "combining sums"))  # type: ignore[assignment]
    with pytest.raises(RankFailedError, match="rank 2 has been silent") as info:
        trainer._collective(broken, "combining sums")
    assert isinstance(info.value.__cause__, RuntimeError)
    trainer.watch = _Watch(None)  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="Connection reset"):
        trainer._collective(broken, "combining sums")
