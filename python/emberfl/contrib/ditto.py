"""Ditto (Li et al., ICML 2021): fair and robust federated learning through personalization.

Algorithm 1 of the paper with FedAvg as the global solver. Every client ``k`` keeps
a personal model ``v_k`` next to the global model ``w``. Selected in round ``t``, it
receives ``w^t`` and

* global update: runs FedAvg's local SGD from ``w^t`` and uploads the result; the
  server takes FedAvg's data-size weighted mean;
* personal update: takes ``ditto_personal_epochs`` epochs of SGD (learning rate
  ``lr``) on::

      F_k(v) + lambda / 2 * ||v - w^t||^2

  from its stored ``v_k`` (from ``w^t`` the first time it is selected): the gradient
  plus ``lambda * (v - w^t)`` on the trainable parameters, after every backward
  pass. Buffers (batch-norm statistics) are the personal model's own.

Why: ``lambda`` moves each client between a purely local model (``lambda = 0``) and
the global one (``lambda`` large). The personal models never reach the server, so
the global model is FedAvg's, and a client's model is only as good for it as its
own data and the global model allow.

``v_k`` is never held in memory between rounds: it is the full state vector in
``<state_dir>/<cid>.safetensors`` (a :class:`~emberfl.contrib.ClientStateStore`,
like SCAFFOLD's controls), so the run directory and its checkpoints keep it and
``emberfl resume`` continues bit for bit.

Personalized accuracy: each client splits its training samples once into a train
and a held-out part (``ditto_holdout`` of them, at least one, when it has two or
more), by a permutation seeded from ``(seed, cid)`` alone, so the split is the same
every round and on every layout. Both trainings use only the train part; the batch
order of both comes from the client's own generator (global epochs first, then the
personal ones). The client evaluates ``w^t`` and its updated ``v_k`` on its held-out
part and puts the numbers in its uplink's metadata (``personal_acc``,
``personal_loss``, ``global_local_acc``, ``global_local_loss``): scalars, which
survive folding and multi-rank stand-ins. ``data_size`` counts the train part.

The server's :meth:`~DittoServerHandler.get_summary` adds ``personal_acc_mean`` and
``personal_acc_std`` (unweighted mean and population std over the round's clients:
each client counts once, as fairness is measured in the paper) and
``global_local_acc_mean`` / ``global_local_acc_std`` (the received global model on
the same held-out parts); ``emberfl run`` writes them as metrics.csv columns. With
``eval_every > 1`` the rounds that are not evaluated still train personal models;
the summary of an evaluated round covers that round's clients only. A client with
fewer than two samples has no held-out part and is left out of the summary (NaN
when no client has one).

The batched runtime trains one stacked model per group of clients; Ditto trains two
models per client from different starting points, so it is refused there.

Settings: ``ditto_lambda`` (``--ditto-lambda``), ``ditto_personal_epochs``
(``--ditto-personal-epochs``), ``ditto_holdout`` (``--ditto-holdout``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from emberfl.contrib.algorithm import Algorithm, fedavg_server
from emberfl.contrib.fedavg import (
    BatchedClientStep,
    FedAvgBaseServerHandler,
    FedAvgClientUpdate,
    FedAvgDownlinkPackage,
    FedAvgUplinkPackage,
)
from emberfl.core import current_client, deserialize_model, serialize_model
from emberfl.core.checks import at_least, check_fraction, check_nonnegative_number
from emberfl.core.client_state import ClientStateStore
from emberfl.core.setting import Setting
from emberfl.core.training import StopSignal, evaluate_loader, local_sgd
from emberfl.data.mapped import MappedArrayDataset, MappedDataLoader
from emberfl.reproducibility import check_client_id, check_seed

__all__ = [
    "DITTO",
    "DITTO_HOLDOUT",
    "DITTO_LAMBDA",
    "DITTO_PERSONAL_EPOCHS",
    "PERSONAL_KEY",
    "DittoClientUpdate",
    "DittoServerHandler",
    "holdout_split",
    "split_loader",
]

#: Name of the personal model's state vector in a client's state file.
PERSONAL_KEY = "ditto.personal"

#: The metadata keys a client's uplink carries, and the summary keys made of them.
_ACC_KEYS = ("personal_acc", "global_local_acc")

# Spawn key of the held-out split's seed: (seed, cid) padded and tagged, never equal
# to the entropy of a client's (seed, cid, round) stream.
_SPLIT_TAG = 0x44_49_54_54  # "DITT"


_GROUP = "algorithm hyper-parameters"
DITTO_LAMBDA = Setting(
    "ditto_lambda",
    float,
    0.1,
    "Ditto's lambda: pull of each personal model towards the global one",
    group=_GROUP,
    owner="ditto",
    check=check_nonnegative_number,
)
DITTO_PERSONAL_EPOCHS = Setting(
    "ditto_personal_epochs",
    int,
    1,
    "Ditto's local epochs of the personal model per round",
    group=_GROUP,
    owner="ditto",
    check=at_least(1),
)
DITTO_HOLDOUT = Setting(
    "ditto_holdout",
    float,
    0.2,
    "fraction of each client's samples held out to evaluate its personal model (Ditto)",
    group=_GROUP,
    owner="ditto",
    check=check_fraction,
)


# -- the held-out split ---------------------------------------------------------------


def holdout_split(
    n: int, fraction: float, seed: int, cid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)`` positions (sorted int64) of a client's ``n`` samples.

    ``floor(fraction * n)`` samples, clamped to ``[1, n - 1]``, are held out when
    ``n >= 2``, none otherwise; which ones depends on ``(seed, cid)`` only.
    """
    fraction = check_fraction(fraction, "ditto_holdout")
    entropy = np.random.SeedSequence(
        [check_seed(seed), check_client_id(cid)], spawn_key=(_SPLIT_TAG,)
    )
    g = torch.Generator().manual_seed(int(entropy.generate_state(1, np.uint64)[0]) >> 1)
    held = min(max(int(fraction * n), 1), n - 1) if n >= 2 else 0
    order = torch.randperm(n, generator=g)
    return order[held:].sort().values, order[:held].sort().values


