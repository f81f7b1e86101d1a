"""What an algorithm is: a client step, a server rule and its settings, in one entry.

An :class:`Algorithm` says everything ``emberfl run`` needs to run one:

* ``client`` -- its client step (a :class:`~emberfl.contrib.FedAvgClientUpdate`: what a
  client does with the global model and its data, with an optional batched form and
  optional per-client state on disk), built from the run's settings. Every runtime
  (serial, thread, process, batched, and any of them on several ranks) takes the step
  as it is: there is no per-runtime subclass;
* ``server`` -- its server handler (how the folded sums become the next model, and
  any server state), built from the run's settings;
* ``settings`` -- its hyper-parameters, each a :class:`~emberfl.core.setting.Setting`
  declared once in the algorithm's module, from which the configuration keys, the
  ``emberfl run`` flags, their checks and the settings reference are made.

An algorithm is its module plus one line in :mod:`emberfl.contrib.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from emberfl.contrib.fedavg import (
    FedAvgBaseServerHandler,
    FedAvgClientUpdate,
    FedAvgPartitionedDataset,
    NonFinitePolicy,
)
from emberfl.core import ModelSelector
from emberfl.core.setting import Setting
from emberfl.runtimes.registry import TrainerSettings

__all__ = [
    "FEDAVG",
    "Algorithm",
    "ClientFactory",
    "RunSettings",
    "ServerFactory",
    "fedavg_client",
    "fedavg_server",
]


class RunSettings(TrainerSettings, Protocol):
    """The settings of a run that building its server handler and client trainer reads
    (``emberfl.config.SimulationConfig`` satisfies it; this layer knows nothing of it).

    ``options`` holds the value of every algorithm's settings, by setting name."""

    @property
    def rounds(self) -> int: ...
    @property
    def sample_ratio(self) -> float: ...
    @property
    def eval_batch_size(self) -> int: ...
    @property
    def nonfinite(self) -> str: ...
    @property
    def sampler(self) -> str: ...
    @property
    def options(self) -> Mapping[str, Any]: ...


#: Builds a server handler from (model selector, dataset, settings).
ServerFactory = Callable[
    [ModelSelector[Any], FedAvgPartitionedDataset, RunSettings], FedAvgBaseServerHandler
]

#: Builds the client step from the algorithms' settings (``RunSettings.options``).
ClientFactory = Callable[[Mapping[str, Any]], FedAvgClientUpdate]


def fedavg_client(options: Mapping[str, Any]) -> FedAvgClientUpdate:
    """FedAvg's client step (local SGD), which most server-side algorithms keep."""
    return FedAvgClientUpdate()


@dataclass(frozen=True)
class Algorithm:
    """One algorithm ``emberfl run --algorithm NAME`` can run.

    ``client_state_on_disk``: its clients keep state between rounds in files under
    the trainer's ``state_dir`` (SCAFFOLD's controls), which then belong to the run
    directory and its checkpoints. ``client_dp``: its uplink is the client's model
    alone, so client-level DP (``--dp``, :mod:`emberfl.contrib.privacy`) can send the
    clipped update instead and the server step take the noised mean. ``summary`` is
    the line ``--help`` and the settings reference show.
    """

    name: str
    summary: str
    server: ServerFactory
    client: ClientFactory = fedavg_client
    settings: tuple[Setting, ...] = ()
    client_state_on_disk: bool = False
    client_dp: bool = False


def fedavg_server(cls: type[FedAvgBaseServerHandler], *options: str) -> ServerFactory:
    """A factory of ``cls`` with FedAvg's server arguments plus, as keywords of the
    same names, the settings ``options``."""

    def build(
        selector: ModelSelector[Any], dataset: FedAvgPartitionedDataset, s: RunSettings
    ) -> FedAvgBaseServerHandler:
        extra = {name: s.options[name] for name in options}
        return cls(
            selector,
            s.model_name,
            dataset,
            s.rounds,
            s.clients,
            s.sample_ratio,
            s.device,
            s.eval_batch_size,
            s.seed,
            # The handler checks the value and names it in its error.
            nonfinite=cast("NonFinitePolicy", s.nonfinite),
            sampler=s.sampler,
            **extra,
        )

    return build


FEDAVG = Algorithm(
    "fedavg",
    "Federated Averaging (McMahan et al. 2017): local SGD, data-size weighted mean",
    fedavg_server(FedAvgBaseServerHandler),
    client_dp=True,
)
