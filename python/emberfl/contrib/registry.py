"""The algorithms a run can name, and how to build each one's server and clients.

One :class:`AlgorithmSpec` per algorithm name says how to build its server handler
from a run's settings, which client trainer classes it uses in the ``process``,
``thread``, ``serial`` and (where it has one) ``batched`` runtimes (and which extra
keyword arguments they take), and whether it keeps per-client state on disk that
outlives a round (SCAFFOLD's control variates, which then belong in the run directory
and its checkpoints).
Adding an algorithm to ``emberfl run`` is adding one entry to :data:`ALGORITHM_SPECS`.

The settings are read through :class:`AlgorithmSettings`, a protocol that
``emberfl.simulation``'s configuration satisfies: this layer knows nothing of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, cast

from emberfl.contrib.fedavg import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgBatchedClientTrainer,
    FedAvgPartitionedDataset,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
    NonFinitePolicy,
)
from emberfl.contrib.fedopt import (
    FedAdagradServerHandler,
    FedAdamServerHandler,
    FedOptServerHandler,
    FedYogiServerHandler,
)
from emberfl.contrib.fedprox import (
    FedProxBaseClientTrainer,
    FedProxBaseServerHandler,
    FedProxBatchedClientTrainer,
    FedProxProcessPoolClientTrainer,
    FedProxThreadPoolClientTrainer,
)
from emberfl.contrib.scaffold import (
    ScaffoldBaseClientTrainer,
    ScaffoldBatchedClientTrainer,
    ScaffoldProcessPoolClientTrainer,
    ScaffoldServerHandler,
    ScaffoldThreadPoolClientTrainer,
)
from emberfl.core import ModelSelector

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_SPECS",
    "RUNTIMES",
    "AlgorithmSettings",
    "AlgorithmSpec",
    "TrainerClasses",
    "algorithm_spec",
    "make_client_trainer",
    "make_server_handler",
]

#: Where the clients of a round run: worker processes, threads, serially, or in batched
#: groups of clients trained as one model (FedAvg's, FedProx's and SCAFFOLD's client steps).
RUNTIMES: tuple[str, ...] = ("process", "thread", "serial", "batched")


class AlgorithmSettings(Protocol):
    """The settings of a run that building its server handler and trainer reads."""

    @property
    def model_name(self) -> str: ...
    @property
    def rounds(self) -> int: ...
    @property
    def clients(self) -> int: ...
    @property
    def sample_ratio(self) -> float: ...
    @property
    def device(self) -> str: ...
    @property
    def eval_batch_size(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def nonfinite(self) -> str: ...
    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def workers_per_rank(self) -> int: ...
    @property
    def threads(self) -> int: ...
    @property
    def batch_clients(self) -> int: ...
    @property
    def progress(self) -> bool: ...
    @property
    def mu(self) -> float: ...
    @property
    def server_lr(self) -> float: ...
    @property
    def beta1(self) -> float: ...
    @property
    def beta2(self) -> float: ...
    @property
    def tau(self) -> float: ...


#: Builds a server handler from (model selector, dataset, settings).
ServerFactory = Callable[
    [ModelSelector[Any], FedAvgPartitionedDataset, AlgorithmSettings], FedAvgBaseServerHandler
]


@dataclass(frozen=True)
class TrainerClasses:
    """The client trainer class of each runtime (constructed with BlazeFL's arguments)."""

    process: type[FedAvgProcessPoolClientTrainer]
    thread: type[FedAvgThreadPoolClientTrainer]
    serial: type[FedAvgBaseClientTrainer]
    batched: type[FedAvgBatchedClientTrainer] | None = None

    def for_runtime(self, runtime: str) -> type[Any]:
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
        cls: type[Any] | None = getattr(self, runtime)
        if cls is None:
            raise ValueError(
                f"this algorithm has no {runtime} runtime (its client step runs per client); "
                "choose process, thread or serial"
            )
        return cls


def _no_options(settings: AlgorithmSettings) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class AlgorithmSpec:
    """How to build one algorithm.

    ``server`` builds the server handler; ``trainers`` are the client trainer classes
    and ``client_options`` the extra keyword arguments they take, read from the
    settings. ``client_state_on_disk``: the clients keep state between rounds in
    files (under the trainer's ``state_dir``) that a checkpoint must keep.
    """

    name: str
    server: ServerFactory
    trainers: TrainerClasses
    client_options: Callable[[AlgorithmSettings], dict[str, Any]] = field(default=_no_options)
    client_state_on_disk: bool = False


def _server(cls: type[FedAvgBaseServerHandler]) -> ServerFactory:
    """A factory of ``cls`` with FedAvg's server arguments."""

    def build(
        selector: ModelSelector[Any], dataset: FedAvgPartitionedDataset, s: AlgorithmSettings
    ) -> FedAvgBaseServerHandler:
        return cls(*_server_args(selector, dataset, s), nonfinite=_nonfinite(s))

    return build


def _fedopt_server(cls: type[FedOptServerHandler]) -> ServerFactory:
    """A factory of the FedOpt server ``cls``: FedAvg's arguments plus its optimizer's."""

    def build(
        selector: ModelSelector[Any], dataset: FedAvgPartitionedDataset, s: AlgorithmSettings
    ) -> FedAvgBaseServerHandler:
        return cls(
            *_server_args(selector, dataset, s),
            server_lr=s.server_lr,
            beta1=s.beta1,
            beta2=s.beta2,
            tau=s.tau,
            nonfinite=_nonfinite(s),
        )

    return build


def _server_args(
    selector: ModelSelector[Any], dataset: FedAvgPartitionedDataset, s: AlgorithmSettings
) -> tuple[Any, ...]:
    return (
        selector,
        s.model_name,
        dataset,
        s.rounds,
        s.clients,
        s.sample_ratio,
        s.device,
        s.eval_batch_size,
        s.seed,
    )


def _nonfinite(s: AlgorithmSettings) -> NonFinitePolicy:
    # The handler checks the value and names it in its error.
    return cast("NonFinitePolicy", s.nonfinite)


_FEDAVG_TRAINERS = TrainerClasses(
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
    FedAvgBaseClientTrainer,
    FedAvgBatchedClientTrainer,
)

_SPECS: tuple[AlgorithmSpec, ...] = (
    AlgorithmSpec("fedavg", _server(FedAvgBaseServerHandler), _FEDAVG_TRAINERS),
    AlgorithmSpec(
        "fedprox",
        _server(FedProxBaseServerHandler),
        TrainerClasses(
            FedProxProcessPoolClientTrainer,
            FedProxThreadPoolClientTrainer,
            FedProxBaseClientTrainer,
            FedProxBatchedClientTrainer,
        ),
        client_options=lambda s: {"mu": s.mu},
    ),
    AlgorithmSpec(
        "scaffold",
        _server(ScaffoldServerHandler),
        TrainerClasses(
            ScaffoldProcessPoolClientTrainer,
            ScaffoldThreadPoolClientTrainer,
            ScaffoldBaseClientTrainer,
            ScaffoldBatchedClientTrainer,
        ),
        client_state_on_disk=True,
    ),
    # FedOpt changes only the server step; its clients are FedAvg's.
    AlgorithmSpec("fedadam", _fedopt_server(FedAdamServerHandler), _FEDAVG_TRAINERS),
    AlgorithmSpec("fedyogi", _fedopt_server(FedYogiServerHandler), _FEDAVG_TRAINERS),
    AlgorithmSpec("fedadagrad", _fedopt_server(FedAdagradServerHandler), _FEDAVG_TRAINERS),
)

#: Every algorithm by name, in the order the command line lists them.
ALGORITHM_SPECS: Mapping[str, AlgorithmSpec] = MappingProxyType({s.name: s for s in _SPECS})

#: The algorithm names (``--algorithm`` choices).
ALGORITHMS: tuple[str, ...] = tuple(ALGORITHM_SPECS)


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The entry of algorithm ``name``; ``ValueError`` naming the choices if unknown."""
    spec = ALGORITHM_SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    return spec


def make_server_handler(
    algorithm: str,
    selector: ModelSelector[Any],
    dataset: FedAvgPartitionedDataset,
    settings: AlgorithmSettings,
) -> FedAvgBaseServerHandler:
    """The server handler of ``algorithm`` for a run with ``settings``."""
    return algorithm_spec(algorithm).server(selector, dataset, settings)


def make_client_trainer(
    algorithm: str,
    runtime: str,
    selector: ModelSelector[Any] | None,
    dataset: FedAvgPartitionedDataset | None,
    settings: AlgorithmSettings,
    *,
    state_dir: Path,
    share_dir: Path | None = None,
) -> Any:
    """The client trainer of ``algorithm`` in ``runtime`` for a run with ``settings``.

    ``state_dir`` is where per-client state files go; ``share_dir`` where the process
    pool writes its round files. A process-pool trainer may get ``selector`` and
    ``dataset`` as ``None`` and have them set (as ``model_selector`` and ``dataset``)
    before its first round: its workers then start while the caller loads the data.
    """
    spec = algorithm_spec(algorithm)
    cls = spec.trainers.for_runtime(runtime)
    s = settings
    extra: dict[str, Any] = {"progress": s.progress, **spec.client_options(s)}
    common = (s.device, s.clients, s.epochs, s.batch_size, s.lr, s.seed)
    if runtime == "process":
        return cls(
            selector,
            s.model_name,
            state_dir,
            dataset,
            *common,
            s.workers_per_rank,
            share_dir=share_dir,
            torch_threads=s.threads,
            **extra,
        )
    if runtime == "thread":
        return cls(
            selector,
            s.model_name,
            dataset,
            *common,
            s.workers_per_rank,
            state_dir=state_dir,
            **extra,
        )
    if runtime == "batched":
        return cls(
            selector,
            s.model_name,
            dataset,
            *common,
            batch_clients=s.batch_clients,
            state_dir=state_dir,
            **extra,
        )
    return cls(selector, s.model_name, dataset, *common, state_dir=state_dir, **extra)
