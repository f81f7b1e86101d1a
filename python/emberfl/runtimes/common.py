"""What the parallel runtimes share: the optional attributes, round counter and delivery.

The process pool (:mod:`emberfl.runtimes.process.trainer`) and the thread pool
(:mod:`emberfl.runtimes.thread`) read the trainer's optional attributes (``seed``,
``num_parallels``, ``client_timeout``, ``device``; described in
:mod:`emberfl.core.client_trainer`) through the ``read_*`` functions here, keep the
round counter (:class:`RoundCounter`, :func:`next_round`, :func:`set_rounds_run`) and
their workers in one slot per trainer (:func:`attach_runtime`,
:func:`attached_runtime`, :func:`shutdown_runtime`), show a :class:`Progress` bar per
round and hand uplinks over in client order (:class:`InOrder`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from multiprocessing.util import Finalize
from typing import Any, Protocol, TypeVar

import torch
from tqdm import tqdm

from emberfl.reproducibility import check_client_id, check_seed

__all__ = [
    "RUNTIME_ATTR",
    "InOrder",
    "Progress",
    "RoundCounter",
    "attach_runtime",
    "attached_runtime",
    "check_cids",
    "client_device",
    "next_round",
    "overrides",
    "read_parallels",
    "read_seed",
    "read_timeout",
    "set_rounds_run",
    "shutdown_runtime",
]

_R = TypeVar("_R", bound="_Runtime")


# ---------------------------------------------------------- optional attributes


def read_seed(trainer: object) -> int:
    # Named after the trainer so that the message points at the attribute to fix.
    return check_seed(getattr(trainer, "seed", 0), what=f"{type(trainer).__name__}.seed")


def read_parallels(trainer: object, minimum: int) -> int:
    n = getattr(trainer, "num_parallels", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(
            f"{type(trainer).__name__}.num_parallels must be an int >= {minimum}, got {n!r}"
        )
    return n


def read_timeout(trainer: object) -> float | None:
    t = getattr(trainer, "client_timeout", None)
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, int | float) or t <= 0:
        raise ValueError(f"{type(trainer).__name__}.client_timeout must be > 0 or None, got {t!r}")
    return float(t)


def check_cids(cid_list: Iterable[int]) -> list[int]:
    # Every id keys a random stream (seed, cid, round), so it must fit the same
    # 32-bit word; checking up front fails the round before any client runs.
    return [check_client_id(cid) for cid in cid_list]


def client_device(trainer: Any, cid: int) -> str:
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


def overrides(trainer: object, base: type, name: str) -> bool:
    return getattr(type(trainer), name, None) is not getattr(base, name)


# ----------------------------------------------------------------- round counter

_ROUND_ATTR = "_emberfl_rounds_run"


def next_round(trainer: object) -> int:
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


class RoundCounter(Protocol):
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

RUNTIME_ATTR = "_emberfl_runtime"


class _Runtime(Protocol):
    """The workers a trainer owns (processes or threads), kept in one slot per trainer."""

    @property
    def closed(self) -> bool: ...

    def close(self, graceful: bool = True) -> None: ...


def attached_runtime(trainer: object, kind: type[_R]) -> _R | None:
    """The trainer's open runtime of type ``kind``, if it has one."""
    state = getattr(trainer, RUNTIME_ATTR, None)
    if state is None:
        return None
    runtime = state[0]
    if isinstance(runtime, kind) and not runtime.closed:
        return runtime
    return None


def attach_runtime(trainer: object, runtime: _R) -> _R:
    """Store ``runtime`` on ``trainer`` (closing any previous one) and arrange its close.

    The finalizer holds the runtime, not the trainer: it runs when the trainer is
    collected or at interpreter exit. A multiprocessing ``Finalize`` with an exit
    priority runs inside multiprocessing's own exit hook *before* that hook joins the
    (non-daemonic) worker processes, whatever order the atexit hooks were registered in.
    """
    shutdown_runtime(trainer)
    finalizer = Finalize(trainer, runtime.close, exitpriority=10)
    setattr(trainer, RUNTIME_ATTR, (runtime, finalizer))
    return runtime


def shutdown_runtime(trainer: object, graceful: bool = True) -> None:
    """Close the trainer's runtime, if any; ``graceful=False`` does not wait for workers."""
    state = getattr(trainer, RUNTIME_ATTR, None)
    if state is None:
        return
    runtime, finalizer = state
    with contextlib.suppress(AttributeError):
        delattr(trainer, RUNTIME_ATTR)
    finalizer.cancel()
    runtime.close(graceful)


# ------------------------------------------------------------ progress, delivery


class Progress:
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


class InOrder:
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
