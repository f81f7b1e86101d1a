"""The ``--dp`` mechanisms and their settings: how a run becomes a private one.

Each :class:`Mechanism` says how it changes an algorithm's client step and which
server rule (:class:`~emberfl.contrib.privacy.mechanism.ClientLevelDP`) it sets on
the algorithm's server handler; :data:`MECHANISMS` is the registry ``--dp`` chooses
from. Client-level DP applies to the algorithms whose uplink is the client's model
alone (``Algorithm.client_dp``: FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from emberfl.contrib.algorithm import RunSettings
from emberfl.contrib.fedavg import (
    FedAvgClientUpdate,
    FedAvgPartitionedDataset,
    FedAvgPartitionType,
)
from emberfl.contrib.fedavg.server import RoundRelease
from emberfl.contrib.privacy.accountant import (
    ACCOUNTANTS,
    ClientAccountant,
    require_dp_accounting,
)
from emberfl.contrib.privacy.dpsgd import (
    SampleLevelDP,
    SampleLevelDPClientUpdate,
    calibrate_sample,
    require_opacus,
)
from emberfl.contrib.privacy.mechanism import (
    ClientLevelDP,
    PrivateClientUpdate,
    update_noise_multiplier,
)
from emberfl.contrib.privacy.noise import NOISE_SOURCES
from emberfl.core.checks import check_positive_number, check_unit_interval
from emberfl.core.setting import Setting

__all__ = [
    "MECHANISMS",
    "PRIVACY_SETTINGS",
    "Mechanism",
    "check_privacy",
    "privacy_record",
    "private_client_step",
    "server_privacy",
]

_GROUP = "privacy"
_OWNER = "--dp runs"


def _open_unit(value: object, what: str) -> float:
    number = check_positive_number(value, what)
    if not number < 1:
        raise ValueError(f"{what} must lie in (0, 1), got {value}")
    return number


#: Builds a mechanism's server rule from the run's settings and its data set.
ServerRule = Callable[[RunSettings, FedAvgPartitionedDataset], RoundRelease]


@dataclass(frozen=True)
class Mechanism:
    """One ``--dp`` choice: ``client`` wraps the algorithm's client step; ``server``
    builds the rule set on the algorithm's server handler (None: no rule);
    ``per_sample``: the guarantee is over a client's samples (Opacus's DP-SGD), not
    over whole clients."""

    name: str
    summary: str
    client: Callable[[FedAvgClientUpdate], FedAvgClientUpdate]
    server: ServerRule | None
    per_sample: bool = False


def _same(step: FedAvgClientUpdate) -> FedAvgClientUpdate:
    return step


def _client_level(s: RunSettings, dataset: FedAvgPartitionedDataset | None = None) -> ClientLevelDP:
    o = s.options
    z = noise_multiplier(s)
    return ClientLevelDP(
        mechanism=o["dp"],
        clip=o["clip"],
        noise_multiplier=z,
        expected_clients=expected_clients(s),
        accountant=_accountant(s),
        delta=o["delta"],
        seed=_noise_seed(s),
        target_epsilon=o["target_epsilon"],
        stop_at_budget=o["dp_budget"] == "stop",
        target_quantile=o["target_quantile"],
        clip_lr=o["clip_lr"],
        count_stddev=_count_stddev(s, z),
    )


def _sample_level(s: RunSettings, dataset: FedAvgPartitionedDataset) -> SampleLevelDP:
    o = s.options
    train = FedAvgPartitionType.TRAIN
    sizes = [len(dataset.get_dataset(train, cid)) for cid in range(s.clients)]  # type: ignore[arg-type]
    z = o["noise_multiplier"]
    if z is None:
        z = calibrate_sample(
            o["target_epsilon"], o["delta"], sizes, s.batch_size, s.epochs, s.rounds
        )
    return SampleLevelDP(
        clip=o["clip"],
        noise_multiplier=float(z),
        sizes=sizes,
        batch_size=s.batch_size,
        epochs=s.epochs,
        delta=o["delta"],
        seed=_noise_seed(s),
        target_epsilon=o["target_epsilon"],
        stop_at_budget=o["dp_budget"] == "stop",
    )


_ENTRIES: tuple[Mechanism, ...] = (
    Mechanism("none", "no differential privacy", _same, None),
    Mechanism(
        "central",
        "client-level DP-FedAvg (McMahan et al. 2018): clip each update, noise the sum once",
        PrivateClientUpdate,
        _client_level,
    ),
    Mechanism(
        "adaptive",
        "central DP with the clip norm tracking a quantile of the update norms "
        "(Andrew et al. 2021)",
        PrivateClientUpdate,
        _client_level,
    ),
    Mechanism(
        "local",
        "local DP: each client clips and noises its own update",
        PrivateClientUpdate,
        _client_level,
    ),
    Mechanism(
        "sample",
        "sample-level DP-SGD inside each client, with Opacus (--clip bounds each "
        "sample's gradient)",
        SampleLevelDPClientUpdate,
        _sample_level,
        per_sample=True,
    ),
)

#: The ``--dp`` mechanisms by name.
MECHANISMS: Mapping[str, Mechanism] = MappingProxyType({m.name: m for m in _ENTRIES})

#: The privacy settings (config keys and ``emberfl run`` flags).
PRIVACY_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "dp",
        str,
        "none",
        "differential privacy: " + "; ".join(f"{m.name}: {m.summary}" for m in _ENTRIES),
        _GROUP,
        choices=tuple(MECHANISMS),
    ),
    Setting(
        "clip",
        float,
        1.0,
        "L2 clip norm C of each client's model update (the initial C with --dp adaptive; "
        "of each sample's gradient with --dp sample)",
        _GROUP,
        check_positive_number,
        owner=_OWNER,
    ),
    Setting(
        "noise_multiplier",
        float,
        None,
        "noise standard deviation over the clip norm (z); calibrated from "
        "--target-epsilon when not given",
        _GROUP,
        lambda v, what: v if v == 0 else check_positive_number(v, what),
        optional=True,
        owner=_OWNER,
    ),
    Setting(
        "target_epsilon",
        float,
        None,
        "privacy budget ε at --delta: calibrate the noise multiplier for the planned "
        "rounds, or stop the run when it is spent (--dp-budget)",
        _GROUP,
        check_positive_number,
        optional=True,
        owner=_OWNER,
    ),
    Setting("delta", float, 1e-5, "δ of the (ε, δ) guarantee", _GROUP, _open_unit, owner=_OWNER),
    Setting(
        "dp_budget",
        str,
        "calibrate",
        "what --target-epsilon does: calibrate the noise before round 1, or stop "
        "before the round that would spend more",
        _GROUP,
        choices=("calibrate", "stop"),
        owner=_OWNER,
    ),
    Setting(
        "accountant",
        str,
        "rdp",
        "privacy accountant of dp-accounting: Rényi DP, or privacy loss distributions "
        "(tighter; Poisson sampling or local DP only)",
        _GROUP,
        choices=ACCOUNTANTS,
        owner=_OWNER,
    ),
    Setting(
        "target_quantile",
        float,
        0.5,
        "adaptive clipping: the quantile of update norms the clip norm tracks",
        _GROUP,
        check_unit_interval,
        owner="adaptive",
    ),
    Setting(
        "clip_lr",
        float,
        0.2,
        "adaptive clipping: learning rate of the clip norm's geometric update",
        _GROUP,
        check_positive_number,
        owner="adaptive",
    ),
    Setting(
        "clip_count_stddev",
        float,
        None,
        "adaptive clipping: noise standard deviation of the clipped count",
        _GROUP,
        check_positive_number,
        optional=True,
        owner="adaptive",
        default_text="max(expected clients per round / 20, noise multiplier)",
    ),
    Setting(
        "dp_noise_source",
        str,
        "seeded",
        "where DP noise comes from: a stream keyed by (seed, round), the same bits on "
        "any layout and after a resume (simulation), or os.urandom (deployment)",
        _GROUP,
        choices=NOISE_SOURCES,
        owner=_OWNER,
    ),
)


# -- building ------------------------------------------------------------------------


def _sampling(s: RunSettings) -> str:
    return "local" if s.options["dp"] == "local" else s.sampler


def _accountant(s: RunSettings) -> ClientAccountant:
    return ClientAccountant(_sampling(s), s.clients, s.sample_ratio, s.options["accountant"])


def expected_clients(s: RunSettings) -> float:
    """The fixed denominator: the expected cohort size of the run's sampler."""
    if s.sampler == "poisson":
        return s.clients * s.sample_ratio
    return float(int(s.clients * s.sample_ratio))


