"""What crosses the network when a simulation spans several ranks (torch.distributed).

The building blocks of a multi-rank round, each a collective every rank calls:

* :func:`assign_clients` -- which rank trains which of the round's clients: balanced by
  expected cost (largest first onto the least-loaded rank), deterministic, recomputed
  from the round's client list alone, so a restart with another world size still works;
* :func:`broadcast_package` -- the global model (any package) from one rank to all, as
  one flat buffer per dtype plus a small skeleton: no tensor is pickled;
* :func:`combine_sums` -- every rank's folded :class:`~emberfl.streaming.StreamingSum`
  into one total on one rank: a tree of exact merges, O(log ranks x model) into that
  rank whatever the number of clients, and the same bits for any world size;
* :func:`gather_bytes` -- small per-rank results (the clients' stand-ins) to one rank.

Ranks must run on a trusted private network: torch.distributed's store and gloo have no
authentication, and package skeletons are pickles (only ever those of this job's ranks).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from emberfl.core.packages import join_package, split_package
from emberfl.streaming import StreamingSum

__all__ = ["assign_clients", "broadcast_package", "combine_sums", "gather_bytes"]


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


def _broadcast_bytes(data: bytes | None, src: int, group: Any) -> bytes:
    dev = _device(group)
    size = torch.tensor([0 if data is None else len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src, group=group)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    if data is not None:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src, group=group)
    return buf.cpu().numpy().tobytes()


def broadcast_package(package: Any, src: int = 0, group: Any = None) -> Any:
    """``package`` of rank ``src``, on every rank (the others pass ``None``).

    The package is split into its skeleton and tensors (as for the mapped files); the
    tensors travel as one contiguous buffer per dtype, in a fixed order, so a model
    moves in one collective per dtype whatever its number of tensors.
    """
    rank = dist.get_rank(group)
    dev = _device(group)
    tensors: dict[str, Any] = {}
    skeleton = layout_json = None
    if rank == src:
        skeleton, tensors, arrays = split_package(package)
        if arrays:
            raise TypeError(f"broadcast_package sends torch tensors, not numpy arrays {arrays}")
        layout_json = json.dumps(
            [
                [key, str(t.dtype).removeprefix("torch."), list(t.shape)]
                for key, t in tensors.items()
            ]
        ).encode()
    skeleton = _broadcast_bytes(skeleton, src, group)
    layout = json.loads(_broadcast_bytes(layout_json, src, group))
    by_dtype: dict[str, list[tuple[str, list[int]]]] = {}
    for key, dtype, shape in layout:
        by_dtype.setdefault(dtype, []).append((key, shape))
    received: dict[str, torch.Tensor] = {}
    for dtype, entries in sorted(by_dtype.items()):
        numel = sum(math.prod(shape) for _, shape in entries)
        if rank == src:
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
    return join_package(skeleton, received)


def combine_sums(sums: StreamingSum, group: Any = None, dst: int = 0) -> StreamingSum | None:
    """Every rank's ``sums`` added up, on rank ``dst`` (the other ranks get ``None``).

    A binomial tree of exact merges: in step ``k`` every rank ``2^k`` places (relative
    to ``dst``) past a multiple of ``2^(k+1)`` sends its partial total to that multiple
    and is done. So no rank receives more than ``ceil(log2(ranks))`` sums, one at a time
    (rank ``dst``'s memory and link carry O(log ranks x model), not O(ranks x model)),
    and the traffic is independent of the number of clients. Exact sums merge in any
    order to the same bits. ``sums`` is merged into (it becomes this rank's partial
    total); ranks that folded something must hold the same terms and lengths, and a rank
    that folded nothing takes part with an empty sum. The result's ``count`` is the total.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = _device(group)
    counts = _all_gather(torch.tensor([sums.count], dtype=torch.int64, device=dev), group)
    names = _names_from_any_rank(sums, group)
    mine = sums.term_bytes()
    lengths = []
    for name in names:
        size = len(mine[name]) if name in mine else 0
        sizes = [int(s) for s in _all_gather(torch.tensor([size], device=dev), group)]
        if any(s not in (0, max(sizes)) for s in sizes):
            raise ValueError(f"ranks hold sums of term {name!r} of different sizes: {sizes}")
        lengths.append(max(sizes))
    del mine
    relative, step = (rank - dst) % world, 1
    while step < world:
        if relative % (2 * step):  # this rank's turn to send its partial total; then done
            peer = _global((relative - step + dst) % world, group)
            held = sums.term_bytes()
            for name in names:
                flag = torch.tensor([int(name in held)], dtype=torch.int64, device=dev)
                dist.send(flag, peer, group=group)
                if name in held:
                    dist.send(torch.from_numpy(held[name]).to(dev), peer, group=group)
            return None
        if relative + step < world:
            peer = _global((relative + step + dst) % world, group)
            for name, length in zip(names, lengths, strict=True):
                flag = torch.zeros(1, dtype=torch.int64, device=dev)
                dist.recv(flag, peer, group=group)
                if int(flag):
                    data = torch.empty(length, dtype=torch.uint8, device=dev)
                    dist.recv(data, peer, group=group)
                    sums.merge_term_bytes(name, data.cpu(), where="combine_sums")
        step *= 2
    sums.count = int(sum(int(c) for c in counts))
    return sums


def _global(rank: int, group: Any) -> int:
    """The global rank of ``rank`` of ``group`` (what send and recv take)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def gather_bytes(data: bytes, dst: int = 0, group: Any = None) -> list[bytes] | None:
    """Every rank's ``data``, in rank order, on rank ``dst`` (the others get ``None``)."""
    dev = _device(group)
    sizes = [int(s) for s in _all_gather(torch.tensor([len(data)], device=dev), group)]
    buf = torch.zeros(max(sizes), dtype=torch.uint8, device=dev)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = _gather(buf, dst, group)
    if dist.get_rank(group) != dst:
        return None
    return [p[:n].cpu().numpy().tobytes() for p, n in zip(parts, sizes, strict=True)]


def _all_gather(t: torch.Tensor, group: Any) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def _gather(t: torch.Tensor, dst: int, group: Any) -> list[torch.Tensor]:
    """``t`` of every rank on ``dst``; the other ranks get an empty list."""
    if dist.get_rank(group) != dst:
        dist.gather(t, None, dst=dst, group=group)
        return []
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.gather(t, parts, dst=dst, group=group)
    return parts


def _names_from_any_rank(sums: StreamingSum, group: Any) -> list[str]:
    """The terms' names, from the lowest rank that has any; ranks must not disagree."""
    dev = _device(group)
    flags = _all_gather(torch.tensor([1 if sums.names else 0], device=dev), group)
    src = next((r for r, f in enumerate(flags) if int(f)), None)
    if src is None:
        return []
    mine = "\n".join(sums.names).encode() if dist.get_rank(group) == src else None
    names = _broadcast_bytes(mine, src, group).decode().split("\n")
    if sums.names and list(sums.names) != names:
        raise ValueError(f"ranks fold different terms: {list(sums.names)} and {names}")
    return names
