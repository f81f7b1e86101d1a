"""FedDyn (Acar et al., ICLR 2021): federated learning with dynamic regularisation.

Each client ``i`` keeps ``g_i``, the gradient of its loss at its last trained model
(zeros before it first trains). Selected in round ``t``, it starts from the server
model ``theta`` and minimises (Algorithm 1 of the paper)::

    L_i(w) - <g_i, w> + alpha / 2 * ||w - theta||^2

by local SGD: the gradient of the two extra terms, ``-g_i + alpha * (w - theta)``, is
added after every backward pass. Trained to ``theta_i``, it sets
``g_i <- g_i - alpha * (theta_i - theta)`` (the first-order condition of its
problem) and uploads ``theta_i`` as FedAvg's clients do. Over the round's
participants ``P`` among the ``m`` clients of the federation the server keeps ``h``
(zeros at first) and sets::

    h     <- h - alpha / m * sum_{i in P} (theta_i - theta)
    theta <- mean_{i in P} theta_i - h / alpha

Why: the linear term makes each client's stationary point agree with the global one
as the rounds go on, so local training stops drifting towards the local optimum;
``h`` is the server's running estimate of the mean of the ``g_i`` that this leaves.

The mean is unweighted (the paper's), folded with weight 1; ``sum(theta_i - theta)``
is ``|P| * (mean - theta)``. The rule concerns the trainable parameters
(:class:`~emberfl.core.layout.ParameterLayout`); buffers (batch-norm statistics)
take the plain mean. A round whose every uplink was dropped (``nonfinite='drop'``)
leaves model and ``h`` unchanged, as FedAvg leaves its model; a client whose trained
model holds NaN or Inf keeps its old ``g_i`` (its round is dropped, not learnt from).

``g_i`` lives in ``<state_dir>/<cid>.safetensors`` (a
:class:`~emberfl.contrib.ClientStateStore`, like SCAFFOLD's controls), so the run
directory and its checkpoints keep it; ``h`` is in the server's
:meth:`~FedDynServerHandler.checkpoint_state`, so ``emberfl resume`` continues bit
for bit. The batched runtime stacks the ``g_i`` of a group (``[k, num_params]``).

Setting: ``alpha_dyn`` (``--alpha-dyn``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from emberfl.contrib.algorithm import Algorithm, fedavg_server
from emberfl.contrib.fedavg import (
    BatchedClientStep,
    BatchedGroup,
    FedAvgBaseServerHandler,
    FedAvgClientUpdate,
    FedAvgUplinkPackage,
    LocalRun,
)
from emberfl.core import FoldTerm, deserialize_model, serialize_model
from emberfl.core.checks import check_positive_number
from emberfl.core.client_state import ClientStateStore
from emberfl.core.layout import ParameterLayout
from emberfl.core.setting import Setting

__all__ = [
    "ALPHA_DYN",
    "FEDDYN",
    "GRADIENT_KEY",
    "FedDynBatchedStep",
    "FedDynClientUpdate",
    "FedDynServerHandler",
]

#: Name of the tensor ``g_i`` in a client's state file.
GRADIENT_KEY = "feddyn.gradient"
#: Name of the server's ``h`` in its checkpoint state.
H_KEY = "feddyn.h"

ALPHA_DYN = Setting(
    "alpha_dyn",
    float,
    0.01,
    "FedDyn regularisation strength alpha",
    group="algorithm hyper-parameters",
    owner="feddyn",
    check=check_positive_number,
)


class FedDynClientUpdate(FedAvgClientUpdate):
    """FedAvg's client step plus FedDyn's gradient ``-g_i + alpha * (w - theta)`` and
    the update of ``g_i`` on disk."""

    def __init__(self, alpha_dyn: float) -> None:
        self.alpha_dyn = check_positive_number(alpha_dyn, "alpha_dyn")

    def begin(self, run: LocalRun) -> None:
        state = _need_state(run.state)
        layout = ParameterLayout.of(run.model)
        gradient = _client_gradient(state, run.cid, layout)
        on_device = gradient.to(run.device)
        params = layout.parameters(run.model)
        run.extra.update(
            layout=layout,
            gradient=gradient,
            start=layout.gather(run.payload.model_parameters.to("cpu", torch.float32)),
            terms=[
                (p, p.detach().clone(), g.view_as(p))
                for p, g in zip(params, layout.split(on_device), strict=True)
            ],
        )

    def after_backward(self, run: LocalRun) -> Callable[[], None] | None:
        terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = run.extra["terms"]
        alpha = self.alpha_dyn

        def dynamic_regulariser() -> None:
            with torch.no_grad():
                for p, anchor, g in terms:
                    if p.grad is None:
                        # The regulariser depends on every parameter, used or not.
                        p.grad = torch.zeros_like(p)
                    p.grad.add_(p - anchor, alpha=alpha).sub_(g)

        return dynamic_regulariser

    def finish(
        self, run: LocalRun, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        assert run.state is not None
        _store_gradient(
            run.state,
            package,
            self.alpha_dyn,
            layout=run.extra["layout"],
            gradient=run.extra["gradient"],
            start=run.extra["start"],
        )
        return package

    def batched_step(self) -> BatchedClientStep | None:
        return FedDynBatchedStep(self.alpha_dyn) if type(self) is FedDynClientUpdate else None

    def __repr__(self) -> str:
        return f"FedDynClientUpdate(alpha_dyn={self.alpha_dyn})"


class FedDynBatchedStep(BatchedClientStep):
    """FedDyn's step in the batched runtime: the group's ``g_i`` stacked per parameter
    (``[k, *shape]``), ``alpha * (w - theta) - g_i`` added to the gradient of every
    client that takes the step (masked by ``active``), ``g_i`` updated as per client."""

    def __init__(self, alpha_dyn: float) -> None:
        self.alpha_dyn = check_positive_number(alpha_dyn, "alpha_dyn")

    def begin(self, group: BatchedGroup) -> None:
        state = _need_state(group.state)
        if len(set(group.cids)) != len(group.cids):
            raise ValueError(
                f"FedDyn clients of one batched group must differ (each reads and writes "
                f"its state file once), got {group.cids}"
            )
        layout = ParameterLayout.of(group.model)
        if set(layout.names) != set(group.params) or len(layout.names) != len(group.params):
            raise ValueError(
                f"the model's trainable parameters {sorted(group.params)} do not match its "
                f"state dict's {list(layout.names)} (shared parameters?): FedDyn cannot be "
                "batched on it"
            )
        gradients = torch.stack([_client_gradient(state, cid, layout) for cid in group.cids])
        sizes = [stop - start for start, stop in layout.spans]
        k = len(group.cids)
        parts = torch.split(gradients.to(group.device), sizes, dim=1)
        group.extra.update(
            layout=layout,
            gradients=gradients,
            start=layout.gather(group.payload.model_parameters.to("cpu", torch.float32)),
            # Every row holds the global model now: one anchor serves the whole group.
            anchor={n: p[0].clone() for n, p in group.params.items()},
            stacked={
                name: part.reshape(k, *group.params[name].shape[1:])
                for name, part in zip(layout.names, parts, strict=True)
            },
        )

    def correct_(
        self, group: BatchedGroup, grads: dict[str, torch.Tensor], active: torch.Tensor
    ) -> None:
        anchor: dict[str, torch.Tensor] = group.extra["anchor"]
        stacked: dict[str, torch.Tensor] = group.extra["stacked"]
        for name, p in group.params.items():
            shape = (-1, *([1] * (p.dim() - 1)))
            term = (p - anchor[name]) * self.alpha_dyn - stacked[name]
            grads[name].add_(term * active.view(shape))

    def finish(
        self, group: BatchedGroup, index: int, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        assert group.state is not None
        gradients: torch.Tensor = group.extra["gradients"]
        _store_gradient(
            group.state,
            package,
            self.alpha_dyn,
            layout=group.extra["layout"],
            gradient=gradients[index],
            start=group.extra["start"],
        )
        return package

    def __repr__(self) -> str:
        return f"FedDynBatchedStep(alpha_dyn={self.alpha_dyn})"


def _need_state(state: ClientStateStore | None) -> ClientStateStore:
    if state is None:
        raise ValueError(
            "FedDyn keeps each client's gradient state on disk: give the trainer a state_dir"
        )
    return state


def _client_gradient(state: ClientStateStore, cid: int, layout: ParameterLayout) -> torch.Tensor:
    """Client ``cid``'s ``g_i`` (float32, CPU) from its state file; zeros without one."""
    stored = state.load(cid)
    if stored is None:
        return torch.zeros(layout.num_params, dtype=torch.float32)
    try:
        gradient = stored[GRADIENT_KEY]
    except KeyError:
        raise ValueError(f"{state.path(cid)} holds no {GRADIENT_KEY!r} tensor") from None
    if gradient.shape != (layout.num_params,):
        raise ValueError(
            f"{state.path(cid)}: FedDyn gradient state of shape "
            f"{tuple(gradient.shape)}, expected ({layout.num_params},)"
        )
    return gradient.to(torch.float32)


