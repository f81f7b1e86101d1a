"""Federated Averaging (McMahan et al. 2017) with BlazeFL 3.0's class names.

The pieces, each an extension point for the other algorithms of this package:

* packages (:mod:`~emberfl.contrib.fedavg.packages`) -- :class:`FedAvgDownlinkPackage`
  (the global state vector) and :class:`FedAvgUplinkPackage` (a client's state
  vector, its number of samples and training metadata: ``loss``, ``steps``,
  ``train_seconds``);
* the client update (:mod:`~emberfl.contrib.fedavg.update`) -- :class:`FedAvgClientUpdate`,
  what one client does in a round. FedProx and SCAFFOLD subclass it through three
  hooks (``begin``, ``after_backward``, ``finish``); it is stateless, so one object
  serves every thread and pickles into worker processes. Its ``batched_step`` is
  the same step for the batched runtime (a :class:`BatchedClientStep`, whose hooks
  see a group of stacked clients);
* the server (:mod:`~emberfl.contrib.fedavg.server`) -- :class:`FedAvgBaseServerHandler`:
  sampling, aggregation (in an :class:`~emberfl.streaming.StreamingSum`, as a list or
  uplink by uplink while the round runs, bitwise the same) and evaluation;
* the client trainers (:mod:`~emberfl.contrib.fedavg.trainers`) with BlazeFL's
  constructors: serial (:class:`FedAvgBaseClientTrainer`), worker processes
  (:class:`FedAvgProcessPoolClientTrainer`) and threads
  (:class:`FedAvgThreadPoolClientTrainer`), sharing one
  :class:`FedAvgTrainerSettings`. All three give bitwise identical uplinks for the
  same seed.
"""

from emberfl.contrib.fedavg.batched import FedAvgBatchedClientTrainer
from emberfl.contrib.fedavg.packages import (
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgPartitionType,
    FedAvgUplinkPackage,
)
from emberfl.contrib.fedavg.server import FedAvgBaseServerHandler, NonFinitePolicy
from emberfl.contrib.fedavg.settings import FedAvgTrainerSettings
from emberfl.contrib.fedavg.trainers import (
    FedAvgBaseClientTrainer,
    FedAvgClientConfig,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
)
from emberfl.contrib.fedavg.update import (
    BatchedClientStep,
    BatchedGroup,
    FedAvgClientUpdate,
    LocalRun,
)

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
