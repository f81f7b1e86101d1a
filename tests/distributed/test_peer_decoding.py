"""What one rank decodes from another: forged skeletons run nothing, forged lengths
allocate nothing, and the packages of emberfl's algorithms still cross ranks.

Unit tests call the decoding functions a follower and rank 0 use; the rest run a real
gloo pair of local ranks in which one rank is the attacker."""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import multiprocessing as mp
import os
import pickle
import socket
from collections import OrderedDict, namedtuple
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from emberfl.contrib import (
    FedAdamServerHandler,
    FedAvgBaseServerHandler,
    FedAvgDownlinkPackage,
    FedAvgUplinkPackage,
    ScaffoldServerHandler,
    ScaffoldUplinkPackage,
)
from emberfl.core import BaseClientTrainer
from emberfl.core.errors import RankFailedError
from emberfl.core.fold import FoldTerm, InProcessFold, UplinkFold, _Shape
from emberfl.core.packages import split_package
from emberfl.distributed import peer_codec
from emberfl.distributed.collectives import (
    broadcast_package,
    broadcast_tensors,
    combine_sums,
    describe_package,
    gather_bytes,
)
from emberfl.distributed.peer_codec import (
    PeerDataError,
    allow_peer_types,
    check_layout,
    check_length,
    declared_package_types,
    load_skeleton,
)
from emberfl.distributed.rank_watch import RankWatch
from emberfl.distributed.trainer import (
    DistributedClientTrainer,
    RoundHeader,
    read_stand_ins,
    write_stand_ins,
)
from emberfl.streaming import StreamingSum


def _forged(module: str, name: str, *args: object) -> bytes:
    """A pickle that calls ``module.name(*args)`` as it loads (GLOBAL, then REDUCE)."""
    call_args = pickle.dumps(args, protocol=3)[2:-1]  # the tuple, without PROTO and STOP
    return b"\x80\x03c" + f"{module}\n{name}\n".encode() + call_args + b"R."


def _attacks(marker: Path) -> list[tuple[str, str, tuple[object, ...]]]:
    touch = f"touch {marker}"
    return [
        ("os", "system", (touch,)),
        ("posix", "system", (touch,)),
        ("builtins", "eval", (f"open({str(marker)!r}, 'w')",)),
        ("builtins", "exec", (f"open({str(marker)!r}, 'w')",)),
        ("builtins", "open", (str(marker), "w")),
        ("builtins", "getattr", (str(marker), "w")),
        ("builtins", "__import__", ("os",)),
        ("subprocess", "check_call", (["touch", str(marker)],)),
        ("emberfl.core.packages", "os.system", (touch,)),  # a dotted path through a module
        ("emberfl.core.fold", "join_package", (b"", {})),  # a function of an emberfl module
        ("torch", "load", (str(marker),)),
        ("pathlib", "Path", (str(marker),)),
    ]


@pytest.mark.parametrize("attack", range(12))
def test_a_forged_skeleton_is_refused_and_runs_nothing(tmp_path: Path, attack: int) -> None:
    marker = tmp_path / "pwned"
    module, name, args = _attacks(marker)[attack]
    forged = _forged(module, name, *args)
    message = rf"^rank 1 sent a package naming {module}\.{name}, which is not an allowed type"
    with pytest.raises(PeerDataError, match=message) as info:
        load_skeleton(forged, {}, sender=1)
    assert info.value.rank == 1
    # The stand-ins rank 0 receives, in the wire form a follower writes.
    wire = write_stand_ins([(4, forged, ())])
    with pytest.raises(PeerDataError, match=message):
        read_stand_ins(wire, 1, [4], ["model"])
    assert not marker.exists()


def test_a_forged_round_header_skeleton_is_refused(tmp_path: Path) -> None:
    """The header a follower reads from the store decodes, and its skeleton is then
    rebuilt as the follower does, without running what it names."""
    marker = tmp_path / "pwned"
    forged = _forged("builtins", "open", str(marker), "w")
    data = _header(skeleton=base64.b64encode(forged).decode())
    header = RoundHeader.decode(data)
    assert header is not None and header.skeleton == forged
    with pytest.raises(PeerDataError, match=r"rank 0 sent a package naming builtins\.open"):
        load_skeleton(header.skeleton, {}, sender=0)
    assert not marker.exists()


