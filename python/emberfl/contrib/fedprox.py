"""FedProx (Li et al. 2020): FedAvg with a proximal term on the clients.

Each client minimises its loss plus ``mu / 2 * ||w - w_global||^2``, which keeps
local models near the global one when clients' data differ. The term enters as its
gradient, ``mu * (w - w_global)``, added after every backward pass; the server is
FedAvg's. With ``mu = 0`` a run is bitwise the same as FedAvg's.

Setting: ``mu`` (``--mu``). BlazeFL's ``FedProx*ClientTrainer`` names are the
runtimes with this step (:mod:`emberfl.contrib.trainer_names`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from emberfl.contrib.algorithm import Algorithm, fedavg_server
from emberfl.contrib.fedavg import (
    BatchedClientStep,
    BatchedGroup,
    FedAvgBaseServerHandler,
    FedAvgClientUpdate,
    LocalRun,
)
from emberfl.core.checks import check_nonnegative_number
from emberfl.core.setting import Setting

__all__ = [
    "FEDPROX",
    "MU",
    "FedProxBaseServerHandler",
    "FedProxClientUpdate",
    "ProximalBatchedStep",
]

MU = Setting(
    "mu",
    float,
    0.01,
    "FedProx proximal coefficient",
    group="algorithm hyper-parameters",
    owner="fedprox",
    check=check_nonnegative_number,
)


class FedProxClientUpdate(FedAvgClientUpdate):
    """FedAvg's client step plus the proximal gradient ``mu * (w - w_global)``."""

    def __init__(self, mu: float) -> None:
        self.mu = check_nonnegative_number(mu, "mu")

    def batched_step(self) -> BatchedClientStep | None:
        if type(self) is not FedProxClientUpdate:
            return None
        # mu = 0 is FedAvg's step, bit for bit, as in the per-client runtimes.
        return ProximalBatchedStep(self.mu) if self.mu else BatchedClientStep()

    def begin(self, run: LocalRun) -> None:
        run.extra["prox"] = [
            (p, p.detach().clone()) for p in run.model.parameters() if p.requires_grad
        ]

    def after_backward(self, run: LocalRun) -> Callable[[], None] | None:
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = run.extra["prox"]
        mu = self.mu

        def proximal_gradient() -> None:
            with torch.no_grad():
                for p, anchor in pairs:
                    if p.grad is not None:
                        p.grad.add_(p - anchor, alpha=mu)

        return proximal_gradient

    def __repr__(self) -> str:
        return f"FedProxClientUpdate(mu={self.mu})"


class ProximalBatchedStep(BatchedClientStep):
    """FedProx's step in the batched runtime: ``mu * (w - w_global)`` added to the
    gradient of every client that takes the step."""

    def __init__(self, mu: float) -> None:
        self.mu = check_nonnegative_number(mu, "mu")

    def begin(self, group: BatchedGroup) -> None:
        # Every row holds the global model now: one anchor serves the whole group.
        group.extra["anchor"] = {n: p[0].clone() for n, p in group.params.items()}

    def correct_(
        self, group: BatchedGroup, grads: dict[str, torch.Tensor], active: torch.Tensor
    ) -> None:
        anchor: dict[str, torch.Tensor] = group.extra["anchor"]
        for name, p in group.params.items():
            shape = (-1, *([1] * (p.dim() - 1)))
            grads[name].add_((p - anchor[name]) * active.view(shape), alpha=self.mu)

    def __repr__(self) -> str:
        return f"ProximalBatchedStep(mu={self.mu})"


class FedProxBaseServerHandler(FedAvgBaseServerHandler):
    """FedProx's server: FedAvg's weighted average of the client models."""


FEDPROX = Algorithm(
    "fedprox",
    "FedProx (Li et al. 2020): FedAvg with a proximal term mu/2 ||w - w_global||^2",
    fedavg_server(FedProxBaseServerHandler),
    client=lambda options: FedProxClientUpdate(options["mu"]),
    settings=(MU,),
    client_dp=True,
)
