"""What crosses the network when a simulation spans several ranks (torch.distributed).

The building blocks of a multi-rank round, each called by every rank of the group:

* :func:`assign_clients` -- which rank trains which of the round's clients: balanced by
  expected cost (largest first onto the least-loaded rank), deterministic, recomputed
  from the round's client list alone, so a restart with another world size still works;
* :func:`broadcast_package` -- the global model (any package) from one rank to all, as
  one flat buffer per dtype plus a small skeleton: no tensor is pickled
  (:func:`describe_package` and :func:`broadcast_tensors` when the skeleton and layout
  travel another way, as the distributed trainer's round header);
* :func:`combine_sums` -- every rank's folded :class:`~emberfl.streaming.StreamingSum`
  into one total on one rank: a tree of exact merges, O(log ranks x model) into that
  rank whatever the number of clients, and the same bits for any world size;
* :func:`gather_bytes` -- small per-rank results (the clients' stand-ins) to one rank.

What a rank receives is decoded by :mod:`emberfl.distributed.peer_codec`: layouts are JSON,
skeletons go through its restricted unpickler (an allow-list of types, tensors only
from the buffers received), and every length is checked before a buffer is allocated;
a bad one raises :class:`~emberfl.distributed.peer_codec.PeerDataError` naming the rank.
torch.distributed's store and gloo have no authentication: firewall their ports to
the job's nodes.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from emberfl.core.packages import split_package
from emberfl.distributed.peer_codec import (
    BUFFER_LIMIT,
    MESSAGE_LIMIT,
    Layout,
    PeerDataError,
    check_layout,
    check_length,
    load_skeleton,
    read_json,
)
from emberfl.streaming import StreamingSum

__all__ = [
    "Layout",
    "assign_clients",
    "broadcast_package",
    "broadcast_tensors",
    "combine_sums",
    "describe_package",
    "gather_bytes",
]

_EXACT_HEADER = 48  # bytes before the values in ExactSum.to_bytes' format


def assign_clients(
    cids: Sequence[int], costs: Sequence[float] | None, world_size: int
) -> list[list[int]]:
    """Split ``cids`` over ``world_size`` ranks, balancing the sum of ``costs``.

    Clients are taken in decreasing cost (ties: in list order) and each goes to the rank
    with the least cost so far (ties: the lowest rank); each rank's share keeps the
    clients' order in ``cids``. ``costs`` defaults to 1 per client (an even split).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    weights = [1.0] * len(cids) if costs is None else [float(c) for c in costs]
    if len(weights) != len(cids):
        raise ValueError(f"got {len(weights)} costs for {len(cids)} clients")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError("costs must be finite and >= 0")
    order = sorted(range(len(cids)), key=lambda i: (-weights[i], i))
    load: list[tuple[float, int]] = [(0.0, r) for r in range(world_size)]
    owner = [0] * len(cids)
    for i in order:
        total, rank = heapq.heappop(load)
        owner[i] = rank
        heapq.heappush(load, (total + weights[i], rank))
    return [[cids[i] for i in range(len(cids)) if owner[i] == r] for r in range(world_size)]


