"""SCAFFOLD (Karimireddy et al. 2020): control variates against client drift.

The server keeps a control variate ``c`` and every client ``i`` its own ``c_i``, both
vectors over the model's trainable parameters. A client's gradients are corrected
by ``c - c_i`` at every step; after ``K`` steps of learning rate ``lr`` it updates
(the paper's option II)::

    c_i+ = c_i - c + (x - y_i) / (K * lr)

where ``x`` is the global model it started from and ``y_i`` its trained model. It
uploads ``y_i`` and ``delta c_i = c_i+ - c_i``; the server averages the models as
FedAvg does (weighted by data size; ``global_lr`` scales the step) and sets
``c += sum(delta c_i) / N`` over the ``N`` clients of the federation.

Client controls are never held in memory between rounds: each lives in
``<state_dir>/<cid>.safetensors`` (a :class:`~emberfl.contrib.ClientStateStore`),
mapped only while its client runs and replaced atomically, so a federation of
10,000 clients costs disk, not RAM. A client without a file starts from ``c_i = 0``.

Every runtime runs :class:`ScaffoldClientUpdate`; it needs the trainer's
``state_dir`` (BlazeFL's ``Scaffold*ClientTrainer`` names require it:
:mod:`emberfl.contrib.trainer_names`). The batched runtime stacks the ``c_i`` of a group of
clients (``[k, num_params]``) next to their stacked weights and adds ``c - c_i`` to
each client's gradient at every step it takes; a padded step neither moves a client
nor counts in its ``K``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from emberfl.contrib.algorithm import Algorithm, fedavg_server
from emberfl.contrib.fedavg import (
    BatchedClientStep,
    BatchedGroup,
    FedAvgBaseServerHandler,
    FedAvgClientUpdate,
    FedAvgDownlinkPackage,
    FedAvgUplinkPackage,
    LocalRun,
)
from emberfl.core import FoldTerm, deserialize_model, serialize_model
from emberfl.core.client_state import ClientStateStore
from emberfl.core.layout import ParameterLayout
from emberfl.distributed.peer_codec import allow_peer_types

__all__ = [
    "CONTROL_KEY",
    "SCAFFOLD",
    "ScaffoldBatchedStep",
    "ScaffoldClientUpdate",
    "ScaffoldDownlinkPackage",
    "ScaffoldServerHandler",
    "ScaffoldUplinkPackage",
]

#: Name of the client control tensor in a client's state file.
CONTROL_KEY = "scaffold.control"


@dataclass(kw_only=True)
class ScaffoldDownlinkPackage(FedAvgDownlinkPackage):
    """The global state vector plus the server control ``c`` (parameters only)."""

    control: torch.Tensor


@dataclass(kw_only=True)
class ScaffoldUplinkPackage(FedAvgUplinkPackage):
    """A FedAvg uplink plus the change of the client's control, ``c_i+ - c_i``."""

    control_delta: torch.Tensor


# Other ranks' skeletons may hold them (a SCAFFOLD job under torchrun).
allow_peer_types(ScaffoldDownlinkPackage, ScaffoldUplinkPackage)


