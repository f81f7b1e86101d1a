"""One round's clients trained over every rank of a torch.distributed job.

:class:`DistributedClientTrainer` wraps the client trainer each rank already has (a
process pool, a thread pool, a serial or batched trainer: anything that folds through
``uplink_fold``). Rank 0 is the server: its loop is the one-machine loop, unchanged::

    trainer = DistributedClientTrainer(local_trainer)
    trainer.uplink_fold = handler.uplink_fold()
    if trainer.is_server:
        while not handler.if_stop():
            cids = handler.sample_clients()
            trainer.local_process(handler.downlink_package(), cids)
            for package in trainer.uplink_package():
                handler.load(package)
    else:
        trainer.follow()           # trains this rank's share of every round
    trainer.close()                # rank 0's releases the other ranks

Per round, rank 0 posts the round's header (round index, clients, their costs, the fold's
terms, the downlink's skeleton and tensor layout) in the job's store, and then every rank

1. meets the others, then receives the downlink's tensors: one broadcast per dtype
   (:func:`broadcast_tensors`);
2. trains its share (:func:`assign_clients`, balanced by the clients' costs, from the
   round's client list alone) with its local trainer, folding every uplink into exact sums;
3. meets the others (:class:`RankWatch`: a dead or silent rank is named, not waited on);
4. sends its sums towards rank 0 in a tree of exact merges (:func:`combine_sums`), and
   its clients' tensor-free stand-ins to rank 0 (:func:`gather_bytes`).

Rank 0 hands the merged round to the fold's sink and its stand-ins to ``uplink_package``
in client order, as a one-machine trainer does. The sums are exact, so the model is
the same bits for any number of ranks, workers per rank and runtime. Every tensor
crosses the network raw; the stand-ins' skeletons are pickles, which only ranks of the
job send, on the trusted network the job runs on.
"""

from __future__ import annotations

import base64
import functools
import json
import pickle
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from emberfl.core.client_trainer import set_rounds_run
from emberfl.core.distributed import (
    assign_clients,
    broadcast_tensors,
    combine_sums,
    describe_package,
    gather_bytes,
)
from emberfl.core.errors import RankFailedError
from emberfl.core.fold import FoldedRound, FoldTerm, UplinkFold, WireStandIn, read_fold
from emberfl.core.packages import join_package, tensor_bytes
from emberfl.core.rank_watch import RankWatch
from emberfl.streaming import StreamingSum

__all__ = ["DistributedClientTrainer"]

SERVER = 0


