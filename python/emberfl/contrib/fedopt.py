"""Adaptive server optimizers (Reddi et al. 2021): FedAdam, FedYogi, FedAdagrad.

The clients run FedAvg's local SGD (use the FedAvg trainers). The server treats the
change of the averaged model as a pseudo-gradient ``delta = mean(y_i) - x`` and
takes an adaptive step on the trainable parameters (Algorithm 2 of the paper)::

    m = beta1 * m + (1 - beta1) * delta
    v = ...                          # FedAdagrad, FedYogi or FedAdam, below
    x = x + server_lr * m / (sqrt(v) + tau)

with ``m`` starting at 0 and ``v`` at ``tau ** 2``, and no bias correction:

* FedAdagrad: ``v = v + delta ** 2``
* FedYogi:    ``v = v - (1 - beta2) * delta ** 2 * sign(v - delta ** 2)``
* FedAdam:    ``v = beta2 * v + (1 - beta2) * delta ** 2``

Buffers (batch-norm statistics) are not optimised: they take the plain average.
The average itself is FedAvg's, on the aggregation kernel. Settings: ``server_lr``,
``beta1``, ``beta2``, ``tau`` (``--server-lr`` ...), shared by the three algorithms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from emberfl.contrib.algorithm import Algorithm, fedavg_server
from emberfl.contrib.fedavg import FedAvgBaseServerHandler, FedAvgUplinkPackage
from emberfl.core import deserialize_model, serialize_model
from emberfl.core.checks import check_positive_number, check_unit_interval
from emberfl.core.layout import ParameterLayout
from emberfl.core.setting import Setting

__all__ = [
    "FEDADAGRAD",
    "FEDADAM",
    "FEDOPT_SETTINGS",
    "FEDYOGI",
    "FedAdagradServerHandler",
    "FedAdamServerHandler",
    "FedOptServerHandler",
    "FedYogiServerHandler",
]

_OWNERS = "fedadam, fedyogi, fedadagrad"
_GROUP = "algorithm hyper-parameters"

#: The server optimizer's settings, shared by FedAdam, FedYogi and FedAdagrad.
FEDOPT_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "server_lr",
        float,
        0.01,
        "server learning rate of FedAdam/FedYogi/FedAdagrad",
        _GROUP,
        check_positive_number,
        owner=_OWNERS,
    ),
    Setting(
        "beta1", float, 0.9, "FedOpt first-moment decay", _GROUP, check_unit_interval, owner=_OWNERS
    ),
    Setting(
        "beta2",
        float,
        0.99,
        "FedAdam/FedYogi second-moment decay",
        _GROUP,
        check_unit_interval,
        owner=_OWNERS,
    ),
    Setting(
        "tau",
        float,
        1e-3,
        "FedOpt adaptivity (epsilon)",
        _GROUP,
        check_positive_number,
        owner=_OWNERS,
    ),
)


class FedOptServerHandler(FedAvgBaseServerHandler):
    """Common machinery of the adaptive server optimizers.

    FedAvg's arguments plus the keywords ``server_lr`` (default 0.01), ``beta1``
    (0.9), ``beta2`` (0.99) and ``tau`` (1e-3). Subclasses define
    :meth:`update_second_moment`. The moments ``m`` and ``v`` (float32 vectors over the
    trainable parameters) are part of the state a checkpoint needs.
    """

    def __init__(
        self,
        *args: Any,
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.server_lr = check_positive_number(server_lr, "server_lr")
        self.beta1 = check_unit_interval(beta1, "beta1")
        self.beta2 = check_unit_interval(beta2, "beta2")
        self.tau = check_positive_number(tau, "tau")
        self.layout = ParameterLayout.of(self.model)
        n = self.layout.num_params
        self.m = torch.zeros(n, dtype=torch.float32)
        self.v = torch.full((n,), self.tau**2, dtype=torch.float32)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = super().checkpoint_state()
        state["fedopt.m"] = self.m.clone()
        state["fedopt.v"] = self.v.clone()
        return state

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_checkpoint_state(state)
        for name in ("m", "v"):
            value = state.get(f"fedopt.{name}")
            if value is None or value.shape != (self.layout.num_params,):
                raise ValueError(
                    f"checkpoint state lacks fedopt.{name} of shape ({self.layout.num_params},)"
                )
            # A copy: the loaded tensor views a read-only mapping, and m/v are updated in place.
            setattr(self, name, value.to(torch.float32).clone())

    def update_second_moment(self, delta_sq: torch.Tensor) -> None:
        """Update ``self.v`` in place from the squared pseudo-gradient."""
        raise NotImplementedError(f"{type(self).__name__} must implement update_second_moment")

    def apply_update(self, mean: torch.Tensor, buffer: list[FedAvgUplinkPackage]) -> None:
        x = self.layout.gather(serialize_model(self.model).to(torch.float32))
        delta = self.layout.gather(mean) - x
        self.m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        self.update_second_moment(delta * delta)
        stepped = x + self.server_lr * self.m / (self.v.sqrt() + self.tau)
        deserialize_model(self.model, self.layout.scatter_(mean.clone(), stepped))


class FedAdagradServerHandler(FedOptServerHandler):
    """FedAdagrad: ``v = v + delta ** 2`` (``beta2`` is not used)."""

    def update_second_moment(self, delta_sq: torch.Tensor) -> None:
        self.v.add_(delta_sq)


class FedYogiServerHandler(FedOptServerHandler):
    """FedYogi: ``v = v - (1 - beta2) * delta ** 2 * sign(v - delta ** 2)``."""

    def update_second_moment(self, delta_sq: torch.Tensor) -> None:
        self.v.sub_((1.0 - self.beta2) * delta_sq * torch.sign(self.v - delta_sq))


class FedAdamServerHandler(FedOptServerHandler):
    """FedAdam: ``v = beta2 * v + (1 - beta2) * delta ** 2``."""

    def update_second_moment(self, delta_sq: torch.Tensor) -> None:
        self.v.mul_(self.beta2).add_(delta_sq, alpha=1.0 - self.beta2)


def _fedopt(name: str, summary: str, cls: type[FedOptServerHandler]) -> Algorithm:
    # FedOpt changes only the server step; its clients are FedAvg's.
    names = tuple(setting.name for setting in FEDOPT_SETTINGS)
    return Algorithm(
        name, summary, fedavg_server(cls, *names), settings=FEDOPT_SETTINGS, client_dp=True
    )


FEDADAM = _fedopt(
    "fedadam", "FedAdam (Reddi et al. 2021): Adam on the server", FedAdamServerHandler
)
FEDYOGI = _fedopt(
    "fedyogi", "FedYogi (Reddi et al. 2021): Yogi on the server", FedYogiServerHandler
)
FEDADAGRAD = _fedopt(
    "fedadagrad", "FedAdagrad (Reddi et al. 2021): Adagrad on the server", FedAdagradServerHandler
)
