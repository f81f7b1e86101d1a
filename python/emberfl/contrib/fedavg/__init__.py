"""Federated Averaging (McMahan et al. 2017) with BlazeFL 3.0's class names.

The pieces, each an extension point for the other algorithms of this package:

* packages (:mod:`emberfl.core.model_packages`) -- :class:`FedAvgDownlinkPackage`
  (the global state vector) and :class:`FedAvgUplinkPackage` (a client's state
  vector, its number of samples and training metadata: ``loss``, ``steps``,
  ``train_seconds``);
* the client update (:mod:`emberfl.core.step`) -- :class:`FedAvgClientUpdate`,
  what one client does in a round. FedProx and SCAFFOLD subclass it through three
  hooks (``begin``, ``after_backward``, ``finish``); it is stateless, so one object
  serves every thread and pickles into worker processes. Its ``batched_step`` is
  the same step for the batched runtime (a :class:`BatchedClientStep`, whose hooks
  see a group of stacked clients);
* the server (:mod:`~emberfl.contrib.fedavg.server`) -- :class:`FedAvgBaseServerHandler`:
  sampling, aggregation (in an :class:`~emberfl.streaming.StreamingSum`, as a list or
  uplink by uplink while the round runs, bitwise the same) and evaluation;
* the client trainers, which are the runtimes (:mod:`emberfl.runtimes`) with BlazeFL's
  constructors: serial (:class:`FedAvgBaseClientTrainer`,
  :mod:`emberfl.runtimes.serial`), worker processes
  (:class:`FedAvgProcessPoolClientTrainer`, :mod:`emberfl.runtimes.process.steps`),
  threads (:class:`FedAvgThreadPoolClientTrainer`, :mod:`emberfl.runtimes.thread`) and
  batched (:class:`FedAvgBatchedClientTrainer`, :mod:`emberfl.runtimes.batched`),
  sharing one :class:`FedAvgTrainerSettings` (:mod:`emberfl.runtimes.settings`). The
  first three give bitwise identical uplinks for the same seed.

The packages, the client update and the trainers are defined in :mod:`emberfl.core`
and :mod:`emberfl.runtimes` and re-exported here.
"""

from emberfl.contrib.fedavg.server import FedAvgBaseServerHandler, NonFinitePolicy
from emberfl.core.model_packages import (
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgPartitionType,
    FedAvgUplinkPackage,
)
from emberfl.core.step import (
    BatchedClientStep,
    BatchedGroup,
    FedAvgClientUpdate,
    LocalRun,
)
from emberfl.runtimes.batched import FedAvgBatchedClientTrainer
from emberfl.runtimes.process.steps import FedAvgClientConfig, FedAvgProcessPoolClientTrainer
from emberfl.runtimes.serial import FedAvgBaseClientTrainer
from emberfl.runtimes.settings import FedAvgTrainerSettings
from emberfl.runtimes.thread import FedAvgThreadPoolClientTrainer

__all__ = [
    "BatchedClientStep",
    "BatchedGroup",
    "FedAvgBaseClientTrainer",
    "FedAvgBaseServerHandler",
    "FedAvgBatchedClientTrainer",
    "FedAvgClientConfig",
    "FedAvgClientUpdate",
    "FedAvgDownlinkPackage",
    "FedAvgPartitionType",
    "FedAvgPartitionedDataset",
    "FedAvgProcessPoolClientTrainer",
    "FedAvgThreadPoolClientTrainer",
    "FedAvgTrainerSettings",
    "FedAvgUplinkPackage",
    "LocalRun",
    "NonFinitePolicy",
]
