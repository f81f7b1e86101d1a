"""Persistent worker processes that run clients from store files.

A :class:`WorkerPool` starts ``size`` processes with the ``spawn`` start method (safe
with CUDA) once and keeps them for every round. Each worker has its own duplex pipe;
the parent hands a worker its next task only when it reports the previous one done,
so a slow client never holds up the others. Messages carry ids and paths only: the
payload, the client config (when it holds tensors) and the result travel as
memory-mapped package files (see :mod:`emberfl.core.packages`).

Every blocking wait in the parent is a ``multiprocessing.connection.wait`` with a
short timeout over the workers' pipes *and* their process sentinels, so a worker that
dies (SIGKILL, out-of-memory killer, crash) is noticed at once and a hang is not
possible. Workers ignore SIGINT: the parent owns Ctrl-C and tears them down.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any

from emberfl.core.errors import ClientError, ClientTimeoutError, WorkerCrashedError
from emberfl.core.fold import WireStandIn
from emberfl.runtimes.tasks import RoundSpec, TaskRunner, TaskSpec

__all__ = ["RoundRun", "WorkerPool"]

logger = logging.getLogger("emberfl.core.pool")

_POLL_S = 0.2  # longest the parent blocks before re-checking liveness and timeouts
_MAX_TRACEBACK = 20_000


# --------------------------------------------------------------------------- child


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (killed with SIGKILL, it can clean up nothing).

    ``parent_pid`` is the process that started this one: the trainer's process
    under ``spawn``, the fork server (which exits with the trainer's process) under
    ``forkserver``. Either way this process is re-parented when it dies.
    """
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(conn: Connection, index: int, threads: int) -> None:
    """Entry point of a worker process: run tasks until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    runner = TaskRunner()
    try:
        conn.send(("ready", os.getpid()))
    except OSError:
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        kind = msg[0]
        if kind == "stop":
            break
        if kind == "round":
            runner.set_round(msg[1])
            continue
        reply: tuple[Any, ...]
        if kind == "flush":
            try:
                reply = ("flushed", msg[1], runner.flush(msg[1], msg[2]))
            except BaseException as exc:
                reply = ("flush-error", msg[1], f"{type(exc).__qualname__}: {exc}")
            try:
                conn.send(reply)
            except (OSError, ValueError):
                break
            continue
        if kind != "task":
            continue
        task: TaskSpec = msg[1]
        try:
            seconds, stand_in = runner.run(task)
            reply = ("done", task.round, task.index, seconds, stand_in)
        except BaseException as exc:  # everything a client raises is reported, not fatal
            tb = traceback.format_exc()
            if len(tb) > _MAX_TRACEBACK:
                tb = "...\n" + tb[-_MAX_TRACEBACK:]
            reply = ("error", task.round, task.index, type(exc).__qualname__, str(exc)[:2000], tb)
        try:
            conn.send(reply)
        except (OSError, ValueError):
            break
    with contextlib.suppress(OSError):
        conn.close()


# -------------------------------------------------------------------------- parent


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    # Tasks sent and not yet reported, oldest first: the head is running, the others
    # wait in the worker's pipe so it never idles while the parent answers.
    inflight: deque[TaskSpec] = field(default_factory=deque)
    task_started: float = 0.0  # when the head task started (as far as the parent knows)
    spec_round: int | None = None  # round whose spec this worker has been sent
    alive: bool = True
    ready: bool = False  # start-up done; a client's time limit counts from then

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def task(self) -> TaskSpec | None:
        """The task the worker is running now, if any."""
        return self.inflight[0] if self.inflight else None


@dataclass
class PoolStats:
    """Counters kept for tests and diagnostics."""

    tasks_sent: int = 0
    max_task_message_bytes: int = 0
    max_round_message_bytes: int = 0
    restarts: int = 0
    started_pids: list[int] = field(default_factory=list)


class WorkerPool:
    """``size`` persistent spawned worker processes, each with ``threads`` torch threads."""

    def __init__(self, size: int, threads: int, start_method: str = "spawn") -> None:
        if size < 1:
            raise ValueError(f"a worker pool needs at least one process, got {size}")
        if start_method not in ("spawn", "forkserver"):
            # "fork" is refused: it is unsafe once the parent has touched CUDA or
            # started threads (torch's intra-op pool among them).
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
        self.size = size
        self.threads = threads
        self.start_method = start_method
        self.stats = PoolStats()
        self._ctx: Any = mp.get_context(start_method)
        if start_method == "forkserver":
            # The fork server imports torch once; every worker then starts in
            # milliseconds. Only effective before the fork server first starts.
            self._ctx.set_forkserver_preload(["torch", "emberfl.runtimes.process.pool"])
        self._closed = False
        self._workers: list[_Worker] = []
        try:
            for i in range(size):
                self._workers.append(self._spawn(i))
        except BaseException:
            self.close(graceful=False)
            raise
        logger.info(
            "started %d worker processes (pids %s), %d torch threads each",
            size,
            [w.pid for w in self._workers],
            threads,
        )

    def _spawn(self, index: int) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, index, self.threads),
            name=f"emberfl-worker-{index}",
            daemon=False,  # daemonic processes may not start DataLoader workers
        )
        process.start()
        child_conn.close()
        if process.pid is not None:
            self.stats.started_pids.append(process.pid)
        return _Worker(index=index, process=process, conn=parent_conn)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.alive and w.pid is not None]

    @property
    def closed(self) -> bool:
        return self._closed

    def _respawn(self, w: _Worker) -> _Worker:
        self._reap(w, kill=True)
        fresh = self._spawn(w.index)
        self._workers[w.index] = fresh
        self.stats.restarts += 1
        logger.warning("worker %d restarted (new pid %s)", w.index, fresh.pid)
        return fresh

    def _reap(self, w: _Worker, kill: bool) -> None:
        w.alive = False
        w.inflight.clear()
        if kill and w.process.is_alive():
            w.process.kill()
        w.process.join(timeout=2.0)
        with contextlib.suppress(OSError):
            w.conn.close()

    def _send(self, w: _Worker, msg: tuple[Any, ...]) -> int:
        data = bytes(ForkingPickler.dumps(msg))
        w.conn.send_bytes(data)
        return len(data)

    def abort_busy(self) -> None:
        """Kill every worker that is running a task (after an error ended the round).

        Their results would otherwise arrive during a later round. Idle workers are
        kept; the killed ones are replaced on the next round.
        """
        for w in self._workers:
            if w.alive and w.task is not None:
                logger.info(
                    "stopping worker %d (pid %s), busy with client %d", w.index, w.pid, w.task.cid
                )
                self._reap(w, kill=True)

    def close(self, graceful: bool = True, grace_s: float = 2.0) -> None:
        """Stop every worker: ask politely (if ``graceful``), then SIGTERM, then SIGKILL."""
        if self._closed:
            return
        self._closed = True
        workers = [w for w in self._workers if w.alive]
        if graceful:
            for w in workers:
                if w.task is None:
                    with contextlib.suppress(OSError, ValueError):
                        self._send(w, ("stop",))
            deadline = time.monotonic() + grace_s
            for w in workers:
                w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.process.is_alive():
                w.process.terminate()
        deadline = time.monotonic() + 1.0
        for w in workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=1.0)
            w.alive = False
            w.inflight.clear()
            with contextlib.suppress(OSError):
                w.conn.close()
        logger.info("worker processes stopped")

    def start_round(
        self,
        spec: RoundSpec,
        make_task: Callable[[int], TaskSpec],
        count: int,
        *,
        client_timeout: float | None = None,
        retry_crashed: bool = False,
        on_done: Callable[[int, float], None] | None = None,
        poll: Callable[[], None] | None = None,
        on_sums: Callable[[str], None] | None = None,
        sums_path: Callable[[int, int], str] | None = None,
    ) -> RoundRun:
        """Start a round. When ``spec.fold`` is set, each worker's folded sums are
        written to ``sums_path(worker, n)`` once it has no more tasks and handed to
        ``on_sums(path)``; the round is finished when every sum is in."""
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        if spec.fold is not None and (on_sums is None or sums_path is None):
            raise ValueError("a folding round needs on_sums and sums_path")
        return RoundRun(
            self,
            spec,
            make_task,
            count,
            client_timeout,
            retry_crashed,
            on_done,
            poll,
            on_sums,
            sums_path,
        )


class RoundRun:
    """Drives one round: hands out tasks, collects completions, watches for deaths."""

    def __init__(
        self,
        pool: WorkerPool,
        spec: RoundSpec,
        make_task: Callable[[int], TaskSpec],
        count: int,
        client_timeout: float | None,
        retry_crashed: bool,
        on_done: Callable[[int, float], None] | None,
        poll: Callable[[], None] | None,
        on_sums: Callable[[str], None] | None = None,
        sums_path: Callable[[int, int], str] | None = None,
    ) -> None:
        self._pool = pool
        self._spec = spec
        self._make_task = make_task
        self._pending: deque[int] = deque(range(count))
        self._built: dict[int, TaskSpec] = {}
        self._retried: set[int] = set()
        self._timeout = client_timeout
        self._retry = retry_crashed
        self._on_done = on_done
        self._poll = poll
        self.done = [False] * count
        self.seconds = [0.0] * count
        self._round_bytes: bytes | None = None
        # Folding: the stand-ins by position; per worker, the positions folded into
        # its sums and not yet flushed; workers asked to flush; positions whose sums
        # died with a worker and are being trained again (their stand-ins are in).
        self._fold = spec.fold is not None
        self._on_sums = on_sums
        self._sums_path = sums_path
        self.stand_ins: dict[int, WireStandIn] = {}
        self._unflushed: dict[int, list[int]] = {}
        self._flushing: set[int] = set()
        self._flushes = 0
        self._refold: set[int] = set()

    @property
    def finished(self) -> bool:
        if not all(self.done):
            return False
        return not self._fold or not (self._refold or self._unflushed or self._flushing)

    def wait_for(self, index: int) -> None:
        while not self.done[index]:
            self.pump(_POLL_S)

    def wait_all(self) -> None:
        while not self.finished:
            self.pump(_POLL_S)

    # -- one step -------------------------------------------------------------

    def _task(self, index: int) -> TaskSpec:
        task = self._built.get(index)
        if task is None:
            task = self._make_task(index)
            self._built[index] = task
        return task

    def _dispatch(self) -> None:
        pool = self._pool
        workers = pool._workers
        for w in list(workers):
            if self._pending and not w.alive:
                pool._respawn(w)  # replaces it in ``workers``
        # First every idle worker gets a task; then each gets one more queued behind
        # its running one, so it starts the next client without waiting for the parent
        # to answer. No queueing in a round's tail (fewer tasks left than workers),
        # where a queued task could wait behind a slow client while a worker idles.
        for depth in (1, 2):
            for w in workers:
                if not self._pending or (depth == 2 and len(self._pending) < len(workers)):
                    break
                if w.alive and len(w.inflight) < depth and w.index not in self._flushing:
                    self._send_task(w)
        if self._fold and not self._pending:
            for w in workers:
                if (
                    w.alive
                    and not w.inflight
                    and self._unflushed.get(w.index)
                    and w.index not in self._flushing
                ):
                    self._send_flush(w)

    def _send_flush(self, w: _Worker) -> None:
        assert self._sums_path is not None
        path = self._sums_path(w.index, self._flushes)
        self._flushes += 1
        try:
            self._pool._send(w, ("flush", self._spec.round, path))
        except (OSError, ValueError):
            return  # the worker is gone; its sentinel reports that on this same pump
        self._flushing.add(w.index)

    def _send_task(self, w: _Worker) -> None:
        pool = self._pool
        index = self._pending.popleft()
        task = self._task(index)
        try:
            if w.spec_round != self._spec.round:
                size = pool._send(w, ("round", self._spec))
                pool.stats.max_round_message_bytes = max(pool.stats.max_round_message_bytes, size)
                w.spec_round = self._spec.round
            size = pool._send(w, ("task", task))
        except (OSError, ValueError):
            # The worker is gone; its sentinel reports that on this same pump.
            size = 0
        pool.stats.tasks_sent += 1
        pool.stats.max_task_message_bytes = max(pool.stats.max_task_message_bytes, size)
        if not w.inflight:
            w.task_started = time.monotonic()
        w.inflight.append(task)
        logger.debug("client %d -> worker %d", task.cid, w.index)

    def pump(self, timeout: float) -> None:
        self._dispatch()
        pool = self._pool
        live = [w for w in pool._workers if w.alive]
        wait_s = timeout
        if self._timeout is not None:
            now = time.monotonic()
            for w in live:
                if w.task is not None and w.ready:
                    wait_s = min(wait_s, max(0.0, w.task_started + self._timeout - now))
        waitables: list[Any] = [w.conn for w in live] + [w.process.sentinel for w in live]
        ready = set(wait(waitables, timeout=wait_s)) if waitables else set()
        for w in live:
            if w.conn in ready:
                self._drain(w)
            if w.process.sentinel in ready:
                self._drain(w)  # a result sent just before dying still counts
                self._on_death(w)
        if self._timeout is not None:
            self._check_timeouts()
        if self._poll is not None:
            self._poll()

    def _drain(self, w: _Worker) -> None:
        try:
            while w.alive and w.conn.poll():
                self._handle(w, w.conn.recv())
        except (EOFError, OSError):
            pass  # the sentinel tells whether it died

    def _handle(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ready":
            logger.debug("worker %d ready (pid %s)", w.index, msg[1])
            w.ready = True
            if w.task is not None:
                w.task_started = time.monotonic()
            return
        if kind in ("flushed", "flush-error"):
            if msg[1] != self._spec.round or w.index not in self._flushing:
                return
            self._flushing.discard(w.index)
            lost = self._unflushed.pop(w.index, [])
            if kind == "flush-error":
                raise ClientError(
                    self._task(lost[0]).cid if lost else -1,
                    f"worker {w.index} could not write its folded sums: {msg[2]}",
                    "",
                )
            if msg[2] is not None and self._on_sums is not None:
                self._on_sums(msg[2])
            return
        if kind not in ("done", "error"):
            return
        round_index, index = msg[1], msg[2]
        task = w.task
        if round_index != self._spec.round or task is None or task.index != index:
            return  # stale: cannot happen with busy workers killed on abort, kept safe
        w.inflight.popleft()
        if w.inflight:
            w.task_started = time.monotonic()  # the worker went straight on to the next
        if kind == "error":
            _, _, _, type_name, message, tb = msg
            raise ClientError(task.cid, f"{type_name}: {message}", tb)
        if self._fold:
            self._unflushed.setdefault(w.index, []).append(index)
            if index in self._refold:
                self._refold.discard(index)  # its stand-in was handed over already
                return
            self.stand_ins[index] = msg[4]
        seconds = float(msg[3])
        self.done[index] = True
        self.seconds[index] = seconds
        if self._on_done is not None:
            self._on_done(index, seconds)

    def _on_death(self, w: _Worker) -> None:
        if not w.alive:
            return
        w.process.join(timeout=2.0)
        exitcode = w.process.exitcode
        task = w.task
        # Tasks queued behind the one that was running never started: they go back to
        # the front of the queue, in order, and do not count as retried.
        self._pending.extendleft(reversed([t.index for t in list(w.inflight)[1:]]))
        self._pool._reap(w, kill=True)
        self._flushing.discard(w.index)
        lost = self._unflushed.pop(w.index, [])
        if lost:
            # Those clients' uplinks were folded into sums that died with the worker:
            # train them again (they give the same uplinks), or fail the round.
            if not self._retry:
                raise WorkerCrashedError(
                    self._task(lost[0]).cid,
                    exitcode,
                    "its folded sums were lost; set retry_crashed=True to train its clients again",
                )
            logger.warning(
                "worker %d (pid %s) died holding the folded sums of %d client(s); "
                "training them again",
                w.index,
                w.pid,
                len(lost),
            )
            self._refold.update(lost)
            self._pending.extend(lost)
        if task is None:
            logger.warning("idle worker %d (pid %s) exited with %s", w.index, w.pid, exitcode)
            return
        if self._retry and task.index not in self._retried:
            self._retried.add(task.index)
            logger.warning(
                "worker %d (pid %s) died running client %d (exit %s); retrying it once",
                w.index,
                w.pid,
                task.cid,
                exitcode,
            )
            self._pending.appendleft(task.index)
            self._pool._respawn(w)
            return
        detail = "" if self._retry else "set retry_crashed=True to restart the worker and retry"
        raise WorkerCrashedError(task.cid, exitcode, detail)

    def _check_timeouts(self) -> None:
        assert self._timeout is not None
        now = time.monotonic()
        for w in self._pool._workers:
            if w.alive and w.ready and w.task is not None and now - w.task_started > self._timeout:
                task = w.task
                self._pool._reap(w, kill=True)
                raise ClientTimeoutError(
                    task.cid,
                    f"ran longer than client_timeout={self._timeout:g} s; its worker was stopped",
                )
