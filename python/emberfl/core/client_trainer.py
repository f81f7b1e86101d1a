"""The client-trainer interface of BlazeFL 3.0 and what its parallel runtimes share.

The serial :class:`BaseClientTrainer` protocol lives here; the process pool
(:mod:`emberfl.core.process_pool`) and the thread pool
(:mod:`emberfl.core.thread_pool`) build on the helpers below: reading the optional
attributes, the round counter, the progress bar and handing uplinks over in order.

User classes subclass the protocols explicitly and, as BlazeFL code does, set
``num_parallels``, ``device``, ``device_count``, ``cache`` and ``stop_event`` in their
own ``__init__`` without calling the base class's. Every piece of runtime state (the
worker processes or threads, the share directory, the round counter) is therefore
created on first use, and released by ``shutdown()`` / ``close()``, by leaving a
``with`` block, when the trainer is garbage collected, or at interpreter exit.

Optional attributes read by both pools (set them in ``__init__``; all have defaults):

``seed`` (int, default 0)
    Root of the per-client random streams: before a client runs, worker processes
    seed Python's ``random``, NumPy's legacy global generator and torch (CPU and CUDA)
    from ``(seed, cid, round)``, and :func:`emberfl.core.current_client` gives an
    :class:`~emberfl.reproducibility.RNGSuite` derived from the same triple.
``progress`` (bool, default True)
    A tqdm bar per round (clients done / total, seconds per client).
``client_timeout`` (float or None, default None)
    Seconds one client may run. The process pool stops the worker and raises
    :class:`ClientTimeoutError`; the thread pool raises it and sets ``stop_event``
    (a thread cannot be stopped from outside).
``uplink_fold`` (:class:`~emberfl.core.fold.UplinkFold` or None, default None)
    Fold the uplinks where the clients train: each worker process or thread adds its
    clients' uplinks into its own exact sum, the trainer merges one sum per worker and
    hands the round to the fold's ``sink``, and ``cache`` gets tensor-free stand-ins
    (``cid``, sizes, metadata) in the order of ``cid_list``. No per-client uplink file
    is written; the result is the same bits for any layout and completion order. See
    :mod:`emberfl.core.fold`; contrib's servers make one with ``uplink_fold()``.
``on_uplink`` (callable or None, default None)
    ``on_uplink(index, package)`` is called in this process with every uplink (or its
    stand-in, when folding), in the order of ``cid_list`` (``index`` is the position in
    it), as soon as that uplink and all the ones before it are in -- while later
    clients still train. What it returns goes into ``cache`` instead of the package.
    Each uplink's file is deleted, and its mapping dropped, once it has been handed
    over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from multiprocessing.util import Finalize
from typing import Any, Protocol, TypeVar, cast

import torch
from tqdm import tqdm

from emberfl.core.errors import ClientError, ClientTimeoutError, WorkerCrashedError
from emberfl.core.fold import UplinkFold
from emberfl.crashpoints import crash_point
from emberfl.reproducibility import check_client_id, check_seed

__all__ = [
    "BaseClientTrainer",
    "ClientError",
    "ClientTimeoutError",
    "WorkerCrashedError",
    "deliver_uplink",
]

UplinkPackage = TypeVar("UplinkPackage")
DownlinkPackage = TypeVar("DownlinkPackage", contravariant=True)
_R = TypeVar("_R", bound="_Runtime")


class BaseClientTrainer(Protocol[UplinkPackage, DownlinkPackage]):
    """Client-side training, serial: ``local_process`` runs clients one after another."""

    # Called with each uplink, in client order, as it arrives; see the module docstring.
    on_uplink: Callable[[int, Any], Any] | None = None
    # Fold uplinks where the clients train; see the module docstring.
    uplink_fold: UplinkFold | None = None

    def uplink_package(self) -> list[UplinkPackage]:
        """The packages produced since the last call (by default: empties ``self.cache``)."""
        cache = cast("list[UplinkPackage]", getattr(self, "cache", []))
        setattr(self, "cache", [])  # noqa: B010 -- cache is declared by the subclasses
        return cache

    def local_process(self, payload: DownlinkPackage, cid_list: list[int]) -> None:
        """Run the clients in ``cid_list`` on ``payload``, storing their uplinks."""
        raise NotImplementedError(f"{type(self).__name__} must implement local_process")


# ---------------------------------------------------------- optional attributes


def _read_seed(trainer: object) -> int:
    # Named after the trainer so that the message points at the attribute to fix.
    return check_seed(getattr(trainer, "seed", 0), what=f"{type(trainer).__name__}.seed")


def _read_parallels(trainer: object, minimum: int) -> int:
    n = getattr(trainer, "num_parallels", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(
            f"{type(trainer).__name__}.num_parallels must be an int >= {minimum}, got {n!r}"
        )
    return n


def _read_timeout(trainer: object) -> float | None:
    t = getattr(trainer, "client_timeout", None)
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, int | float) or t <= 0:
        raise ValueError(f"{type(trainer).__name__}.client_timeout must be > 0 or None, got {t!r}")
    return float(t)


def _check_cids(cid_list: Iterable[int]) -> list[int]:
    # Every id keys a random stream (seed, cid, round), so it must fit the same
    # 32-bit word; checking up front fails the round before any client runs.
    return [check_client_id(cid) for cid in cid_list]


def _client_device(trainer: Any, cid: int) -> str:
    device = str(getattr(trainer, "device", "cpu"))
    if device == "cuda":
        count = getattr(trainer, "device_count", None)
        if count is None:
            count = torch.cuda.device_count()
        if count < 1:
            raise RuntimeError(
                f"{type(trainer).__name__}.device is 'cuda' but no CUDA device is visible"
            )
        return f"cuda:{cid % count}"
    return device


def _overrides(trainer: object, base: type, name: str) -> bool:
    return getattr(type(trainer), name, None) is not getattr(base, name)


# ----------------------------------------------------------------- round counter

_ROUND_ATTR = "_emberfl_rounds_run"


def _next_round(trainer: object) -> int:
    """The index of the round about to run, counting ``local_process`` calls from 0."""
    index = int(getattr(trainer, _ROUND_ATTR, 0))
    setattr(trainer, _ROUND_ATTR, index + 1)
    return index


def _set_rounds_run(trainer: object, value: int) -> None:
    setattr(trainer, _ROUND_ATTR, check_seed(value, what="rounds_run"))


def set_rounds_run(trainer: object, value: int) -> None:
    """Set any trainer's round counter: the ``rounds_run`` property of the pools (and of
    any trainer that has one), else the ``round`` attribute of the serial and batched
    trainers; the next ``local_process`` runs round ``value``."""
    if isinstance(getattr(type(trainer), "rounds_run", None), property):
        trainer.rounds_run = value  # type: ignore[attr-defined]
    else:
        trainer.round = value  # type: ignore[attr-defined]


class _RoundCounter(Protocol):
    """The round counter both pools keep (it feeds the per-client random streams)."""

    @property
    def rounds_run(self) -> int:
        """Rounds run so far; the next ``local_process`` runs round ``rounds_run``.

        The round index feeds the per-client random streams. Set it when resuming a
        run from a checkpoint so that the streams continue where they stopped.
        """
        return int(getattr(self, _ROUND_ATTR, 0))

    @rounds_run.setter
    def rounds_run(self, value: int) -> None:
        _set_rounds_run(self, value)


# ----------------------------------------------------------------- runtime slot

_RUNTIME_ATTR = "_emberfl_runtime"


class _Runtime(Protocol):
    """The workers a trainer owns (processes or threads), kept in one slot per trainer."""

    @property
    def closed(self) -> bool: ...

    def close(self, graceful: bool = True) -> None: ...


def _attached_runtime(trainer: object, kind: type[_R]) -> _R | None:
    """The trainer's open runtime of type ``kind``, if it has one."""
    state = getattr(trainer, _RUNTIME_ATTR, None)
    if state is None:
        return None
    runtime = state[0]
    if isinstance(runtime, kind) and not runtime.closed:
        return runtime
    return None