class DistributedClientTrainer:
    """``local`` (this rank's client trainer) trained as one rank of the job.

    ``client_cost(cid)`` estimates a client's work (e.g. its sample count) for
    balancing the ranks (default: 1 each); only rank 0's is used. ``watch`` is the
    job's :class:`RankWatch` (default: one on the default process group's store).
    """

    def __init__(
        self,
        local: Any,
        *,
        group: Any = None,
        watch: RankWatch | None = None,
        client_cost: Callable[[int], float] | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "DistributedClientTrainer needs torch.distributed: call "
                "torch.distributed.init_process_group() first (torchrun sets its environment)"
            )
        self.local = local
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.watch = watch or RankWatch(self.rank, self.world_size)
        self.client_cost = client_cost
        self.uplink_fold: UplinkFold | None = None
        self.cache: list[Any] = []
        #: Bytes the last round moved between ranks (model out, sums and stand-ins in).
        self.round_wire_bytes = 0
        self._rounds_run = 0
        self._seq = 0
        self._folded: FoldedRound | None = None
        self._closed = False
        self._aborted = False

    @property
    def is_server(self) -> bool:
        return self.rank == SERVER

    @property
    def rounds_run(self) -> int:
        """Rounds run so far (rank 0's count; it feeds the clients' random streams)."""
        return self._rounds_run

    @rounds_run.setter
    def rounds_run(self, value: int) -> None:
        self._rounds_run = int(value)

    # -- rank 0 ---------------------------------------------------------------------

    def local_process(self, payload: Any, cid_list: list[int]) -> None:
        """Train ``cid_list`` over all ranks (rank 0 only; the others :meth:`follow`)."""
        if not self.is_server:
            raise RuntimeError(f"rank {self.rank} follows rank 0: call follow(), not local_process")
        fold = read_fold(self)
        if fold is None:
            raise ValueError(
                "a DistributedClientTrainer folds every round: set its uplink_fold "
                "(e.g. handler.uplink_fold()) first"
            )
        cids = [int(c) for c in cid_list]
        if len(cids) < self.world_size:
            raise ValueError(
                f"{len(cids)} clients this round for {self.world_size} ranks: every rank "
                "needs at least one client (use fewer ranks or more clients per round)"
            )
        costs = [float(self.client_cost(c)) for c in cids] if self.client_cost else None
        skeleton, layout, tensors = describe_package(payload)
        header = {
            "op": "round",
            "round": self._rounds_run,
            "cids": cids,
            "costs": costs,
            "terms": [[t.name, t.field, t.weight] for t in fold.terms],
            "skeleton": base64.b64encode(skeleton).decode("ascii"),
            "layout": layout,
        }
        self._guarded(lambda: self._post(header), "posting a round")
        folded = self._guarded(lambda: self._round(header, tensors), f"round {header['round']}")
        assert folded is not None
        self._rounds_run += 1
        self.cache = list(folded.stand_ins)
        if fold.sink is not None:
            fold.sink(folded)

    def uplink_package(self) -> list[Any]:
        """The round's stand-ins in ``cid_list`` order (their sums went to the sink)."""
        packages, self.cache = self.cache, []
        return packages

    # -- the other ranks ------------------------------------------------------------

    def follow(self) -> int:
        """Train this rank's share of every round rank 0 runs, until it closes the
        job; returns the number of rounds. Raises :class:`RankFailedError` when rank 0
        (or another rank) fails or goes silent."""
        if self.is_server:
            raise RuntimeError("rank 0 is the server: it calls local_process, not follow()")
        rounds = 0
        while True:
            header = self._guarded(self._next_header, "waiting for rank 0's next round")
            if header["op"] == "stop":
                return rounds
            self._guarded(functools.partial(self._round, header, None), f"round {header['round']}")
            rounds += 1

    # -- one round, on every rank ---------------------------------------------------

    def _round(
        self, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None
    ) -> FoldedRound | None:
        cids: list[int] = header["cids"]
        positions = assign_clients(list(range(len(cids))), header["costs"], self.world_size)
        mine = positions[self.rank]
        # Every rank is here before the broadcast: a collective waits for a silent rank
        # as long as its timeout, a meeting in the store only ``watch.timeout``.
        self.watch.meet(f"start/{self._seq}", f"starting round {header['round']}")
        layout = [(k, d, list(shape)) for k, d, shape in header["layout"]]
        received = self._collective(
            lambda: broadcast_tensors(layout, tensors, SERVER, self.group), "receiving the model"
        )
        payload = join_package(base64.b64decode(header["skeleton"]), received)
        terms = tuple(FoldTerm(n, f, w) for n, f, w in header["terms"])
        local = self._train([cids[i] for i in mine], payload, terms, header["round"])
        self.watch.meet(f"trained/{self._seq}", f"waiting for round {header['round']}'s ranks")
        names = [t.name for t in terms]
        total = self._collective(
            lambda: combine_sums(local.sums, names, self.group, dst=SERVER), "combining sums"
        )
        # Rank 0 keeps its own stand-ins; the others send theirs in wire form.
        fold = UplinkFold(terms)
        wires = [] if self.is_server else [
            (mine[i], fold.wire_skeleton(s), local.skipped.get(i, ()))
            for i, s in enumerate(local.stand_ins)
        ]  # fmt: skip
        gathered = self._collective(
            lambda: gather_bytes(pickle.dumps(wires), SERVER, self.group), "sending stand-ins"
        )
        if gathered is None or total is None:
            return None
        # Every rank but this one receives the model once and sends one sum.
        model_bytes = tensor_bytes(payload)
        sum_bytes = 16 * total.elements
        self.round_wire_bytes = (self.world_size - 1) * (model_bytes + sum_bytes) + sum(
            len(g) for r, g in enumerate(gathered) if r != SERVER
        )
        stand_ins: list[Any] = [None] * len(cids)
        skipped: dict[int, tuple[str, ...]] = {}
        for i, stand_in in enumerate(local.stand_ins):
            stand_ins[mine[i]] = stand_in
        skipped.update((mine[i], bad) for i, bad in local.skipped.items())
        for r, data in enumerate(gathered):
            if r == SERVER:
                continue
            for position, skeleton, bad in pickle.loads(data):
                stand_ins[position] = WireStandIn(skeleton, tuple(bad)).package()
                if bad:
                    skipped[position] = tuple(bad)
        return FoldedRound(total, stand_ins, dict(sorted(skipped.items())))

    def _collective(self, step: Callable[[], Any], what: str) -> Any:
        """Run a collective ``step``; when it breaks (gloo and NCCL raise RuntimeError),
        most likely another rank died in it: name that rank if the watch can."""
        try:
            return step()
        except RuntimeError as exc:
            cause = self.watch.explain(what)
            if cause is not None:
                raise cause from exc
            raise

    def _train(
        self, cids: list[int], payload: Any, terms: tuple[FoldTerm, ...], round_index: int
    ) -> FoldedRound:
        """This rank's share of the round, folded by the local trainer."""
        if not cids:
            return FoldedRound(StreamingSum(nonfinite="skip"), [], {})
        self._folded = None
        self.local.uplink_fold = UplinkFold(terms, sink=self._receive)
        set_rounds_run(self.local, round_index)
        self.local.local_process(payload, cids)
        self.local.uplink_package()  # the stand-ins are in the folded round
        folded, self._folded = self._folded, None
        if folded is None:
            raise RuntimeError(f"{type(self.local).__name__} did not fold its round")
        return folded

    def _receive(self, folded: FoldedRound) -> None:
        self._folded = folded

    # -- control messages -----------------------------------------------------------

    def _post(self, header: dict[str, Any]) -> None:
        self.watch.post(f"cmd/{self._seq}", json.dumps(header))
        self._seq += 1

    def _next_header(self) -> dict[str, Any]:
        data = self.watch.get(f"cmd/{self._seq}", SERVER, "waiting for rank 0's next round")
        self._seq += 1
        header: dict[str, Any] = json.loads(data)
        return header

    def _guarded(self, step: Callable[[], Any], what: str) -> Any:
        """Run ``step``; on any failure tell the other ranks (so they stop at once)."""
        try:
            return step()
        except RankFailedError:
            raise  # another rank's failure: that rank has told the others
        except BaseException as exc:
            self.watch.fail(f"{type(exc).__name__} while {what}: {exc}".splitlines()[0])
            raise

    # -- the end --------------------------------------------------------------------

    def abort(self, reason: str) -> None:
        """Tell the other ranks that this one failed (``reason``; the first line is
        sent): they stop at once with :class:`RankFailedError`, instead of being
        released as by :meth:`close`."""
        self._aborted = True
        self.watch.fail(reason.splitlines()[0] if reason else "aborted")

    def close(self) -> None:
        """Rank 0: release the other ranks (their :meth:`follow` returns), unless it
        aborted. Every rank: close the local trainer and stop the heartbeat."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.is_server and not self._aborted:
                self._post({"op": "stop"})
        finally:
            try:
                close = getattr(self.local, "close", None)
                if callable(close):
                    close()
            finally:
                self.watch.close()
