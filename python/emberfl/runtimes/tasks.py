"""Rounds and client tasks, and the files a client runs from (in a worker or in-process).

Shared by the worker processes (:mod:`emberfl.runtimes.process.pool`) and the
process pool's in-process path (``num_parallels=0``):

* :class:`ShareDir` -- the directory round files live in (owned, removed on close);
* :class:`SharedFlag` -- a stop flag in an 8-byte shared file mapping: it pickles as
  its path, so it can be handed to workers at any time (unlike a
  ``multiprocessing.Event``) and needs no extra process (unlike a Manager's);
* :class:`PinnedStager` -- host<->GPU copies through one reusable pinned buffer;
* :class:`RoundSpec`, :class:`TaskSpec`, :class:`TaskRunner` -- what one round and one
  client task are, and how a client is run from the files that describe it.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emberfl import reproducibility
from emberfl.core.context import ClientContext, client_scope
from emberfl.core.fold import UplinkFold, WireStandIn, map_fields
from emberfl.core.packages import join_package, load_package, save_package
from emberfl.core.utils import reconstruct_from_shared_memory
from emberfl.streaming import StreamingSum

__all__ = [
    "PinnedStager",
    "RoundSpec",
    "ShareDir",
    "SharedFlag",
    "TaskRunner",
    "TaskSpec",
]

logger = logging.getLogger("emberfl.core.runtime")

_ALIGN = 64  # every staged tensor starts on a cache line, so any dtype can view it


class ShareDir:
    """A fresh directory for round files, created under ``base`` (default: the temp dir).

    The directory is always a new one owned by this object, even when ``base`` is
    given, so two trainers pointed at the same ``share_dir`` never collide and
    :meth:`close` can remove everything it made. A ``base`` that does not exist yet
    is created with its missing parents, as BlazeFL does; :meth:`close` removes those
    directories again once they are empty, and never one that existed before.
    """

    def __init__(self, base: str | os.PathLike[str] | None = None) -> None:
        # Deepest first, so that close() can remove them in this order.
        self._made: list[Path] = []
        if base is not None:
            self._made = _make_dirs(Path(base))
        try:
            self.path = Path(tempfile.mkdtemp(prefix="emberfl-", dir=base))
        except BaseException:
            _remove_empty(self._made)
            raise
        logger.debug("share dir %s created", self.path)

    def round_dir(self, round_index: int) -> Path:
        path = self.path / f"round-{round_index}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir()
        return path

    def remove_round(self, round_index: int) -> None:
        shutil.rmtree(self.path / f"round-{round_index}", ignore_errors=True)

    def close(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            logger.debug("share dir %s removed", self.path)
        made, self._made = self._made, []
        _remove_empty(made)


def _make_dirs(base: Path) -> list[Path]:
    """Create ``base`` and its missing parents; the ones this call made, deepest first.

    Each level is made on its own, so a directory that another process creates at
    the same moment is not counted as ours (and is therefore never removed).
    """
    missing: list[Path] = []
    for directory in (base, *base.parents):
        if directory.exists():
            break
        missing.append(directory)
    if not missing and not base.is_dir():
        raise NotADirectoryError(f"share_dir {os.fspath(base)!r} is not a directory")
    made: list[Path] = []
    try:
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:
                if not directory.is_dir():
                    raise NotADirectoryError(
                        f"share_dir {os.fspath(base)!r}: {os.fspath(directory)!r} "
                        "is not a directory"
                    ) from None
                continue
            made.append(directory)
    except BaseException:
        _remove_empty(made[::-1])
        raise
    made.reverse()
    return made


def _remove_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (deepest first) while they are empty.

    Only empty ones go: whatever others put there stays, and once one is not empty
    its parents cannot be either.
    """
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            break


class SharedFlag:
    """An event-like flag (``set``/``clear``/``is_set``/``wait``) shared through a file.

    Every process that maps the file sees the same byte; setting it is a single
    store, so there is nothing to lock. It pickles as its path.
    """

    _SIZE = 8

    def __init__(self, path: str | os.PathLike[str], create: bool = False) -> None:
        self.path = os.fspath(path)
        if create:
            with open(self.path, "wb") as f:
                f.write(b"\0" * self._SIZE)
        with open(self.path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), self._SIZE)

    def is_set(self) -> bool:
        return self._map[0] != 0

    def set(self) -> None:
        self._map[0] = 1

    def clear(self) -> None:
        self._map[0] = 0

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def __reduce__(self) -> tuple[type[SharedFlag], tuple[str]]:
        return (SharedFlag, (self.path,))

    def __repr__(self) -> str:
        return f"SharedFlag({self.path!r}, set={self.is_set()})"


