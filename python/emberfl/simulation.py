"""Run a whole federated experiment from one configuration.

:func:`run_simulation` (and the :class:`Simulation` object behind it) is what
``emberfl run`` calls: it loads the dataset, partitions it among the clients, writes
both into a memory-mapped :class:`~emberfl.data.DatasetStore` (in a temporary
directory), builds the algorithm's server handler and client trainer (see
:mod:`emberfl.contrib.registry`), runs the rounds and writes the run directory:

* ``config.json`` -- the resolved configuration (written first; see
  :mod:`emberfl.config`);
* ``metrics.csv`` -- one row per evaluated round (see :mod:`emberfl.metrics`), with
  the extra columns ``train_loss`` (mean client training loss), ``dropped`` (client
  updates left out for holding NaN/Inf) and the algorithm's own (Ditto's);
* ``model.safetensors`` -- the final global model, readable by
  :func:`emberfl.store.load` / :func:`emberfl.store.load_model`;
* ``client_state/`` -- per-client state files (SCAFFOLD's controls, FedDyn's
  gradients, Ditto's personal models);
* ``checkpoint-<round>/`` and ``latest`` -- the last checkpoint (every
  ``checkpoint_every`` rounds) and the name of it; :func:`resume_simulation` (``emberfl
  resume DIR``) continues a run from there. :mod:`emberfl.checkpoint` has the layout
  and the order of the writes;
* ``.lock`` -- held by the one process writing the directory, from
  :meth:`Simulation.prepare` to :meth:`Simulation.close`: a second ``run`` or
  ``resume`` of it fails with :class:`RunDirLockedError`.

Under torchrun (see :mod:`emberfl.distributed.cluster`) every rank prepares the same data and its
own workers; rank 0 runs the rounds and writes the run directory, the others follow.

Every file is published by temp file + rename (:mod:`emberfl.fileio`), with the
permissions the process umask gives; none is opened through a symbolic link (a link
where a run file belongs raises :class:`~emberfl.fileio.UnsafePathError`). Everything
a later round depends on lives in the server handler (model, round counter, client
sampler, optimizer moments, server control) and in the client state directory; the
client streams are derived from ``(seed, cid, round)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from emberfl import __version__, store
from emberfl.checkpoint import (
    LATEST_FILE,
    MODEL_FILE,
    STATE_DIR,
    WORK_PREFIX,
    CheckpointError,
    CheckpointInfo,
    RunDirLock,
    RunDirLockedError,
    latest_checkpoint,
    load_checkpoint,
    remove_leftovers,
    restore_run,
    write_checkpoint,
)
from emberfl.config import (
    ALGORITHMS,
    CONFIG_FILE,
    DEFAULT_MODELS,
    PARTITIONS,
    RESUME_SETTINGS,
    RUNTIMES,
    ConfigError,
    SimulationConfig,
    default_run_dir,
    load_config_file,
)
from emberfl.contrib import FedAvgBaseServerHandler, FedAvgUplinkPackage
from emberfl.contrib.privacy import privacy_record
from emberfl.contrib.registry import algorithm_spec, make_client_trainer, make_server_handler
from emberfl.core.packages import tensor_bytes
from emberfl.crashpoints import crash_point
from emberfl.data import Dataset, Partition, StorePartitionedDataset
from emberfl.distributed.cluster import Cluster
from emberfl.distributed.trainer import DistributedClientTrainer
from emberfl.fileio import atomic_write_text, refuse_symlink
from emberfl.metrics import METRICS_FILE, MetricsWriter, RoundMetrics, round_metrics
from emberfl.models import ZooModelSelector
from emberfl.run_data import load_run_data, write_store

# Names defined in emberfl.config and emberfl.checkpoint are re-exported: they are the
# documented Python interface of a run (emberfl.simulation.resume_simulation, ...).
__all__ = [
    "ALGORITHMS",
    "DEFAULT_MODELS",
    "PARTITIONS",
    "RESUME_SETTINGS",
    "RUNTIMES",
    "CheckpointError",
    "CheckpointInfo",
    "ConfigError",
    "RunDirLockedError",
    "Simulation",
    "SimulationConfig",
    "SimulationResult",
    "default_run_dir",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config_file",
    "resume_simulation",
    "run_simulation",
    "write_store",
]

logger = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """What a finished run produced."""

    run_dir: Path
    metrics: list[RoundMetrics] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.metrics[-1].accuracy if self.metrics else math.nan

    @property
    def final_loss(self) -> float:
        return self.metrics[-1].loss if self.metrics else math.nan


class Simulation:
    """One run: :meth:`prepare` builds everything, :meth:`run_round` runs a round.

    Use it as a context manager (or call :meth:`close`): that stops the worker
    processes, removes the temporary dataset store and releases the run directory.
    :meth:`prepare` raises :class:`ConfigError` or :class:`~emberfl.data.DatasetError`
    for bad settings and missing data before anything has run, and
    :class:`RunDirLockedError` when another process is writing the run directory.

    ``resume=True`` (or :meth:`for_resume`) continues the run already in ``run_dir``
    from its last checkpoint instead of refusing a directory that holds a run.
    """

    def __init__(
        self,
        config: SimulationConfig,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        resume: bool = False,
    ):
        config.validate()
        self.config = config
        if run_dir is None:
            run_dir = config.out if config.out is not None else default_run_dir(config)
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.handler: FedAvgBaseServerHandler | None = None
        self.trainer: Any = None
        self.data: Dataset | None = None
        self.partition: Partition | None = None
        #: Called as ``hook(stage, round)`` while a checkpoint is written, at the stages
        #: ``"written"`` (files complete, not yet renamed into place), ``"renamed"``
        #: (in place, ``latest`` not yet updated) and ``"done"``: for observing, or for
        #: tests that interrupt a run at an exact point.
        self.checkpoint_hook: Callable[[str, int], None] | None = None
        #: The round of the checkpoint a resumed run started from (None: from scratch).
        self.resumed_from: int | None = None
        self._work: Path | None = None
        self._writer: MetricsWriter | None = None
        self._threads: int | None = None
        self._made_run_dir = False
        self._lock = RunDirLock(self.run_dir)
        #: The torchrun job this process is a rank of (None: a one-process run).
        self.cluster = Cluster.from_env()
        self._following = False

    @classmethod
    def for_resume(cls, run_dir: str | os.PathLike[str], **settings: Any) -> Simulation:
        """A simulation that continues the run in ``run_dir`` from its last checkpoint.

        The configuration is the run's ``config.json``; ``settings`` may change only
        :data:`RESUME_SETTINGS`. Without any checkpoint the run starts over.
        """
        directory = Path(run_dir)
        path = directory / CONFIG_FILE
        refuse_symlink(path)  # read as the run's own, and written again
        cluster = Cluster.from_env()
        if cluster is not None and not cluster.is_server and not path.is_file():
            # This node does not see the run directory: prepare() adopts rank 0's.
            return cls(SimulationConfig.from_mapping(settings), directory, resume=True)
        if not path.is_file():
            raise CheckpointError(f"{directory} is not a run directory: it has no {CONFIG_FILE}")
        values = load_config_file(path)
        for key in ("emberfl_version", "out", "layout", "privacy"):
            values.pop(key, None)
        if values.get("threads", 1) is None:
            # Written before the thread count was recorded: it followed that
            # machine's CPUs, so no count reproduces it everywhere; take the default.
            del values["threads"]
        changed = sorted(k for k in settings if k.replace("-", "_") not in RESUME_SETTINGS)
        if changed:
            raise ConfigError(
                f"a resumed run keeps its configuration; only {', '.join(RESUME_SETTINGS)} "
                f"may change, not {', '.join(changed)}"
            )
        config = SimulationConfig.from_mapping({**values, **settings})
        return cls(config, directory, resume=True)

    # -- set-up ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Load and partition the data, write the store, build handler and trainer.

        Under torchrun every rank prepares; rank 0 alone builds the server handler and
        writes the run directory, after every rank agreed on the configuration.
        """
        if self.handler is not None or self._following:
            return
        config, cluster = self.config, self.cluster
        server = cluster is None or cluster.is_server
        if cluster is not None:
            cluster.start(config.device, rank_timeout=config.rank_timeout, collective_timeout=600)
            if config.clients_per_round < cluster.world_size:
                raise ConfigError(
                    f"{config.clients_per_round} clients per round cannot keep "
                    f"{cluster.world_size} ranks busy: use fewer ranks or more clients per round"
                )
        if server:
            self._take_run_dir()
            if cluster is not None and cluster.restart and (self.run_dir / CONFIG_FILE).exists():
                logger.info("restart %d of the job: resuming %s", cluster.restart, self.run_dir)
                self.resume = True
            if self.resume:
                remove_leftovers(self.run_dir)
            else:
                for name in (MODEL_FILE, METRICS_FILE, LATEST_FILE):
                    if refuse_symlink(self.run_dir / name):
                        raise ConfigError(
                            f"{self.run_dir} already holds a run ({name}); choose another "
                            "output directory, or resume it"
                        )
        if cluster is not None:
            self._agree(cluster)
            config = self.config
        if server:
            # Before the data is loaded and the workers start (seconds, for a large
            # dataset): a run killed from here on can be resumed, which needs it.
            self._write_config()
        # The scratch directory (dataset store, round files) lives in the run directory,
        # so that whatever a killed run leaves behind is found and removed on resume.
        if server:
            self._work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=self.run_dir))
            crash_point("simulation.setup")
        else:
            assert cluster is not None
            self._work = cluster.scratch(self.run_dir)
        if config.runtime == "process" and config.workers_per_rank > 0:
            # Built first so that its worker processes start (a fresh interpreter
            # importing torch takes seconds) while this process loads the data; the
            # model selector and the dataset, which only tasks read, are bound below.
            self.trainer = self._make_trainer(None, None)
        data, partition = load_run_data(config)
        self.data, self.partition = data, partition

        dataset = write_store(self._work / "data", data, partition)
        selector = ZooModelSelector(tuple(data.in_shape), data.num_classes, config.seed)
        if self.trainer is None:
            self.trainer = self._make_trainer(selector, dataset)
        else:
            self.trainer.model_selector = selector
            self.trainer.dataset = dataset
        if cluster is not None:
            sizes = [len(i) for i in partition.indices]
            self.trainer = DistributedClientTrainer(
                self.trainer, watch=cluster.watch, client_cost=lambda cid: sizes[cid]
            )
        if not server:
            self._following = True
            return
        self.handler = make_server_handler(config.algorithm, selector, dataset, config)
        # Every worker folds its clients' uplinks into its own exact sums; this
        # process merges one per worker a round, however many clients it has.
        self.trainer.uplink_fold = self.handler.uplink_fold()
        if self.resume:
            self._restore()
        self._writer = MetricsWriter(self.run_dir, resume=self.resume)
        self._made_run_dir = False

    def _agree(self, cluster: Cluster) -> None:
        """Check the configuration against rank 0's (another rank resuming adopts it)."""
        mine = None if self.resume and not cluster.is_server else self._config_record()
        shared = algorithm_spec(self.config.algorithm).client_state_on_disk
        agreed, self.run_dir = cluster.agree(mine, self.run_dir, shared_state=shared)
        if not cluster.is_server:
            values = {k: v for k, v in agreed.items() if k in SimulationConfig.field_names()}
            for key in ("progress", *RESUME_SETTINGS):
                values[key] = getattr(self.config, key)
            self.config = SimulationConfig.from_mapping({**values, "out": str(self.run_dir)})

    def _take_run_dir(self) -> None:
        """Make the run directory if need be and lock it, before anything in it changes."""
        if self._lock.held:
            return
        if not self.run_dir.exists():
            if self.resume:
                raise CheckpointError(f"run directory {self.run_dir} does not exist")
            # Another process may make it at the same moment: then the lock decides.
            with contextlib.suppress(FileExistsError):
                self.run_dir.mkdir(parents=True)
                self._made_run_dir = True
        self._lock.acquire()

    def _restore(self) -> None:
        """Bring the run directory, handler and trainer back to the last checkpoint."""
        self.resumed_from = restore_run(
            self.run_dir, self.config.algorithm, self.handler, self.trainer
        )

    def _config_record(self) -> dict[str, Any]:
        config = self.config
        resolved = config.to_dict()
        resolved.update(
            model=config.model_name,
            partition=config.partition_name,
            out=str(self.run_dir),
            emberfl_version=__version__,
        )
        record = privacy_record(config)
        if record is not None:
            resolved["privacy"] = record
        return resolved

    def _write_config(self) -> None:
        resolved = self._config_record()
        workers = (
            self.config.workers_per_rank if self.config.runtime in ("process", "thread") else 0
        )
        resolved["layout"] = (
            self.cluster.layout(workers)
            if self.cluster is not None
            else {"world_size": 1, "nodes": 1, "processes_per_node": 1, "workers_per_rank": workers}
        )
        text = json.dumps(resolved, indent=2, sort_keys=True) + "\n"
        atomic_write_text(self.run_dir / CONFIG_FILE, text, durable=True)

    def _make_trainer(
        self, selector: ZooModelSelector | None, dataset: StorePartitionedDataset | None
    ) -> Any:
        config = self.config
        assert self._work is not None
        # State that outlives a round belongs to the run (and its checkpoints); any
        # other goes to the scratch directory.
        keeps_state = algorithm_spec(config.algorithm).client_state_on_disk
        state_dir = (self.run_dir if keeps_state else self._work) / STATE_DIR
        if self.cluster is not None:  # one GPU per rank
            config = SimulationConfig.from_mapping(
                {"device": self.cluster.device(config.device)}, config
            )
        return make_client_trainer(
            config.algorithm,
            config.runtime,
            selector,
            dataset,
            config,
            state_dir=state_dir,
            share_dir=self._work,
        )

    # -- rounds ----------------------------------------------------------------------

    def _set_threads(self) -> None:
        # This process (evaluation, and the clients themselves in the thread and serial
        # runtimes) runs with the clients' thread count, which decides the bits.
        if self._threads is None:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(self.config.threads)

    def _restore_threads(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None

    @property
    def following(self) -> bool:
        """True on a rank other than 0 of a torchrun job, once prepared: it trains its
        share of rank 0's rounds (:meth:`run`) and writes nothing."""
        return self._following

    @property
    def round(self) -> int:
        """Rounds completed so far."""
        return 0 if self.handler is None else self.handler.round

    def run_round(self) -> RoundMetrics | None:
        """Run one round; returns its metrics when it was evaluated (else ``None``)."""
        self.prepare()
        handler, trainer, writer = self.handler, self.trainer, self._writer
        assert handler is not None and writer is not None
        if handler.is_stopped():
            raise RuntimeError(f"all {self.config.rounds} rounds have run")
        self._set_threads()
        start = time.perf_counter()
        cids = handler.sample_clients()
        payload = handler.downlink_package()
        trainer.local_process(payload, cids)
        uplinks: list[FedAvgUplinkPackage] = trainer.uplink_package()
        bytes_down = tensor_bytes(payload) * len(cids)
        bytes_up = sum(tensor_bytes(p) for p in uplinks)
        clients = [(p.metadata, p.data_size) for p in uplinks]
        for package in uplinks:
            handler.load(package)
        if not cids:  # Poisson sampling drew nobody: the round still counts
            handler.aggregate_empty_round()
        del payload, uplinks  # drops the mappings of this round's files
        index = handler.round
        last = handler.is_stopped()
        if index % self.config.eval_every != 0 and not last:
            self._maybe_checkpoint()
            return None
        metrics = round_metrics(
            index,
            handler.get_summary(),
            clients,
            round_seconds=time.perf_counter() - start,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            dropped=len(handler.dropped),
        )
        writer.write(metrics)
        self._maybe_checkpoint()
        return metrics

    # -- checkpoints -----------------------------------------------------------------

    def _maybe_checkpoint(self) -> None:
        every = self.config.checkpoint_every
        assert self.handler is not None
        if every and self.handler.round % every == 0:
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Write ``<run_dir>/checkpoint-<round>`` crash-safely and point ``latest`` at it.

        See :mod:`emberfl.checkpoint` for the layout and the order of the writes. The
        previous checkpoint is removed only once the new one is complete and named.
        """
        handler = self.handler
        assert handler is not None, "prepare() has not run"
        return write_checkpoint(
            self.run_dir,
            handler.checkpoint_state(),
            round=handler.round,
            rounds=self.config.rounds,
            algorithm=self.config.algorithm,
            seed=self.config.seed,
            hook=self.checkpoint_hook,
        )

    def rounds(self) -> Iterator[RoundMetrics]:
        """Run the remaining rounds, yielding the metrics of every evaluated one."""
        self.prepare()
        assert self.handler is not None
        while not self.handler.is_stopped():
            metrics = self.run_round()
            if metrics is not None:
                yield metrics

    def save_model(self) -> Path:
        """Write the global model to ``<run_dir>/model.safetensors`` (atomically)."""
        assert self.handler is not None, "prepare() has not run"
        path = self.run_dir / MODEL_FILE
        store.save_model(
            self.handler.model,
            path,
            metadata={
                "model": self.config.model_name,
                "dataset": self.config.dataset_key,
                "algorithm": self.config.algorithm,
                "round": str(self.handler.round),
                "in_shape": json.dumps(list(self.data.in_shape) if self.data else []),
                "num_classes": str(self.data.num_classes if self.data else 0),
            },
            durable=True,
        )
        return path

    def run(self, on_round: Callable[[RoundMetrics], None] | None = None) -> SimulationResult:
        """Run every round, write the final model; ``on_round`` sees each evaluated round."""
        start = time.perf_counter()
        result = SimulationResult(run_dir=self.run_dir)
        self.prepare()
        if self._following:  # another rank than 0: train its share of rank 0's rounds
            self._set_threads()
            self.trainer.follow()
            result.seconds = time.perf_counter() - start
            return result
        for metrics in self.rounds():
            result.metrics.append(metrics)
            if on_round is not None:
                on_round(metrics)
        self.save_model()
        crash_point("simulation.model")
        result.seconds = time.perf_counter() - start
        return result

    # -- clean-up --------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers, close the metrics file, remove the temporary files and
        release the run directory."""
        try:
            trainer = self.trainer
            self.trainer = None
            close = getattr(trainer, "close", None)
            if callable(close):
                close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
            self._restore_threads()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._work is not None:
                shutil.rmtree(self._work, ignore_errors=True)
                self._work = None
            # prepare() failed in a directory it made: leave no empty run directory.
            if self._made_run_dir:
                (self.run_dir / CONFIG_FILE).unlink(missing_ok=True)
            self._lock.release(remove=self._made_run_dir)
            if self._made_run_dir:
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
                self._made_run_dir = False

    def __enter__(self) -> Simulation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.abort(f"{type(exc).__name__}: {exc}")
        self.close()

    def abort(self, reason: str) -> None:
        """Under torchrun: tell the other ranks that this one failed (``reason``); they
        stop at once with an error naming it, instead of being released by close()."""
        abort = getattr(self.trainer, "abort", None)
        if callable(abort):
            abort(reason)
        elif self.cluster is not None and self.cluster.watch is not None:
            self.cluster.watch.fail(reason)


def run_simulation(
    config: SimulationConfig | Mapping[str, Any] | None = None,
    *,
    on_round: Callable[[RoundMetrics], None] | None = None,
    **settings: Any,
) -> SimulationResult:
    """Run a whole experiment; returns its metrics and run directory.

    ``config`` is a :class:`SimulationConfig` or a mapping of settings; keyword
    ``settings`` override it (``run_simulation(rounds=5, clients=20)``).
    """
    if config is None:
        base = SimulationConfig()
    elif isinstance(config, SimulationConfig):
        base = config
    else:
        base = SimulationConfig.from_mapping(config)
    resolved = SimulationConfig.from_mapping(settings, base) if settings else base
    with Simulation(resolved) as simulation:
        return simulation.run(on_round)


def resume_simulation(
    run_dir: str | os.PathLike[str],
    *,
    on_round: Callable[[RoundMetrics], None] | None = None,
    **settings: Any,
) -> SimulationResult:
    """Continue the run in ``run_dir`` from its last checkpoint to its last round.

    ``metrics.csv`` is cut back to the checkpoint's round and appended to; the result
    holds the metrics of the rounds run now. ``settings`` may change only
    :data:`RESUME_SETTINGS` (e.g. ``workers``). Raises :class:`CheckpointError` when
    ``run_dir`` is not a run directory or its checkpoint is unusable.
    """
    with Simulation.for_resume(run_dir, **settings) as simulation:
        return simulation.run(on_round)
