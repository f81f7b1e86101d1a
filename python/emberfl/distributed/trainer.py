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
the same bits for any number of ranks, workers per rank and runtime.

Every tensor crosses the network raw, by the dtypes and shapes of the round header.
The header (:class:`RoundHeader`) and each rank's stand-ins (:func:`write_stand_ins`)
are JSON, checked field by field on arrival; the package skeletons in them are rebuilt
by :func:`~emberfl.distributed.peer_codec.load_skeleton`, whose unpickler knows only
emberfl's types, plain builtins, torch dtypes and the job's own package types (the
local trainer's generic arguments, ``package_types`` and
:func:`~emberfl.distributed.peer_codec.allow_peer_types`). Anything else stops the job with a
:class:`~emberfl.distributed.peer_codec.PeerDataError` naming the rank that sent it.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
import torch.distributed as dist

from emberfl.core.errors import RankFailedError
from emberfl.core.fold import FoldedRound, FoldTerm, UplinkFold, WireStandIn, read_fold
from emberfl.core.packages import tensor_bytes
from emberfl.distributed.collectives import (
    assign_clients,
    broadcast_tensors,
    combine_sums,
    describe_package,
    gather_bytes,
)
from emberfl.distributed.peer_codec import (
    Layout,
    PeerDataError,
    check_layout,
    declared_package_types,
    load_skeleton,
    read_base64,
    read_json,
)
from emberfl.distributed.rank_watch import RankWatch
from emberfl.runtimes.common import set_rounds_run
from emberfl.streaming import StreamingSum

__all__ = ["DistributedClientTrainer", "RoundHeader", "read_stand_ins", "write_stand_ins"]

SERVER = 0

_STOP = json.dumps({"op": "stop"})


def _is_int(value: object) -> TypeGuard[int]:
    return type(value) is int  # not a bool


