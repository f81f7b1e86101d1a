"""The runtimes a run can name, each a builder of a client trainer around any client step.

A runtime is one entry of :data:`RUNTIME_BUILDERS`: a function that makes a trainer of
the BlazeFL family (BlazeFL's constructor arguments, read from the run's settings)
running the request's client step. No runtime knows any algorithm: an algorithm is
its client step (:class:`~emberfl.core.step.FedAvgClientUpdate`), which every runtime
takes as ``client_update``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from emberfl.core.model_packages import FedAvgPartitionedDataset
from emberfl.core.model_selector import ModelSelector
from emberfl.core.step import FedAvgClientUpdate
from emberfl.runtimes.batched import FedAvgBatchedClientTrainer
from emberfl.runtimes.process.steps import FedAvgProcessPoolClientTrainer
from emberfl.runtimes.serial import FedAvgBaseClientTrainer
from emberfl.runtimes.thread import FedAvgThreadPoolClientTrainer

__all__ = [
    "RUNTIMES",
    "RUNTIME_BUILDERS",
    "TrainerRequest",
    "TrainerSettings",
    "make_trainer",
]


class TrainerSettings(Protocol):
    """The settings of a run that building a client trainer reads."""

    @property
    def model_name(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def clients(self) -> int: ...
    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def workers_per_rank(self) -> int: ...
    @property
    def threads(self) -> int: ...
    @property
    def batch_clients(self) -> int: ...
    @property
    def progress(self) -> bool: ...


@dataclass(frozen=True)
class TrainerRequest:
    """What a runtime builder gets: the run's settings, the algorithm's client step,
    where per-client state goes (``state_dir``) and where the process pool writes its
    round files (``share_dir``). ``selector`` and ``dataset`` may be ``None`` for the
    process pool, which then starts its workers while the caller loads the data and
    has them set before its first round."""

    settings: TrainerSettings
    step: FedAvgClientUpdate
    selector: ModelSelector[Any] | None
    dataset: FedAvgPartitionedDataset | None
    state_dir: Path
    share_dir: Path | None = None


def _common(r: TrainerRequest) -> tuple[str, int, int, int, float, int]:
    s = r.settings
    return (s.device, s.clients, s.epochs, s.batch_size, s.lr, s.seed)


# The trainers take the selector and dataset as BlazeFL does; both may be set later.


def _process(r: TrainerRequest) -> Any:
    s = r.settings
    return FedAvgProcessPoolClientTrainer(
        r.selector,  # type: ignore[arg-type]
        s.model_name,
        r.state_dir,
        r.dataset,  # type: ignore[arg-type]
        *_common(r),
        s.workers_per_rank,
        client_update=r.step,
        progress=s.progress,
        share_dir=r.share_dir,
        torch_threads=s.threads,
    )


def _thread(r: TrainerRequest) -> Any:
    s = r.settings
    return FedAvgThreadPoolClientTrainer(
        r.selector,  # type: ignore[arg-type]
        s.model_name,
        r.dataset,  # type: ignore[arg-type]
        *_common(r),
        s.workers_per_rank,
        state_dir=r.state_dir,
        client_update=r.step,
        progress=s.progress,
    )


def _serial(r: TrainerRequest) -> Any:
    s = r.settings
    return FedAvgBaseClientTrainer(
        r.selector,  # type: ignore[arg-type]
        s.model_name,
        r.dataset,  # type: ignore[arg-type]
        *_common(r),
        state_dir=r.state_dir,
        client_update=r.step,
        progress=s.progress,
    )


def _batched(r: TrainerRequest) -> Any:
    s = r.settings
    return FedAvgBatchedClientTrainer(
        r.selector,  # type: ignore[arg-type]
        s.model_name,
        r.dataset,  # type: ignore[arg-type]
        *_common(r),
        batch_clients=s.batch_clients,
        state_dir=r.state_dir,
        client_update=r.step,
        progress=s.progress,
    )


#: Where the clients of a round run, by ``--runtime`` name: worker processes, threads,
#: serially, or in batched groups of clients trained as one model (client steps with a
#: batched form only; the others are refused with the reason).
RUNTIME_BUILDERS: Mapping[str, Callable[[TrainerRequest], Any]] = MappingProxyType(
    {"process": _process, "thread": _thread, "serial": _serial, "batched": _batched}
)

#: The runtime names (``--runtime`` choices).
RUNTIMES: tuple[str, ...] = tuple(RUNTIME_BUILDERS)


def make_trainer(runtime: str, request: TrainerRequest) -> Any:
    """The client trainer of ``runtime`` for ``request``; ``ValueError`` naming the
    choices when ``runtime`` is unknown."""
    build = RUNTIME_BUILDERS.get(runtime)
    if build is None:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    return build(request)
