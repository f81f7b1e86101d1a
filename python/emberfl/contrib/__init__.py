"""Federated-learning algorithms built on :mod:`emberfl.core`.

* FedAvg (McMahan et al. 2017) with BlazeFL 3.0's names: :mod:`emberfl.contrib.fedavg`
* FedProx (Li et al. 2020): :mod:`emberfl.contrib.fedprox`
* SCAFFOLD (Karimireddy et al. 2020): :mod:`emberfl.contrib.scaffold`
* FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021): :mod:`emberfl.contrib.fedopt`

Every algorithm has a server handler and serial, process-pool, thread-pool and batched
client trainers; FedOpt's clients are FedAvg's. Code written against ``blazefl.contrib``
runs after changing the import to ``emberfl.contrib``. :mod:`emberfl.contrib.registry`
names them for ``emberfl run`` and says how to build each one.
"""

from emberfl.contrib.client_state import ClientStateStore
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
from emberfl.contrib.fedprox import (
    FedProxBaseClientTrainer,
    FedProxBaseServerHandler,
    FedProxBatchedClientTrainer,
    FedProxClientUpdate,
    FedProxProcessPoolClientTrainer,
    FedProxThreadPoolClientTrainer,
)
from emberfl.contrib.layout import ParameterLayout
from emberfl.contrib.registry import (
    ALGORITHM_SPECS,
    ALGORITHMS,
    AlgorithmSettings,
    AlgorithmSpec,
    TrainerClasses,
    algorithm_spec,
    make_client_trainer,
    make_server_handler,
)
from emberfl.contrib.scaffold import (
    ScaffoldBaseClientTrainer,
    ScaffoldBatchedClientTrainer,
    ScaffoldClientUpdate,
    ScaffoldDownlinkPackage,
    ScaffoldProcessPoolClientTrainer,
    ScaffoldServerHandler,
    ScaffoldThreadPoolClientTrainer,
    ScaffoldUplinkPackage,
)
from emberfl.contrib.training import LocalTrainingResult, evaluate_loader, local_sgd, sgd_step

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_SPECS",
    "AlgorithmSettings",
    "AlgorithmSpec",
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
    "TrainerClasses",
    "algorithm_spec",
    "evaluate_loader",
    "local_sgd",
    "make_client_trainer",
    "make_server_handler",
    "sgd_step",
]