def _device(group: Any) -> torch.device:
    """Where this backend's collectives want their tensors (NCCL: this rank's GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_bytes(data: bytes | None, src: int, group: Any, what: str) -> bytes:
    dev = _device(group)
    size = torch.tensor([0 if data is None else len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src, group=group)
    length = check_length(int(size.item()), src, what, MESSAGE_LIMIT)
    buf = torch.empty(length, dtype=torch.uint8, device=dev)
    if data is not None:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src, group=group)
    return buf.cpu().numpy().tobytes()


def describe_package(package: Any) -> tuple[bytes, Layout, dict[str, torch.Tensor]]:
    """``package`` split for :func:`broadcast_tensors`: its skeleton (a pickle of the
    non-tensor structure, as for the mapped files), the layout of its tensors, and the
    tensors."""
    skeleton, tensors, arrays = split_package(package)
    if arrays:
        raise TypeError(f"packages cross ranks with torch tensors, not numpy arrays {arrays}")
    layout = [
        (key, str(t.dtype).removeprefix("torch."), list(t.shape))
        for key, t in tensors.items()
        if isinstance(t, torch.Tensor)
    ]
    return skeleton, layout, {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor)}


def broadcast_tensors(
    layout: Layout, tensors: dict[str, torch.Tensor] | None, src: int = 0, group: Any = None
) -> dict[str, torch.Tensor]:
    """Rank ``src``'s ``tensors`` on every rank (the others pass ``None``; all know the
    ``layout``): one contiguous buffer per dtype, in a fixed order, so a model moves in
    one collective per dtype whatever its number of tensors. A receiver checks the
    layout (:func:`~emberfl.distributed.peer_codec.check_layout`) before allocating."""
    if tensors is None:
        layout = check_layout(layout, src)
    dev = _device(group)
    by_dtype: dict[str, list[tuple[str, list[int]]]] = {}
    for key, dtype, shape in layout:
        by_dtype.setdefault(dtype, []).append((key, list(shape)))
    received: dict[str, torch.Tensor] = {}
    for dtype, entries in sorted(by_dtype.items()):
        numel = sum(math.prod(shape) for _, shape in entries)
        if tensors is not None:
            flat = torch.cat([tensors[key].detach().reshape(-1).to(dev) for key, _ in entries])
        else:
            flat = torch.empty(numel, dtype=getattr(torch, dtype), device=dev)
        dist.broadcast(flat, src, group=group)
        flat = flat.cpu()
        offset = 0
        for key, shape in entries:
            n = math.prod(shape)
            received[key] = flat[offset : offset + n].view(shape)
            offset += n
    return received


def broadcast_package(
    package: Any, src: int = 0, group: Any = None, *, types: Iterable[type] = ()
) -> Any:
    """``package`` of rank ``src``, on every rank (the others pass ``None``): its
    skeleton and layout, then :func:`broadcast_tensors`. The others rebuild it with
    :func:`~emberfl.distributed.peer_codec.load_skeleton`: its classes must be emberfl's, plain
    builtins, ``types`` or declared with
    :func:`~emberfl.distributed.peer_codec.allow_peer_types`."""
    skeleton = layout_json = None
    tensors = None
    if dist.get_rank(group) == src:
        skeleton, layout, tensors = describe_package(package)
        layout_json = json.dumps(layout).encode()
    skeleton = _broadcast_bytes(skeleton, src, group, "a package skeleton")
    layout_data = _broadcast_bytes(layout_json, src, group, "a tensor layout")
    layout = read_json(layout_data, src, "a tensor layout")
    received = broadcast_tensors(layout, tensors, src, group)
    return load_skeleton(skeleton, received, sender=src, types=types)


def combine_sums(
    sums: StreamingSum, names: Sequence[str], group: Any = None, dst: int = 0
) -> StreamingSum | None:
    """Every rank's ``sums`` of the terms ``names`` added up, on rank ``dst`` (the other
    ranks get ``None``).

    A binomial tree of exact merges: in step ``k`` every rank ``2^k`` places (relative
    to ``dst``) past a multiple of ``2^(k+1)`` sends its partial total to that multiple
    and is done. So no rank receives more than ``ceil(log2(ranks))`` sums, one at a time
    (rank ``dst``'s memory and link carry O(log ranks x model), not O(ranks x model)),
    the traffic is independent of the number of clients, and there is no collective:
    each send is a small header (count, each term's byte length; 0 for a rank that
    folded nothing) and the terms' bytes. Exact sums merge in any order to the same
    bits. ``sums`` is merged into (it becomes this rank's partial total). The result's
    ``count`` is the total.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = _device(group)
    names = list(names)
    count = sums.count
    relative, step = (rank - dst) % world, 1
    while step < world:
        if relative % (2 * step):  # this rank's turn to send its partial total; then done
            peer = _global((relative - step + dst) % world, group)
            held = sums.term_bytes()
            lengths = [len(held[n]) if n in held else 0 for n in names]
            header = torch.tensor([count, *lengths], dtype=torch.int64, device=dev)
            dist.send(header, peer, group=group)
            for name in names:
                if name in held:
                    dist.send(torch.from_numpy(held[name]).to(dev), peer, group=group)
            return None
        if relative + step < world:
            sender = (relative + step + dst) % world
            peer = _global(sender, group)
            header = torch.zeros(1 + len(names), dtype=torch.int64, device=dev)
            dist.recv(header, peer, group=group)
            got, *lengths = (int(v) for v in header.tolist())
            if got < 0:
                raise PeerDataError(sender, f"a sum of {got} contributions: a negative count")
            count += got
            for name, length in zip(names, lengths, strict=True):
                _check_term_length(sums, name, length, sender)
                if length:
                    data = torch.empty(length, dtype=torch.uint8, device=dev)
                    dist.recv(data, peer, group=group)
                    sums.merge_term_bytes(name, data.cpu(), where=f"rank {sender}'s sums")
        step *= 2
    sums.count = count
    return sums


def _check_term_length(sums: StreamingSum, name: str, length: int, sender: int) -> None:
    """A term's byte length from ``sender``, checked before it is allocated: an exact
    sum of ``n`` values is ``48 + 16 n`` bytes, and ``n`` is this rank's own when it
    holds that term already (0: the sender folded nothing)."""
    if length == 0:
        return
    what = f"term {name!r}'s sum"
    held = sums.term_length(name)
    if held is not None and length != _EXACT_HEADER + 16 * held:
        raise PeerDataError(
            sender,
            f"{what} of {length} bytes, where this rank's of {held} values has "
            f"{_EXACT_HEADER + 16 * held}",
        )
    check_length(length, sender, what, BUFFER_LIMIT)
    if length < _EXACT_HEADER or (length - _EXACT_HEADER) % 16:
        raise PeerDataError(sender, f"{what} of {length} bytes, which no exact sum has")


def gather_bytes(
    data: bytes, dst: int = 0, group: Any = None, *, limit: int = MESSAGE_LIMIT
) -> list[bytes] | None:
    """Every rank's ``data``, in rank order, on rank ``dst`` (the others get ``None``):
    each rank sends its length and bytes to ``dst``, no collective. A length over
    ``limit`` (or negative) raises :class:`~emberfl.distributed.peer_codec.PeerDataError`
    before anything is allocated."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = _device(group)
    if rank != dst:
        peer = _global(dst, group)
        dist.send(torch.tensor([len(data)], dtype=torch.int64, device=dev), peer, group=group)
        if data:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
            dist.send(buf, peer, group=group)
        return None
    parts = []
    for r in range(world):
        if r == dst:
            parts.append(data)
            continue
        size = torch.zeros(1, dtype=torch.int64, device=dev)
        dist.recv(size, _global(r, group), group=group)
        length = check_length(int(size.item()), r, "a message", limit)
        buf = torch.empty(length, dtype=torch.uint8, device=dev)
        if length:
            dist.recv(buf, _global(r, group), group=group)
        parts.append(buf.cpu().numpy().tobytes())
    return parts


def _global(rank: int, group: Any) -> int:
    """The global rank of ``rank`` of ``group`` (what send and recv take)."""
    return rank if group is None else dist.get_global_rank(group, rank)
