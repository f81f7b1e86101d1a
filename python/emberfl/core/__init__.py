"""The framework's interfaces: BlazeFL 3.0's names, run on persistent mapped-file workers.

Server handlers, client trainers (serial, process pool, thread pool), model
selectors, partitioned datasets and the model/package helpers. Code written against
``blazefl.core`` runs after changing the import to ``emberfl.core``.
"""

from emberfl.core.client_trainer import (
    BaseClientTrainer,
    ProcessPoolClientTrainer,
    ThreadPoolClientTrainer,
    deliver_uplink,
)
from emberfl.core.context import ClientContext, current_client
from emberfl.core.errors import ClientError, ClientTimeoutError, WorkerCrashedError
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

__all__ = [
    "BaseClientTrainer",
    "BaseServerHandler",
    "ClientContext",
    "ClientError",
    "ClientTimeoutError",
    "FilteredDataset",
    "ModelSelector",
    "PackageError",
    "PartitionedDataset",
    "ProcessPoolClientTrainer",
    "SHMHandle",
    "ThreadPoolClientTrainer",
    "WorkerCrashedError",
    "current_client",
    "deliver_uplink",
    "deserialize_model",
    "load_package",
    "process_tensors_in_object",
    "reconstruct_from_shared_memory",
    "save_package",
    "serialize_model",
]