def _header(**fields: object) -> bytes:
    header: dict[str, object] = {
        "op": "round",
        "round": 2,
        "cids": [4, 1, 7],
        "costs": [1.0, 2, 3.5],
        "terms": [["model", "model_parameters", "data_size"], ["control", "control_delta", 1.0]],
        "skeleton": base64.b64encode(b"\x80\x05N.").decode(),
        "layout": [["model_parameters", "float32", [3, 4]]],
    }
    header.update(fields)
    return json.dumps(header).encode()


def test_round_headers_round_trip_and_every_field_is_checked() -> None:
    header = RoundHeader.decode(_header())
    assert header == RoundHeader(
        2,
        [4, 1, 7],
        [1.0, 2.0, 3.5],
        (FoldTerm("model", "model_parameters", "data_size"), FoldTerm("control", "control_delta")),
        b"\x80\x05N.",
        [("model_parameters", "float32", [3, 4])],
    )
    assert RoundHeader.decode(header.encode().encode()) == header
    assert RoundHeader.decode(b'{"op": "stop"}') is None
    bad: list[tuple[bytes, str]] = [
        (b"\x80\x04K\x01.", "not JSON"),
        (b"[1, 2]", "no known op"),
        (b'{"op": "exec"}', "no known op"),
        (_header(round=-1), "round index -1"),
        (_header(round=True), "round index True"),
        (_header(cids=[1, True]), "clients"),
        (_header(cids=[-3]), "clients"),
        (_header(cids=[]), "clients"),
        (_header(costs=[1.0, 2.0]), "costs"),
        (_header(costs=[1.0, -2.0, 1.0]), "costs"),
        (_header(terms=[["model", "model_parameters"]]), "fold terms"),
        (_header(terms=[[1, "model_parameters", 1.0]]), "fold terms"),
        (_header(terms=[["m", "f", [1]]]), "fold terms"),
        (_header(terms=[["m", "f", 1.0], ["m", "g", 1.0]]), "fold terms"),
        (_header(skeleton="not base64!"), "not base64"),
        (_header(skeleton=12), "not a base64 string"),
        (_header(layout=[["w", "float32", [-1]]]), "shape"),
        (_header(layout=[["w", "load", [1]]]), "dtype 'load'"),
        (_header(layout=[["w", "float32", [1]], ["w", "float32", [1]]]), "key 'w'"),
        (_header(layout=[["w", "float32", [1 << 40, 1 << 40]]]), "over the limit"),
        (_header(layout={"w": 1}), "layout"),
    ]
    for data, message in bad:
        with pytest.raises(PeerDataError, match=rf"^rank 0 sent .*{message}"):
            RoundHeader.decode(data)


def test_lengths_and_layouts_from_peers_are_bounded() -> None:
    assert check_length(10, 2, "a message", 10) == 10
    with pytest.raises(PeerDataError, match=r"^rank 2 sent a message of -1 bytes: a negative"):
        check_length(-1, 2, "a message", 10)
    with pytest.raises(PeerDataError, match="a message of 11 bytes, over the limit of 10"):
        check_length(11, 2, "a message", 10)
    assert check_layout([["a", "bfloat16", [2, 0]], ("b", "int64", [])], 1) == [
        ("a", "bfloat16", [2, 0]),
        ("b", "int64", []),
    ]
    for layout, message in [
        ([["a", "float32", [2, -3]]], "shape"),
        ([["a", "float32", [2.0]]], "shape"),
        ([["a", "float32", [True]]], "shape"),
        ([["a", "float32", [1] * 33]], "shape"),
        ([["a", "complex64", [1]]], "dtype"),
        ([["a", "float32"]], "entry"),
        ([[7, "float32", [1]]], "key 7"),
        ([["a", "float32", [1 << 20]], ["b", "float64", [1 << 20]]], "over the limit"),
    ]:
        with pytest.raises(PeerDataError, match=rf"^rank 1 sent .*{message}"):
            check_layout(layout, 1, limit=(1 << 23) - 1)


BIG = b"\x8a\x06\x00\x00\x00\x00\x00\x01"  # LONG1: 2 ** 40
RANGE = b"cbuiltins\nrange\n" + BIG + b"\x85R"  # range(2 ** 40)


