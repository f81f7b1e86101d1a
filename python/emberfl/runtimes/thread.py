"""The thread-pool client trainers: clients run in daemon threads of this process.

The payload is shared as it is (no files) and uplinks are handed over in the order
of ``cid_list`` as they arrive. The optional attributes it reads (``seed``,
``progress``, ``client_timeout``, ``on_uplink``, ``uplink_fold``) are described in
:mod:`emberfl.core.client_trainer`; with ``uplink_fold`` each worker thread folds
its clients into a sum of its own.

:class:`ThreadPoolClientTrainer` is BlazeFL's protocol (subclasses define
``worker``); :class:`FedAvgThreadPoolClientTrainer` runs a client step
(:class:`~emberfl.core.step.FedAvgClientUpdate`) in it with BlazeFL's constructor,
bitwise like the serial and process-pool trainers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Protocol, TypeVar, cast

import torch
from torch import nn

from emberfl.core.client_trainer import (
    BaseClientTrainer,
    DownlinkPackage,
    UplinkPackage,
    deliver_uplink,
)
from emberfl.core.context import ClientContext, client_scope, current_client
from emberfl.core.errors import ClientError, ClientTimeoutError
from emberfl.core.fold import InProcessFold, read_fold
from emberfl.core.model_packages import (
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgUplinkPackage,
)
from emberfl.core.model_selector import ModelSelector
from emberfl.core.step import FedAvgClientUpdate
from emberfl.runtimes.client_round import client_loader
from emberfl.runtimes.common import (
    Progress,
    RoundCounter,
    attach_runtime,
    attached_runtime,
    check_cids,
    client_device,
    next_round,
    overrides,
    read_parallels,
    read_seed,
    read_timeout,
    shutdown_runtime,
)
from emberfl.runtimes.settings import FedAvgTrainerSettings, SettingsAttributes

__all__ = ["FedAvgThreadPoolClientTrainer", "ThreadPoolClientTrainer"]

_Self = TypeVar("_Self")


class _ThreadRuntime:
    """Daemon threads that run submitted calls (daemonic: Ctrl-C never waits on them)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.closed = False
        self._queue: SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = SimpleQueue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"emberfl-client-{i}", daemon=True)
            for i in range(size)
        ]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, fn))
        return future

    def close(self, graceful: bool = True, wait_s: float = 5.0) -> None:
        """Stop the threads once they finish their current call.

        ``graceful`` waits up to ``wait_s`` for them. Waiting matters at interpreter
        exit: a thread that has run torch code and is still unwinding while the C++
        runtime is torn down can abort the process.
        """
        if self.closed:
            return
        self.closed = True
        for _ in self._threads:
            self._queue.put(None)
        if not graceful:
            return
        deadline = time.monotonic() + wait_s
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))


def _thread_runtime(trainer: object, size: int) -> _ThreadRuntime:
    runtime = attached_runtime(trainer, _ThreadRuntime)
    if runtime is not None and runtime.size == size:
        return runtime
    return attach_runtime(trainer, _ThreadRuntime(size))


