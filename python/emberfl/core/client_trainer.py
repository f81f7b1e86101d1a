"""The client-trainer interface of BlazeFL 3.0: the serial protocol and its attributes.

:class:`BaseClientTrainer` is the serial protocol (``local_process`` runs clients one
after another) and :func:`deliver_uplink` hands one uplink over; the runtimes that run
clients in parallel -- the process pool (:mod:`emberfl.runtimes.process.trainer`) and
the thread pool (:mod:`emberfl.runtimes.thread`) -- build on it with the helpers of
:mod:`emberfl.runtimes.common`.

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

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

from emberfl.core.errors import ClientError, ClientTimeoutError, WorkerCrashedError
from emberfl.core.fold import UplinkFold
from emberfl.crashpoints import crash_point

__all__ = [
    "BaseClientTrainer",
    "ClientError",
    "ClientTimeoutError",
    "WorkerCrashedError",
    "deliver_uplink",
]

UplinkPackage = TypeVar("UplinkPackage")
DownlinkPackage = TypeVar("DownlinkPackage", contravariant=True)


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
