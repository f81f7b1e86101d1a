"""Run a whole federated experiment from one configuration.

:func:`run_simulation` (and the :class:`Simulation` object behind it) is what
``emberfl run`` calls: it loads the dataset, partitions it among the clients, writes
both into a memory-mapped :class:`~emberfl.datastore.DatasetStore` (in a temporary
directory), builds the algorithm's server handler and client trainer, runs the
rounds and writes the run directory:

* ``config.json`` -- the resolved configuration (written first);
* ``metrics.csv`` -- one row per evaluated round (see :mod:`emberfl.metrics`), with
  the extra columns ``train_loss`` (mean client training loss) and ``dropped``
  (client updates left out for holding NaN/Inf);
* ``model.safetensors`` -- the final global model, readable by
  :func:`emberfl.store.load` / :func:`emberfl.store.load_model`;
* ``client_state/`` -- per-client state files (SCAFFOLD's control variates);
* ``checkpoint-<round>/`` and ``latest`` -- the last checkpoint (every
  ``checkpoint_every`` rounds) and the name of it; :func:`resume_simulation` (``emberfl
  resume DIR``) continues a run from there.

Checkpoints are written crash-safely: into a temporary directory whose files and the
directory itself are fsynced, renamed into place (then the run directory is fsynced),
and only then named by ``latest`` (written by temp file + fsync + rename). The
previous checkpoint is deleted after that, so at every instant ``latest`` names a
complete checkpoint. A checkpoint holds ``server.safetensors`` (global model, round,
the sampler's generators and the algorithm's server state, see
:meth:`~emberfl.contrib.FedAvgBaseServerHandler.checkpoint_state`), a copy of
``metrics.csv`` up to its round, hard links to the client state files (those are
only ever replaced by rename, never rewritten, so a link keeps the state of the
checkpoint's round) and ``manifest.json``, written last.

Everything a later round depends on lives in the server handler (model, round
counter, client sampler, optimizer moments, server control) and in the client state
directory; the client streams are derived from ``(seed, cid, round)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from emberfl import __version__, store
from emberfl.contrib import (
    FedAdagradServerHandler,
    FedAdamServerHandler,
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
    FedAvgUplinkPackage,
    FedProxBaseClientTrainer,
    FedProxBaseServerHandler,
    FedProxProcessPoolClientTrainer,
    FedProxThreadPoolClientTrainer,
    FedYogiServerHandler,
    ScaffoldBaseClientTrainer,
    ScaffoldProcessPoolClientTrainer,
    ScaffoldServerHandler,
    ScaffoldThreadPoolClientTrainer,
)
from emberfl.core.runtime import available_cpus
from emberfl.data import DATASET_NAMES, Dataset, Partition, load_dataset
from emberfl.data import dirichlet as dirichlet_partition
from emberfl.data import iid as iid_partition
from emberfl.data import quantity_skew as quantity_partition
from emberfl.data import shards as shards_partition
from emberfl.datastore import DatasetStore, StorePartitionedDataset
from emberfl.metrics import MetricsWriter, RoundMetrics
from emberfl.models import MODEL_NAMES, create_model

__all__ = [
    "ALGORITHMS",
    "DEFAULT_MODELS",
    "PARTITIONS",
    "RUNTIMES",
    "CheckpointError",
    "CheckpointInfo",
    "ConfigError",
    "Simulation",
    "SimulationConfig",
    "SimulationResult",
    "ZooModelSelector",
    "default_run_dir",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config_file",
    "resume_simulation",
    "run_simulation",
    "write_store",
]

logger = logging.getLogger(__name__)

ALGORITHMS: tuple[str, ...] = ("fedavg", "fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad")
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards", "quantity")
RUNTIMES: tuple[str, ...] = ("process", "thread", "serial")

#: The model each dataset gets when none is named. MNIST-like data default to
#: McMahan et al.'s 2NN rather than their CNN: it has 8x fewer parameters, reaches
#: about 97-98% on MNIST, and a round takes a fraction of a second on a laptop CPU.
DEFAULT_MODELS: dict[str, str] = {
    "digits": "mlp",
    "mnist": "2nn",
    "fashion-mnist": "2nn",
    "cifar10": "cifar_cnn",
    "synthetic": "logreg",
}

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
STATE_DIR = "client_state"
METRICS_FILE = "metrics.csv"
LATEST_FILE = "latest"
CHECKPOINT_PREFIX = "checkpoint-"
SERVER_FILE = "server.safetensors"
MANIFEST_FILE = "manifest.json"
WORK_PREFIX = ".work-"
CHECKPOINT_FORMAT = 1

_CHECKPOINT_RE = re.compile(r"checkpoint-(0|[1-9][0-9]*)")
_STATE_FILE_RE = re.compile(r"(0|[1-9][0-9]*)\.safetensors")

#: Settings a resumed run may change: they decide how the rounds run, not what they
#: compute (results are bitwise the same for any runtime and worker count).
RESUME_SETTINGS: tuple[str, ...] = ("workers", "threads", "runtime", "progress", "checkpoint_every")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting."""