def _store_gradient(
    state: ClientStateStore,
    package: FedAvgUplinkPackage,
    alpha: float,
    *,
    layout: ParameterLayout,
    gradient: torch.Tensor,
    start: torch.Tensor,
) -> None:
    """Save ``g_i - alpha * (theta_i - theta)`` as client ``package.cid``'s state."""
    trained = layout.gather(package.model_parameters.to("cpu", torch.float32))
    new = gradient - alpha * (trained - start)
    if not bool(torch.isfinite(new).all()):
        # The server refuses or drops this client's model: keep what it knew before.
        new = gradient.clone()
    state.save(package.cid, {GRADIENT_KEY: new})


class FedDynServerHandler(FedAvgBaseServerHandler):
    """FedDyn's server: FedAvg's arguments plus ``alpha_dyn`` (keyword, default 0.01).

    ``h`` (parameters only) is part of its :meth:`checkpoint_state`.
    """

    def __init__(self, *args: Any, alpha_dyn: float = 0.01, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alpha_dyn = check_positive_number(alpha_dyn, "alpha_dyn")
        self.layout = ParameterLayout.of(self.model)
        self.h = torch.zeros(self.layout.num_params, dtype=torch.float32)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = super().checkpoint_state()
        state[H_KEY] = self.h.clone()
        return state

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_checkpoint_state(state)
        h = state.get(H_KEY)
        if h is None or h.shape != (self.layout.num_params,):
            raise ValueError(f"checkpoint state lacks {H_KEY} of shape ({self.layout.num_params},)")
        self.h = h.to(torch.float32).clone()

    def fold_terms(self) -> tuple[FoldTerm, ...]:
        # The paper averages the participants unweighted.
        return (FoldTerm("model", "model_parameters", 1),)

    def apply_update(self, mean: torch.Tensor, buffer: list[FedAvgUplinkPackage]) -> None:
        layout, alpha = self.layout, self.alpha_dyn
        current = layout.gather(serialize_model(self.model).to(torch.float32))
        averaged = layout.gather(mean)
        # sum_{i in P} (theta_i - theta) = |P| * (mean - theta); P = the kept uplinks.
        self.h -= (alpha * len(buffer) / self.num_clients) * (averaged - current)
        stepped = averaged - self.h / alpha
        deserialize_model(self.model, layout.scatter_(mean.clone(), stepped))


FEDDYN = Algorithm(
    "feddyn",
    "FedDyn (Acar et al. 2021): dynamic regularisation of the clients' objectives",
    fedavg_server(FedDynServerHandler, "alpha_dyn"),
    client=lambda options: FedDynClientUpdate(options["alpha_dyn"]),
    settings=(ALPHA_DYN,),
    client_state_on_disk=True,
)