def _reduce_of(func: bytes, arg: bytes) -> bytes:
    """A pickle calling the global ``func`` (``b"module\\nname\\n"``) on the ops ``arg``."""
    return b"\x80\x03c" + func + arg + b"\x85R."


@pytest.mark.parametrize(
    ("forged", "message"),
    [
        # Types whose constructors would expand a few bytes into terabytes.
        (_reduce_of(b"builtins\nbytearray\n", BIG), "bytearray"),
        (_reduce_of(b"builtins\nbytes\n", BIG), "bytes"),
        (_reduce_of(b"builtins\nlist\n", RANGE), "list"),
        (_reduce_of(b"torch\nSize\n", RANGE), "Size"),
        (b"\x80\x03cbuiltins\ntuple\n" + RANGE + b"\x85\x81.", "tuple"),  # NEWOBJ
        # An empty-tensor reference whose shape is not empty.
        (b"\x80\x02(X\r\x00\x00\x00emberfl-emptyctorch\nfloat32\n\x8a\x05\x00\x00\x00\x00\x01\x85"
         b"X\x06\x00\x00\x00tensor\x89tQ.", "empty-tensor reference"),
        (b"\x80\x02(X\x07\x00\x00\x00emberflX\x01\x00\x00\x000X\x06\x00\x00\x00tensor\x89tQ.",
         "tensor '0', which it did not send"),
        (b"\x80\x02X\x03\x00\x00\x00pidQ.", "unknown persistent reference"),
        # Attributes set on an allowed class itself, and protocol 0 instances.
        (b"\x80\x02cemberfl.core.fold\n_Shape\nN}X\x04\x00\x00\x00metaK\x01s\x86b.",
         "class _Shape"),
        (b"(ibuiltins\nbytearray\n.", "INST or OBJ"),
        (b"\x80\x02\x82\x01.", "extension code"),
        (b"\x80\x02K\x01", "not one \\(EOFError"),  # cut short
    ],
)  # fmt: skip
def test_skeletons_that_would_allocate_or_tamper_are_refused(forged: bytes, message: str) -> None:
    with pytest.raises(PeerDataError, match=rf"^rank 3 sent a package skeleton .*{message}"):
        load_skeleton(forged, {}, sender=3)


class _Colour(enum.Enum):
    RED = "red"


_Point = namedtuple("_Point", "x y")


@dataclass(frozen=True)
class _Inner:
    note: str
    shape: torch.Size


@dataclass
class _Package:
    weights: torch.Tensor
    bias: nn.Parameter
    empty: torch.Tensor
    inner: _Inner
    extras: dict[str, Any] = field(default_factory=dict)


def _rich_package() -> _Package:
    extras = {
        "ordered": OrderedDict(b=1, a=[1.5, None, True]),
        "set": {1, 2},
        "frozen": frozenset({"x"}),
        "complex": 1 + 2j,
        "slice": slice(1, 9, 2),
        "range": range(0, 10, 3),
        "bytes": b"\x00\xff",
        "bytearray": bytearray(b"ab"),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "colour": _Colour.RED,
        "point": _Point(3, (4, 5)),
        "types": (int, dict, range),
        "shared": [7],
    }
    extras["again"] = extras["shared"]
    return _Package(
        torch.arange(6, dtype=torch.float32).view(2, 3),
        nn.Parameter(torch.ones(2)),
        torch.zeros(0, 4, dtype=torch.int8),
        _Inner("hi", torch.Size([2, 3])),
        extras,
    )


def test_packages_of_declared_types_round_trip() -> None:
    package = _rich_package()
    skeleton, layout, tensors = describe_package(package)
    types = (_Package, _Inner, _Colour, _Point)
    got = load_skeleton(skeleton, tensors, sender=1, types=types)
    assert torch.equal(got.weights, package.weights) and got.weights is tensors["0"]
    assert isinstance(got.bias, nn.Parameter) and got.bias.requires_grad
    assert got.empty.shape == (0, 4) and got.empty.dtype == torch.int8
    assert got.inner == package.inner and type(got.inner.shape) is torch.Size
    assert got.extras == package.extras
    assert got.extras["again"] is got.extras["shared"]
    assert [k for k, _, _ in layout] == ["0", "1"]
    # Leave one out and it is named.
    with pytest.raises(PeerDataError, match=r"naming test_peer_decoding\._Inner, which is not"):
        load_skeleton(skeleton, tensors, sender=1, types=(_Package, _Colour, _Point))