class ThreadPoolClientTrainer(
    BaseClientTrainer[UplinkPackage, DownlinkPackage],
    RoundCounter,
    Protocol[UplinkPackage, DownlinkPackage],
):
    """Runs clients in ``num_parallels`` threads of this process.

    Subclasses define ``worker(self, cid, device, payload, stop_event)``. The payload
    is shared as it is (no files). Uplinks are appended to ``cache`` in the order of
    ``cid_list``.

    Reproducibility: the global random generators are process-wide, so concurrent
    clients would interleave their draws; this pool therefore never seeds them.
    Client code that takes all its randomness from
    ``emberfl.core.current_client().rng`` (e.g. a DataLoader with
    ``generator=current_client().rng.torch_cpu``) gives results identical to the
    process pool and to a serial run, whatever ``num_parallels`` is. Code that uses
    global random state (``torch.randn`` without a generator, dropout, ...) is
    reproducible in the process pool but not here.

    Optional attributes: ``seed``, ``progress``, ``client_timeout``, ``on_uplink``,
    ``uplink_fold`` (see :mod:`emberfl.core.client_trainer`).
    """

    num_parallels: int
    device: str
    device_count: int
    cache: list[UplinkPackage]
    stop_event: threading.Event

    def progress_fn(self, it: list[Future[UplinkPackage]]) -> Iterable[Future[UplinkPackage]]:
        """Wraps the per-client futures; override to show your own progress."""
        return it

    def worker(
        self, cid: int, device: str, payload: DownlinkPackage, stop_event: threading.Event
    ) -> UplinkPackage:
        """Train client ``cid`` in a worker thread and return its uplink package."""
        raise NotImplementedError(f"{type(self).__name__} must implement worker")

    def get_client_device(self, cid: int) -> str:
        """The device client ``cid`` runs on: ``cuda:{cid % device_count}`` for "cuda"."""
        return client_device(self, cid)

    def shutdown(self) -> None:
        """Stop the worker threads (they finish the client they are running)."""
        shutdown_runtime(self)

    def close(self) -> None:
        """Same as :meth:`shutdown`."""
        self.shutdown()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def local_process(self, payload: DownlinkPackage, cid_list: list[int]) -> None:
        """Run every client of ``cid_list`` in the thread pool; append uplinks in order.

        Raises :class:`ClientError` (with the thread's traceback) when a client raises;
        the clients still running finish first, as in BlazeFL, and the pending ones
        are dropped.
        """
        cids = check_cids(cid_list)
        parallels = read_parallels(self, minimum=1)
        seed = read_seed(self)
        timeout = read_timeout(self)
        if getattr(self, "cache", None) is None:
            self.cache = []
        stop_event = getattr(self, "stop_event", None)
        if stop_event is None:
            stop_event = threading.Event()
            self.stop_event = stop_event
        runtime = _thread_runtime(self, parallels)
        round_index = next_round(self)
        stop_event.clear()

        watch = _RoundWatch(cids, timeout, stop_event)
        fold = read_fold(self)
        folding = None if fold is None else InProcessFold(fold, len(cids))

        def job(index: int, cid: int, device: str) -> UplinkPackage:
            watch.running[index] = time.monotonic()
            ctx = ClientContext(cid=cid, round=round_index, seed=seed, device=device)
            try:
                with client_scope(ctx):
                    package = self.worker(cid, device, payload, stop_event)
                    if folding is None:
                        return package
                    # Folded here, in this thread's own sum: the parent merges one
                    # sum per thread when the round is over.
                    return cast(UplinkPackage, folding.add(index, package))
            except BaseException:
                watch.failed.append(index)
                raise
            finally:
                watch.finished[index] = time.monotonic() - watch.running.pop(index)

        futures: list[Future[UplinkPackage]] = []
        custom_progress = overrides(self, ThreadPoolClientTrainer, "progress_fn")
        bar = Progress(
            len(cids), round_index, bool(getattr(self, "progress", True)) and not custom_progress
        )
        failure: BaseException | None = None
        results: list[UplinkPackage] = []
        try:
            for index, cid in enumerate(cids):
                device = self.get_client_device(cid)
                futures.append(runtime.submit(functools.partial(job, index, cid, device)))
            if custom_progress:
                for future in self.progress_fn(futures):
                    watch.wait(future, futures)
            for index, future in enumerate(futures):
                watch.wait(future, futures)
                results.append(deliver_uplink(self, index, future.result()))
                # Without this the future would keep the package alive all round.
                futures[index] = _TAKEN
                if not custom_progress:
                    bar.done(watch.finished.get(index, 0.0))
            if folding is not None:
                folding.finish()
            self.cache.extend(results)
        except BaseException as exc:
            failure = exc
            # The error's traceback keeps this frame alive while the caller keeps the
            # error; the uplinks handed over so far should not live that long.
            results.clear()
            raise
        finally:
            stop_event.set()
            bar.close()
            if failure is not None:
                for future in futures:
                    future.cancel()
            if type(failure) is ClientError:
                # As BlazeFL's executor shutdown: let the running clients (which now
                # see stop_event set) finish before returning. Not after a timeout or
                # Ctrl-C, where waiting is what must not happen.
                for future in futures:
                    with contextlib.suppress(BaseException):
                        future.exception(timeout=None)


_TAKEN: Future[Any] = Future()
_TAKEN.set_result(None)