class CheckpointError(ValueError):
    """A run directory holds no usable checkpoint; the message names the file."""


# ------------------------------------------------------------------------ config


@dataclass
class SimulationConfig:
    """Every setting of a run. The defaults are the quick start (FedAvg on digits).

    Names match the command line flags (``sample_ratio`` is ``--sample-ratio``).
    ``partition=None`` means ``iid``, except for ``synthetic``, whose generator gives
    every client its own data. ``model=None`` picks :data:`DEFAULT_MODELS`.
    """

    algorithm: str = "fedavg"
    dataset: str = "digits"
    data_dir: str | None = None
    partition: str | None = None
    alpha: float = 0.5
    shards_per_client: int = 2
    sigma: float = 1.0
    model: str | None = None
    clients: int = 100
    sample_ratio: float = 0.1
    rounds: int = 40
    epochs: int = 5
    batch_size: int = 10
    lr: float = 0.2
    workers: int = 2
    threads: int | None = None
    runtime: str = "process"
    device: str = "cpu"
    seed: int = 0
    mu: float = 0.01
    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    nonfinite: str = "raise"
    checkpoint_every: int | None = 10
    eval_every: int = 1
    eval_batch_size: int = 1024
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    out: str | None = None
    progress: bool = True

    # -- building ------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: SimulationConfig | None = None
    ) -> SimulationConfig:
        """``base`` (default: the defaults) with ``values`` applied.

        Keys may use dashes or underscores (``sample-ratio``). Unknown keys and values
        of the wrong type raise :class:`ConfigError`.
        """
        config = dataclasses.replace(base) if base is not None else cls()
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in types:
                raise ConfigError(
                    f"unknown setting {raw_key!r}; valid settings are: "
                    + ", ".join(n.replace("_", "-") for n in cls.field_names())
                )
            setattr(config, key, _coerce(key, str(types[key]), value))
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- derived values --------------------------------------------------------------

    @property
    def dataset_key(self) -> str:
        key = self.dataset.strip().lower().replace("_", "-")
        return {"fashion": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(
            key, key
        )

    @property
    def model_name(self) -> str:
        return self.model if self.model is not None else DEFAULT_MODELS[self.dataset_key]

    @property
    def partition_name(self) -> str:
        if self.partition is not None:
            return self.partition
        return "natural" if self.dataset_key == "synthetic" else "iid"

    @property
    def threads_per_worker(self) -> int:
        """Intra-op torch threads of each worker process, and of this process during a
        run: ``threads``, or the CPUs shared out among the workers."""
        if self.threads is not None:
            return self.threads
        return max(1, available_cpus() // max(1, self.workers))

    @property
    def clients_per_round(self) -> int:
        return int(self.clients * self.sample_ratio)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting."""
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("dataset", self.dataset_key, DATASET_NAMES)
        if self.partition is not None:
            _choice("partition", self.partition, PARTITIONS)
        _choice("model", self.model_name.strip().lower().replace("-", "_"), MODEL_NAMES)
        _choice("runtime", self.runtime, RUNTIMES)
        _choice("nonfinite", self.nonfinite, ("raise", "drop"))
        if self.dataset_key in ("mnist", "cifar10") and self.data_dir is None:
            raise ConfigError(
                f"dataset {self.dataset_key!r} is read from files: give its directory (--data-dir)"
            )
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"data directory {self.data_dir} does not exist")
        _at_least("clients", self.clients, 1)
        _at_least("rounds", self.rounds, 1)
        _at_least("epochs", self.epochs, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("eval_every", self.eval_every, 1)
        if self.checkpoint_every is not None:
            _at_least("checkpoint_every", self.checkpoint_every, 0)
        _at_least("eval_batch_size", self.eval_batch_size, 1)
        _at_least("shards_per_client", self.shards_per_client, 1)
        _at_least("workers", self.workers, 1 if self.runtime == "thread" else 0)
        if self.threads is not None:
            _at_least("threads", self.threads, 1)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must lie in [0, 2**32), got {self.seed}")
        if not 0 < self.sample_ratio <= 1:
            raise ConfigError(f"sample_ratio must lie in (0, 1], got {self.sample_ratio}")
        if self.clients_per_round < 1:
            raise ConfigError(
                f"sample_ratio {self.sample_ratio} of {self.clients} clients selects no client "
                "per round; raise sample_ratio or clients"
            )
        _positive("lr", self.lr)
        _positive("alpha", self.alpha)
        _positive("server_lr", self.server_lr)
        _positive("tau", self.tau)
        _non_negative("mu", self.mu)
        _non_negative("sigma", self.sigma)
        _non_negative("synthetic_alpha", self.synthetic_alpha)
        _non_negative("synthetic_beta", self.synthetic_beta)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ConfigError(f"{name} must lie in [0, 1), got {value}")
        device = self.device.strip().lower()
        try:
            torch.device(device)
        except RuntimeError:
            raise ConfigError(f"device {self.device!r} is not a torch device") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} was asked for but CUDA is not available")


def _coerce(key: str, type_text: str, value: Any) -> Any:
    """``value`` checked (and, for ints given as floats like 3.0, converted) for ``key``."""
    optional = "None" in type_text
    if value is None:
        if optional:
            return None
        raise ConfigError(f"setting {key!r} cannot be null")
    if type_text.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"setting {key!r} must be true or false, got {value!r}")
    if type_text.startswith("int"):
        if isinstance(value, bool):
            raise ConfigError(f"setting {key!r} must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise ConfigError(f"setting {key!r} must be an integer, got {value!r}")
    if type_text.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"setting {key!r} must be a number, got {value!r}")
        return float(value)
    if type_text.startswith("str"):
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"setting {key!r} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled setting type {type_text} for {key}")


def _choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


def _at_least(what: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {value}")


def _positive(what: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be a finite number > 0, got {value}")


def _non_negative(what: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{what} must be a finite number >= 0, got {value}")


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings in a JSON (``.json``) or TOML (any other suffix) file.

    A TOML file may keep them at the top level or under a ``[run]`` table.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    data: Any
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: invalid JSON: {exc}") from None
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            try:
                import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]
            except ModuleNotFoundError:
                raise ConfigError(
                    f"{p}: reading TOML on Python 3.10 needs the 'tomli' package; "
                    "install it or use a .json config"
                ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("run"), dict) and len(data) == 1:
            data = data["run"]
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a table of settings, got {type(data).__name__}")
    return data


def default_run_dir(config: SimulationConfig, parent: str | os.PathLike[str] = "runs") -> Path:
    """``<parent>/<timestamp>-<algorithm>-<dataset>``, made unique with a suffix."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(parent) / f"{stamp}-{config.algorithm}-{config.dataset_key}"
    candidate = base
    n = 1
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate


# ------------------------------------------------------------------ model selector


@dataclass(frozen=True)
class ZooModelSelector:
    """A :class:`~emberfl.core.ModelSelector` over :func:`emberfl.models.create_model`.

    Every model it builds for a name starts from the same weights (drawn from
    ``seed``). Frozen and small: it pickles into every task, and worker processes
    reuse the model they built for an equal selector.
    """

    in_shape: tuple[int, ...]
    num_classes: int
    seed: int = 0

    def select_model(self, model_name: str) -> nn.Module:
        return create_model(model_name, self.in_shape, self.num_classes, seed=self.seed)


# ------------------------------------------------------------------------ running


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


def _tensor_bytes(obj: Any, depth: int = 0) -> int:
    """Bytes of tensor data in a package (dataclasses, dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if depth > 16:
        return 0
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_bytes(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v, depth + 1) for v in obj)
    return 0


def _partition(config: SimulationConfig, data: Dataset) -> Partition:
    name = config.partition_name
    labels = data.train_y
    if name == "natural":
        if data.partition is None:
            raise ConfigError(f"dataset {config.dataset_key!r} has no built-in client split")
        return data.partition
    try:
        if name == "iid":
            return iid_partition(labels, config.clients, seed=config.seed)
        if name == "dirichlet":
            return dirichlet_partition(labels, config.clients, config.alpha, seed=config.seed)
        if name == "shards":
            return shards_partition(
                labels, config.clients, config.shards_per_client, seed=config.seed
            )
        return quantity_partition(labels, config.clients, config.sigma, seed=config.seed)
    except ValueError as exc:
        raise ConfigError(f"cannot partition {config.dataset_key}: {exc}") from exc


def write_store(
    root: str | os.PathLike[str], data: Dataset, partition: Partition, *, overwrite: bool = False
) -> StorePartitionedDataset:
    """Write ``data`` (splits ``train`` and ``test``) and the clients' ``partition`` of its
    training split to a dataset store at ``root``; returns the store as a
    :class:`~emberfl.core.PartitionedDataset` whose samples come out normalised.
    """
    DatasetStore.create(
        root,
        {"train": (data.train_x, data.train_y), "test": (data.test_x, data.test_y)},
        {"train": partition},
        mean=data.mean,
        std=data.std,
        scale=1.0,  # a Dataset keeps mean/std in the units of the stored values
        overwrite=overwrite,
    )
    return StorePartitionedDataset(root)


class Simulation:
    """One run: :meth:`prepare` builds everything, :meth:`run_round` runs a round.

    Use it as a context manager (or call :meth:`close`): that stops the worker
    processes and removes the temporary dataset store. :meth:`prepare` raises
    :class:`ConfigError` or :class:`~emberfl.data.DatasetError` for bad settings and
    missing data before anything has run.

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

    @classmethod
    def for_resume(cls, run_dir: str | os.PathLike[str], **settings: Any) -> Simulation:
        """A simulation that continues the run in ``run_dir`` from its last checkpoint.

        The configuration is the run's ``config.json``; ``settings`` may change only
        :data:`RESUME_SETTINGS`. Without any checkpoint the run starts over.
        """
        directory = Path(run_dir)
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{directory} is not a run directory: it has no {CONFIG_FILE}")
        values = load_config_file(path)
        values.pop("emberfl_version", None)
        values.pop("out", None)
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
        """Load and partition the data, write the store, build handler and trainer."""
        if self.handler is not None:
            return
        config = self.config
        if self.resume:
            _remove_leftovers(self.run_dir)
        else:
            for name in (MODEL_FILE, METRICS_FILE, LATEST_FILE):
                if (self.run_dir / name).exists():
                    raise ConfigError(
                        f"{self.run_dir} already holds a run ({name}); choose another output "
                        "directory, or resume it"
                    )
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self._made_run_dir = True
        # The scratch directory (dataset store, round files) lives in the run directory,
        # so that whatever a killed run leaves behind is found and removed on resume.
        self._work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=self.run_dir))
        if config.runtime == "process" and config.workers > 0:
            # Built first so that its worker processes start (a fresh interpreter
            # importing torch takes seconds) while this process loads the data; the
            # model selector and the dataset, which only tasks read, are bound below.
            self.trainer = self._make_trainer(None, None)
        data_options: dict[str, Any] = {}
        if config.dataset_key == "synthetic":
            data_options = {
                "alpha": config.synthetic_alpha,
                "beta": config.synthetic_beta,
                "num_clients": config.clients,
            }
        data = load_dataset(config.dataset_key, config.data_dir, config.seed, **data_options)
        partition = _partition(config, data)
        if partition.num_clients != config.clients:
            raise ConfigError(
                f"the partition has {partition.num_clients} clients, expected {config.clients}"
            )
        self.data, self.partition = data, partition

        dataset = write_store(self._work / "data", data, partition)
        selector = ZooModelSelector(tuple(data.in_shape), data.num_classes, config.seed)
        self.handler = self._make_handler(selector, dataset)
        if self.trainer is None:
            self.trainer = self._make_trainer(selector, dataset)
        else:
            self.trainer.model_selector = selector
            self.trainer.dataset = dataset
        # Uplinks are folded into the server's sums as they arrive, so a round holds a
        # few of them at a time, however many clients it has.
        self.trainer.on_uplink = self.handler.fold_uplink
        if self.resume:
            self._restore()
        self._write_config()
        self._writer = MetricsWriter(self.run_dir, resume=self.resume)
        self._made_run_dir = False

    def _restore(self) -> None:
        """Bring the run directory, handler and trainer back to the last checkpoint."""
        assert self.handler is not None
        checkpoint = latest_checkpoint(self.run_dir)
        state_dir = self.run_dir / STATE_DIR
        metrics = self.run_dir / METRICS_FILE
        if checkpoint is None:
            logger.info("%s has no checkpoint: the run starts over", self.run_dir)
            for path in (metrics, self.run_dir / MODEL_FILE):
                path.unlink(missing_ok=True)
            if state_dir.exists():
                _replace_dir(state_dir, None)
            return
        manifest = _read_manifest(checkpoint)
        if manifest.get("algorithm") != self.config.algorithm:
            raise CheckpointError(
                f"{checkpoint} was written by a {manifest.get('algorithm')!r} run, "
                f"not {self.config.algorithm!r}"
            )
        state = _load_server_state(checkpoint)
        try:
            self.handler.load_checkpoint_state(state)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(
                f"{checkpoint / SERVER_FILE} does not fit this run: {exc}"
            ) from exc
        round_ = self.handler.round
        if "rounds_run" in dir(type(self.trainer)):
            self.trainer.rounds_run = round_
        else:
            self.trainer.round = round_
        saved_metrics = checkpoint / METRICS_FILE
        if saved_metrics.is_file():
            _copy_durable(saved_metrics, metrics)
        else:
            metrics.unlink(missing_ok=True)
        saved_state = checkpoint / STATE_DIR
        if saved_state.is_dir() or state_dir.exists():
            _replace_dir(state_dir, saved_state if saved_state.is_dir() else None)
        # A final model from a later round than the checkpoint is rewritten at the end.
        (self.run_dir / MODEL_FILE).unlink(missing_ok=True)
        self.resumed_from = round_
        logger.info("resuming %s from round %d", self.run_dir, round_)

    def _write_config(self) -> None:
        config = self.config
        resolved = config.to_dict()
        resolved.update(
            model=config.model_name,
            partition=config.partition_name,
            out=str(self.run_dir),
            emberfl_version=__version__,
        )
        tmp = self.run_dir / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.run_dir / CONFIG_FILE)

    def _make_handler(
        self, selector: ZooModelSelector, dataset: StorePartitionedDataset
    ) -> FedAvgBaseServerHandler:
        config = self.config
        args = (
            selector,
            config.model_name,
            dataset,
            config.rounds,
            config.clients,
            config.sample_ratio,
            config.device,
            config.eval_batch_size,
            config.seed,
        )
        common: dict[str, Any] = {"nonfinite": config.nonfinite}
        algorithm = config.algorithm
        if algorithm in ("fedadam", "fedyogi", "fedadagrad"):
            cls = {
                "fedadam": FedAdamServerHandler,
                "fedyogi": FedYogiServerHandler,
                "fedadagrad": FedAdagradServerHandler,
            }[algorithm]
            return cls(
                *args,
                server_lr=config.server_lr,
                beta1=config.beta1,
                beta2=config.beta2,
                tau=config.tau,
                **common,
            )
        if algorithm == "scaffold":
            return ScaffoldServerHandler(*args, **common)
        if algorithm == "fedprox":
            return FedProxBaseServerHandler(*args, **common)
        return FedAvgBaseServerHandler(*args, **common)

    def _make_trainer(
        self, selector: ZooModelSelector | None, dataset: StorePartitionedDataset | None
    ) -> Any:
        config = self.config
        assert self._work is not None
        state_dir = (
            self.run_dir / STATE_DIR if config.algorithm == "scaffold" else self._work / STATE_DIR
        )
        extra: dict[str, Any] = {"progress": config.progress}
        if config.algorithm == "fedprox":
            extra["mu"] = config.mu
        family = {"fedprox": "fedprox", "scaffold": "scaffold"}.get(config.algorithm, "fedavg")
        classes: dict[str, tuple[Any, Any, Any]] = {
            "fedavg": (
                FedAvgProcessPoolClientTrainer,
                FedAvgThreadPoolClientTrainer,
                FedAvgBaseClientTrainer,
            ),
            "fedprox": (
                FedProxProcessPoolClientTrainer,
                FedProxThreadPoolClientTrainer,
                FedProxBaseClientTrainer,
            ),
            "scaffold": (
                ScaffoldProcessPoolClientTrainer,
                ScaffoldThreadPoolClientTrainer,
                ScaffoldBaseClientTrainer,
            ),
        }
        process_cls, thread_cls, serial_cls = classes[family]
        common = (config.device, config.clients, config.epochs, config.batch_size, config.lr)
        name = config.model_name
        if config.runtime == "process":
            return process_cls(
                selector,
                name,
                state_dir,
                dataset,
                *common,
                config.seed,
                config.workers,
                share_dir=self._work,
                torch_threads=config.threads_per_worker,
                **extra,
            )
        if config.runtime == "thread":
            return thread_cls(
                selector,
                name,
                dataset,
                *common,
                config.seed,
                config.workers,
                state_dir=state_dir,
                **extra,
            )
        return serial_cls(
            selector, name, dataset, *common, config.seed, state_dir=state_dir, **extra
        )

    # -- rounds ----------------------------------------------------------------------

    def _set_threads(self) -> None:
        # This process (evaluation, and the clients themselves in the thread and serial
        # runtimes) gets the same share of the CPUs as each worker process, so that
        # small ops do not oversubscribe them.
        if self._threads is None:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(self.config.threads_per_worker)

    def _restore_threads(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None

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
        bytes_down = _tensor_bytes(payload) * len(cids)
        bytes_up = sum(_tensor_bytes(p) for p in uplinks)
        seconds = [(p.metadata or {}).get("train_seconds", math.nan) for p in uplinks]
        losses = [((p.metadata or {}).get("loss", math.nan), p.data_size) for p in uplinks]
        for package in uplinks:
            handler.load(package)
        del payload, uplinks  # drops the mappings of this round's files
        index = handler.round
        last = handler.is_stopped()
        if index % self.config.eval_every != 0 and not last:
            self._maybe_checkpoint()
            return None
        summary = handler.get_summary()
        weight = sum(n for _, n in losses)
        train_loss = sum(loss * n for loss, n in losses) / weight if weight > 0 else math.nan
        metrics = RoundMetrics(
            round=index,
            accuracy=summary["server_acc"],
            loss=summary["server_loss"],
            round_seconds=time.perf_counter() - start,
            client_train_seconds_mean=sum(seconds) / len(seconds) if seconds else 0.0,
            client_train_seconds_max=max(seconds) if seconds else 0.0,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            num_clients=len(cids),
            extra={"train_loss": train_loss, "dropped": float(len(handler.dropped))},
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

        See the module docstring for the layout and the order of the writes. The
        previous checkpoint is removed only once the new one is complete and named.
        """
        handler = self.handler
        assert handler is not None, "prepare() has not run"
        round_ = handler.round
        name = f"{CHECKPOINT_PREFIX}{round_}"
        final = self.run_dir / name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.run_dir))
        try:
            store.save(
                tmp / SERVER_FILE,
                handler.checkpoint_state(),
                metadata={"algorithm": self.config.algorithm, "round": str(round_)},
                durable=True,
            )
            metrics = self.run_dir / METRICS_FILE
            if metrics.is_file():
                # Rows are flushed as they are written: the file holds every row so far.
                shutil.copyfile(metrics, tmp / METRICS_FILE)
                _fsync(tmp / METRICS_FILE)
            state_dir = self.run_dir / STATE_DIR
            if state_dir.is_dir():
                _link_state_files(state_dir, tmp / STATE_DIR)
            manifest = {
                "format": CHECKPOINT_FORMAT,
                "round": round_,
                "rounds": self.config.rounds,
                "algorithm": self.config.algorithm,
                "seed": self.config.seed,
                "emberfl_version": __version__,
            }
            _write_durable(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
            _fsync(tmp, directory=True)
            self._hook("written", round_)
            if final.exists():
                # Left by a run killed before it named this checkpoint: never current.
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(self.run_dir, directory=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._hook("renamed", round_)
        _write_durable(self.run_dir / LATEST_FILE, name + "\n")
        for entry in os.scandir(self.run_dir):
            if entry.name != name and _CHECKPOINT_RE.fullmatch(entry.name) and entry.is_dir():
                shutil.rmtree(entry.path, ignore_errors=True)
        self._hook("done", round_)
        return final

    def _hook(self, stage: str, round_: int) -> None:
        if self.checkpoint_hook is not None:
            self.checkpoint_hook(stage, round_)

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
        for metrics in self.rounds():
            result.metrics.append(metrics)
            if on_round is not None:
                on_round(metrics)
        self.save_model()
        result.seconds = time.perf_counter() - start
        return result

    # -- clean-up --------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers, close the metrics file and remove the temporary files."""
        try:
            trainer = self.trainer
            self.trainer = None
            close = getattr(trainer, "close", None)
            if callable(close):
                close()
        finally:
            self._restore_threads()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._work is not None:
                shutil.rmtree(self._work, ignore_errors=True)
                self._work = None
            if self._made_run_dir:
                # prepare() failed: leave no empty run directory behind.
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
        self.close()


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


# ------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointInfo:
    """A loaded checkpoint: its directory, round, manifest and server state tensors."""

    path: Path
    round: int
    manifest: dict[str, Any]
    state: dict[str, torch.Tensor]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint directory ``<run_dir>/latest`` names, or ``None`` when there is none.

    Raises :class:`CheckpointError` when ``latest`` names a missing or incomplete one.
    """
    directory = Path(run_dir)
    pointer = directory / LATEST_FILE
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if _CHECKPOINT_RE.fullmatch(name) is None:
        raise CheckpointError(f"{pointer} does not name a checkpoint: {name[:80]!r}")
    path = directory / name
    if not (path / MANIFEST_FILE).is_file():
        raise CheckpointError(f"{pointer} names {path}, which is missing or incomplete")
    return path


def load_checkpoint(run_dir: str | os.PathLike[str]) -> CheckpointInfo:
    """Read and check the last checkpoint of ``run_dir`` (see :func:`latest_checkpoint`)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{Path(run_dir) / LATEST_FILE} does not exist: no checkpoint")
    manifest = _read_manifest(path)
    state = _load_server_state(path)
    saved = state.get("round")
    if saved is None or saved.numel() != 1 or int(saved.item()) != manifest.get("round"):
        raise CheckpointError(f"{path}: the round of {SERVER_FILE} and {MANIFEST_FILE} differ")
    return CheckpointInfo(path=path, round=int(manifest["round"]), manifest=manifest, state=state)


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file} is not a format-{CHECKPOINT_FORMAT} checkpoint manifest")
    if not isinstance(manifest.get("round"), int):
        raise CheckpointError(f"{file} has no round")
    return manifest


def _load_server_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return store.load(path / SERVER_FILE)
    except (OSError, store.StoreError) as exc:
        raise CheckpointError(f"cannot load {path / SERVER_FILE}: {exc}") from exc


def _fsync(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temp file, fsync, rename, fsync of the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)


def _copy_durable(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        _fsync(Path(tmp))
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(dst.parent, directory=True)


def _link_state_files(src: Path, dst: Path) -> None:
    """Hard-link (or, across file systems, copy) the client state files of ``src``."""
    dst.mkdir()
    for entry in os.scandir(src):
        if _STATE_FILE_RE.fullmatch(entry.name) is None or not entry.is_file():
            continue  # e.g. the temporary file of a write in progress
        target = dst / entry.name
        try:
            os.link(entry.path, target)
        except OSError:
            shutil.copyfile(entry.path, target)
        _fsync(target)
    _fsync(dst, directory=True)


def _replace_dir(target: Path, source: Path | None) -> None:
    """Make ``target`` a copy (hard links) of the state files in ``source``, or empty."""
    fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        if source is not None:
            fresh.rmdir()
            _link_state_files(source, fresh)
        old = None
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=".tmp", dir=target.parent)
            )
            os.replace(target, old / target.name)
        os.rename(fresh, target)
        _fsync(target.parent, directory=True)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(run_dir: Path) -> None:
    """Delete what an interrupted run left in ``run_dir``: scratch directories,
    unfinished checkpoints and temporary files, and checkpoints ``latest`` does not name."""
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    current = latest_checkpoint(run_dir)
    for entry in os.scandir(run_dir):
        hidden_tmp = entry.name.startswith(".") and entry.name.endswith(".tmp")
        stale = (
            entry.name.startswith(WORK_PREFIX)
            or hidden_tmp
            or (
                _CHECKPOINT_RE.fullmatch(entry.name) is not None
                and (current is None or entry.name != current.name)
            )
        )
        if not stale:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
    state_dir = run_dir / STATE_DIR
    if state_dir.is_dir():
        for entry in os.scandir(state_dir):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                Path(entry.path).unlink(missing_ok=True)