def test_allow_peer_types_declares_for_every_later_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_codec, "_declared", {})
    skeleton, _, _ = describe_package(_Inner("x", torch.Size([1])))
    with pytest.raises(PeerDataError, match="_Inner"):
        load_skeleton(skeleton, {}, sender=1)
    allow_peer_types(_Inner)
    assert load_skeleton(skeleton, {}, sender=1) == _Inner("x", torch.Size([1]))
    with pytest.raises(TypeError, match="classes"):
        allow_peer_types(os.system)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="classes"):
        load_skeleton(skeleton, {}, sender=1, types=[os.system])  # type: ignore[list-item]


class _MyUplink:
    pass


class _MyDownlink:
    pass


class _MyTrainer(BaseClientTrainer[_MyUplink, _MyDownlink]):
    pass


class _Derived(_MyTrainer):
    pass


def test_a_trainer_declares_its_generic_package_types() -> None:
    assert set(declared_package_types(_Derived())) == {_MyUplink, _MyDownlink}
    assert declared_package_types(object()) == ()


# -- the packages of emberfl's algorithms -------------------------------------------


class _Selector:
    def select_model(self, name: str) -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(3, 2)


def _handlers() -> list[Any]:
    args = (_Selector(), "linear", None, 3, 4, 0.5, "cpu", 8, 0)
    return [
        FedAvgBaseServerHandler(*args),
        ScaffoldServerHandler(*args),
        FedAdamServerHandler(*args),
    ]


@pytest.mark.parametrize("algorithm", [0, 1, 2], ids=["fedavg", "scaffold", "fedadam"])
def test_the_algorithms_packages_cross_ranks(algorithm: int) -> None:
    handler = _handlers()[algorithm]
    downlink = handler.downlink_package()
    skeleton, _, tensors = describe_package(downlink)
    got = load_skeleton(skeleton, tensors, sender=0)
    assert type(got) is type(downlink)
    assert all(torch.equal(getattr(got, k), v) for k, v in vars(downlink).items())
    fold = handler.uplink_fold()
    n = downlink.model_parameters.numel()
    if isinstance(handler, ScaffoldServerHandler):
        uplink: Any = ScaffoldUplinkPackage(
            5, torch.ones(n), 12, {"loss": 0.25}, control_delta=torch.zeros(n)
        )
    else:
        uplink = FedAvgUplinkPackage(5, torch.ones(n), 12, {"loss": 0.25, "steps": 3.0})
    wire = write_stand_ins([(2, fold.wire_skeleton(uplink), ("model",))])
    [(position, stand_in, bad)] = read_stand_ins(wire, 1, [2], [t.name for t in fold.terms])
    assert (position, bad) == (2, ("model",))
    assert type(stand_in) is type(uplink)
    assert (stand_in.cid, stand_in.data_size, stand_in.metadata) == (5, 12, uplink.metadata)
    assert stand_in.model_parameters.is_meta and stand_in.model_parameters.shape == (n,)


def test_stand_ins_must_be_those_the_round_gave_the_rank() -> None:
    fold = UplinkFold((FoldTerm("model", "model_parameters", "data_size"),))
    wire = fold.wire_skeleton(FedAvgUplinkPackage(1, torch.ones(2), 1))
    good = write_stand_ins([(3, wire, ()), (5, wire, ())])
    bad_shape, _, _ = split_package(FedAvgUplinkPackage(1, _Shape((-1,), "load"), 1))  # type: ignore[arg-type]
    assert [p for p, _, _ in read_stand_ins(good, 2, [3, 5], ["model"])] == [3, 5]
    bad: list[tuple[bytes, list[int], str]] = [
        (pickle.dumps([(3, wire, ())]), [3], "a list of stand-ins that is not JSON"),
        (good, [3], "does not hold 1"),
        (good, [3, 6], "not one for position 6"),
        (json.dumps([[True, "", []]]).encode(), [1], "position 1"),
        (json.dumps([[3, "", ["nan"]]]).encode(), [3], "NaN/Inf terms"),
        (json.dumps([[3, "%%", []]]).encode(), [3], "not base64"),
        (write_stand_ins([(3, pickle.dumps([1]), ())]), [3], "a stand-in that is not one"),
        (write_stand_ins([(3, bad_shape, ())]), [3], "a stand-in that is not one"),
    ]  # fmt: skip
    for data, positions, message in bad:
        with pytest.raises(PeerDataError, match=rf"^rank 2 sent .*{message}"):
            read_stand_ins(data, 2, positions, ["model"])


