"""The client step: what one client does in a round (FedAvg's), and the hooks to change it.

:class:`FedAvgClientUpdate` runs one client; FedProx and SCAFFOLD subclass it through
its hooks. :class:`BatchedClientStep` is the same step for the batched runtime
(:mod:`~emberfl.runtimes.batched`), where a group of clients trains as one stacked
model and the hooks see all of them at once. Every runtime (:mod:`emberfl.runtimes`)
takes a step as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from emberfl.core.client_state import ClientStateStore
from emberfl.core.model_packages import FedAvgDownlinkPackage, FedAvgUplinkPackage
from emberfl.core.training import StopSignal, local_sgd
from emberfl.core.utils import deserialize_model, serialize_model

__all__ = ["BatchedClientStep", "BatchedGroup", "FedAvgClientUpdate", "LocalRun"]


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

    def batched_step(self) -> BatchedClientStep | None:
        """This step for the batched runtime, or None when it cannot run there (a
        subclass whose hooks must run per client)."""
        return BatchedClientStep() if type(self) is FedAvgClientUpdate else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass
class BatchedGroup:
    """A group of clients trained together, as the :class:`BatchedClientStep` hooks see it.

    ``params`` are the group's stacked trainable parameters (name to ``[k, *shape]``,
    on ``device``; row ``i`` is client ``cids[i]``), updated in place at every step.
    ``model`` holds the global model of ``payload`` while :meth:`~BatchedClientStep.begin`
    runs. ``extra`` is scratch space for the hooks, as in :class:`LocalRun`.
    """

    cids: list[int]
    model: nn.Module
    payload: FedAvgDownlinkPackage
    params: dict[str, torch.Tensor]
    device: torch.device
    lr: float
    state: ClientStateStore | None
    extra: dict[str, Any]


class BatchedClientStep:
    """FedAvg's client step in the batched runtime, and the hooks other steps change.

    * :meth:`begin` -- before the group trains;
    * :meth:`correct_` -- after every batched gradient, before the SGD step: may add a
      term to each client's gradient (FedProx's proximal gradient, SCAFFOLD's control
      correction);
    * :meth:`finish` -- turns one trained client into its uplink package.

    Like :class:`FedAvgClientUpdate` it holds no per-group state (that goes in
    ``group.extra``).
    """

    def begin(self, group: BatchedGroup) -> None:
        """Called once the group's parameters are stacked, before training (default:
        nothing)."""

    def correct_(
        self, group: BatchedGroup, grads: dict[str, torch.Tensor], active: torch.Tensor
    ) -> None:
        """Change one step's stacked gradients in place (default: nothing).

        ``active[i]`` is 1.0 when client ``i`` has a batch at this step and 0.0 when
        it has none left; such a client's gradients are exactly zero, so it does not
        move -- as long as whatever is added here is multiplied by ``active``.
        """

    def finish(
        self, group: BatchedGroup, index: int, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        """The uplink of client ``group.cids[index]`` after ``steps`` real SGD steps
        (its parameters are in ``package``); default: ``package`` as it is."""
        return package

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