def _subset_loader(
    loader: DataLoader[Any],
    positions: torch.Tensor,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool,
) -> DataLoader[Any]:
    dataset = loader.dataset
    assert loader.batch_size is not None
    if isinstance(dataset, MappedArrayDataset):
        return MappedDataLoader(
            dataset.subset(positions),
            batch_size=loader.batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=drop_last,
        )
    subset: Dataset[Any] = Subset(dataset, positions.tolist())
    return DataLoader(
        subset,
        batch_size=loader.batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        collate_fn=loader.collate_fn,
        num_workers=0,
    )


def split_loader(
    loader: DataLoader[Any], fraction: float, seed: int, cid: int
) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
    """A client's train loader and held-out loader (``None`` with no held-out part).

    The train loader keeps ``loader``'s batch size, shuffling, ``drop_last`` and
    generator, so its batch order is drawn from the client's own stream; the
    held-out loader reads in order and draws only from a private generator.
    """
    dataset = loader.dataset
    if not isinstance(dataset, Sized):
        raise TypeError("Ditto splits each client's data: its dataset must have a length")
    if loader.batch_size is None:
        raise ValueError("Ditto splits each client's data: its loader needs a batch_size")
    train, held = holdout_split(len(dataset), fraction, seed, cid)
    if held.numel() == 0:
        return loader, None
    shuffle = isinstance(loader.sampler, RandomSampler)
    return (
        _subset_loader(
            loader, train, shuffle=shuffle, generator=loader.generator, drop_last=loader.drop_last
        ),
        _subset_loader(loader, held, shuffle=False, generator=torch.Generator(), drop_last=False),
    )


# -- the client step ------------------------------------------------------------------