# -- a real gloo pair, one rank the attacker ----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _init(rank: int, port: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=30),
    )


def _describe(exc: BaseException | None) -> str:
    return "accepted" if exc is None else f"{type(exc).__name__}: {exc}"


def _send_bytes(data: bytes, src: int) -> None:
    """What broadcast_package's sender does for one byte string."""
    dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), src)
    if data:
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src)


def _lengths_main(rank: int, port: int, tmp: str) -> None:
    """Rank 1 sends forged length headers, layouts and skeletons; rank 0 records what
    it made of each."""
    _init(rank, port)
    marker = str(Path(tmp) / "pwned")
    held = StreamingSum()
    held.add([("model", torch.ones(3), 1.0)])
    receive = [
        lambda: gather_bytes(b"", 0),
        lambda: gather_bytes(b"", 0),
        lambda: combine_sums(StreamingSum(), ["model"]),
        lambda: combine_sums(StreamingSum(), ["model"]),
        lambda: broadcast_package(None, src=1),
        lambda: broadcast_package(None, src=1),
        lambda: broadcast_package(None, src=1),
        lambda: combine_sums(held, ["model"]),
    ]
    skeleton, _, _ = describe_package(FedAvgDownlinkPackage(torch.zeros(1)))
    attack = [
        lambda: dist.send(torch.tensor([-5]), 0),
        lambda: dist.send(torch.tensor([1 << 62]), 0),
        lambda: dist.send(torch.tensor([-1, 0]), 0),
        lambda: dist.send(torch.tensor([1, 1 << 62]), 0),
        lambda: (_send_bytes(_forged("builtins", "open", marker, "w"), 1), _send_bytes(b"[]", 1)),
        lambda: dist.broadcast(torch.tensor([-1]), 1),
        lambda: (
            _send_bytes(skeleton, 1),
            _send_bytes(b'[["model_parameters", "float32", [2147483648, 2147483648]]]', 1),
        ),
        lambda: dist.send(torch.tensor([1, 1000]), 0),
    ]
    results = []
    try:
        for step in receive if rank == 0 else attack:
            error: BaseException | None = None
            try:
                step()
            except Exception as exc:
                error = exc
            results.append(_describe(error))
        if rank == 0:
            Path(tmp, "results.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _spawn(target: Any, tmp: Path) -> None:
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, port, str(tmp))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]