def noise_multiplier(s: RunSettings) -> float:
    """The noise multiplier the accountant sees: given, or calibrated to the target."""
    o = s.options
    if o["noise_multiplier"] is not None:
        return float(o["noise_multiplier"])
    if o["target_epsilon"] is None:
        raise ValueError("--dp needs --noise-multiplier or --target-epsilon")
    return _accountant(s).calibrate(o["target_epsilon"], o["delta"], s.rounds)


def _noise_seed(s: RunSettings) -> int | None:
    return s.seed if s.options["dp_noise_source"] == "seeded" else None


def _count_stddev(s: RunSettings, z: float) -> float:
    # The paper's m/20, but never below z: a small cohort would otherwise leave the
    # update no share of the noise (2 sigma_b must exceed z).
    given = s.options["clip_count_stddev"]
    return float(given) if given is not None else max(expected_clients(s) / 20.0, z)


def server_privacy(s: RunSettings, dataset: FedAvgPartitionedDataset) -> RoundRelease | None:
    """The server rule of the run's ``--dp`` mechanism (None for ``none``)."""
    build = MECHANISMS[s.options["dp"]].server
    return None if build is None else build(s, dataset)


def private_client_step(step: FedAvgClientUpdate, options: Mapping[str, Any]) -> FedAvgClientUpdate:
    """The algorithm's client ``step`` as the run's ``--dp`` mechanism runs it."""
    return MECHANISMS[options["dp"]].client(step)


