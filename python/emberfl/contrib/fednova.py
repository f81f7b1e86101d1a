"""FedNova (Wang et al., NeurIPS 2020): normalized averaging against objective inconsistency.

Client ``i`` runs ``tau_i`` local SGD steps from the global model ``x`` to ``y_i``
(``tau_i`` = epochs x batches, so it grows with the client's data). FedAvg's mean of
the ``y_i`` then weighs each client by how far it walked as well as by ``n_i``: it
converges to the optimum of an objective skewed towards the clients that take more
steps. FedNova averages the *normalized* updates instead and rescales the result by
an effective step count (the paper's vanilla case, plain SGD: ``a_i = [1, ..., 1]``,
``||a_i||_1 = tau_i``). With ``p_i = n_i / N`` over the round's participants
(``N = sum_j n_j``)::

    d_i     = (x - y_i) / tau_i
    tau_eff = sum_i p_i tau_i
    x+      = x - tau_eff * sum_i p_i d_i

Why this form here: the server only sees exact folded sums (:class:`FoldTerm`), so
the rule is rewritten over sums. With ``w_i = n_i r_i``, ``r_i = 1 / tau_i``::

    sum_i p_i d_i = (W x - S) / N,   S = sum_i w_i y_i,   W = sum_i w_i
    x+ = x - c (x - S / W) = m + (1 - c) (x - m),   m = S / W,   c = T W / N^2

with ``T = sum_i n_i tau_i``. Every client sends its model (folded twice: weighted by
``n_i`` for FedAvg's mean, and by ``w_i`` = :attr:`FedNovaUplinkPackage.nova_weight`
for ``S``) and a three-element ``nova_counts = [1, tau_i, r_i]`` folded with weight
``n_i``, whose sum is ``[N, T, W]``. ``r_i`` is ``1 / tau_i`` rounded to float32, and
``w_i`` is ``n_i r_i`` exactly, so ``W`` is the exact sum of the weights in ``S``.
When every ``tau_i`` is equal, ``c = 1`` and ``m`` is FedAvg's mean: FedNova is FedAvg
(to float rounding). ``c`` is computed in float64 and the result rounded once.

The rule concerns the trainable parameters
(:class:`~emberfl.core.layout.ParameterLayout`); buffers (batch-norm statistics)
take FedAvg's data-size weighted mean. A client without data (``n_i = 0``)
contributes nothing; one that took no step (``tau_i = 0``, ``y_i = x``) has
``d_i = 0`` and still counts in ``p_i``. A round in which no client took a step
leaves the parameters as they were.

The client trains exactly as FedAvg's (local SGD); only its uplink differs, so every
runtime runs it, the batched one included (:class:`FedNovaBatchedStep` adds the same
fields from each client's real, unpadded step count). The server keeps no state
beyond FedAvg's, so checkpoints and ``emberfl resume`` are FedAvg's. FedNova has no
hyper-parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from emberfl.core.layout import ParameterLayout
from emberfl.distributed.peer_codec import allow_peer_types

__all__ = [
    "FEDNOVA",
    "FedNovaBatchedStep",
    "FedNovaClientUpdate",
    "FedNovaServerHandler",
    "FedNovaUplinkPackage",
    "nova_uplink",
]


@dataclass(kw_only=True)
class FedNovaUplinkPackage(FedAvgUplinkPackage):
    """A FedAvg uplink plus what FedNova's server folds from it.

    ``nova_weight`` is ``w_i = n_i r_i`` (a float, so it survives in the stand-ins and
    in their JSON between ranks); ``nova_counts`` is ``[1, tau_i, r_i]`` (float32),
    with ``tau_i`` the client's local steps and ``r_i = 1 / tau_i`` rounded to float32
    (0 when ``tau_i = 0``).
    """

    nova_weight: float
    nova_counts: torch.Tensor


# Other ranks send FedNova's stand-ins as package skeletons: let them be rebuilt.
allow_peer_types(FedNovaUplinkPackage)


def nova_uplink(package: FedAvgUplinkPackage, steps: int) -> FedNovaUplinkPackage:
    """``package`` (a client trained for ``steps`` local SGD steps) as FedNova's uplink."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    counts = torch.tensor([1.0, float(steps), 1.0 / steps if steps else 0.0], dtype=torch.float32)
    # n_i * r_i is exact in float64 (an int below 2**29 times a float32), and is the
    # product the fold forms for W: the weights of S add up to W exactly.
    weight = package.data_size * float(counts[2])
    return FedNovaUplinkPackage(
        cid=package.cid,
        model_parameters=package.model_parameters,
        data_size=package.data_size,
        metadata=package.metadata,
        nova_weight=weight,
        nova_counts=counts,
    )


class FedNovaClientUpdate(FedAvgClientUpdate):
    """FedAvg's client step (local SGD), reporting its step count for FedNova."""

    def finish(
        self, run: LocalRun, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        return nova_uplink(package, steps)

    def batched_step(self) -> BatchedClientStep | None:
        # A subclass may add per-client hooks the batched form would not run.
        return FedNovaBatchedStep() if type(self) is FedNovaClientUpdate else None


class FedNovaBatchedStep(BatchedClientStep):
    """FedNova's step in the batched runtime: FedAvg's, with each client's uplink
    carrying its real (unpadded) step count."""

    def finish(
        self, group: BatchedGroup, index: int, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        return nova_uplink(package, steps)


class FedNovaServerHandler(FedAvgBaseServerHandler):
    """FedNova's server: FedAvg's arguments; the normalized update on the parameters,
    FedAvg's mean on the buffers. It keeps no state of its own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layout = ParameterLayout.of(self.model)

    def fold_terms(self) -> tuple[FoldTerm, ...]:
        # The model twice: weighted by n_i (FedAvg's mean, for the buffers) and by
        # w_i = n_i / tau_i (S); the counts by n_i give [N, T, W].
        return (
            *super().fold_terms(),
            FoldTerm("nova", "model_parameters", "nova_weight"),
            FoldTerm("nova_counts", "nova_counts", "data_size"),
        )

    def apply_update(self, mean: torch.Tensor, buffer: list[FedAvgUplinkPackage]) -> None:
        names = [term.name for term in self.fold_terms()]
        weighted = self.round_sums[names.index("nova")]
        n, t, w = self.round_sums[names.index("nova_counts")].to(torch.float64).tolist()
        layout = self.layout
        x = layout.gather(serialize_model(self.model).to(torch.float64))
        if w > 0:
            m = layout.gather(weighted.to(torch.float64)) / w
            c = t * w / (n * n)
            params = m + (1.0 - c) * (x - m)
        else:
            # No client took a step: every d_i is 0, the parameters stay.
            params = x
        new_state = layout.scatter_(mean.clone(), params.to(mean.dtype))
        deserialize_model(self.model, new_state)


FEDNOVA = Algorithm(
    "fednova",
    "FedNova (Wang et al. 2020): normalized averaging of local updates against "
    "objective inconsistency",
    fedavg_server(FedNovaServerHandler),
    client=lambda options: FedNovaClientUpdate(),
)
