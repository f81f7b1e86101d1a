"""The algorithms a run can name, and how to build its server and clients.

Each algorithm is an :class:`~emberfl.contrib.algorithm.Algorithm` declared in its
own module (client step, server rule, settings); adding one to ``emberfl run`` is
adding its entry to :data:`_ENTRIES`. The clients run in any runtime of
:mod:`emberfl.runtimes.registry`, which takes the algorithm's client step as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from emberfl.contrib.algorithm import FEDAVG, Algorithm, RunSettings
from emberfl.contrib.ditto import DITTO
from emberfl.contrib.fedavg import FedAvgBaseServerHandler, FedAvgPartitionedDataset
from emberfl.contrib.feddyn import FEDDYN
from emberfl.contrib.fednova import FEDNOVA
from emberfl.contrib.fedopt import FEDADAGRAD, FEDADAM, FEDYOGI
from emberfl.contrib.fedprox import FEDPROX
from emberfl.contrib.privacy.settings import (
    PRIVACY_SETTINGS,
    check_privacy,
    private_client_step,
    server_privacy,
)
from emberfl.contrib.scaffold import SCAFFOLD
from emberfl.core import ModelSelector
from emberfl.core.setting import Setting
from emberfl.runtimes.registry import TrainerRequest, make_trainer

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_SETTINGS",
    "ALGORITHM_SPECS",
    "BATCHED_ALGORITHMS",
    "algorithm_spec",
    "check_run_privacy",
    "make_client_trainer",
    "make_server_handler",
]

# One line per algorithm, in the order the command line lists them.
_ENTRIES: tuple[Algorithm, ...] = (
    FEDAVG,
    FEDPROX,
    SCAFFOLD,
    FEDADAM,
    FEDYOGI,
    FEDADAGRAD,
    FEDDYN,
    FEDNOVA,
    DITTO,
)

#: Every algorithm by name.
ALGORITHM_SPECS: Mapping[str, Algorithm] = MappingProxyType({a.name: a for a in _ENTRIES})

#: The algorithm names (``--algorithm`` choices).
ALGORITHMS: tuple[str, ...] = tuple(ALGORITHM_SPECS)


def _settings_of(entries: tuple[Algorithm, ...]) -> tuple[Setting, ...]:
    """Every algorithm's settings, each once (algorithms may share one, as FedOpt's do);
    two different settings of one name are a declaration error."""
    found: dict[str, Setting] = {}
    for entry in entries:
        for setting in entry.settings:
            other = found.setdefault(setting.name, setting)
            if other is not setting:
                raise AssertionError(f"two algorithms declare different settings {setting.name!r}")
    return tuple(found.values())


#: The settings of every algorithm and of differential privacy (config keys and
#: ``emberfl run`` flags).
ALGORITHM_SETTINGS: tuple[Setting, ...] = (*_settings_of(_ENTRIES), *PRIVACY_SETTINGS)


def _batched(entries: tuple[Algorithm, ...]) -> tuple[str, ...]:
    defaults = {s.name: s.default for s in ALGORITHM_SETTINGS}
    return tuple(a.name for a in entries if a.client(defaults).batched_step() is not None)


#: The algorithms whose client step has a batched form (``--runtime batched``), with
#: their settings' defaults.
BATCHED_ALGORITHMS: tuple[str, ...] = _batched(_ENTRIES)


def algorithm_spec(name: str) -> Algorithm:
    """The entry of algorithm ``name``; ``ValueError`` naming the choices if unknown."""
    spec = ALGORITHM_SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    return spec


def make_server_handler(
    algorithm: str,
    selector: ModelSelector[Any],
    dataset: FedAvgPartitionedDataset,
    settings: RunSettings,
) -> FedAvgBaseServerHandler:
    """The server handler of ``algorithm`` for a run with ``settings`` (with the server
    rule of its ``--dp`` mechanism, if any)."""
    handler = algorithm_spec(algorithm).server(selector, dataset, settings)
    handler.privacy = server_privacy(settings, dataset)
    return handler


def check_run_privacy(algorithm: str, settings: RunSettings) -> None:
    """``ValueError`` when the run's ``--dp`` settings cannot run with ``algorithm``."""
    check_privacy(settings, algorithm_spec(algorithm).client_dp, algorithm)


def make_client_trainer(
    algorithm: str,
    runtime: str,
    selector: ModelSelector[Any] | None,
    dataset: FedAvgPartitionedDataset | None,
    settings: RunSettings,
    *,
    state_dir: Path,
    share_dir: Path | None = None,
) -> Any:
    """The client trainer of ``runtime`` (:mod:`emberfl.runtimes.registry`) running
    ``algorithm``'s client step."""
    step = private_client_step(algorithm_spec(algorithm).client(settings.options), settings.options)
    return make_trainer(
        runtime, TrainerRequest(settings, step, selector, dataset, state_dir, share_dir)
    )
