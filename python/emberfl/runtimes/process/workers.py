"""What a process-pool trainer owns, and its life: worker processes and share directory.

A :class:`ProcessRuntime` holds the
:class:`~emberfl.runtimes.process.pool.WorkerPool`, the share directory with its stop
flag, and the in-process runner used for ``num_parallels=0``; it never refers back to
the trainer, so the trainer can be collected while it runs. The trainer's settings
that shape the workers (``start_method``, ``torch_threads``, ``prewarm``) are read
here (:func:`read_start_method`, :func:`read_torch_threads`, :func:`prewarm`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from emberfl.runtimes.common import (
    RUNTIME_ATTR,
    attach_runtime,
    attached_runtime,
    read_parallels,
)
from emberfl.runtimes.process.pool import WorkerPool
from emberfl.runtimes.tasks import SharedFlag, ShareDir, TaskRunner

__all__ = [
    "ProcessRuntime",
    "prewarm",
    "process_runtime",
    "read_start_method",
    "read_torch_threads",
]

logger = logging.getLogger("emberfl.core")


class ProcessRuntime:
    """Everything a process-pool trainer owns; never refers back to the trainer."""

    def __init__(self) -> None:
        self._share: ShareDir | None = None
        self._stop_flag: SharedFlag | None = None
        self.pool: WorkerPool | None = None
        self.inline: TaskRunner | None = None
        self.closed = False

    def ensure_share(self, base: str | os.PathLike[str] | None) -> tuple[ShareDir, SharedFlag]:
        """The share directory and stop flag, made on first use.

        Not earlier: workers may be started from ``__init__``, and a ``share_dir``
        the caller sets after construction must still count.
        """
        if self._share is None or self._stop_flag is None:
            self._share = ShareDir(base)
            self._stop_flag = SharedFlag(self._share.path / "stop.flag", create=True)
        return self._share, self._stop_flag

    @property
    def share_path(self) -> Path | None:
        return None if self._share is None else self._share.path

    def ensure_pool(self, size: int, threads: int, start_method: str) -> WorkerPool:
        pool = self.pool
        if pool is not None and (
            pool.closed
            or pool.size != size
            or pool.threads != threads
            or pool.start_method != start_method
        ):
            pool.close()
            pool = None
        if pool is None:
            pool = WorkerPool(size, threads, start_method)
            self.pool = pool
        return pool

    def close(self, graceful: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.pool is not None:
                self.pool.close(graceful=graceful)
        finally:
            self.pool = None
            if self._share is not None:
                self._share.close()


def process_runtime(trainer: object) -> ProcessRuntime:
    runtime = attached_runtime(trainer, ProcessRuntime)
    if runtime is not None:
        return runtime
    return attach_runtime(trainer, ProcessRuntime())


def prewarm(trainer: object) -> None:
    """Start the workers as soon as a trainer is built, so that their start-up
    (a fresh interpreter importing torch takes seconds) overlaps whatever the caller
    does before the first round. Off with ``prewarm = False``; any problem here is
    left for the first ``local_process`` to report.
    """
    if not getattr(trainer, "prewarm", True) or getattr(trainer, RUNTIME_ATTR, None) is not None:
        return
    try:
        parallels = read_parallels(trainer, minimum=0)
        if parallels == 0:
            return
        runtime = process_runtime(trainer)
        runtime.ensure_pool(parallels, read_torch_threads(trainer), read_start_method(trainer))
    except Exception:
        logger.debug("worker start at construction failed; retried on first use", exc_info=True)


def read_start_method(trainer: object) -> str:
    method = getattr(trainer, "start_method", "spawn")
    if method not in ("spawn", "forkserver"):
        raise ValueError(
            f"{type(trainer).__name__}.start_method must be 'spawn' or 'forkserver', got {method!r}"
        )
    return str(method)


def read_torch_threads(trainer: object) -> int:
    # One thread per client by default, whatever the number of workers: torch's
    # reductions split their work by thread count, so the count decides the bits.
    threads = getattr(trainer, "torch_threads", None)
    if threads is None:
        return 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(
            f"{type(trainer).__name__}.torch_threads must be an int >= 1, got {threads!r}"
        )
    return threads
