"""The framework's interfaces: BlazeFL 3.0's names, run on persistent mapped-file workers.

Server handlers, client trainers (serial, process pool, thread pool), model
selectors, partitioned datasets and the model/package helpers. Code written against
``blazefl.core`` runs after changing the import to ``emberfl.core``.

The parallel client trainers and :func:`available_cpus` live in :mod:`emberfl.runtimes`
(which builds on this package); they are re-exported here, imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from emberfl.core.client_trainer import BaseClientTrainer, deliver_uplink
from emberfl.core.context import ClientContext, client_scope, current_client
from emberfl.core.errors import ClientError, ClientTimeoutError, WorkerCrashedError
from emberfl.core.fold import FoldedRound, FoldTerm, UplinkFold
from emberfl.core.ipc import IPCMode, accept_ipc_mode
from emberfl.core.model_selector import ModelSelector
from emberfl.core.packages import PackageError, load_package, save_package
from emberfl.core.partitioned_dataset import FilteredDataset, PartitionedDataset
from emberfl.core.server_handler import BaseServerHandler
from emberfl.core.utils import (
    SHMHandle,
    deserialize_model,
    process_tensors_in_object,
    reconstruct_from_shared_memory,
    serialize_model,
)

if TYPE_CHECKING:
    from emberfl.runtimes.cpus import available_cpus
    from emberfl.runtimes.process.trainer import ProcessPoolClientTrainer
    from emberfl.runtimes.thread import ThreadPoolClientTrainer

__all__ = [
    "BaseClientTrainer",
    "BaseServerHandler",
    "ClientContext",
    "ClientError",
    "ClientTimeoutError",
    "FilteredDataset",
    "FoldTerm",
    "FoldedRound",
    "IPCMode",
    "ModelSelector",
    "PackageError",
    "PartitionedDataset",
    "ProcessPoolClientTrainer",
    "SHMHandle",
    "ThreadPoolClientTrainer",
    "UplinkFold",
    "WorkerCrashedError",
    "accept_ipc_mode",
    "available_cpus",
    "client_scope",
    "current_client",
    "deliver_uplink",
    "deserialize_model",
    "load_package",
    "process_tensors_in_object",
    "reconstruct_from_shared_memory",
    "save_package",
    "serialize_model",
]

# Re-exported from emberfl.runtimes, which imports this package: imported on first
# access (PEP 562), so that neither package needs the other to finish importing first.
_RUNTIME_EXPORTS = {
    "ProcessPoolClientTrainer": "emberfl.runtimes.process.trainer",
    "ThreadPoolClientTrainer": "emberfl.runtimes.thread",
    "available_cpus": "emberfl.runtimes.cpus",
}


def __getattr__(name: str) -> Any:
    module = _RUNTIME_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
