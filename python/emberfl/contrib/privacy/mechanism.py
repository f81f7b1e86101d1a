"""Client-level DP-FedAvg: clip in the worker, noise the exact sum once on the server.

Central DP, after McMahan et al. (ICLR 2018), Algorithm 1 with uniform client weights:
every client ``k`` of round ``t`` sends its clipped update::

    Δ_k = clip(y_k - x_t, C)          # L2 norm at most C, in the worker

the workers fold them into exact sums, and the server releases::

    x_{t+1} = x_t + (Σ_k Δ_k + N(0, σ² C² I)) / m

with ``σ`` the noise multiplier and ``m`` a fixed denominator, the expected cohort size
(``q N`` under Poisson sampling, ``K`` under fixed-size sampling), as the sensitivity
analysis requires. The algorithm's own server step (FedAvg's, or a FedOpt optimizer's)
then takes ``x_{t+1}`` where it would take the weighted mean.

Adaptive clipping (Andrew et al., NeurIPS 2021): each client also reports
``b_k = 1[||y_k - x_t|| <= C]``; the server noises their count with ``N(0, σ_b²)`` and
moves ``C`` geometrically towards the target quantile ``γ`` of the update norms::

    C <- C * exp(-η_C * ((Σ_k b_k + N(0, σ_b²)) / m - γ))

Both releases together are one Gaussian mechanism with multiplier ``σ`` when the
update's noise multiplier is ``σ_Δ = (σ^-2 - (2 σ_b)^-2)^(-1/2)`` (the paper's
Theorem 1; ``2 σ_b > σ`` is required), so the accountant sees ``σ``.

Local DP: every client clips its update and adds ``N(0, σ² C² I)`` itself before
upload; the server averages what arrives.

The noise comes from :mod:`~emberfl.contrib.privacy.noise`: the server's is drawn after
the exact sum, keyed by ``(seed, round)``, so the released model is the same bits for
any number of workers, ranks or nodes, any runtime, and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from emberfl.contrib.fedavg import (
    BatchedClientStep,
    BatchedGroup,
    FedAvgClientUpdate,
    FedAvgDownlinkPackage,
    FedAvgUplinkPackage,
    LocalRun,
)
from emberfl.contrib.privacy.accountant import ClientAccountant
from emberfl.contrib.privacy.clipping import clip_update
from emberfl.contrib.privacy.noise import Purpose, gaussian
from emberfl.core import FoldTerm
from emberfl.distributed.peer_codec import allow_peer_types
from emberfl.streaming import StreamingSum

__all__ = [
    "ClientLevelDP",
    "PrivateBatchedStep",
    "PrivateClientUpdate",
    "PrivateDownlinkPackage",
    "PrivateUplinkPackage",
    "private_payload",
    "privatize",
    "update_noise_multiplier",
]

#: The fold term of the clipped updates.
UPDATE_TERM = "update"


@dataclass(kw_only=True)
class PrivateDownlinkPackage(FedAvgDownlinkPackage):
    """The global state vector plus what the clients' DP step needs: the clip norm,
    the clients' own noise multiplier (local DP; 0 for none) and the key of their noise
    streams (``noise_seed`` None: the OS's entropy)."""

    clip: float
    noise_multiplier: float
    noise_seed: int | None
    round: int


@dataclass(kw_only=True)
class PrivateUplinkPackage(FedAvgUplinkPackage):
    """A client's DP uplink: ``model_parameters`` holds its clipped (and, under local
    DP, noised) update ``Δ = clip(y - x, C)``, not its model. ``metadata`` adds
    ``update_norm`` (before clipping) and ``clip_bit`` (1.0 when it was within ``C``)."""


# Other ranks' skeletons and broadcasts may hold them (a DP job under torchrun).
allow_peer_types(PrivateDownlinkPackage, PrivateUplinkPackage)


def private_payload(payload: FedAvgDownlinkPackage) -> PrivateDownlinkPackage:
    if not isinstance(payload, PrivateDownlinkPackage):
        raise TypeError(
            "a DP client step needs a PrivateDownlinkPackage (a server handler whose "
            f"privacy rule is set), got {type(payload).__name__}"
        )
    return payload


def privatize(package: FedAvgUplinkPackage, payload: FedAvgDownlinkPackage) -> PrivateUplinkPackage:
    """The DP uplink of a trained client: its update from ``payload``'s model, clipped
    to ``payload.clip`` and, for local DP, noised from the client's own stream."""
    down = private_payload(payload)
    trained = package.model_parameters.detach().to("cpu", torch.float32)
    update = trained - down.model_parameters.detach().to("cpu", torch.float32)
    clipped, norm = clip_update(update, down.clip)
    if down.noise_multiplier > 0:
        noise = gaussian(clipped.numel(), down.noise_seed, down.round, Purpose.LOCAL, package.cid)
        scale = down.noise_multiplier * down.clip
        clipped = (clipped.to(torch.float64) + scale * noise).to(torch.float32)
    metadata = dict(package.metadata or {})
    metadata["update_norm"] = norm
    metadata["clip_bit"] = 1.0 if norm <= down.clip else 0.0
    return PrivateUplinkPackage(
        cid=package.cid, model_parameters=clipped, data_size=package.data_size, metadata=metadata
    )


class PrivateClientUpdate(FedAvgClientUpdate):
    """An algorithm's client step (``inner``, e.g. FedProx's) whose uplink is the
    clipped update (:func:`privatize`), computed in the worker that trained it."""

    def __init__(self, inner: FedAvgClientUpdate) -> None:
        if not isinstance(inner, FedAvgClientUpdate):
            raise TypeError(f"expected a FedAvgClientUpdate, got {type(inner).__name__}")
        self.inner = inner

    def begin(self, run: LocalRun) -> None:
        private_payload(run.payload)
        self.inner.begin(run)

    def after_backward(self, run: LocalRun) -> Callable[[], None] | None:
        return self.inner.after_backward(run)

    def finish(
        self, run: LocalRun, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        return privatize(self.inner.finish(run, package, steps), run.payload)

    def batched_step(self) -> BatchedClientStep | None:
        inner = self.inner.batched_step()
        return None if inner is None else PrivateBatchedStep(inner)

    def __repr__(self) -> str:
        return f"PrivateClientUpdate({self.inner!r})"


class PrivateBatchedStep(BatchedClientStep):
    """:class:`PrivateClientUpdate` in the batched runtime."""

    def __init__(self, inner: BatchedClientStep) -> None:
        self.inner = inner

    def begin(self, group: BatchedGroup) -> None:
        private_payload(group.payload)
        self.inner.begin(group)

    def correct_(
        self, group: BatchedGroup, grads: dict[str, torch.Tensor], active: torch.Tensor
    ) -> None:
        self.inner.correct_(group, grads, active)

    def finish(
        self, group: BatchedGroup, index: int, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        return privatize(self.inner.finish(group, index, package, steps), group.payload)

    def __repr__(self) -> str:
        return f"PrivateBatchedStep({self.inner!r})"


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """σ_Δ of adaptive clipping: the update's share of a total multiplier σ when the
    clipped count gets noise of standard deviation ``count_stddev`` (σ_b)."""
    if noise_multiplier <= 0:
        return 0.0
    rest = noise_multiplier**-2 - (2.0 * count_stddev) ** -2
    if not rest > 0:
        raise ValueError(
            f"adaptive clipping: the clipped count's noise (stddev {count_stddev}) must "
            f"exceed half the noise multiplier {noise_multiplier}; raise clip_count_stddev"
        )
    return float(rest**-0.5)


@dataclass
class ClientLevelDP:
    """The server's side of client-level DP (a
    :class:`~emberfl.contrib.fedavg.server.RoundRelease`): see the module.

    ``mechanism`` is ``"central"``, ``"adaptive"`` or ``"local"``; ``noise_multiplier``
    ``σ`` is what the accountant sees; ``expected_clients`` the fixed denominator
    ``m``; ``seed`` keys the noise streams (None: the OS's entropy). With
    ``target_epsilon`` and ``stop_at_budget`` the run stops before a round that would
    take ε at ``delta`` beyond it.
    """

    mechanism: str
    clip: float
    noise_multiplier: float
    expected_clients: float
    accountant: ClientAccountant
    delta: float
    seed: int | None
    target_epsilon: float | None = None
    stop_at_budget: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0

    def __post_init__(self) -> None:
        if self.mechanism not in ("central", "adaptive", "local"):
            raise ValueError(f"unknown client-level DP mechanism {self.mechanism!r}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be a positive number, got {self.clip!r}")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        self.update_multiplier = (
            update_noise_multiplier(self.noise_multiplier, self.count_stddev)
            if self.mechanism == "adaptive"
            else self.noise_multiplier
        )

    # -- RoundRelease --------------------------------------------------------------

    def fold_terms(self) -> tuple[FoldTerm, ...]:
        # Uniform weights: a client moves the sum by at most C, whatever its data size.
        return (FoldTerm(UPDATE_TERM, "model_parameters", 1.0),)

    def downlink(self, package: FedAvgDownlinkPackage, round: int) -> PrivateDownlinkPackage:
        local = self.noise_multiplier if self.mechanism == "local" else 0.0
        return PrivateDownlinkPackage(
            model_parameters=package.model_parameters,
            clip=self.clip,
            noise_multiplier=local,
            noise_seed=self.seed,
            round=round,
        )

    def release(
        self,
        model: torch.Tensor,
        sums: StreamingSum | None,
        kept: list[FedAvgUplinkPackage],
        round: int,
    ) -> torch.Tensor:
        for package in kept:
            if not isinstance(package, PrivateUplinkPackage):
                raise TypeError(
                    f"the uplink of client {package.cid} is not clipped "
                    f"({type(package).__name__}): the clients must run the DP client step"
                )
        n = model.numel()
        total = (
            sums.sum(UPDATE_TERM).to(torch.float64)
            if sums is not None
            else torch.zeros(n, dtype=torch.float64)
        )
        if self.mechanism == "local":
            # The clients noised their updates: averaging them is post-processing.
            if not kept:
                return model.clone()
            denominator = float(len(kept))
        else:
            if self.update_multiplier > 0:
                noise = gaussian(n, self.seed, round, Purpose.UPDATE)
                total = total + (self.update_multiplier * self.clip) * noise
            denominator = self.expected_clients
        released = (model.to(torch.float64) + total / denominator).to(model.dtype)
        if self.mechanism == "adaptive":
            self._adapt_clip(kept, round)
        return released

    def _adapt_clip(self, kept: list[FedAvgUplinkPackage], round: int) -> None:
        within = sum((p.metadata or {}).get("clip_bit", 0.0) for p in kept)
        noisy = within + self.count_stddev * float(gaussian(1, self.seed, round, Purpose.COUNT)[0])
        fraction = noisy / self.expected_clients
        self.clip = self.clip * math.exp(-self.clip_lr * (fraction - self.target_quantile))

    def epsilon(self, rounds: int) -> float:
        """ε at :attr:`delta` after ``rounds`` rounds."""
        return self.accountant.epsilon(self.noise_multiplier, rounds, self.delta)

    def summary(self, round: int) -> dict[str, float]:
        return {
            "epsilon": self.epsilon(round),
            "clip_norm": self.clip,
            "noise_multiplier": self.noise_multiplier,
        }

    def exhausted(self, round: int) -> bool:
        if not self.stop_at_budget or self.target_epsilon is None:
            return False
        return self.epsilon(round + 1) > self.target_epsilon

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "dp.clip": torch.tensor([self.clip], dtype=torch.float64),
            "dp.noise_multiplier": torch.tensor([self.noise_multiplier], dtype=torch.float64),
        }

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for key in ("dp.clip", "dp.noise_multiplier"):
            value = state.get(key)
            if value is None or value.numel() != 1:
                raise ValueError(f"checkpoint state lacks {key} (a run without --dp?)")
        saved = float(state["dp.noise_multiplier"].item())
        if saved != self.noise_multiplier:
            raise ValueError(
                f"the checkpoint's noise multiplier {saved} differs from this run's "
                f"{self.noise_multiplier}"
            )
        self.clip = float(state["dp.clip"].item())
