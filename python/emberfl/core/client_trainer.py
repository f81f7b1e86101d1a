"""Client trainers with BlazeFL 3.0's interfaces: serial, process pool and thread pool.

User classes subclass these protocols explicitly and, as BlazeFL code does, set
``num_parallels``, ``device``, ``device_count``, ``cache`` and ``stop_event`` in their
own ``__init__`` without calling the base class's. Every piece of runtime state (the
worker processes, the share directory, the round counter) is therefore created on
first use, and released by ``shutdown()`` / ``close()``, by leaving a ``with`` block,
when the trainer is garbage collected, or at interpreter exit.

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
``on_uplink`` (callable or None, default None)
    ``on_uplink(index, package)`` is called in this process with every uplink, in
    the order of ``cid_list`` (``index`` is the position in it), as soon as that
    uplink and all the ones before it are in -- while later clients still train.
    What it returns goes into ``cache`` instead of the package. A server that folds
    each update into running sums and returns a tensor-free stand-in (contrib
    FedAvg's ``fold_uplink``) makes a round's memory independent of its number of
    clients: each uplink's file is deleted, and its mapping dropped, once it has
    been handed over.

Process pool only:

``share_dir`` (path, default: the system temp dir)
    Where a fresh per-trainer directory for round files is made; it is removed on
    close. A RAM-backed directory such as ``/dev/shm`` avoids disk writeback when it
    is large enough.
``retry_crashed`` (bool, default False)
    When a worker process dies mid-client, start a new one and retry that client
    once instead of raising :class:`WorkerCrashedError`.
``torch_threads`` (int, default ``max(1, cpus // num_parallels)``)
    Intra-op threads of each worker process.
``start_method`` ("spawn" or "forkserver", default "spawn")
    How worker processes start. Both are safe with CUDA. "forkserver" imports torch
    once in a fork server and forks every worker from it: far less CPU and start-up
    time with many workers or restarts. The fork server is shared by everything in
    the process that uses it, and workers see the environment as it was when it
    started.
``prewarm`` (bool, default True)
    Start the worker processes when the trainer's ``__init__`` returns rather than
    at the first ``local_process``: each one is a fresh interpreter importing torch,
    which takes seconds that then overlap the rest of the set-up.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import inspect
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from multiprocessing.util import Finalize
from pathlib import Path
from queue import SimpleQueue
from typing import Any, NoReturn, Protocol, TypeVar, cast

import torch
from tqdm import tqdm

from emberfl.core.context import ClientContext, client_scope
from emberfl.core.errors import ClientError, ClientTimeoutError, WorkerCrashedError
from emberfl.core.packages import load_package, save_package, split_package
from emberfl.core.pool import RoundRun, WorkerPool
from emberfl.core.runtime import (
    RoundSpec,
    SharedFlag,
    ShareDir,
    TaskRunner,
    TaskSpec,
    available_cpus,
)
from emberfl.reproducibility import RandomStateSnapshot

__all__ = [
    "BaseClientTrainer",
    "ClientError",
    "ClientTimeoutError",
    "ProcessPoolClientTrainer",
    "ThreadPoolClientTrainer",
    "WorkerCrashedError",
    "deliver_uplink",
]

logger = logging.getLogger("emberfl.core")

UplinkPackage = TypeVar("UplinkPackage")
DownlinkPackage = TypeVar("DownlinkPackage", contravariant=True)
ClientConfig = TypeVar("ClientConfig")
BufferPackage = TypeVar("BufferPackage")
_Self = TypeVar("_Self")

_RUNTIME_ATTR = "_emberfl_runtime"


class BaseClientTrainer(Protocol[UplinkPackage, DownlinkPackage]):
    """Client-side training, serial: ``local_process`` runs clients one after another."""

    # Called with each uplink, in client order, as it arrives; see the module docstring.
    on_uplink: Callable[[int, Any], Any] | None = None

    def uplink_package(self) -> list[UplinkPackage]:
        """The packages produced since the last call (by default: empties ``self.cache``)."""
        cache = cast("list[UplinkPackage]", getattr(self, "cache", []))
        setattr(self, "cache", [])  # noqa: B010 -- cache is declared by the subclasses
        return cache

    def local_process(self, payload: DownlinkPackage, cid_list: list[int]) -> None:
        """Run the clients in ``cid_list`` on ``payload``, storing their uplinks."""
        raise NotImplementedError(f"{type(self).__name__} must implement local_process")


# ----------------------------------------------------------------- shared helpers


def _read_seed(trainer: object) -> int:
    seed = getattr(trainer, "seed", 0)
    # Per-client streams hash (seed, cid, round) as 32-bit words.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(
            f"{type(trainer).__name__}.seed must be an int in [0, 2**32), got {seed!r}"
        )
    return seed


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
    cids = list(cid_list)
    for cid in cids:
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise TypeError(f"client ids must be ints, got {cid!r} ({type(cid).__name__})")
    return cids


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


_ROUND_ATTR = "_emberfl_rounds_run"


def _next_round(trainer: object) -> int:
    """The index of the round about to run, counting ``local_process`` calls from 0."""
    index = int(getattr(trainer, _ROUND_ATTR, 0))
    setattr(trainer, _ROUND_ATTR, index + 1)
    return index


def _set_rounds_run(trainer: object, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ValueError(f"rounds_run must be an int in [0, 2**32), got {value!r}")
    setattr(trainer, _ROUND_ATTR, value)


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


def _overrides(trainer: object, base: type, name: str) -> bool:
    return getattr(type(trainer), name, None) is not getattr(base, name)


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


# ------------------------------------------------------------------ process pool


class _ProcessRuntime:
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


def _shutdown_runtime(trainer: object, graceful: bool = True) -> None:
    state = getattr(trainer, _RUNTIME_ATTR, None)
    if state is None:
        return
    runtime, finalizer = state
    with contextlib.suppress(AttributeError):
        delattr(trainer, _RUNTIME_ATTR)
    finalizer.cancel()
    if isinstance(runtime, _ProcessRuntime):
        runtime.close(graceful)
    else:
        runtime.close()


def _process_runtime(trainer: object) -> _ProcessRuntime:
    state = getattr(trainer, _RUNTIME_ATTR, None)
    if state is not None:
        runtime = state[0]
        if isinstance(runtime, _ProcessRuntime) and not runtime.closed:
            return runtime
    runtime = _ProcessRuntime()
    # The finalizer holds the runtime, not the trainer: it runs when the trainer is
    # collected or at interpreter exit. A multiprocessing Finalize with an exit
    # priority runs inside multiprocessing's own exit hook *before* that hook joins
    # the (non-daemonic) workers, whatever order the atexit hooks were registered in.
    finalizer = Finalize(trainer, runtime.close, exitpriority=10)
    setattr(trainer, _RUNTIME_ATTR, (runtime, finalizer))
    return runtime


def _prewarm(trainer: object) -> None:
    """Start the workers as soon as a trainer is built, so that their start-up
    (a fresh interpreter importing torch takes seconds) overlaps whatever the caller
    does before the first round. Off with ``prewarm = False``; any problem here is
    left for the first ``local_process`` to report.
    """
    if not getattr(trainer, "prewarm", True) or getattr(trainer, _RUNTIME_ATTR, None) is not None:
        return
    try:
        parallels = _read_parallels(trainer, minimum=0)
        if parallels == 0:
            return
        runtime = _process_runtime(trainer)
        runtime.ensure_pool(parallels, _torch_threads(trainer, parallels), _start_method(trainer))
    except Exception:
        logger.debug("worker start at construction failed; retried on first use", exc_info=True)


def _start_method(trainer: object) -> str:
    method = getattr(trainer, "start_method", "spawn")
    if method not in ("spawn", "forkserver"):
        raise ValueError(
            f"{type(trainer).__name__}.start_method must be 'spawn' or 'forkserver', got {method!r}"
        )
    return str(method)


def _torch_threads(trainer: object, parallels: int) -> int:
    threads = getattr(trainer, "torch_threads", None)
    if threads is None:
        return max(1, available_cpus() // parallels)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(
            f"{type(trainer).__name__}.torch_threads must be an int >= 1, got {threads!r}"
        )
    return threads


class _Handle:
    """What ``progress_fn`` receives per client: ``get()`` waits for that client."""

    def __init__(self, run: Callable[[int], None], index: int, done: list[bool]) -> None:
        self._run = run
        self._index = index
        self._done = done

    def ready(self) -> bool:
        return self._done[self._index]

    def successful(self) -> bool:
        return self._done[self._index]

    def wait(self, timeout: float | None = None) -> None:
        self._run(self._index)

    def get(self, timeout: float | None = None) -> None:
        self._run(self._index)


def _no_buffer_template(trainer: object) -> NoReturn:
    raise NotImplementedError(f"{type(trainer).__name__} does not define a result buffer template")


class ProcessPoolClientTrainer(
    BaseClientTrainer[UplinkPackage, DownlinkPackage],
    _RoundCounter,
    Protocol[UplinkPackage, DownlinkPackage, ClientConfig, BufferPackage],
):
    """Runs clients in ``num_parallels`` persistent worker processes.

    Subclasses provide ``get_client_config(cid)`` and a ``@staticmethod``
    ``worker(config, payload, device, stop_event, *, shm_buffer=None)``. The payload
    is written once per round to a package file that every worker maps; each
    client's result is written by its worker and handed back, mapped, in the order of
    ``cid_list``. Subclasses written for BlazeFL's shared-memory protocol
    (``prepare_uplink_package_buffer`` / ``SHMHandle`` / ``convert_buffer_to_uplink``)
    work unchanged: the buffer is served from a mapped file, fresh for every client.

    ``num_parallels=0`` runs the clients in this process, one by one, through the same
    files -- handy under a debugger; the global random state is restored afterwards
    (``client_timeout`` and ``retry_crashed`` do not apply there).

    See the module docstring for the optional attributes (``seed``, ``share_dir``,
    ``progress``, ``retry_crashed``, ``client_timeout``, ``torch_threads``).

    Attributes:
        num_parallels: number of worker processes.
        device: "cpu", "cuda" (clients spread over ``cuda:{cid % device_count}``) or a
            specific device.
        device_count: CUDA devices to spread clients over (default: all visible).
        cache: uplink packages of the clients run so far.
        stop_event: an event the workers may poll; cleared when a round starts and
            set when it ends. A ``multiprocessing.Manager().Event()`` is handed to the
            workers as it is; any other event is mirrored into a shared flag.
    """

    num_parallels: int
    device: str
    device_count: int
    cache: list[UplinkPackage]
    stop_event: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        # Protocols (generic intermediate interfaces) are never instantiated.
        if (
            init is None
            or getattr(init, "_emberfl_prewarm", False)
            or cls.__dict__.get("_is_protocol", False)
        ):
            return

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            # Only once the outermost __init__ is done (it is the one type(self)
            # resolves to), so attributes set after a super().__init__() count.
            if type(self).__init__ is __init__:
                _prewarm(self)

        __init__._emberfl_prewarm = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]

    def progress_fn(self, it: list[Any]) -> Iterable[Any]:
        """Wraps the per-client handles; override to show your own progress.

        When overridden, the built-in tqdm bar is off and the runtime waits for the
        clients in the order this iterable yields their handles.
        """
        return it

    def get_client_config(self, cid: int) -> ClientConfig:
        """The configuration passed to ``worker`` for client ``cid`` (default: None).

        It is pickled once per task; tensors in it are not pickled but written to a
        package file that the worker maps.
        """
        return cast(ClientConfig, None)

    def get_client_device(self, cid: int) -> str:
        """The device client ``cid`` runs on: ``cuda:{cid % device_count}`` for "cuda"."""
        return _client_device(self, cid)

    @staticmethod
    def worker(
        config: ClientConfig,
        payload: DownlinkPackage,
        device: str,
        stop_event: Any,
        *,
        shm_buffer: BufferPackage | None = None,
    ) -> BufferPackage:
        """Train one client in a worker process and return its package."""
        raise NotImplementedError("ProcessPoolClientTrainer subclasses must define worker")

    def prepare_uplink_package_buffer(self) -> BufferPackage:
        """Template of a client's result buffer (optional; BlazeFL's shm protocol).

        Called once per round. Every client gets a fresh copy as ``shm_buffer``, may
        fill it in place and return a package with :class:`SHMHandle` placeholders.
        """
        # Deliberately not a bare ``raise``: type checkers treat protocol methods with
        # trivial bodies as abstract, and this one is optional for subclasses.
        _no_buffer_template(self)

    def convert_buffer_to_uplink(self, buffer: BufferPackage) -> UplinkPackage:
        """Turn a merged result into the uplink package (default: unchanged)."""
        return cast(UplinkPackage, buffer)

    # -- lifecycle ------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the workers, remove the share directory and shut down ``self.manager``."""
        _shutdown_runtime(self)
        manager = getattr(self, "manager", None)
        shutdown = getattr(manager, "shutdown", None)
        if callable(shutdown):
            shutdown()
            with contextlib.suppress(AttributeError):
                delattr(self, "manager")

    def close(self) -> None:
        """Same as :meth:`shutdown`."""
        self.shutdown()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            _shutdown_runtime(self)

    @property
    def share_path(self) -> Path | None:
        """The directory this trainer's round files go to (None before the first round)."""
        state = getattr(self, _RUNTIME_ATTR, None)
        if state is None or not isinstance(state[0], _ProcessRuntime):
            return None
        return state[0].share_path

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (empty before the first round)."""
        state = getattr(self, _RUNTIME_ATTR, None)
        if state is None or not isinstance(state[0], _ProcessRuntime) or state[0].pool is None:
            return []
        return state[0].pool.pids

    # -- one round ------------------------------------------------------------

    def local_process(self, payload: DownlinkPackage, cid_list: list[int]) -> None:
        """Run every client of ``cid_list`` on ``payload``; append their uplinks to ``cache``.

        Uplinks are appended in the order of ``cid_list``. Their tensors are mapped
        from files, so they cost no anonymous memory in this process. Raises
        :class:`ClientError` (with the worker's traceback) when a client raises,
        :class:`WorkerCrashedError` when a worker dies, and re-raises
        ``KeyboardInterrupt`` after stopping every worker and removing the files.
        """
        cids = _check_cids(cid_list)
        parallels = _read_parallels(self, minimum=0)
        seed = _read_seed(self)
        timeout = _read_timeout(self)
        if getattr(self, "cache", None) is None:
            self.cache = []
        runtime = _process_runtime(self)
        round_index = _next_round(self)
        user_event = getattr(self, "stop_event", None)
        if user_event is not None:
            user_event.clear()
        share, stop_flag = runtime.ensure_share(getattr(self, "share_dir", None))
        stop_flag.clear()
        uplinks: list[Path] = []
        try:
            if parallels > 0:
                # Started before the payload is written, so spawning overlaps it.
                pool: WorkerPool | None = runtime.ensure_pool(
                    parallels, _torch_threads(self, parallels), _start_method(self)
                )
            else:
                pool = None
            round_dir = share.round_dir(round_index)
            downlink = round_dir / "downlink.safetensors"
            save_package(downlink, payload)
            template = None
            if _overrides(self, ProcessPoolClientTrainer, "prepare_uplink_package_buffer"):
                template = round_dir / "uplink-buffer.safetensors"
                save_package(template, self.prepare_uplink_package_buffer())
            if not isinstance(inspect.getattr_static(type(self), "worker"), staticmethod):
                raise TypeError(
                    f"{type(self).__name__}.worker must be a @staticmethod with the signature "
                    "worker(config, payload, device, stop_event, *, shm_buffer=None)"
                )
            worker_fn = type(self).worker
            try:
                worker_bytes = split_package(worker_fn)[0]
            except TypeError as exc:
                raise TypeError(
                    f"{type(self).__name__}.worker cannot be sent to worker processes; define "
                    "the trainer class at module level and worker as a @staticmethod"
                ) from exc
            spec = RoundSpec(
                round=round_index,
                seed=seed,
                downlink=str(downlink),
                template=None if template is None else str(template),
                worker=worker_bytes,
                stop_event=_transportable_event(user_event, stop_flag),
            )
            seen: dict[int, int] = {}
            for cid in cids:
                k = seen.get(cid, 0)
                seen[cid] = k + 1
                name = f"uplink-{cid}.safetensors" if k == 0 else f"uplink-{cid}-{k}.safetensors"
                uplinks.append(round_dir / name)

            def make_task(index: int) -> TaskSpec:
                cid = cids[index]
                config = self.get_client_config(cid)
                skeleton, tensors, _ = split_package(config)
                config_path = None
                if tensors:
                    config_path = str(round_dir / f"config-{index}.safetensors")
                    save_package(config_path, config)
                    skeleton = b""
                return TaskSpec(
                    round=round_index,
                    index=index,
                    cid=cid,
                    device=self.get_client_device(cid),
                    config=skeleton,
                    config_path=config_path,
                    uplink=str(uplinks[index]),
                )

            convert = template is not None or _overrides(
                self, ProcessPoolClientTrainer, "convert_buffer_to_uplink"
            )
            results: list[UplinkPackage] = []

            def take(index: int) -> None:
                package = load_package(uplinks[index])
                # The package stays readable through its mapping; unlinking now means
                # the space is returned as soon as nothing refers to the package.
                with contextlib.suppress(OSError):
                    uplinks[index].unlink()
                if convert:
                    package = self.convert_buffer_to_uplink(package)
                results.append(deliver_uplink(self, index, package))

            collector = _InOrder(len(cids), take)
            if pool is None:
                self._run_inline(runtime, spec, make_task, len(cids), round_index, collector)
            else:
                self._run_pool(
                    pool,
                    spec,
                    make_task,
                    len(cids),
                    round_index,
                    timeout,
                    user_event,
                    stop_flag,
                    collector,
                )
            assert collector.complete
            self.cache.extend(results)
        except KeyboardInterrupt:
            logger.info("interrupted: stopping workers and removing %s", share.path)
            _shutdown_runtime(self, graceful=False)
            raise
        except BaseException:
            if runtime.pool is not None:
                runtime.pool.abort_busy()
            raise
        finally:
            if user_event is not None:
                with contextlib.suppress(Exception):
                    user_event.set()
            with contextlib.suppress(Exception):
                stop_flag.set()
            share.remove_round(round_index)

    def _run_pool(
        self,
        pool: WorkerPool,
        spec: RoundSpec,
        make_task: Callable[[int], TaskSpec],
        count: int,
        round_index: int,
        timeout: float | None,
        user_event: Any,
        flag: SharedFlag,
        collector: _InOrder,
    ) -> None:
        custom_progress = _overrides(self, ProcessPoolClientTrainer, "progress_fn")
        bar = _Progress(
            count, round_index, bool(getattr(self, "progress", True)) and not custom_progress
        )
        mirror = None
        if user_event is not None and spec.stop_event is flag:

            def mirror() -> None:
                if user_event.is_set():
                    flag.set()

        def on_done(index: int, seconds: float) -> None:
            bar.done(seconds)
            collector.done(index)

        run: RoundRun = pool.start_round(
            spec,
            make_task,
            count,
            client_timeout=timeout,
            retry_crashed=bool(getattr(self, "retry_crashed", False)),
            on_done=on_done,
            poll=mirror,
        )
        try:
            if custom_progress:
                handles = [_Handle(run.wait_for, i, run.done) for i in range(count)]
                for handle in self.progress_fn(handles):
                    handle.get()
            run.wait_all()
        finally:
            bar.close()

    def _run_inline(
        self,
        runtime: _ProcessRuntime,
        spec: RoundSpec,
        make_task: Callable[[int], TaskSpec],
        count: int,
        round_index: int,
        collector: _InOrder,
    ) -> None:
        if runtime.inline is None:
            runtime.inline = TaskRunner()
        runner = runtime.inline
        runner.set_round(spec)
        bar = _Progress(count, round_index, bool(getattr(self, "progress", True)))
        snapshot = RandomStateSnapshot.capture()
        try:
            for index in range(count):
                task = make_task(index)
                try:
                    seconds = runner.run(task)
                except Exception as exc:
                    raise ClientError(
                        task.cid, f"{type(exc).__qualname__}: {exc}", traceback.format_exc()
                    ) from exc
                bar.done(seconds)
                collector.done(index)
        finally:
            RandomStateSnapshot.restore(snapshot)
            bar.close()


def _transportable_event(user_event: Any, flag: SharedFlag) -> Any:
    """The event handed to workers: the user's if it can cross processes, else ``flag``.

    A Manager's ``Event`` proxy pickles and reconnects in the worker, as in BlazeFL. A
    ``threading.Event`` or an inherited-only ``multiprocessing.Event`` cannot; for
    those the parent mirrors the user's event into the shared flag while it waits.
    """
    if user_event is None or isinstance(user_event, threading.Event):
        return flag
    try:
        split_package(user_event)
    except (TypeError, RuntimeError, ValueError):
        return flag
    return user_event


# ------------------------------------------------------------------- thread pool


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

    def close(self, wait_s: float = 5.0) -> None:
        """Stop the threads once they finish their current call; wait up to ``wait_s``.

        Waiting matters at interpreter exit: a thread that has run torch code and is
        still unwinding while the C++ runtime is torn down can abort the process.
        """
        if self.closed:
            return
        self.closed = True
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + wait_s
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))


def _thread_runtime(trainer: object, size: int) -> _ThreadRuntime:
    state = getattr(trainer, _RUNTIME_ATTR, None)
    if state is not None:
        runtime = state[0]
        if isinstance(runtime, _ThreadRuntime) and not runtime.closed and runtime.size == size:
            return runtime
        _shutdown_runtime(trainer)
    runtime = _ThreadRuntime(size)
    finalizer = Finalize(trainer, runtime.close, exitpriority=10)
    setattr(trainer, _RUNTIME_ATTR, (runtime, finalizer))
    return runtime


class ThreadPoolClientTrainer(
    BaseClientTrainer[UplinkPackage, DownlinkPackage],
    _RoundCounter,
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

    Optional attributes: ``seed``, ``progress``, ``client_timeout`` (see the module
    docstring).
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
        return _client_device(self, cid)

    def shutdown(self) -> None:
        """Stop the worker threads (they finish the client they are running)."""
        _shutdown_runtime(self)

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
        cids = _check_cids(cid_list)
        parallels = _read_parallels(self, minimum=1)
        seed = _read_seed(self)
        timeout = _read_timeout(self)
        if getattr(self, "cache", None) is None:
            self.cache = []
        stop_event = getattr(self, "stop_event", None)
        if stop_event is None:
            stop_event = threading.Event()
            self.stop_event = stop_event
        runtime = _thread_runtime(self, parallels)
        round_index = _next_round(self)
        stop_event.clear()

        watch = _RoundWatch(cids, timeout, stop_event)

        def job(index: int, cid: int, device: str) -> UplinkPackage:
            watch.running[index] = time.monotonic()
            ctx = ClientContext(cid=cid, round=round_index, seed=seed, device=device)
            try:
                with client_scope(ctx):
                    return self.worker(cid, device, payload, stop_event)
            except BaseException:
                watch.failed.append(index)
                raise
            finally:
                watch.finished[index] = time.monotonic() - watch.running.pop(index)

        futures: list[Future[UplinkPackage]] = []
        custom_progress = _overrides(self, ThreadPoolClientTrainer, "progress_fn")
        bar = _Progress(
            len(cids), round_index, bool(getattr(self, "progress", True)) and not custom_progress
        )
        failure: BaseException | None = None
        try:
            for index, cid in enumerate(cids):
                device = self.get_client_device(cid)
                futures.append(runtime.submit(functools.partial(job, index, cid, device)))
            if custom_progress:
                for future in self.progress_fn(futures):
                    watch.wait(future, futures)
            results: list[UplinkPackage] = []
            for index, future in enumerate(futures):
                watch.wait(future, futures)
                results.append(deliver_uplink(self, index, future.result()))
                # Without this the future would keep the package alive all round.
                futures[index] = _TAKEN
                if not custom_progress:
                    bar.done(watch.finished.get(index, 0.0))
            self.cache.extend(results)
        except BaseException as exc:
            failure = exc
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
