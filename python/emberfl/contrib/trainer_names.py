"""BlazeFL's per-algorithm trainer names, as thin aliases of the runtimes.

An algorithm is a client step that every runtime runs (``client_update=``), so
``FedProxProcessPoolClientTrainer(...)`` is the process-pool runtime with FedProx's
step. BlazeFL code and scripts name such classes; each one here is the runtime's
class with BlazeFL's arguments, plus the algorithm's own keywords (FedProx's ``mu``),
building the step from them. New algorithms need no entry here: pass their step as
``client_update`` to any runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from emberfl.contrib.fedavg import (
    FedAvgBaseClientTrainer,
    FedAvgBatchedClientTrainer,
    FedAvgClientUpdate,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
)
from emberfl.contrib.fedprox import FedProxClientUpdate
from emberfl.contrib.scaffold import ScaffoldClientUpdate

__all__ = [
    "FedProxBaseClientTrainer",
    "FedProxBatchedClientTrainer",
    "FedProxProcessPoolClientTrainer",
    "FedProxThreadPoolClientTrainer",
    "ScaffoldBaseClientTrainer",
    "ScaffoldBatchedClientTrainer",
    "ScaffoldProcessPoolClientTrainer",
    "ScaffoldThreadPoolClientTrainer",
]

_R = TypeVar("_R")

_RUNTIMES: dict[str, tuple[type[Any], str]] = {
    "Base": (FedAvgBaseClientTrainer, "one after another in this process"),
    "ProcessPool": (FedAvgProcessPoolClientTrainer, "in worker processes"),
    "ThreadPool": (FedAvgThreadPoolClientTrainer, "in worker threads"),
    "Batched": (FedAvgBatchedClientTrainer, "trained in batched groups"),
}


def _alias(
    runtime: type[_R],
    algorithm: str,
    step: Callable[..., FedAvgClientUpdate],
    options: dict[str, float],
    *,
    state_dir_needed: str | None = None,
) -> type[_R]:
    """``runtime`` taking ``options`` (keyword, with defaults) to build ``step``; the
    options become attributes, as on BlazeFL's trainers. ``state_dir_needed``: the
    reason the keyword ``state_dir`` is required (the process pool takes it anyway)."""
    kind = next(k for k, (cls, _) in _RUNTIMES.items() if cls is runtime)
    name = f"{algorithm}{kind}ClientTrainer"
    where = _RUNTIMES[kind][1]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        values = {key: float(kwargs.pop(key, default)) for key, default in options.items()}
        if state_dir_needed is not None and kwargs.get("state_dir") is None:
            raise ValueError(f"{name} needs state_dir: {state_dir_needed}")
        base: Any = runtime
        base.__init__(self, *args, client_update=step(**values), **kwargs)
        for key, value in values.items():
            setattr(self, key, value)

    extras = "".join(f" plus ``{k}`` (default {v})" for k, v in options.items())
    namespace = {
        "__init__": __init__,
        "__doc__": f"{algorithm} clients {where}: {runtime.__name__}'s arguments{extras}.",
        "__module__": __name__,
        "__qualname__": name,
    }
    return type(name, (runtime,), namespace)


_FEDPROX = {"mu": 0.01}
_NEEDS_CONTROLS = "SCAFFOLD keeps each client's control variate on disk"

FedProxBaseClientTrainer = _alias(FedAvgBaseClientTrainer, "FedProx", FedProxClientUpdate, _FEDPROX)
FedProxProcessPoolClientTrainer = _alias(
    FedAvgProcessPoolClientTrainer, "FedProx", FedProxClientUpdate, _FEDPROX
)
FedProxThreadPoolClientTrainer = _alias(
    FedAvgThreadPoolClientTrainer, "FedProx", FedProxClientUpdate, _FEDPROX
)
FedProxBatchedClientTrainer = _alias(
    FedAvgBatchedClientTrainer, "FedProx", FedProxClientUpdate, _FEDPROX
)
ScaffoldBaseClientTrainer = _alias(
    FedAvgBaseClientTrainer, "Scaffold", ScaffoldClientUpdate, {}, state_dir_needed=_NEEDS_CONTROLS
)
ScaffoldProcessPoolClientTrainer = _alias(
    FedAvgProcessPoolClientTrainer, "Scaffold", ScaffoldClientUpdate, {}
)
ScaffoldThreadPoolClientTrainer = _alias(
    FedAvgThreadPoolClientTrainer,
    "Scaffold",
    ScaffoldClientUpdate,
    {},
    state_dir_needed=_NEEDS_CONTROLS,
)
ScaffoldBatchedClientTrainer = _alias(
    FedAvgBatchedClientTrainer,
    "Scaffold",
    ScaffoldClientUpdate,
    {},
    state_dir_needed=_NEEDS_CONTROLS,
)