class DittoClientUpdate(FedAvgClientUpdate):
    """FedAvg's client step on the train part, then the personal update and the
    held-out evaluation (see the module's docstring)."""

    def __init__(self, ditto_lambda: float, personal_epochs: int = 1, holdout: float = 0.2):
        self.ditto_lambda = check_nonnegative_number(ditto_lambda, "ditto_lambda")
        self.personal_epochs = at_least(1)(personal_epochs, "ditto_personal_epochs")
        self.holdout = check_fraction(holdout, "ditto_holdout")

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
        start = time.perf_counter()
        if state is None:
            raise ValueError(
                "Ditto keeps each client's personal model on disk: give the trainer a state_dir"
            )
        train, held = split_loader(loader, self.holdout, current_client().seed, cid)
        package = super().__call__(
            cid=cid,
            model=model,
            payload=payload,
            loader=train,
            device=device,
            epochs=epochs,
            lr=lr,
            stop_event=stop_event,
            state=state,
        )
        dev = torch.device(device)
        metadata = dict(package.metadata or {})
        deserialize_model(model, payload.model_parameters)
        if held is not None:
            metadata["global_local_loss"], metadata["global_local_acc"] = evaluate_loader(
                model, held, dev
            )
        # The anchor w^t, on the trainable parameters, before v_k replaces it.
        anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
        personal = _stored_personal(state, cid, model)
        if personal is not None:
            deserialize_model(model, personal)
        result = local_sgd(
            model,
            train,
            dev,
            self.personal_epochs,
            lr,
            stop_event,
            after_backward=_proximal(anchors, self.ditto_lambda),
        )
        if held is not None:
            metadata["personal_loss"], metadata["personal_acc"] = evaluate_loader(model, held, dev)
        state.save(cid, {PERSONAL_KEY: serialize_model(model)})
        metadata["personal_steps"] = float(result.steps)
        metadata["train_seconds"] = time.perf_counter() - start
        package.metadata = metadata
        return package

    def batched_step(self) -> BatchedClientStep | None:
        # Two models per client, from different starting points: one stacked model per
        # group cannot hold them, so the batched runtime refuses Ditto.
        return None

    def __repr__(self) -> str:
        return (
            f"DittoClientUpdate(ditto_lambda={self.ditto_lambda}, "
            f"personal_epochs={self.personal_epochs}, holdout={self.holdout})"
        )


def _proximal(
    anchors: Sequence[tuple[torch.Tensor, torch.Tensor]], lam: float
) -> Callable[[], None] | None:
    """The gradient hook adding ``lam * (v - w^t)``; none at ``lam = 0`` (plain SGD)."""
    if lam == 0:
        return None

    def proximal_gradient() -> None:
        with torch.no_grad():
            for p, anchor in anchors:
                if p.grad is not None:
                    p.grad.add_(p - anchor, alpha=lam)

    return proximal_gradient


def _stored_personal(state: ClientStateStore, cid: int, model: nn.Module) -> torch.Tensor | None:
    """Client ``cid``'s personal state vector, checked against ``model``; None without one."""
    stored = state.load(cid)
    if stored is None:
        return None
    try:
        vector = stored[PERSONAL_KEY]
    except KeyError:
        raise ValueError(f"{state.path(cid)} holds no {PERSONAL_KEY!r} tensor") from None
    size = sum(t.numel() for t in model.state_dict().values())
    if vector.shape != (size,):
        raise ValueError(
            f"{state.path(cid)}: personal model of shape {tuple(vector.shape)}, the model "
            f"holds {size} state values"
        )
    return vector


# -- the server -----------------------------------------------------------------------


class DittoServerHandler(FedAvgBaseServerHandler):
    """FedAvg's server, whose summary adds the round's personalized accuracy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.round_accuracies: dict[str, list[float]] = {key: [] for key in _ACC_KEYS}

    def global_update(self, buffer: list[FedAvgUplinkPackage]) -> None:
        # Every client of the round counts, also one whose global update is dropped
        # for NaN/Inf: its personal model was evaluated all the same.
        found: dict[str, list[float]] = {key: [] for key in _ACC_KEYS}
        for package in sorted(buffer, key=lambda p: p.cid):
            metadata = package.metadata or {}
            for key in _ACC_KEYS:
                if key in metadata:
                    found[key].append(float(metadata[key]))
        self.round_accuracies = found
        super().global_update(buffer)

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_checkpoint_state(state)
        self.round_accuracies = {key: [] for key in _ACC_KEYS}

    def get_summary(self) -> dict[str, float]:
        """FedAvg's summary plus ``personal_acc_mean``/``_std`` and
        ``global_local_acc_mean``/``_std`` over the last round's clients (unweighted;
        population std)."""
        summary = super().get_summary()
        for key in _ACC_KEYS:
            mean, std = _mean_std(self.round_accuracies[key])
            summary[f"{key}_mean"] = mean
            summary[f"{key}_std"] = std
        return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (exactly rounded sums); NaN when empty."""
    if not values:
        return math.nan, math.nan
    mean = math.fsum(values) / len(values)
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


DITTO = Algorithm(
    "ditto",
    "Ditto (Li et al. 2021): FedAvg plus a personal model per client, "
    "regularised by lambda/2 ||v - w||^2",
    fedavg_server(DittoServerHandler),
    client=lambda options: DittoClientUpdate(
        options["ditto_lambda"], options["ditto_personal_epochs"], options["ditto_holdout"]
    ),
    settings=(DITTO_LAMBDA, DITTO_PERSONAL_EPOCHS, DITTO_HOLDOUT),
    client_state_on_disk=True,
)
