"""Privacy accounting with Google's ``dp-accounting`` (``pip install 'emberfl[privacy]'``).

A round of client-level DP is one DP event, and the event must match how the round
chose its clients:

* ``poisson`` sampling (every client on its own with probability ``q``, the sampling
  DP-FedAvg's analysis assumes): ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
  under add/remove-one-client neighbours, where ``z`` is the noise's standard
  deviation over the clip norm ``C`` (a client changes the sum by at most ``C``);
* ``fixed``-size sampling (``K = int(N q)`` of ``N`` clients without replacement):
  ``SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z / 2))`` under
  replace-one-client neighbours, since replacing a client changes the sum by up to
  ``2C``. RDP only: ``dp-accounting``'s PLD accountant has no such event;
* ``local`` DP (every client noises its own clipped update): each release is
  ``GaussianDpEvent(z / 2)`` of that client (its two possible updates differ by up to
  ``2C``), composed over every round -- the guarantee of a client that takes part in
  all of them, with no credit for sampling.

``T`` rounds compose as ``SelfComposedDpEvent(event, T)``; ε at δ comes from the RDP
or the PLD accountant. Calibration (``--target-epsilon``) is
``dp_accounting.calibrate_dp_mechanism`` over ``z`` for the planned rounds.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ACCOUNTANTS", "ClientAccountant", "require_dp_accounting"]

#: The ``--accountant`` choices.
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")


def require_dp_accounting() -> Any:
    """The ``dp_accounting`` module; one clear ``ImportError`` line when it is missing."""
    try:
        import dp_accounting
    except ModuleNotFoundError:
        raise ImportError(
            "differential privacy needs Google's dp-accounting: pip install 'emberfl[privacy]'"
        ) from None
    return dp_accounting


@dataclass(frozen=True)
class ClientAccountant:
    """The privacy loss of ``rounds`` rounds of one client-level mechanism.

    ``sampling`` is ``"poisson"``, ``"fixed"`` or ``"local"`` (see the module);
    ``num_clients`` ``N`` and ``sample_ratio`` ``q`` describe the sampler (``K = int(N
    q)`` for ``fixed``); ``accountant`` is ``"rdp"`` or ``"pld"``.
    """

    sampling: str
    num_clients: int
    sample_ratio: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if self.sampling not in ("poisson", "fixed", "local"):
            raise ValueError(f"unknown sampling {self.sampling!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(
                f"unknown accountant {self.accountant!r}; choose one of: {', '.join(ACCOUNTANTS)}"
            )
        if self.sampling == "fixed" and self.accountant == "pld":
            raise ValueError(
                "the PLD accountant has no event for fixed-size sampling without "
                "replacement; use --sampler poisson or --accountant rdp"
            )

    def event(self, noise_multiplier: float, rounds: int) -> Any:
        """The DP event of ``rounds`` rounds with noise multiplier ``z``."""
        dpa = require_dp_accounting()
        if self.sampling == "poisson":
            one = dpa.PoissonSampledDpEvent(
                self.sample_ratio, dpa.GaussianDpEvent(noise_multiplier)
            )
        elif self.sampling == "fixed":
            k = int(self.num_clients * self.sample_ratio)
            one = dpa.SampledWithoutReplacementDpEvent(
                self.num_clients, k, dpa.GaussianDpEvent(noise_multiplier / 2.0)
            )
        else:
            one = dpa.GaussianDpEvent(noise_multiplier / 2.0)
        return dpa.SelfComposedDpEvent(one, rounds)

    def _fresh(self) -> Any:
        dpa = require_dp_accounting()
        if self.accountant == "pld":
            return dpa.pld.PLDAccountant()
        relation = (
            dpa.NeighboringRelation.REPLACE_ONE
            if self.sampling == "fixed"
            else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
        )
        return dpa.rdp.RdpAccountant(neighboring_relation=relation)

    def epsilon(self, noise_multiplier: float, rounds: int, delta: float) -> float:
        """ε at ``delta`` after ``rounds`` rounds (0 before any; inf without noise)."""
        return _epsilon(self, float(noise_multiplier), int(rounds), float(delta))

    def calibrate(self, target_epsilon: float, delta: float, rounds: int) -> float:
        """The smallest noise multiplier (to the accountant's tolerance) whose ε after
        ``rounds`` rounds is at most ``target_epsilon``."""
        return _calibrate(self, float(target_epsilon), float(delta), int(rounds))


@functools.lru_cache(maxsize=4096)
def _epsilon(acc: ClientAccountant, z: float, rounds: int, delta: float) -> float:
    if rounds <= 0:
        return 0.0
    if z <= 0:
        return math.inf
    accountant = acc._fresh()
    accountant.compose(acc.event(z, rounds))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def _calibrate(acc: ClientAccountant, target: float, delta: float, rounds: int) -> float:
    dpa = require_dp_accounting()
    z = dpa.calibrate_dp_mechanism(
        acc._fresh,
        lambda noise: acc.event(noise, rounds),
        target,
        delta,
        dpa.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4,
    )
    return float(z)