def test_forged_lengths_and_skeletons_are_refused_on_a_gloo_pair(tmp_path: Path) -> None:
    _spawn(_lengths_main, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    expected = [
        "rank 1 sent a message of -5 bytes: a negative length",
        "rank 1 sent a message of 4611686018427387904 bytes, over the limit",
        "rank 1 sent a sum of -1 contributions: a negative count",
        "rank 1 sent term 'model''s sum of 4611686018427387904 bytes, over the limit",
        "rank 1 sent a package naming builtins.open, which is not an allowed type",
        "rank 1 sent a package skeleton of -1 bytes: a negative length",
        "rank 1 sent a package's tensors of 18446744073709551616 bytes, over the limit",
        "rank 1 sent term 'model''s sum of 1000 bytes, where this rank's of 3 values has 96",
    ]
    assert len(results) == len(expected)
    for got, want in zip(results, expected, strict=True):
        assert got.startswith("PeerDataError: ") and want in got, (got, want)
    assert not (tmp_path / "pwned").exists()


class _Ones:
    """A local trainer whose every client uploads a vector of ones."""

    uplink_fold: UplinkFold | None = None
    round = 0

    def local_process(self, payload: Any, cids: list[int]) -> None:
        assert self.uplink_fold is not None
        collector = InProcessFold(self.uplink_fold, len(cids))
        for i, cid in enumerate(cids):
            collector.add(i, FedAvgUplinkPackage(cid, torch.ones(3), 1, {"loss": 0.5}))
        collector.finish()

    def uplink_package(self) -> list[Any]:
        return []


_TERMS = [["model", "model_parameters", "data_size"]]


def _header_main(rank: int, port: int, tmp: str) -> None:
    """Rank 0 posts a round header whose skeleton opens a file; rank 1 follows."""
    _init(rank, port)
    marker = Path(tmp) / "pwned"
    watch = RankWatch(rank, 2, timeout=5.0, interval=0.1)
    try:
        if rank == 1:
            trainer = DistributedClientTrainer(_Ones(), watch=watch)
            error: BaseException | None = None
            try:
                trainer.follow()
            except Exception as exc:
                error = exc
            finally:
                trainer.close()
            Path(tmp, "follower.txt").write_text(_describe(error))
            return
        forged = _forged("builtins", "open", str(marker), "w")
        header = {
            "op": "round", "round": 0, "cids": [0, 1], "costs": None, "terms": _TERMS,
            "skeleton": base64.b64encode(forged).decode(), "layout": [],
        }  # fmt: skip
        watch.post("cmd/0", json.dumps(header))  # the round's meetings are numbered 1
        with contextlib.suppress(RankFailedError):
            watch.meet("start/1", "posting a forged round")
            # Until the follower fails, or gets past the skeleton (then it trains).
            watch.get("at/trained/1", 1, "waiting for the follower")
    finally:
        watch.close()
        dist.destroy_process_group()


def test_a_follower_refuses_a_forged_round_header_on_a_gloo_pair(tmp_path: Path) -> None:
    _spawn(_header_main, tmp_path)
    got = (tmp_path / "follower.txt").read_text()
    assert got.startswith("PeerDataError: rank 0 sent a package naming builtins.open"), got
    assert not (tmp_path / "pwned").exists()


def _stand_ins_main(rank: int, port: int, tmp: str) -> None:
    """Rank 0 runs a round; rank 1 follows the protocol but sends forged stand-ins."""
    _init(rank, port)
    forged = _forged("builtins", "open", str(Path(tmp) / "pwned"), "w")
    wire = json.loads(Path(tmp, "wire.json").read_text())
    watch = RankWatch(rank, 2, timeout=5.0, interval=0.1)
    try:
        if rank == 0:
            trainer = DistributedClientTrainer(_Ones(), watch=watch)
            trainer.uplink_fold = UplinkFold((FoldTerm(*_TERMS[0]),))
            error: BaseException | None = None
            try:
                trainer.local_process(FedAvgDownlinkPackage(torch.zeros(3)), [0, 1])
            except Exception as exc:
                error = exc
            finally:
                trainer.close()
            Path(tmp, "server.txt").write_text(_describe(error))
            return
        header = json.loads(watch.get("cmd/0", 0, "waiting for the round"))
        watch.meet("start/1", "starting the round")
        broadcast_tensors([(k, d, list(s)) for k, d, s in header["layout"]], None, 0)
        watch.meet("trained/1", "training")
        sums = StreamingSum(nonfinite="skip")
        sums.add([("model", torch.ones(3), 1.0)])
        combine_sums(sums, ["model"])
        if wire == "pickle":  # a pickle in place of the stand-ins
            message = forged
        else:  # stand-ins whose skeleton is the pickle
            message = json.dumps([[1, base64.b64encode(forged).decode(), []]]).encode()
        gather_bytes(message, 0)
        with contextlib.suppress(RankFailedError):
            watch.get("cmd/1", 0, "waiting for rank 0 to close")
    finally:
        watch.close()
        dist.destroy_process_group()


@pytest.mark.parametrize("wire", ["pickle", "json"])
def test_rank_0_refuses_forged_stand_ins_on_a_gloo_pair(tmp_path: Path, wire: str) -> None:
    (tmp_path / "wire.json").write_text(json.dumps(wire))
    _spawn(_stand_ins_main, tmp_path)
    got = (tmp_path / "server.txt").read_text()
    want = (
        "a list of stand-ins that is not JSON"
        if wire == "pickle"
        else "a package naming builtins.open"
    )
    assert got.startswith(f"PeerDataError: rank 1 sent {want}"), got
    assert not (tmp_path / "pwned").exists()
