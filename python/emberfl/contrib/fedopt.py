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
The average itself is FedAvg's, on the aggregation kernel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from emberfl.contrib.fedavg import FedAvgBaseServerHandler, FedAvgUplinkPackage
from emberfl.contrib.layout import ParameterLayout
from emberfl.core import deserialize_model, serialize_model

__all__ = [
    "FedAdagradServerHandler",
    "FedAdamServerHandler",
    "FedOptServerHandler",
    "FedYogiServerHandler",
]


def _check(value: float, what: str, low: float, high: float | None, low_open: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        left = "(" if low_open else "["
        right = f"{high})" if high is not None else "inf)"
        raise ValueError(f"{what} must lie in {left}{low}, {right}, got {value!r}")
    return float(value)


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
        self.server_lr = _check(server_lr, "server_lr", 0.0, None, low_open=True)
        self.beta1 = _check(beta1, "beta1", 0.0, 1.0, low_open=False)
        self.beta2 = _check(beta2, "beta2", 0.0, 1.0, low_open=False)
        self.tau = _check(tau, "tau", 0.0, None, low_open=True)
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
