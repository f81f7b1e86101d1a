"""Sample-level DP inside the clients: DP-SGD (Abadi et al. 2016) with Opacus.

Every local step of a client computes per-sample gradients with Opacus's
``GradSampleModule`` hooks, clips each sample's gradient to L2 norm ``C`` and adds
Gaussian noise once to their sum::

    g = (Σ_i g_i · min(1, C / ||g_i||) + N(0, σ² C² I)) / B

before the algorithm's own gradient hook (FedProx's proximal term, which reads no
data) and the SGD step. The noise is drawn from the client's stream keyed by
``(seed, round, cid)``, step after step, so a client's update does not depend on the
worker that trains it. The server is the algorithm's own; it only counts how often each
client took part.

The guarantee is per client, over its own samples: Opacus's RDP accountant with sample
rate ``q_k = B / n_k`` and ``E * ceil(n_k / B)`` steps for each round the client took
part in; the run reports the largest ε among its clients. That accountant assumes
Poisson-sampled batches, while the clients' loaders shuffle into fixed-size batches, as
most DP-SGD code in federated learning does: the reported ε is the conventional figure
for that practice, not a proof for it (Opacus says the same of such loaders).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from emberfl.contrib.fedavg import (
    BatchedClientStep,
    FedAvgClientUpdate,
    FedAvgDownlinkPackage,
    FedAvgUplinkPackage,
    LocalRun,
)
from emberfl.contrib.privacy.mechanism import PrivateDownlinkPackage, private_payload
from emberfl.contrib.privacy.noise import NoiseStream, Purpose
from emberfl.core import FoldTerm
from emberfl.streaming import StreamingSum

__all__ = ["SampleLevelDP", "SampleLevelDPClientUpdate", "require_opacus"]


def require_opacus() -> Any:
    """The ``opacus`` module; one clear ``ImportError`` line when it is missing."""
    try:
        import opacus
    except ModuleNotFoundError:
        raise ImportError(
            "--dp sample trains with Opacus: pip install 'emberfl[privacy]'"
        ) from None
    return opacus


class SampleLevelDPClientUpdate(FedAvgClientUpdate):
    """An algorithm's client step (``inner``) trained with DP-SGD: see the module."""

    def __init__(self, inner: FedAvgClientUpdate) -> None:
        if not isinstance(inner, FedAvgClientUpdate):
            raise TypeError(f"expected a FedAvgClientUpdate, got {type(inner).__name__}")
        self.inner = inner

    def begin(self, run: LocalRun) -> None:
        down = private_payload(run.payload)
        opacus = require_opacus()
        from opacus.validators import ModuleValidator

        problems = ModuleValidator.validate(run.model, strict=False)
        if problems:
            raise ValueError(
                "--dp sample needs per-sample gradients, which this model's layers do "
                f"not allow: {problems[0]} (choose a model without BatchNorm)"
            )
        # Opacus's backward hooks refuse in-place activations; out of place they give
        # the same values.
        for module in run.model.modules():
            if isinstance(getattr(module, "inplace", None), bool):
                module.inplace = False  # type: ignore[assignment]
        # Hooks on the model's own layers: local SGD calls the model as it is.
        run.extra["dp.module"] = opacus.GradSampleModule(
            run.model, batch_first=True, loss_reduction="mean", strict=True
        )
        run.extra["dp.noise"] = NoiseStream(down.noise_seed, down.round, Purpose.SAMPLE, run.cid)
        self.inner.begin(run)

    def after_backward(self, run: LocalRun) -> Callable[[], None] | None:
        down = private_payload(run.payload)
        params = [p for p in run.model.parameters() if p.requires_grad]
        noise: NoiseStream = run.extra["dp.noise"]
        clip, scale = down.clip, down.noise_multiplier * down.clip
        inner = self.inner.after_backward(run)

        def private_gradient() -> None:
            with torch.no_grad():
                samples: list[torch.Tensor] = [p.grad_sample for p in params]  # type: ignore[attr-defined]
                batch = samples[0].shape[0]
                squares = torch.stack([g.reshape(batch, -1).pow(2).sum(1) for g in samples])
                norms = squares.sum(0).sqrt()
                # Opacus's own rule: min(1, C / (||g_i|| + 1e-6)).
                factors = (clip / (norms + 1e-6)).clamp(max=1.0)
                for p, g in zip(params, samples, strict=True):
                    summed = torch.einsum("i,i...->...", factors, g)
                    drawn = noise.draw(p.numel()).reshape(p.shape).to(p.dtype)
                    p.grad = (summed + scale * drawn.to(summed.device)) / batch
                    p.grad_sample = None  # type: ignore[attr-defined]
            if inner is not None:
                inner()

        return private_gradient

    def finish(
        self, run: LocalRun, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        run.extra.pop("dp.module")._close()  # removes the hooks from the model
        return self.inner.finish(run, package, steps)

    def batched_step(self) -> BatchedClientStep | None:
        return None  # per-sample gradients need one model per client

    def __repr__(self) -> str:
        return f"SampleLevelDPClientUpdate({self.inner!r})"


def _client_steps(size: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """A client's sample rate and its DP-SGD steps in one round."""
    return min(1.0, batch_size / size), epochs * math.ceil(size / batch_size)


def sample_epsilon(
    noise_multiplier: float,
    sizes: Sequence[int],
    participations: Sequence[int],
    batch_size: int,
    epochs: int,
    delta: float,
) -> float:
    """The largest per-client ε at ``delta`` (Opacus's RDP accountant): client ``k``
    with ``sizes[k]`` samples took part in ``participations[k]`` rounds."""
    require_opacus()
    from opacus.accountants import RDPAccountant

    worst = 0.0
    for (size, times), _ in Counter(zip(sizes, participations, strict=True)).items():
        if times == 0 or size == 0:
            continue
        if noise_multiplier <= 0:
            return math.inf
        rate, steps = _client_steps(size, batch_size, epochs)
        accountant = RDPAccountant()
        accountant.history = [(noise_multiplier, rate, steps * times)]
        worst = max(worst, float(accountant.get_epsilon(delta)))
    return worst


def calibrate_sample(
    target_epsilon: float,
    delta: float,
    sizes: Sequence[int],
    batch_size: int,
    epochs: int,
    rounds: int,
) -> float:
    """The noise multiplier whose ε is at most the target for every client even if it
    takes part in every one of ``rounds`` rounds (Opacus's calibration, per size)."""
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    needed = 0.0
    for size in sorted({s for s in sizes if s > 0}):
        rate, steps = _client_steps(size, batch_size, epochs)
        z = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps * rounds,
            accountant="rdp",
        )
        needed = max(needed, float(z))
    return needed


@dataclass
class SampleLevelDP:
    """The server's side of ``--dp sample`` (a
    :class:`~emberfl.contrib.fedavg.server.RoundRelease`): FedAvg's fold and mean, a
    downlink that tells the clients ``C`` and ``σ``, and the per-client accounting."""

    clip: float
    noise_multiplier: float
    sizes: list[int]
    batch_size: int
    epochs: int
    delta: float
    seed: int | None
    target_epsilon: float | None = None
    stop_at_budget: bool = False
    participations: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.participations:
            self.participations = [0] * len(self.sizes)

    def fold_terms(self) -> tuple[FoldTerm, ...]:
        return (FoldTerm("model", "model_parameters", "data_size"),)

    def downlink(self, package: FedAvgDownlinkPackage, round: int) -> PrivateDownlinkPackage:
        return PrivateDownlinkPackage(
            model_parameters=package.model_parameters,
            clip=self.clip,
            noise_multiplier=self.noise_multiplier,
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
            self.participations[package.cid] += 1
        if sums is None or not sums.totals[0] > 0:
            return model.clone()
        return sums.mean("model")

    def epsilon(self, participations: Sequence[int] | None = None) -> float:
        times = self.participations if participations is None else participations
        return sample_epsilon(
            self.noise_multiplier, self.sizes, times, self.batch_size, self.epochs, self.delta
        )

    def summary(self, round: int) -> dict[str, float]:
        return {
            "epsilon": self.epsilon(),
            "clip_norm": self.clip,
            "noise_multiplier": self.noise_multiplier,
        }

    def exhausted(self, round: int) -> bool:
        if not self.stop_at_budget or self.target_epsilon is None:
            return False
        # Whoever takes part next: stop when any client's next round would overspend.
        return self.epsilon([t + 1 for t in self.participations]) > self.target_epsilon

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "dp.participations": torch.tensor(self.participations, dtype=torch.int64),
            "dp.noise_multiplier": torch.tensor([self.noise_multiplier], dtype=torch.float64),
        }

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        value = state.get("dp.participations")
        if value is None or value.numel() != len(self.sizes):
            raise ValueError(
                "checkpoint state lacks dp.participations (a run without --dp sample?)"
            )
        self.participations = [int(v) for v in value.tolist()]
