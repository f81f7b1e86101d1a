"""Federated-learning algorithms built on :mod:`emberfl.core`.

* FedAvg (McMahan et al. 2017) with BlazeFL 3.0's names: :mod:`emberfl.contrib.fedavg`
* FedProx (Li et al. 2020): :mod:`emberfl.contrib.fedprox`
* SCAFFOLD (Karimireddy et al. 2020): :mod:`emberfl.contrib.scaffold`
* FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021): :mod:`emberfl.contrib.fedopt`

Every algorithm is one module declaring an :class:`~emberfl.contrib.algorithm.Algorithm`
(client step, server rule, settings) and one line in :mod:`emberfl.contrib.registry`;
every runtime runs every client step. FedOpt's clients are FedAvg's. Code written
against ``blazefl.contrib`` runs after changing the import to ``emberfl.contrib``
(BlazeFL's per-algorithm trainer names: :mod:`emberfl.contrib.trainer_names`).
"""

from emberfl.contrib.algorithm import Algorithm
from emberfl.contrib.fedavg import (
    BatchedClientStep,
    BatchedGroup,
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgBatchedClientTrainer,
    FedAvgClientConfig,
    FedAvgClientUpdate,
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgPartitionType,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
    FedAvgTrainerSettings,
    FedAvgUplinkPackage,
    LocalRun,
    NonFinitePolicy,
)
from emberfl.contrib.fedopt import (
    FedAdagradServerHandler,
    FedAdamServerHandler,
    FedOptServerHandler,
    FedYogiServerHandler,
)
from emberfl.contrib.fedprox import FedProxBaseServerHandler, FedProxClientUpdate
from emberfl.contrib.registry import (
    ALGORITHM_SPECS,
    ALGORITHMS,
    algorithm_spec,
    make_client_trainer,
    make_server_handler,
)
from emberfl.contrib.scaffold import (
    ScaffoldClientUpdate,
    ScaffoldDownlinkPackage,
    ScaffoldServerHandler,
    ScaffoldUplinkPackage,
)
from emberfl.contrib.trainer_names import (
    FedProxBaseClientTrainer,
    FedProxBatchedClientTrainer,
    FedProxProcessPoolClientTrainer,
    FedProxThreadPoolClientTrainer,
    ScaffoldBaseClientTrainer,
    ScaffoldBatchedClientTrainer,
    ScaffoldProcessPoolClientTrainer,
    ScaffoldThreadPoolClientTrainer,
)
from emberfl.core.client_state import ClientStateStore
from emberfl.core.layout import ParameterLayout
from emberfl.core.training import LocalTrainingResult, evaluate_loader, local_sgd, sgd_step

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_SPECS",
    "Algorithm",
    "BatchedClientStep",
    "BatchedGroup",
    "ClientStateStore",
    "FedAdagradServerHandler",
    "FedAdamServerHandler",
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
    "FedOptServerHandler",
    "FedProxBaseClientTrainer",
    "FedProxBaseServerHandler",
    "FedProxBatchedClientTrainer",
    "FedProxClientUpdate",
    "FedProxProcessPoolClientTrainer",
    "FedProxThreadPoolClientTrainer",
    "FedYogiServerHandler",
    "LocalRun",
    "LocalTrainingResult",
    "NonFinitePolicy",
    "ParameterLayout",
    "ScaffoldBaseClientTrainer",
    "ScaffoldBatchedClientTrainer",
    "ScaffoldClientUpdate",
    "ScaffoldDownlinkPackage",
    "ScaffoldProcessPoolClientTrainer",
    "ScaffoldServerHandler",
    "ScaffoldThreadPoolClientTrainer",
    "ScaffoldUplinkPackage",
    "algorithm_spec",
    "evaluate_loader",
    "local_sgd",
    "make_client_trainer",
    "make_server_handler",
    "sgd_step",
]