class ScaffoldClientUpdate(FedAvgClientUpdate):
    """FedAvg's client step with SCAFFOLD's gradient correction and control update."""

    def begin(self, run: LocalRun) -> None:
        state = _need_state(run.state)
        payload = _scaffold_payload(run.payload)
        layout = ParameterLayout.of(run.model)
        server_control = _server_control(payload, layout)
        client_control = _client_control(state, run.cid, layout)
        correction = (server_control - client_control).to(run.device)
        params = layout.parameters(run.model)
        run.extra.update(
            layout=layout,
            server_control=server_control,
            client_control=client_control,
            start=layout.gather(payload.model_parameters.to("cpu", torch.float32)),
            corrections=[
                (p, view.view_as(p))
                for p, view in zip(params, layout.split(correction), strict=True)
            ],
        )

    def after_backward(self, run: LocalRun) -> Callable[[], None] | None:
        corrections: list[tuple[torch.Tensor, torch.Tensor]] = run.extra["corrections"]

        def control_correction() -> None:
            with torch.no_grad():
                for p, corr in corrections:
                    if p.grad is not None:
                        p.grad.add_(corr)

        return control_correction

    def finish(
        self, run: LocalRun, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        assert run.state is not None
        return _control_update(
            run.state,
            package,
            steps,
            run.lr,
            layout=run.extra["layout"],
            server_control=run.extra["server_control"],
            client_control=run.extra["client_control"],
            start=run.extra["start"],
        )

    def batched_step(self) -> BatchedClientStep | None:
        return ScaffoldBatchedStep() if type(self) is ScaffoldClientUpdate else None


class ScaffoldBatchedStep(BatchedClientStep):
    """SCAFFOLD's step in the batched runtime: the group's client controls stacked.

    ``begin`` loads each client's ``c_i`` as :class:`ScaffoldClientUpdate` does
    (zeros without a file) and stacks the corrections ``c - c_i`` per parameter
    (``[k, *shape]``); ``correct_`` adds them to the gradients of the clients that
    take the step; ``finish`` updates and stores ``c_i`` exactly as the per-client
    step does, with ``K_i`` the client's real (unpadded) steps.
    """

    def begin(self, group: BatchedGroup) -> None:
        state = _need_state(group.state)
        if len(set(group.cids)) != len(group.cids):
            raise ValueError(
                f"SCAFFOLD clients of one batched group must differ (each reads and writes "
                f"its control file once), got {group.cids}"
            )
        payload = _scaffold_payload(group.payload)
        layout = ParameterLayout.of(group.model)
        if set(layout.names) != set(group.params) or len(layout.names) != len(group.params):
            raise ValueError(
                f"the model's trainable parameters {sorted(group.params)} do not match its "
                f"state dict's {list(layout.names)} (shared parameters?): SCAFFOLD cannot be "
                "batched on it"
            )
        server_control = _server_control(payload, layout)
        client_controls = torch.stack(
            [_client_control(state, cid, layout).to(torch.float32) for cid in group.cids]
        )
        correction = (server_control - client_controls).to(group.device)
        sizes = [stop - start for start, stop in layout.spans]
        k = len(group.cids)
        corrections = {
            name: part.reshape(k, *group.params[name].shape[1:])
            for name, part in zip(layout.names, torch.split(correction, sizes, dim=1), strict=True)
        }
        group.extra.update(
            layout=layout,
            server_control=server_control,
            client_controls=client_controls,
            start=layout.gather(payload.model_parameters.to("cpu", torch.float32)),
            corrections=corrections,
        )

    def correct_(
        self, group: BatchedGroup, grads: dict[str, torch.Tensor], active: torch.Tensor
    ) -> None:
        corrections: dict[str, torch.Tensor] = group.extra["corrections"]
        for name, g in grads.items():
            shape = (-1, *([1] * (g.dim() - 1)))
            g.add_(corrections[name] * active.view(shape))

    def finish(
        self, group: BatchedGroup, index: int, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        assert group.state is not None
        client_controls: torch.Tensor = group.extra["client_controls"]
        return _control_update(
            group.state,
            package,
            steps,
            group.lr,
            layout=group.extra["layout"],
            server_control=group.extra["server_control"],
            client_control=client_controls[index],
            start=group.extra["start"],
        )


def _need_state(state: ClientStateStore | None) -> ClientStateStore:
    if state is None:
        raise ValueError(
            "SCAFFOLD keeps each client's control variate on disk: give the trainer a state_dir"
        )
    return state


def _scaffold_payload(payload: FedAvgDownlinkPackage) -> ScaffoldDownlinkPackage:
    if not isinstance(payload, ScaffoldDownlinkPackage):
        raise TypeError(
            f"SCAFFOLD clients need a ScaffoldDownlinkPackage, got {type(payload).__name__}"
        )
    return payload


def _server_control(payload: ScaffoldDownlinkPackage, layout: ParameterLayout) -> torch.Tensor:
    """The server control ``c`` of ``payload`` (float32, on the CPU), checked."""
    server_control = payload.control.to("cpu", torch.float32)
    if server_control.shape != (layout.num_params,):
        raise ValueError(
            f"the server control has shape {tuple(server_control.shape)}, the model "
            f"has {layout.num_params} trainable values"
        )
    return server_control


def _client_control(state: ClientStateStore, cid: int, layout: ParameterLayout) -> torch.Tensor:
    """Client ``cid``'s control ``c_i`` from its state file; zeros without one."""
    stored = state.load(cid)
    if stored is None:
        return torch.zeros(layout.num_params, dtype=torch.float32)
    try:
        client_control = stored[CONTROL_KEY]
    except KeyError:
        raise ValueError(f"{state.path(cid)} holds no {CONTROL_KEY!r} tensor") from None
    if client_control.shape != (layout.num_params,):
        raise ValueError(
            f"{state.path(cid)}: control of shape "
            f"{tuple(client_control.shape)}, expected ({layout.num_params},)"
        )
    return client_control


def _control_update(
    state: ClientStateStore,
    package: FedAvgUplinkPackage,
    steps: int,
    lr: float,
    *,
    layout: ParameterLayout,
    server_control: torch.Tensor,
    client_control: torch.Tensor,
    start: torch.Tensor,
) -> ScaffoldUplinkPackage:
    """Store the client's new control ``c_i+ = c_i - c + (x - y) / (K * lr)`` and
    return ``package`` with ``control_delta = c_i+ - c_i``."""
    c, c_i, x = server_control, client_control, start
    if steps > 0:
        y = layout.gather(package.model_parameters)
        new_control = (c_i - c) + (x - y) / (steps * lr)
    else:
        # No step taken (no data, or stopped): nothing was learnt about the drift.
        new_control = c_i.clone()
    delta = new_control - c_i
    state.save(package.cid, {CONTROL_KEY: new_control})
    return ScaffoldUplinkPackage(
        cid=package.cid,
        model_parameters=package.model_parameters,
        data_size=package.data_size,
        metadata=package.metadata,
        control_delta=delta,
    )


class ScaffoldServerHandler(FedAvgBaseServerHandler):
    """SCAFFOLD's server: FedAvg's arguments plus ``global_lr`` (keyword, default 1).

    ``control`` (the server control variate) is part of its :meth:`checkpoint_state`.
    """

    def __init__(self, *args: Any, global_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not (isinstance(global_lr, int | float) and math.isfinite(global_lr) and global_lr > 0):
            raise ValueError(f"global_lr must be a finite number > 0, got {global_lr!r}")
        self.global_lr = float(global_lr)
        self.layout = ParameterLayout.of(self.model)
        self.control = torch.zeros(self.layout.num_params, dtype=torch.float32)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = super().checkpoint_state()
        state["scaffold.server_control"] = self.control.clone()
        return state

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_checkpoint_state(state)
        control = state.get("scaffold.server_control")
        if control is None or control.shape != (self.layout.num_params,):
            raise ValueError(
                "checkpoint state lacks scaffold.server_control of shape "
                f"({self.layout.num_params},)"
            )
        self.control = control.to(torch.float32).clone()

    def downlink_package(self) -> ScaffoldDownlinkPackage:
        return ScaffoldDownlinkPackage(serialize_model(self.model), control=self.control.clone())

    def fold_terms(self) -> tuple[FoldTerm, ...]:
        # The control moves by sum(delta c_i) / N over the N clients of the federation:
        # summed with weight 1 and divided once (1/N is rarely an exact weight).
        return (*super().fold_terms(), FoldTerm("control", "control_delta"))

    def apply_update(self, mean: torch.Tensor, buffer: list[FedAvgUplinkPackage]) -> None:
        if self.global_lr == 1.0:
            new_state = mean
        else:
            current = serialize_model(self.model).to(torch.float32)
            # x + global_lr * (mean - x) on the parameters; buffers take the mean.
            stepped = self.layout.gather(current) + self.global_lr * (
                self.layout.gather(mean) - self.layout.gather(current)
            )
            new_state = self.layout.scatter_(mean.clone(), stepped)
        deserialize_model(self.model, new_state)
        self.control += self.round_sums[1] / self.num_clients


SCAFFOLD = Algorithm(
    "scaffold",
    "SCAFFOLD (Karimireddy et al. 2020): control variates against client drift",
    fedavg_server(ScaffoldServerHandler),
    client=lambda options: ScaffoldClientUpdate(),
    client_state_on_disk=True,
)
