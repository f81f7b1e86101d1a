"""The framework's interfaces: BlazeFL 3.0's names, run on persistent mapped-file workers.

Server handlers, client trainers (serial, process pool, thread pool), model
selectors, partitioned datasets and the model/package helpers. Code written against
``blazefl.core`` runs after changing the import to ``emberfl.core``.
"""

from emberfl.core.client_trainer import BaseClientTrainer, deliver_uplink
from emberfl.core.context import ClientContext, client_scope, current_client
from emberfl.core.errors import ClientError, ClientTimeoutError, WorkerCrashedError
from emberfl.core.fold import FoldedRound, FoldTerm, UplinkFold
from emberfl.core.ipc import IPCMode, accept_ipc_mode
from emberfl.core.model_selector import ModelSelector
from emberfl.core.packages import PackageError, load_package, save_package
from emberfl.core.partitioned_dataset import FilteredDataset, PartitionedDataset
from emberfl.core.process_pool import ProcessPoolClientTrainer
from emberfl.core.runtime import available_cpus
from emberfl.core.server_handler import BaseServerHandler
from emberfl.core.thread_pool import ThreadPoolClientTrainer
from emberfl.core.utils import (
    SHMHandle,
    deserialize_model,
    process_tensors_in_object,
    reconstruct_from_shared_memory,
    serialize_model,
)

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
