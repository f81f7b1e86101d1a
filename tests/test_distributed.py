"""The collectives a multi-rank round is made of, on a real gloo group of 2-3 local ranks."""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from emberfl import store
from emberfl.core.distributed import assign_clients, broadcast_package, combine_sums
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
        got = broadcast_package(package, src=0)
        assert (got.round, got.note) == (3, "global")
        # Every rank folds the clients assigned to it; the last rank may fold nothing.
        contributions = _contributions()
        cids = list(range(len(contributions)))
        shares = assign_clients(cids, [float(i % 3 + 1) for i in cids], world)
        local = StreamingSum()
        for cid in shares[rank]:
            local.add(contributions[cid], label=cid)
        total = combine_sums(local)
        empty = combine_sums(StreamingSum() if rank == world - 1 else local)
        store.save(
            Path(tmp) / f"rank{rank}.safetensors",
            {
                "weights": got.weights,
                "counts": got.counts,
                "half": got.half,
                "model": total.mean("model"),
                "control": total.sum("control"),
                "count": torch.tensor([total.count, empty.count]),
                "empty_model": empty.mean("model"),
            },
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
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
    # The same contributions, without the last rank's share.
    shares = assign_clients(list(range(7)), [float(i % 3 + 1) for i in range(7)], world)
    partial = StreamingSum()
    for cid in sorted(c for share in shares[:-1] for c in share):
        partial.add(_contributions()[cid])
    for rank in range(world):
        got = store.load(tmp_path / f"rank{rank}.safetensors")
        assert torch.equal(got["weights"], torch.linspace(-1, 1, 1000).view(10, 100))
        assert torch.equal(got["counts"], torch.arange(6))
        assert got["half"].dtype == torch.bfloat16 and torch.equal(
            got["half"].float(), torch.ones(4)
        )
        assert torch.equal(got["model"], whole.mean("model"))
        assert torch.equal(got["control"], whole.sum("control"))
        assert got["count"].tolist() == [7, partial.count]
        assert torch.equal(got["empty_model"], partial.mean("model"))
