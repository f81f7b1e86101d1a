"""The process-pool client trainer: clients run in persistent worker processes.

The payload is written once per round to a package file that every worker maps;
each client's result comes back the same way (or, with ``uplink_fold``, is folded
into its worker's sums, which come back once per round) and is handed over in the
order of ``cid_list`` as it arrives. The worker processes and the share directory
are owned by the trainer's runtime (:mod:`emberfl.runtimes.process.workers`).

Besides the optional attributes both pools read (``seed``, ``progress``,
``client_timeout``, ``on_uplink``, ``uplink_fold``; see
:mod:`emberfl.core.client_trainer`), this pool reads:

``share_dir`` (path, default: the system temp dir)
    Where a fresh per-trainer directory for round files is made; it is removed on
    close. A ``share_dir`` that does not exist yet is created (parents included, as
    BlazeFL does), and the directories created for it are removed on close once
    empty. A RAM-backed directory such as ``/dev/shm`` avoids disk writeback when it
    is large enough.
``retry_crashed`` (bool, default False)
    When a worker process dies mid-client, start a new one and retry that client
    once instead of raising :class:`WorkerCrashedError`.
``torch_threads`` (int, default 1)
    Intra-op threads of each worker process. torch splits a reduction's work by the
    thread count, so the count decides the bits: with the same count the results are
    the same for any ``num_parallels``.
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
``ipc_mode`` (:class:`~emberfl.core.IPCMode`, default ``IPCMode.STORAGE``)
    BlazeFL 2.x's choice of transport, accepted so that 2.x trainers run unchanged:
    either value selects the mapped files (a bad value is refused when a round
    starts).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, Protocol, cast

from typing_extensions import TypeVar

from emberfl.core.client_trainer import (
    BaseClientTrainer,
    DownlinkPackage,
    UplinkPackage,
    deliver_uplink,
)
from emberfl.core.errors import ClientError
from emberfl.core.fold import FoldCollector, WireStandIn, read_fold
from emberfl.core.ipc import IPCMode, accept_ipc_mode
from emberfl.core.packages import load_package, save_package, split_package
from emberfl.reproducibility import RandomStateSnapshot
from emberfl.runtimes.common import (
    InOrder,
    Progress,
    RoundCounter,
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
from emberfl.runtimes.process.pool import RoundRun, WorkerPool
from emberfl.runtimes.process.workers import (
    ProcessRuntime,
    prewarm,
    process_runtime,
    read_start_method,
    read_torch_threads,
)
from emberfl.runtimes.tasks import RoundSpec, SharedFlag, TaskRunner, TaskSpec

__all__ = ["ProcessPoolClientTrainer"]

logger = logging.getLogger("emberfl.core")

ClientConfig = TypeVar("ClientConfig")
# BlazeFL 2.x's protocol takes three parameters and its buffer is an uplink package;
# the default keeps ``ProcessPoolClientTrainer[Up, Down, Config]`` subscriptable.
BufferPackage = TypeVar("BufferPackage", default=UplinkPackage)
_Self = TypeVar("_Self")


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


def _read_ipc_mode(trainer: object) -> None:
    """Check an ``ipc_mode`` the trainer sets (BlazeFL 2.x); logs once that it is moot.

    The protocol's own default is not reported: only a value the user chose is.
    """
    if "ipc_mode" in getattr(trainer, "__dict__", {}) or overrides(
        trainer, ProcessPoolClientTrainer, "ipc_mode"
    ):
        try:
            accept_ipc_mode(getattr(trainer, "ipc_mode"))  # noqa: B009 -- set by the subclass
        except ValueError as exc:
            raise ValueError(f"{type(trainer).__name__}.{exc}") from None


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


class ProcessPoolClientTrainer(
    BaseClientTrainer[UplinkPackage, DownlinkPackage],
    RoundCounter,
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

    See :mod:`emberfl.runtimes.process.trainer` for the optional attributes (``seed``,
    ``share_dir``, ``progress``, ``retry_crashed``, ``client_timeout``,
    ``torch_threads``, ``start_method``, ``prewarm``, ``ipc_mode``).

    Attributes:
        num_parallels: number of worker processes.
        device: "cpu", "cuda" (clients spread over ``cuda:{cid % device_count}``) or a
            specific device.
        device_count: CUDA devices to spread clients over (default: all visible).
        cache: uplink packages of the clients run so far.
        stop_event: an event the workers may poll; cleared when a round starts and
            set when it ends. A ``multiprocessing.Manager().Event()`` is handed to the
            workers as it is; any other event is mirrored into a shared flag.
        ipc_mode: BlazeFL 2.x's transport choice; accepted, and either value means
            the mapped files.
    """

    num_parallels: int
    device: str
    device_count: int
    cache: list[UplinkPackage]
    stop_event: Any
    ipc_mode: IPCMode = IPCMode.STORAGE

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
                prewarm(self)

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
        return client_device(self, cid)

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
        shutdown_runtime(self)
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
            shutdown_runtime(self)

    @property
    def share_path(self) -> Path | None:
        """The directory this trainer's round files go to (None before the first round)."""
        runtime = attached_runtime(self, ProcessRuntime)
        return None if runtime is None else runtime.share_path

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (empty before the first round)."""
        runtime = attached_runtime(self, ProcessRuntime)
        if runtime is None or runtime.pool is None:
            return []
        return runtime.pool.pids

    # -- one round ------------------------------------------------------------

    def local_process(self, payload: DownlinkPackage, cid_list: list[int]) -> None:
        """Run every client of ``cid_list`` on ``payload``; append their uplinks to ``cache``.

        Uplinks are appended in the order of ``cid_list``. Their tensors are mapped
        from files, so they cost no anonymous memory in this process. Raises
        :class:`ClientError` (with the worker's traceback) when a client raises,
        :class:`WorkerCrashedError` when a worker dies, and re-raises
        ``KeyboardInterrupt`` after stopping every worker and removing the files.
        """
        cids = check_cids(cid_list)
        parallels = read_parallels(self, minimum=0)
        seed = read_seed(self)
        timeout = read_timeout(self)
        _read_ipc_mode(self)
        if getattr(self, "cache", None) is None:
            self.cache = []
        runtime = process_runtime(self)
        # Before the round counter moves: a share_dir that cannot be made runs no round.
        share, stop_flag = runtime.ensure_share(getattr(self, "share_dir", None))
        round_index = next_round(self)
        user_event = getattr(self, "stop_event", None)
        if user_event is not None:
            user_event.clear()
        stop_flag.clear()
        uplinks: list[Path] = []
        results: list[UplinkPackage] = []
        fold = read_fold(self)
        collector = None if fold is None else FoldCollector(fold, len(cids))
        # Folded uplinks' stand-ins, from their workers until handed over in order.
        wires: dict[int, WireStandIn] = {}
        try:
            if parallels > 0:
                # Started before the payload is written, so spawning overlaps it.
                pool: WorkerPool | None = runtime.ensure_pool(
                    parallels, read_torch_threads(self), read_start_method(self)
                )
            else:
                pool = None
            round_dir = share.round_dir(round_index)
            downlink = round_dir / "downlink.safetensors"
            save_package(downlink, payload)
            template = None
            if overrides(self, ProcessPoolClientTrainer, "prepare_uplink_package_buffer"):
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
                fold=fold,
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

            convert = template is not None or overrides(
                self, ProcessPoolClientTrainer, "convert_buffer_to_uplink"
            )

            def take(index: int) -> None:
                if collector is not None:
                    wire = wires.pop(index)
                    package = wire.package()
                    collector.record(index, package, wire.bad_terms)
                    results.append(deliver_uplink(self, index, package))
                    return
                package = load_package(uplinks[index])
                # The package stays readable through its mapping; unlinking now means
                # the space is returned as soon as nothing refers to the package.
                with contextlib.suppress(OSError):
                    uplinks[index].unlink()
                if convert:
                    package = self.convert_buffer_to_uplink(package)
                results.append(deliver_uplink(self, index, package))

            in_order = InOrder(len(cids), take)
            if pool is None:
                self._run_inline(
                    runtime, spec, make_task, len(cids), round_index, in_order, wires, collector
                )
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
                    in_order,
                    wires,
                    collector,
                    round_dir,
                )
            assert in_order.complete
            if collector is not None:
                collector.finish()
            self.cache.extend(results)
        except KeyboardInterrupt:
            results.clear()
            logger.info("interrupted: stopping workers and removing %s", share.path)
            shutdown_runtime(self, graceful=False)
            raise
        except BaseException:
            # The error's traceback keeps this frame alive as long as the caller
            # keeps the error: the uplinks handed over so far must not stay mapped.
            results.clear()
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
        in_order: InOrder,
        wires: dict[int, WireStandIn],
        collector: FoldCollector | None,
        round_dir: Path,
    ) -> None:
        custom_progress = overrides(self, ProcessPoolClientTrainer, "progress_fn")
        bar = Progress(
            count, round_index, bool(getattr(self, "progress", True)) and not custom_progress
        )
        mirror = None
        if user_event is not None and spec.stop_event is flag:

            def mirror() -> None:
                if user_event.is_set():
                    flag.set()

        def on_done(index: int, seconds: float) -> None:
            bar.done(seconds)
            if collector is not None:
                wires[index] = run.stand_ins.pop(index)
            in_order.done(index)

        def sums_path(worker: int, n: int) -> str:
            return str(round_dir / f"sums-{worker}-{n}.safetensors")

        run: RoundRun = pool.start_round(
            spec,
            make_task,
            count,
            client_timeout=timeout,
            retry_crashed=bool(getattr(self, "retry_crashed", False)),
            on_done=on_done,
            poll=mirror,
            on_sums=None if collector is None else collector.merge_file,
            sums_path=sums_path,
        )
        try:
            if custom_progress:
                handles = [_Handle(run.wait_for, i, run.done) for i in range(count)]
                for handle in self.progress_fn(handles):
                    handle.get()
            run.wait_all()
        finally:
            bar.close()
            # on_done refers to the run, which refers to on_done: without this the
            # cycle would keep this round's uplinks alive until the next collection.
            run = None  # type: ignore[assignment]

    def _run_inline(
        self,
        runtime: ProcessRuntime,
        spec: RoundSpec,
        make_task: Callable[[int], TaskSpec],
        count: int,
        round_index: int,
        in_order: InOrder,
        wires: dict[int, WireStandIn],
        collector: FoldCollector | None,
    ) -> None:
        if runtime.inline is None:
            runtime.inline = TaskRunner()
        runner = runtime.inline
        runner.set_round(spec)
        bar = Progress(count, round_index, bool(getattr(self, "progress", True)))
        snapshot = RandomStateSnapshot.capture()
        try:
            for index in range(count):
                task = make_task(index)
                try:
                    seconds, wire = runner.run(task)
                except Exception as exc:
                    raise ClientError(
                        task.cid, f"{type(exc).__qualname__}: {exc}", traceback.format_exc()
                    ) from exc
                bar.done(seconds)
                if wire is not None:
                    wires[index] = wire
                in_order.done(index)
            sums = runner.take_sums()
            if collector is not None and sums is not None:
                collector.merge(sums)
        finally:
            RandomStateSnapshot.restore(snapshot)
            bar.close()