def check_privacy(s: RunSettings, client_dp: bool, algorithm: str) -> None:
    """``ValueError`` naming the conflict when the privacy settings cannot run
    together (or dp-accounting is missing); nothing for ``--dp none``."""
    o = s.options
    if o["dp"] == "none":
        return
    if not client_dp:
        raise ValueError(
            f"--dp {o['dp']} clips and noises a client's model update, but the uplink of "
            f"{algorithm!r} carries more (state or corrections the analysis does not "
            "cover); use fedavg, fedprox, fedadam, fedyogi or fedadagrad"
        )
    require_dp_accounting()
    given, target = o["noise_multiplier"], o["target_epsilon"]
    if o["dp_budget"] == "calibrate" and given is not None and target is not None:
        raise ValueError(
            "--noise-multiplier and --target-epsilon both given: with --dp-budget "
            "calibrate the multiplier is derived from the target; give one, or use "
            "--dp-budget stop"
        )
    if o["dp_budget"] == "stop" and target is not None and given is None:
        raise ValueError("--dp-budget stop needs --noise-multiplier (the run stops at the target)")
    if MECHANISMS[o["dp"]].per_sample:
        require_opacus()
        if getattr(s, "runtime", None) == "batched":
            raise ValueError(
                "--dp sample needs per-sample gradients of one model per client: use "
                "the process, thread or serial runtime"
            )
        return  # its calibration needs the clients' sizes: done with the data
    _accountant(s)  # refuses PLD with fixed-size sampling
    z = noise_multiplier(s)
    if o["dp"] == "adaptive":
        update_noise_multiplier(z, _count_stddev(s, z))


def privacy_record(s: RunSettings) -> dict[str, Any] | None:
    """The derived privacy parameters config.json records (None without ``--dp``, and
    for ``--dp sample``, whose noise depends on the clients' data: its figures are in
    metrics.csv)."""
    mechanism = MECHANISMS[s.options["dp"]]
    if mechanism.server is None or mechanism.per_sample:
        return None
    rule = _client_level(s)
    epsilon = rule.epsilon(s.rounds)
    return {
        "mechanism": rule.mechanism,
        "noise_multiplier": rule.noise_multiplier,
        "update_noise_multiplier": rule.update_multiplier,
        "clipped_count_stddev": rule.count_stddev if rule.mechanism == "adaptive" else None,
        "expected_clients_per_round": rule.expected_clients,
        "sampling": rule.accountant.sampling,
        "accountant": rule.accountant.accountant,
        "dp_event": str(rule.accountant.event(rule.noise_multiplier, s.rounds)),
        "epsilon_after_all_rounds": epsilon if math.isfinite(epsilon) else None,
        "delta": rule.delta,
    }
