"""What one FedAvg client does in a round, with the hooks FedProx and SCAFFOLD use."""

from __future__ import annotations

import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from emberfl.contrib.client_state import ClientStateStore
from emberfl.contrib.fedavg.packages import FedAvgDownlinkPackage, FedAvgUplinkPackage
from emberfl.contrib.training import StopSignal, local_sgd
from emberfl.core import deserialize_model, serialize_model

__all__ = ["FedAvgClientUpdate", "LocalRun"]


@dataclass
class LocalRun:
    """One client's round, as the :class:`FedAvgClientUpdate` hooks see it.

    ``extra`` is scratch space for the hooks of a subclass (the update object itself
    is shared by concurrent clients and must stay stateless).
    """

    cid: int
    model: nn.Module
    payload: FedAvgDownlinkPackage
    device: torch.device
    lr: float
    state: ClientStateStore | None
    extra: dict[str, Any]


class FedAvgClientUpdate:
    """FedAvg's client step: load the global model, run local SGD, send the model back.

    Subclasses change it through three hooks:

    * :meth:`begin` -- before training (e.g. remember the global weights, load state);
    * :meth:`after_backward` -- returns a callable run after every ``backward()``
      that may change the gradients, or ``None``;
    * :meth:`finish` -- turns the trained client into its uplink package.

    It holds no per-client state, so one object serves every thread and pickles into
    worker processes.
    """

    def __call__(
        self,
        *,
        cid: int,
        model: nn.Module,
        payload: FedAvgDownlinkPackage,
        loader: DataLoader[Any],
        device: str | torch.device,
        epochs: int,
        lr: float,
        stop_event: StopSignal | None = None,
        state: ClientStateStore | None = None,
    ) -> FedAvgUplinkPackage:
        """Run client ``cid`` on ``loader`` starting from ``payload``; returns its uplink."""
        start = time.perf_counter()
        dev = torch.device(device)
        model.to(dev)
        deserialize_model(model, payload.model_parameters)
        run = LocalRun(
            cid=cid, model=model, payload=payload, device=dev, lr=lr, state=state, extra={}
        )
        self.begin(run)
        result = local_sgd(
            model, loader, dev, epochs, lr, stop_event, after_backward=self.after_backward(run)
        )
        dataset = loader.dataset
        data_size = len(dataset) if isinstance(dataset, Sized) else result.samples // max(epochs, 1)
        package = FedAvgUplinkPackage(
            cid=cid,
            model_parameters=serialize_model(model),
            data_size=data_size,
            metadata={"loss": result.loss, "steps": float(result.steps)},
        )
        package = self.finish(run, package, result.steps)
        metadata = package.metadata if package.metadata is not None else {}
        metadata["train_seconds"] = time.perf_counter() - start
        package.metadata = metadata
        return package

    def begin(self, run: LocalRun) -> None:
        """Called after the global model is loaded, before training (default: nothing)."""

    def after_backward(self, run: LocalRun) -> Callable[[], None] | None:
        """A gradient hook for this client's training (default: none)."""
        return None

    def finish(
        self, run: LocalRun, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        """The uplink of the trained client (default: ``package`` as it is)."""
        return package

    def batched_proximal_mu(self) -> float | None:
        """How the batched runtime can run this step: the proximal coefficient to add
        (``mu * (w - w_global)`` to each gradient; 0 for none), or None when it cannot
        (a subclass whose hooks must run per client)."""
        return 0.0 if type(self) is FedAvgClientUpdate else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