class _RoundWatch:
    """Failures, running clients and their start times, shared with the worker threads.

    Waiting on one future checks these in O(running clients), so a round of
    thousands of clients is not slowed by polling every future.
    """

    def __init__(self, cids: list[int], timeout: float | None, stop_event: threading.Event) -> None:
        self.cids = cids
        self.timeout = timeout
        self.stop_event = stop_event
        self.failed: list[int] = []  # appended by worker threads (atomic)
        self.running: dict[int, float] = {}
        self.finished: dict[int, float] = {}

    def wait(self, future: Future[Any], futures: list[Future[Any]]) -> None:
        while True:
            if self.failed:
                index = self.failed[0]
                exc = futures[index].exception()  # set right after the thread records it
                assert exc is not None
                tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                cid = self.cids[index]
                raise ClientError(cid, f"{type(exc).__qualname__}: {exc}", tb) from exc
            if self.timeout is not None:
                now = time.monotonic()
                for index, t0 in list(self.running.items()):
                    if now - t0 > self.timeout:
                        self.stop_event.set()
                        raise ClientTimeoutError(
                            self.cids[index], f"ran longer than client_timeout={self.timeout:g} s"
                        )
            if future.done():
                return
            concurrent.futures.wait([future], timeout=0.2)


# ------------------------------------------------- FedAvg's thread-pool trainer


class FedAvgThreadPoolClientTrainer(
    SettingsAttributes, ThreadPoolClientTrainer[FedAvgUplinkPackage, FedAvgDownlinkPackage]
):
    """Runs clients in ``num_parallels`` threads of this process (BlazeFL's arguments).

    The payload is shared as it is. Batch orders come from each client's own
    generator, so results equal the process pool's bit for bit. Keyword extras:
    ``state_dir``, ``client_update`` and ``progress``.
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        dataset: FedAvgPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        num_parallels: int,
        *,
        state_dir: Path | str | None = None,
        client_update: FedAvgClientUpdate | None = None,
        progress: bool = True,
    ) -> None:
        self.settings = FedAvgTrainerSettings(
            model_selector,
            model_name,
            dataset,
            device,
            num_clients,
            epochs,
            batch_size,
            lr,
            seed,
            state_dir=None if state_dir is None else Path(state_dir),
            client_update=FedAvgClientUpdate() if client_update is None else client_update,
            progress=progress,
        )
        self.settings.client_state()  # creates state_dir now, as BlazeFL's trainers do
        self.num_parallels = num_parallels
        self.device_count = torch.cuda.device_count()
        self.cache: list[FedAvgUplinkPackage] = []
        self.stop_event = threading.Event()
        self._models = _ModelPool()

    def worker(
        self,
        cid: int,
        device: str,
        payload: FedAvgDownlinkPackage,
        stop_event: threading.Event,
    ) -> FedAvgUplinkPackage:
        """Train client ``cid`` in a worker thread."""
        settings = self.settings
        loader = client_loader(
            settings.dataset, cid, settings.batch_size, current_client().rng.torch_cpu
        )
        with self._models.borrow(settings.model_selector, settings.model_name, device) as model:
            return settings.client_update(
                cid=cid,
                model=model,
                payload=payload,
                loader=loader,
                device=device,
                epochs=settings.epochs,
                lr=settings.lr,
                stop_event=stop_event,
                state=settings.client_state(),
            )

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """The uplinks produced since the last call."""
        package, self.cache = self.cache, []
        return package


class _ModelPool:
    """Models lent to worker threads, one per concurrent client and reused afterwards.

    Building a model per client costs more than training it for small clients; the
    weights are overwritten from the payload anyway. Models of another selector or
    name than the one asked for (the trainer's settings changed) are dropped.
    """

    def __init__(self) -> None:
        self._free: dict[str, list[nn.Module]] = {}
        self._made_by: tuple[ModelSelector[Any] | None, str | None] = (None, None)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self, selector: ModelSelector[Any], name: str, device: str) -> Iterator[nn.Module]:
        with self._lock:
            made_by = self._made_by
            if made_by[0] is not selector or made_by[1] != name:
                self._free = {}
                self._made_by = (selector, name)
            free = self._free.setdefault(device, [])
            model = free.pop() if free else None
        if model is None:
            model = selector.select_model(name).to(device)
        try:
            yield model
        finally:
            with self._lock:
                if self._made_by[0] is selector and self._made_by[1] == name:
                    self._free.setdefault(device, []).append(model)