def _attach_runtime(trainer: object, runtime: _R) -> _R:
    """Store ``runtime`` on ``trainer`` (closing any previous one) and arrange its close.

    The finalizer holds the runtime, not the trainer: it runs when the trainer is
    collected or at interpreter exit. A multiprocessing ``Finalize`` with an exit
    priority runs inside multiprocessing's own exit hook *before* that hook joins the
    (non-daemonic) worker processes, whatever order the atexit hooks were registered in.
    """
    _shutdown_runtime(trainer)
    finalizer = Finalize(trainer, runtime.close, exitpriority=10)
    setattr(trainer, _RUNTIME_ATTR, (runtime, finalizer))
    return runtime


def _shutdown_runtime(trainer: object, graceful: bool = True) -> None:
    """Close the trainer's runtime, if any; ``graceful=False`` does not wait for workers."""
    state = getattr(trainer, _RUNTIME_ATTR, None)
    if state is None:
        return
    runtime, finalizer = state
    with contextlib.suppress(AttributeError):
        delattr(trainer, _RUNTIME_ATTR)
    finalizer.cancel()
    runtime.close(graceful)


# ------------------------------------------------------------ progress, delivery


class _Progress:
    """A tqdm bar per round that shows seconds per client; a no-op when disabled."""

    def __init__(self, total: int, round_index: int, enabled: bool) -> None:
        self._bar = (
            tqdm(total=total, desc=f"round {round_index}", unit="client", leave=False)
            if enabled and total > 0
            else None
        )
        self._seconds = 0.0
        self._count = 0

    def done(self, seconds: float) -> None:
        if self._bar is None:
            return
        self._count += 1
        self._seconds += seconds
        self._bar.set_postfix_str(f"{self._seconds / self._count:.2f} s/client", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def deliver_uplink(trainer: object, index: int, package: UplinkPackage) -> UplinkPackage:
    """What goes into ``trainer.cache`` for the uplink at position ``index``: the package,
    or what the trainer's ``on_uplink`` hook makes of it (see the module docstring).

    Trainers call it in client-list order; custom serial trainers can too.
    """
    crash_point("round.client")
    hook = getattr(trainer, "on_uplink", None)
    if hook is None:
        return package
    if not callable(hook):
        raise TypeError(f"{type(trainer).__name__}.on_uplink must be callable or None")
    return cast(UplinkPackage, hook(index, package))


class _InOrder:
    """Calls ``take(index)`` for each index in order, once it and all before it are done.

    Completions arrive in any order; handing uplinks over in list order as early as
    possible is what lets a folding server keep only the out-of-order backlog.
    """

    def __init__(self, count: int, take: Callable[[int], None]) -> None:
        self._done = [False] * count
        self._next = 0
        self._take = take

    def done(self, index: int) -> None:
        self._done[index] = True
        while self._next < len(self._done) and self._done[self._next]:
            index, self._next = self._next, self._next + 1
            self._take(index)

    @property
    def complete(self) -> bool:
        return self._next == len(self._done)