class PinnedStager:
    """Moves tensors between host and a CUDA device through one reusable pinned buffer.

    Copies into the device are issued ``non_blocking`` from the pinned buffer and the
    stream is synchronized before returning, because the buffer is reused by the next
    call. Results coming back are copied into the same buffer, so they must be
    consumed (written to their file) before the next staging call.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def _host(self, nbytes: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes:
            # Grow with headroom so models of slightly different sizes do not
            # re-allocate pinned memory (which is slow) every round.
            size = max(nbytes + nbytes // 4, 1 << 20)
            self._buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return self._buffer

    @staticmethod
    def _layout(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[int, int]], int]:
        offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            offsets[name] = (total, nbytes)
            total += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        return offsets, total

    def _slot(self, buffer: torch.Tensor, t: torch.Tensor, off: int, nbytes: int) -> torch.Tensor:
        return buffer[off : off + nbytes].view(t.dtype).view(t.shape)

    def to_device(
        self, tensors: dict[str, torch.Tensor], device: str | torch.device
    ) -> dict[str, torch.Tensor]:
        dev = torch.device(device)
        if dev.type != "cuda":
            return tensors
        offsets, total = self._layout(tensors)
        buffer = self._host(total)
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            off, nbytes = offsets[name]
            if nbytes == 0:
                out[name] = torch.empty(t.shape, dtype=t.dtype, device=dev)
                continue
            host = self._slot(buffer, t, off, nbytes)
            host.copy_(t)
            out[name] = host.to(dev, non_blocking=True)
        torch.cuda.current_stream(dev).synchronize()
        return out

    def to_host(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        on_gpu = {k: t for k, t in tensors.items() if t.device.type == "cuda"}
        if not on_gpu:
            return tensors
        offsets, total = self._layout(on_gpu)
        buffer = self._host(total)
        devices = set()
        out = dict(tensors)
        for name, t in on_gpu.items():
            off, nbytes = offsets[name]
            if nbytes == 0:
                out[name] = torch.empty(t.shape, dtype=t.dtype)
                continue
            host = self._slot(buffer, t, off, nbytes)
            host.copy_(t.detach(), non_blocking=True)
            devices.add(t.device)
            out[name] = host
        for dev in devices:
            torch.cuda.current_stream(dev).synchronize()
        return out


@dataclass
class RoundSpec:
    """What every task of one round shares; sent to a worker once per round."""

    round: int
    seed: int
    downlink: str
    template: str | None  # uplink buffer package (BlazeFL's shm_buffer protocol)
    worker: bytes  # the user's worker function, pickled by reference
    stop_event: Any
    fold: UplinkFold | None = None  # fold uplinks here instead of writing them


@dataclass
class TaskSpec:
    """One client of one round: small by construction (paths and ids)."""

    round: int
    index: int
    cid: int
    device: str
    config: bytes  # the pickled config when it holds no tensors
    config_path: str | None  # else a package file holding it
    uplink: str


class TaskRunner:
    """Runs client tasks from their files; one per worker process (or the parent)."""

    def __init__(self) -> None:
        self._spec: RoundSpec | None = None
        self._worker: Callable[..., Any] | None = None
        self._stager = PinnedStager()
        # The uplinks of this round's clients, folded (when the round folds).
        self._sums: StreamingSum | None = None

    @property
    def round(self) -> int:
        return -1 if self._spec is None else self._spec.round

    def set_round(self, spec: RoundSpec) -> None:
        self._spec = spec
        self._worker = None  # unpickled on first use so a failure names a client
        self._sums = None

    def take_sums(self) -> StreamingSum | None:
        """This round's folded sums (None when nothing was folded); they are reset."""
        sums, self._sums = self._sums, None
        return sums

    def flush(self, round_index: int, path: str) -> str | None:
        """Write round ``round_index``'s folded sums to ``path``; None when there are none."""
        if self.round != round_index or self._sums is None:
            return None
        sums = self.take_sums()
        assert sums is not None
        sums.save(path)
        return path

    def run(self, task: TaskSpec) -> tuple[float, WireStandIn | None]:
        """Run one client and write its uplink file, or fold it when the round folds.

        Returns the seconds it took and, for a folded uplink, its stand-in.
        """
        spec = self._spec
        if spec is None or spec.round != task.round:
            raise RuntimeError(f"task for round {task.round} arrived before its round spec")
        start = time.perf_counter()
        if self._worker is None:
            self._worker = pickle.loads(spec.worker)
        worker = self._worker
        device = task.device
        dev = torch.device(device)
        on_cuda = dev.type == "cuda"
        if on_cuda and dev.index is not None:
            torch.cuda.set_device(dev)

        def stage_in(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return self._stager.to_device(tensors, device)

        payload = load_package(spec.downlink, stage=stage_in if on_cuda else None)
        if task.config_path is not None:
            config = load_package(task.config_path)
        else:
            config = join_package(task.config, {})
        # Each client maps the template afresh: the mapping is private, so what one
        # client writes into its buffer is never seen by the next.
        buffer = None if spec.template is None else load_package(spec.template)

        reproducibility.seed_client(spec.seed, task.cid, spec.round)
        ctx = ClientContext(cid=task.cid, round=spec.round, seed=spec.seed, device=device)
        with client_scope(ctx):
            if buffer is None:
                result = worker(config, payload, device, spec.stop_event)
            else:
                result = worker(config, payload, device, spec.stop_event, shm_buffer=buffer)
                result = reconstruct_from_shared_memory(result, buffer)
        del payload, config
        if spec.fold is None:
            save_package(task.uplink, result, stage=self._stager.to_host if on_cuda else None)
            return time.perf_counter() - start, None
        if self._sums is None:
            self._sums = spec.fold.new_sums()
        skeleton = spec.fold.wire_skeleton(result)  # refuses what cannot fold, before folding
        # The sums read host memory: top-level tensors come to the CPU (a no-op there).
        on_host = map_fields(result, lambda _, v: v.cpu() if isinstance(v, torch.Tensor) else v)
        bad = spec.fold.fold(self._sums, on_host, task.index)
        return time.perf_counter() - start, WireStandIn(skeleton, bad)