@dataclass(frozen=True)
class RoundHeader:
    """What rank 0 posts in the job's store before each round, as JSON: the round's
    index, clients and their costs, the fold's terms, and the downlink's skeleton and
    tensor layout (:func:`~emberfl.distributed.collectives.describe_package`)."""

    round: int
    cids: list[int]
    costs: list[float] | None
    terms: tuple[FoldTerm, ...]
    skeleton: bytes
    layout: Layout

    def encode(self) -> str:
        return json.dumps(
            {
                "op": "round",
                "round": self.round,
                "cids": self.cids,
                "costs": self.costs,
                "terms": [[t.name, t.field, t.weight] for t in self.terms],
                "skeleton": base64.b64encode(self.skeleton).decode("ascii"),
                "layout": self.layout,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> RoundHeader | None:
        """The header in ``data`` (``None``: rank 0 closed the job), every field
        checked: anyone who reaches the store can write it."""
        obj = read_json(data, SERVER, "a round header")
        if not isinstance(obj, dict) or obj.get("op") not in ("round", "stop"):
            raise PeerDataError(SERVER, "a round header with no known op")
        if obj["op"] == "stop":
            return None

        def bad(what: str) -> PeerDataError:
            return PeerDataError(SERVER, f"a round header with {what}")

        index, cids, costs = obj.get("round"), obj.get("cids"), obj.get("costs")
        if not _is_int(index) or index < 0:
            raise bad(f"the round index {index!r}")
        if not isinstance(cids, list) or not cids or not all(_is_int(c) and c >= 0 for c in cids):
            raise bad("clients that are not a list of client ids")
        if costs is not None and not (
            isinstance(costs, list)
            and len(costs) == len(cids)
            and all(type(c) in (int, float) and math.isfinite(c) and c >= 0 for c in costs)
        ):
            raise bad("costs that are not one finite number >= 0 per client")
        raw = obj.get("terms")
        if not isinstance(raw, list) or not all(
            isinstance(t, list) and len(t) == 3 and isinstance(t[0], str) and isinstance(t[1], str)
            for t in raw
        ):
            raise bad("fold terms that are not [name, field, weight] triples")
        try:
            terms = UplinkFold(tuple(FoldTerm(*t) for t in raw)).terms
        except (TypeError, ValueError) as exc:
            raise bad(f"fold terms that no fold has ({exc})") from None
        return cls(
            round=index,
            cids=cids,
            costs=None if costs is None else [float(c) for c in costs],
            terms=terms,
            skeleton=read_base64(obj.get("skeleton"), SERVER, "a round header's skeleton"),
            layout=check_layout(obj.get("layout"), SERVER),
        )


#: One client's stand-in as a rank sends it: its position in the round, its wire
#: skeleton (:meth:`UplinkFold.wire_skeleton`) and the names of its NaN/Inf terms.
WireEntry = tuple[int, bytes, tuple[str, ...]]


def write_stand_ins(entries: list[WireEntry]) -> bytes:
    """A rank's stand-ins, as JSON, for :func:`read_stand_ins` on rank 0."""
    return json.dumps(
        [[p, base64.b64encode(skeleton).decode("ascii"), list(bad)] for p, skeleton, bad in entries]
    ).encode()


def read_stand_ins(
    data: bytes,
    sender: int,
    positions: list[int],
    terms: Iterable[str],
    types: Iterable[type] = (),
) -> list[tuple[int, Any, tuple[str, ...]]]:
    """The stand-ins rank ``sender`` sent (``data``), rebuilt around ``meta`` tensors:
    ``(position, stand-in, NaN/Inf terms)`` each. They must be one per position the
    round gave that rank (``positions``, in order), naming only ``terms``; their
    skeletons go through :func:`~emberfl.distributed.peer_codec.load_skeleton`."""
    obj = read_json(data, sender, "a list of stand-ins")
    names = set(terms)
    if not isinstance(obj, list) or len(obj) != len(positions):
        raise PeerDataError(sender, f"a list of stand-ins that does not hold {len(positions)}")
    types = tuple(types)
    out = []
    for entry, expected in zip(obj, positions, strict=True):
        if not (isinstance(entry, list) and len(entry) == 3 and _is_int(entry[0])) or (
            entry[0] != expected
        ):
            raise PeerDataError(sender, f"a stand-in that is not one for position {expected}")
        _, text, bad = entry
        if not (isinstance(bad, list) and all(isinstance(b, str) and b in names for b in bad)):
            raise PeerDataError(sender, f"a stand-in whose NaN/Inf terms {bad!r} are no terms")
        skeleton = read_base64(text, sender, "a stand-in's skeleton")
        load = functools.partial(load_skeleton, tensors={}, sender=sender, types=types)
        try:
            stand_in = WireStandIn(skeleton, tuple(bad)).package(load)
        except PeerDataError:
            raise
        except (TypeError, ValueError) as exc:  # not a dataclass or mapping, a bad shape
            raise PeerDataError(sender, f"a stand-in that is not one ({exc})") from None
        out.append((expected, stand_in, tuple(bad)))
    return out


class DistributedClientTrainer:
    """``local`` (this rank's client trainer) trained as one rank of the job.

    ``client_cost(cid)`` estimates a client's work (e.g. its sample count) for
    balancing the ranks (default: 1 each); only rank 0's is used. ``watch`` is the
    job's :class:`RankWatch` (default: one on the default process group's store).
    ``package_types`` are classes that packages from other ranks may hold besides
    emberfl's own, plain builtins and the classes among ``local``'s generic arguments
    (``BaseClientTrainer[MyUplink, MyDownlink]``); see
    :func:`~emberfl.distributed.peer_codec.allow_peer_types`.
    """

    def __init__(
        self,
        local: Any,
        *,
        group: Any = None,
        watch: RankWatch | None = None,
        client_cost: Callable[[int], float] | None = None,
        package_types: Iterable[type] = (),
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
        self.package_types = (*package_types, *declared_package_types(local))
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
        # A rank may get no client (a Poisson round can draw fewer than the ranks, or
        # none): it still meets the others and sends an empty sum.
        cids = [int(c) for c in cid_list]
        costs = [float(self.client_cost(c)) for c in cids] if self.client_cost else None
        skeleton, layout, tensors = describe_package(payload)
        header = RoundHeader(self._rounds_run, cids, costs, fold.terms, skeleton, layout)
        self._guarded(lambda: self._post(header.encode()), "posting a round")
        folded = self._guarded(lambda: self._round(header, tensors), f"round {header.round}")
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
            if header is None:
                return rounds
            self._guarded(functools.partial(self._round, header, None), f"round {header.round}")
            rounds += 1

    # -- one round, on every rank ---------------------------------------------------

    def _round(
        self, header: RoundHeader, tensors: dict[str, torch.Tensor] | None
    ) -> FoldedRound | None:
        cids, terms = header.cids, header.terms
        positions = assign_clients(list(range(len(cids))), header.costs, self.world_size)
        mine = positions[self.rank]
        # Every rank is here before the broadcast: a collective waits for a silent rank
        # as long as its timeout, a meeting in the store only ``watch.timeout``.
        self.watch.meet(f"start/{self._seq}", f"starting round {header.round}")
        received = self._collective(
            lambda: broadcast_tensors(header.layout, tensors, SERVER, self.group),
            "receiving the model",
        )
        payload = load_skeleton(header.skeleton, received, sender=SERVER, types=self.package_types)
        local = self._train([cids[i] for i in mine], payload, terms, header.round)
        self.watch.meet(f"trained/{self._seq}", f"waiting for round {header.round}'s ranks")
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
            lambda: gather_bytes(write_stand_ins(wires), SERVER, self.group), "sending stand-ins"
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
            for position, stand_in, bad in read_stand_ins(
                data, r, positions[r], names, self.package_types
            ):
                stand_ins[position] = stand_in
                if bad:
                    skipped[position] = bad
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

    def _post(self, header: str) -> None:
        self.watch.post(f"cmd/{self._seq}", header)
        self._seq += 1

    def _next_header(self) -> RoundHeader | None:
        data = self.watch.get(f"cmd/{self._seq}", SERVER, "waiting for rank 0's next round")
        self._seq += 1
        return RoundHeader.decode(data)

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
                self._post(_STOP)
        finally:
            try:
                close = getattr(self.local, "close", None)
                if callable(close):
                    close()
            finally:
                self.watch.close()
