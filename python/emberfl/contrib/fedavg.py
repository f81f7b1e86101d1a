"""Federated Averaging (McMahan et al. 2017) with BlazeFL 3.0's class names.

The pieces, each an extension point for the other algorithms of this package:

* packages -- :class:`FedAvgDownlinkPackage` (the global state vector) and
  :class:`FedAvgUplinkPackage` (a client's state vector, its number of samples and
  training metadata: ``loss``, ``steps``, ``train_seconds``);
* :class:`FedAvgClientUpdate` -- what one client does in a round. FedProx and
  SCAFFOLD subclass it through three hooks (``begin``, ``after_backward``,
  ``finish``); it is stateless, so one object serves every thread and pickles into
  worker processes;
* :class:`FedAvgBaseServerHandler` -- sampling, aggregation and evaluation. The
  uplinks are summed by the aggregation kernel directly on the tensors the
  workers' files map -- either as a list in :meth:`~FedAvgBaseServerHandler.global_update`
  or one by one while the round runs (:meth:`~FedAvgBaseServerHandler.fold_uplink`,
  bitwise the same result) -- and the mean is handed to
  :meth:`~FedAvgBaseServerHandler.apply_update` (FedOpt and SCAFFOLD override it);
* three client trainers with BlazeFL's constructors: serial
  (:class:`FedAvgBaseClientTrainer`), worker processes
  (:class:`FedAvgProcessPoolClientTrainer`) and threads
  (:class:`FedAvgThreadPoolClientTrainer`). All three give bitwise identical uplinks
  for the same seed: every client's batch order comes from the generator of
  ``(seed, cid, round)`` (:func:`emberfl.core.current_client`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from emberfl import aggregate
from emberfl.aggregate import NonFiniteError
from emberfl.contrib.client_state import ClientStateStore
from emberfl.contrib.training import StopSignal, evaluate_loader, local_sgd
from emberfl.core import (
    BaseClientTrainer,
    BaseServerHandler,
    ClientContext,
    ModelSelector,
    PartitionedDataset,
    ProcessPoolClientTrainer,
    ThreadPoolClientTrainer,
    current_client,
    deliver_uplink,
    deserialize_model,
    serialize_model,
)
from emberfl.core.context import client_scope
from emberfl.core.runtime import available_cpus
from emberfl.reproducibility import (
    RandomStateSnapshot,
    create_rng_suite,
    restore_rng_suite,
    rng_suite_state,
    seed_client,
)

__all__ = [
    "FedAvgBaseClientTrainer",
    "FedAvgBaseServerHandler",
    "FedAvgClientConfig",
    "FedAvgClientUpdate",
    "FedAvgDownlinkPackage",
    "FedAvgPartitionType",
    "FedAvgPartitionedDataset",
    "FedAvgProcessPoolClientTrainer",
    "FedAvgThreadPoolClientTrainer",
    "FedAvgUplinkPackage",
    "LocalRun",
    "NonFinitePolicy",
]

logger = logging.getLogger(__name__)

NonFinitePolicy = Literal["raise", "drop"]


# ----------------------------------------------------------------------- packages


@dataclass
class FedAvgUplinkPackage:
    """A client's result: its model state vector, sample count and training metadata.

    ``metadata`` holds ``loss`` (mean training cross-entropy), ``steps`` (optimizer
    steps) and ``train_seconds`` (wall time of the client's update).
    """

    cid: int
    model_parameters: torch.Tensor
    data_size: int
    metadata: dict[str, float] | None = None


@dataclass
class FedAvgDownlinkPackage:
    """What every client of a round receives: the global model's state vector."""

    model_parameters: torch.Tensor


class FedAvgPartitionType(str, Enum):
    """The partition types of a FedAvg dataset (BlazeFL's ``StrEnum``, 3.10-compatible)."""

    TRAIN = "train"
    TEST = "test"

    def __str__(self) -> str:
        return self.value


FedAvgPartitionedDataset = PartitionedDataset[FedAvgPartitionType]


# ------------------------------------------------------------------ client update


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
        assert package.metadata is not None
        package.metadata["train_seconds"] = time.perf_counter() - start
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ------------------------------------------------------------------ server handler


def _check_seed(seed: int) -> int:
    # Client streams hash (seed, cid, round) as 32-bit words.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return seed


def _check_positive_int(value: int, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


class FedAvgBaseServerHandler(BaseServerHandler[FedAvgUplinkPackage, FedAvgDownlinkPackage]):
    """The FedAvg server: samples clients, averages their models, evaluates.

    Arguments are BlazeFL's; ``batch_size`` is the evaluation batch size. Extra
    keyword arguments:

    ``nonfinite``
        ``"raise"`` (default): an uplink holding NaN or Inf makes
        :meth:`global_update` raise :class:`~emberfl.aggregate.NonFiniteError` naming
        the clients. ``"drop"``: such clients are left out of the average with a
        warning (their ids are in :attr:`dropped`); when none is left the global
        model stays as it was.
    ``aggregation_threads``
        Threads of the aggregation kernel (default: the CPUs available). The result
        is bitwise the same for any count.

    State that a checkpoint needs: ``model``, ``round`` and ``rng_suite`` (the
    client sampler); :meth:`checkpoint_state` gathers it.

    Memory: set ``trainer.on_uplink = handler.fold_uplink`` and every uplink is
    folded into running sums while the round runs, its file deleted right after; the
    round then holds a few uplinks at a time instead of all of them, with the same
    result bit for bit.
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        dataset: FedAvgPartitionedDataset,
        global_round: int,
        num_clients: int,
        sample_ratio: float,
        device: str,
        batch_size: int,
        seed: int,
        *,
        nonfinite: NonFinitePolicy = "raise",
        aggregation_threads: int | None = None,
    ) -> None:
        _check_positive_int(global_round, "global_round")
        _check_positive_int(num_clients, "num_clients")
        _check_positive_int(batch_size, "batch_size")
        if not (isinstance(sample_ratio, int | float) and 0 < sample_ratio <= 1):
            raise ValueError(f"sample_ratio must be in the interval (0, 1], got {sample_ratio!r}")
        num_clients_per_round = int(num_clients * sample_ratio)
        if num_clients_per_round <= 0:
            raise ValueError(
                "sample_ratio selects zero clients per round; increase sample_ratio or "
                f"num_clients (got num_clients={num_clients}, sample_ratio={sample_ratio})"
            )
        if nonfinite not in ("raise", "drop"):
            raise ValueError(f"nonfinite must be 'raise' or 'drop', got {nonfinite!r}")
        if aggregation_threads is None:
            aggregation_threads = available_cpus()
        _check_positive_int(aggregation_threads, "aggregation_threads")

        self.model = model_selector.select_model(model_name)
        self.model_selector = model_selector
        self.model_name = model_name
        self.dataset = dataset
        self.global_round = global_round
        self.num_clients = num_clients
        self.sample_ratio = sample_ratio
        self.device = device
        self.batch_size = batch_size
        self.seed = _check_seed(seed)
        self.nonfinite: NonFinitePolicy = nonfinite
        self.aggregation_threads = aggregation_threads

        self.model.to(device)
        self.client_buffer_cache: list[FedAvgUplinkPackage] = []
        self.num_clients_per_round = num_clients_per_round
        self.round = 0
        self.dropped: list[int] = []
        self.rng_suite = create_rng_suite(self.seed)
        self.round_sums: list[torch.Tensor] = []
        self._fold: _Fold | None = None

    # -- BlazeFL's protocol ----------------------------------------------------

    def sample_clients(self) -> list[int]:
        """A sorted random sample of ``num_clients_per_round`` client ids."""
        sampled = self.rng_suite.python.sample(range(self.num_clients), self.num_clients_per_round)
        return sorted(sampled)

    def is_stopped(self) -> bool:
        """Whether ``global_round`` rounds have been aggregated."""
        return self.round >= self.global_round

    def load(self, payload: FedAvgUplinkPackage) -> bool:
        """Buffer one uplink; aggregate once a whole round's worth has arrived."""
        self.client_buffer_cache.append(payload)
        if len(self.client_buffer_cache) < self.num_clients_per_round:
            return False
        buffer, self.client_buffer_cache = self.client_buffer_cache, []
        self.global_update(buffer)
        self.round += 1
        return True

    def downlink_package(self) -> FedAvgDownlinkPackage:
        """The global model's state vector."""
        return FedAvgDownlinkPackage(serialize_model(self.model))

    def global_update(self, buffer: list[FedAvgUplinkPackage]) -> None:
        """Average the uplinks' models (weighted by data size) and apply the result.

        ``buffer`` holds either full uplinks or, all of them, the stand-ins that
        :meth:`fold_uplink` returned for this round.
        """
        fold = self._take_fold(buffer)
        if fold is None:
            kept = self.screen(buffer)
            sums, totals = self._sum_terms(kept)
        else:
            kept, sums, totals = fold.kept, fold.sums, fold.totals
            self.dropped = fold.dropped
            self._report_dropped(self.dropped)
            # Finite updates can still overflow when summed; a list is checked the same way.
            for name, total in zip(fold.names, sums, strict=True):
                if aggregate.find_nonfinite([total], threads=self.aggregation_threads):
                    raise NonFiniteError(
                        f"round {self.round}: the sum of the {name} updates overflowed "
                        "(NaN or Inf); lower the learning rate"
                    )
        self.round_sums = sums
        if not kept:
            logger.warning(
                "round %d: no usable client update (dropped: %s); the global model is unchanged",
                self.round,
                self.dropped,
            )
            return
        if totals[0] <= 0:
            logger.warning(
                "round %d: the sampled clients hold no data; the global model is unchanged",
                self.round,
            )
            return
        self.apply_update(weighted_mean_of_sum(sums[0], totals[0]), kept)

    def fold_uplink(self, index: int, package: FedAvgUplinkPackage) -> FedAvgUplinkPackage:
        """Fold one uplink into this round's sums now; returns a tensor-free stand-in.

        Meant as a client trainer's ``on_uplink`` hook, which calls it in client-list
        order while the round runs (``index`` 0 starts a new round). The stand-in is
        the package with its tensors replaced by ``meta`` tensors of the same shape
        and dtype; hand the round's stand-ins to :meth:`load` / :meth:`global_update`
        as usual. The result equals averaging the full uplinks bit for bit: the same
        kernel adds the same products in the same order.

        A non-finite update raises :class:`NonFiniteError` at once (the round stops)
        or, with ``nonfinite="drop"``, is left out.
        """
        if index == 0 or self._fold is None:
            self._fold = _Fold()
        fold = self._fold
        terms = self.uplink_terms(package)
        vectors = [_flat_f32(vector) for _, vector, _ in terms]
        finite = not any(
            aggregate.find_nonfinite([v], threads=self.aggregation_threads) for v in vectors
        )
        if not finite:
            if self.nonfinite == "raise":
                raise NonFiniteError(
                    f"round {self.round}: the updates of clients {[package.cid]} hold NaN or "
                    "Inf; lower the learning rate, or pass nonfinite='drop' to leave such "
                    "clients out"
                )
            fold.dropped.append(package.cid)
        else:
            if not fold.sums:
                fold.names = [name for name, _, _ in terms]
                fold.sums = [torch.zeros(v.numel(), dtype=torch.float32) for v in vectors]
                fold.totals = [0.0] * len(vectors)
            for k, ((_, _, weight), vector) in enumerate(zip(terms, vectors, strict=True)):
                aggregate.accumulate(fold.sums[k], vector, weight, threads=self.aggregation_threads)
                fold.totals[k] += weight
        stand_in: FedAvgUplinkPackage = _stand_in(package)
        if finite:
            fold.kept.append(stand_in)
        fold.seen.append(stand_in)
        fold.ids.add(id(stand_in))
        return stand_in

    # -- checkpoints -----------------------------------------------------------

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Everything later rounds depend on, as CPU tensors for :func:`emberfl.store.save`.

        The global model (``model.<name>``), the round counter (``round``) and the
        client sampler's generators (``rng.*``). Subclasses add their own state
        (optimizer moments, control variates) under prefixes of their own.
        """
        state: dict[str, torch.Tensor] = {
            f"model.{k}": v.detach().cpu().clone() for k, v in self.model.state_dict().items()
        }
        state["round"] = torch.tensor([self.round], dtype=torch.int64)
        state.update(rng_suite_state(self.rng_suite, prefix="rng."))
        return state

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Continue from a :meth:`checkpoint_state` (taken from a handler built the same way)."""
        model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state, strict=True)
        round_ = state.get("round")
        if round_ is None or round_.numel() != 1:
            raise ValueError("checkpoint state has no 'round' entry")
        self.round = int(round_.item())
        self.rng_suite = restore_rng_suite(dict(state), prefix="rng.")
        self.client_buffer_cache = []
        self._fold = None

    # -- hooks -----------------------------------------------------------------

    def uplink_terms(self, package: FedAvgUplinkPackage) -> list[tuple[str, torch.Tensor, float]]:
        """What an uplink adds to the round: ``(name, vector, weight)`` terms.

        Each is summed over the clients as ``sum_i weight_i * vector_i`` into
        :attr:`round_sums` (in this order); the first one's weighted mean becomes the
        update. FedAvg: the model, weighted by the client's data size.
        """
        return [("model", package.model_parameters, float(package.data_size))]

    def apply_update(self, mean: torch.Tensor, buffer: list[FedAvgUplinkPackage]) -> None:
        """Make the weighted mean of the clients' models the global model.

        ``buffer`` holds the aggregated uplinks, or their stand-ins when they were
        folded (:meth:`fold_uplink`); the sums of every term are in :attr:`round_sums`.
        """
        deserialize_model(self.model, mean)

    # -- machinery -------------------------------------------------------------

    def screen(self, buffer: list[FedAvgUplinkPackage]) -> list[FedAvgUplinkPackage]:
        """The uplinks to aggregate: all of them, or (``nonfinite="drop"``) the finite ones."""
        self.dropped = []
        for package in buffer:
            if _is_stand_in(package):
                raise ValueError(
                    f"the uplink of client {package.cid} is a stand-in that another handler's "
                    "fold_uplink returned (or one of an earlier round); hand each round's "
                    "stand-ins to the handler that folded them"
                )
        if self.nonfinite == "raise" or not buffer:
            return list(buffer)
        bad: set[int] = set()
        columns = [[vector for _, vector, _ in self.uplink_terms(p)] for p in buffer]
        for vectors in zip(*columns, strict=True):
            bad.update(
                aggregate.find_nonfinite(
                    [_flat_f32(v) for v in vectors], threads=self.aggregation_threads
                )
            )
        self.dropped = [buffer[i].cid for i in sorted(bad)]
        self._report_dropped(self.dropped)
        return [p for i, p in enumerate(buffer) if i not in bad]

    def _report_dropped(self, cids: list[int]) -> None:
        if cids:
            logger.warning(
                "round %d: dropping %d client update(s) holding NaN or Inf (clients %s)",
                self.round,
                len(cids),
                cids,
            )

    def _sum_terms(self, kept: list[FedAvgUplinkPackage]) -> tuple[list[torch.Tensor], list[float]]:
        """The weighted sum of every uplink term over ``kept``, and the weights' totals."""
        if not kept:
            return [], []
        columns = list(zip(*(self.uplink_terms(p) for p in kept), strict=True))
        sums = [
            self.average(
                [vector for _, vector, _ in column],
                [weight for _, _, weight in column],
                kept,
                column[0][0],
                mean=False,
            )
            for column in columns
        ]
        return sums, [sum(weight for _, _, weight in column) for column in columns]

    def _take_fold(self, buffer: list[FedAvgUplinkPackage]) -> _Fold | None:
        """This round's fold when ``buffer`` is exactly its stand-ins, in order; None
        when it holds no stand-in of this handler."""
        fold = self._fold
        if fold is None or not any(id(p) in fold.ids for p in buffer):
            return None
        self._fold = None
        if len(buffer) != len(fold.seen) or any(
            p is not q for p, q in zip(buffer, fold.seen, strict=True)
        ):
            raise ValueError(
                f"global_update got {len(buffer)} uplinks mixing stand-ins of the "
                f"{len(fold.seen)} folded by fold_uplink with others or in another order; "
                "a round's uplinks must be either all folded or none"
            )
        return fold

    def average(
        self,
        vectors: Sequence[torch.Tensor],
        weights: Sequence[float],
        buffer: Sequence[FedAvgUplinkPackage],
        what: str,
        *,
        mean: bool = True,
    ) -> torch.Tensor:
        """The weighted mean (or, with ``mean=False``, sum) of the uplinks' ``vectors``,
        computed by the aggregation kernel on the tensors as they are.

        Raises :class:`NonFiniteError` naming the clients when a vector holds NaN or Inf.
        """
        inputs = [_flat_f32(v) for v in vectors]
        try:
            result = aggregate.weighted_sum(inputs, weights, threads=self.aggregation_threads)
        except NonFiniteError as exc:
            culprits = aggregate.find_nonfinite(inputs, threads=self.aggregation_threads)
            cids = [buffer[i].cid for i in culprits]
            raise NonFiniteError(
                f"round {self.round}: the {what} updates of clients {cids} hold NaN or Inf; "
                "lower the learning rate, or pass nonfinite='drop' to leave such clients out"
            ) from exc
        assert isinstance(result, torch.Tensor)
        return weighted_mean_of_sum(result, sum(weights)) if mean else result

    @staticmethod
    def aggregate(parameters_list: list[torch.Tensor], weights_list: list[int]) -> torch.Tensor:
        """Weighted average of flat parameter vectors (BlazeFL's helper, on the Rust kernel).

        Bitwise the same as the handler's own averaging of the same uplinks.
        """
        weights = [float(w) for w in weights_list]
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights_list!r}")
        result = aggregate.weighted_sum([_flat_f32(p) for p in parameters_list], weights)
        assert isinstance(result, torch.Tensor)
        return weighted_mean_of_sum(result, sum(weights))

    @staticmethod
    def evaluate(
        model: nn.Module, test_loader: DataLoader[Any], device: str
    ) -> tuple[float, float]:
        """Mean loss and accuracy of ``model`` over ``test_loader``."""
        return evaluate_loader(model, test_loader, device)

    def test_loader(self) -> DataLoader[Any]:
        """A loader over the global test set.

        It gets a generator of its own: the loader draws from it, and drawing from
        the sampler's generator would make client sampling depend on how often the
        model is evaluated.
        """
        return self.dataset.get_dataloader(
            type_=FedAvgPartitionType.TEST,
            cid=None,
            batch_size=self.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def get_summary(self) -> dict[str, float]:
        """``server_acc`` and ``server_loss`` of the global model on the test set."""
        loss, acc = self.evaluate(self.model, self.test_loader(), self.device)
        return {"server_acc": acc, "server_loss": loss}


def weighted_mean_of_sum(total: torch.Tensor, weight: float) -> torch.Tensor:
    """FedAvg's mean from the weighted sum of the updates and the sum of the weights.

    Every averaging path ends here -- a list of uplinks, uplinks folded as they
    arrived, BlazeFL's ``aggregate`` helper -- which is what makes them agree bit for
    bit: the sums are built by the same kernel in the same client order.
    """
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"the weights' sum must be finite and > 0, got {weight!r}")
    return torch.div(total, weight)


@dataclass
class _Fold:
    """One round's running sums, built by :meth:`FedAvgBaseServerHandler.fold_uplink`."""

    seen: list[Any] = field(default_factory=list)  # stand-ins handed out, in order
    ids: set[int] = field(default_factory=set)  # their ids (kept alive by ``seen``)
    kept: list[Any] = field(default_factory=list)  # stand-ins of the folded uplinks
    dropped: list[int] = field(default_factory=list)  # cids left out (non-finite)
    names: list[str] = field(default_factory=list)  # of the terms, as uplink_terms gave them
    sums: list[torch.Tensor] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)


def _stand_in(package: Any) -> Any:
    """``package`` with every tensor field replaced by a data-less ``meta`` tensor.

    Shapes and dtypes stay (so sizes can still be reported); anything that tries to
    read the values fails loudly instead of seeing stale numbers.
    """
    if not dataclasses.is_dataclass(package) or isinstance(package, type):
        raise TypeError(f"fold_uplink needs a dataclass package, got {type(package).__name__}")
    meta = {
        f.name: torch.empty(value.shape, dtype=value.dtype, device="meta")
        for f in dataclasses.fields(package)
        if isinstance(value := getattr(package, f.name), torch.Tensor)
    }
    return dataclasses.replace(package, **meta)


def _is_stand_in(package: Any) -> bool:
    """Whether ``package`` came out of :func:`_stand_in` (judged by its fields, without
    calling the handler's hooks on data-less tensors)."""
    return (
        dataclasses.is_dataclass(package)
        and not isinstance(package, type)
        and any(
            isinstance(value := getattr(package, f.name), torch.Tensor) and value.is_meta
            for f in dataclasses.fields(package)
        )
    )


def _flat_f32(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` as a 1-D float32 CPU tensor; a no-op (no copy) for the usual uplink."""
    if vector.dim() != 1:
        vector = vector.reshape(-1)
    if vector.dtype != torch.float32 or vector.device.type != "cpu":
        vector = vector.to("cpu", torch.float32)
    return vector


# ------------------------------------------------------------------ client trainers


def _client_loader(
    dataset: FedAvgPartitionedDataset, cid: int, batch_size: int, generator: torch.Generator
) -> DataLoader[Any]:
    return dataset.get_dataloader(
        type_=FedAvgPartitionType.TRAIN, cid=cid, batch_size=batch_size, generator=generator
    )


def _as_payload(payload: FedAvgDownlinkPackage | torch.Tensor) -> FedAvgDownlinkPackage:
    # BlazeFL's serial trainer takes the bare parameter vector.
    if isinstance(payload, torch.Tensor):
        return FedAvgDownlinkPackage(payload)
    return payload


def _state_store(state_dir: Path | str | None) -> ClientStateStore | None:
    return None if state_dir is None else ClientStateStore(state_dir)


class FedAvgBaseClientTrainer(BaseClientTrainer[FedAvgUplinkPackage, FedAvgDownlinkPackage]):
    """Runs the clients one after another in this process (BlazeFL's serial trainer).

    As in the worker processes, the global random generators are seeded from
    ``(seed, cid, round)`` while a client runs, and restored when the round is over.
    ``state_dir`` (keyword) is where per-client state files go, for algorithms that
    keep any.
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        dataset: FedAvgPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        *,
        state_dir: Path | str | None = None,
        client_update: FedAvgClientUpdate | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model_selector.select_model(model_name)
        self.model_selector = model_selector
        self.model_name = model_name
        self.dataset = dataset
        self.device = device
        self.num_clients = num_clients
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = _check_seed(seed)
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.client_update = client_update if client_update is not None else FedAvgClientUpdate()
        self.progress = progress
        self.model.to(self.device)
        self.cache: list[FedAvgUplinkPackage] = []
        self.round = 0
        self._state = _state_store(self.state_dir)

    def local_process(
        self, payload: FedAvgDownlinkPackage | torch.Tensor, cid_list: list[int]
    ) -> None:
        """Train every client of ``cid_list`` from ``payload``; uplinks go to ``cache``."""
        package = _as_payload(payload)
        round_index = self.round
        self.round += 1
        snapshot = RandomStateSnapshot.capture()
        results: list[FedAvgUplinkPackage] = []
        try:
            bar = tqdm(cid_list, desc="client", leave=False, disable=not self.progress)
            for index, cid in enumerate(bar):
                ctx = ClientContext(cid=cid, round=round_index, seed=self.seed, device=self.device)
                with client_scope(ctx):
                    seed_client(self.seed, cid, round_index)
                    loader = _client_loader(self.dataset, cid, self.batch_size, ctx.rng.torch_cpu)
                    uplink = self.train(package, loader, cid)
                results.append(deliver_uplink(self, index, uplink))
        finally:
            RandomStateSnapshot.restore(snapshot)
        self.cache.extend(results)

    def train(
        self,
        payload: FedAvgDownlinkPackage | torch.Tensor,
        train_loader: DataLoader[Any],
        cid: int,
    ) -> FedAvgUplinkPackage:
        """One client's update from ``payload`` on ``train_loader``."""
        return self.client_update(
            cid=cid,
            model=self.model,
            payload=_as_payload(payload),
            loader=train_loader,
            device=self.device,
            epochs=self.epochs,
            lr=self.lr,
            state=self._state,
        )

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """The uplinks produced since the last call."""
        package, self.cache = self.cache, []
        return package


@dataclass
class FedAvgClientConfig:
    """Everything a worker process needs to run one client (pickled per task).

    ``dataset`` should pickle small (a :class:`~emberfl.datastore.StorePartitionedDataset`
    pickles as its directory). ``seed`` is the run's seed: the runtime seeds each
    client's generators from ``(seed, cid, round)``.
    """

    model_selector: ModelSelector[Any]
    model_name: str
    dataset: FedAvgPartitionedDataset
    epochs: int
    batch_size: int
    lr: float
    cid: int
    seed: int
    state_path: Path
    client_update: FedAvgClientUpdate
    state_dir: Path | None = None


# A worker process runs one client at a time, so it can keep the model it built for
# the last client and reload only the weights. Keyed by selector, name and device;
# a selector that is not hashable (or compares by identity) is simply not reused.
_WORKER_MODELS: dict[tuple[Any, str, str], nn.Module] = {}
_WORKER_MODELS_MAX = 4


def _worker_model(selector: ModelSelector[Any], name: str, device: str) -> nn.Module:
    key = (selector, name, device)
    try:
        model = _WORKER_MODELS.get(key)
    except TypeError:
        return selector.select_model(name).to(device)
    if model is None:
        model = selector.select_model(name).to(device)
        if len(_WORKER_MODELS) >= _WORKER_MODELS_MAX:
            _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = model
    return model


class FedAvgProcessPoolClientTrainer(
    ProcessPoolClientTrainer[
        FedAvgUplinkPackage, FedAvgDownlinkPackage, FedAvgClientConfig, FedAvgUplinkPackage
    ]
):
    """Runs clients in ``num_parallels`` persistent worker processes (BlazeFL's arguments).

    The payload is written once per round to a file every worker maps; each uplink
    comes back mapped from the file its worker wrote, so the server averages the
    clients' models without copying them. ``state_dir`` holds per-client state files
    (for algorithms that keep any). Keyword extras: ``client_update`` (the client
    step; FedAvg's by default), ``progress`` (a bar per round), ``share_dir``
    (where round files go; default: the system's temporary directory) and
    ``torch_threads`` (intra-op threads of each worker; default: CPUs // workers).
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        state_dir: Path | str,
        dataset: FedAvgPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        num_parallels: int,
        *,
        client_update: FedAvgClientUpdate | None = None,
        progress: bool = True,
        share_dir: Path | str | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self.num_parallels = num_parallels
        self.device = device
        self.device_count = torch.cuda.device_count()
        self.cache: list[FedAvgUplinkPackage] = []
        self.stop_event = threading.Event()

        self.model_selector = model_selector
        self.model_name = model_name
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.dataset = dataset
        self.num_clients = num_clients
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = _check_seed(seed)
        self.client_update = client_update if client_update is not None else FedAvgClientUpdate()
        self.progress = progress
        self.share_dir = share_dir
        if torch_threads is not None:
            self.torch_threads = torch_threads

    def get_client_config(self, cid: int) -> FedAvgClientConfig:
        """The settings of client ``cid``'s task."""
        return FedAvgClientConfig(
            model_selector=self.model_selector,
            model_name=self.model_name,
            dataset=self.dataset,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            cid=cid,
            seed=self.seed,
            state_path=ClientStateStore(self.state_dir).path(cid),
            client_update=self.client_update,
            state_dir=self.state_dir,
        )

    @staticmethod
    def worker(
        config: FedAvgClientConfig,
        payload: FedAvgDownlinkPackage,
        device: str,
        stop_event: Any,
        *,
        shm_buffer: FedAvgUplinkPackage | None = None,
    ) -> FedAvgUplinkPackage:
        """Train one client in a worker process and return its uplink."""
        model = _worker_model(config.model_selector, config.model_name, device)
        loader = _client_loader(
            config.dataset, config.cid, config.batch_size, current_client().rng.torch_cpu
        )
        return config.client_update(
            cid=config.cid,
            model=model,
            payload=payload,
            loader=loader,
            device=device,
            epochs=config.epochs,
            lr=config.lr,
            stop_event=stop_event,
            state=_state_store(config.state_dir),
        )

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """The uplinks produced since the last call (their tensors map worker files)."""
        package, self.cache = self.cache, []
        return package


class FedAvgThreadPoolClientTrainer(
    ThreadPoolClientTrainer[FedAvgUplinkPackage, FedAvgDownlinkPackage]
):
    """Runs clients in ``num_parallels`` threads of this process (BlazeFL's arguments).

    The payload is shared as it is. Batch orders come from each client's own
    generator, so results equal the process pool's bit for bit. Keyword extras:
    ``state_dir``, ``client_update`` and ``progress``.
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        dataset: FedAvgPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        num_parallels: int,
        *,
        state_dir: Path | str | None = None,
        client_update: FedAvgClientUpdate | None = None,
        progress: bool = True,
    ) -> None:
        self.num_parallels = num_parallels
        self.device = device
        self.device_count = torch.cuda.device_count()
        self.cache: list[FedAvgUplinkPackage] = []
        self.stop_event = threading.Event()

        self.model_selector = model_selector
        self.model_name = model_name
        self.dataset = dataset
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.num_clients = num_clients
        self.seed = _check_seed(seed)
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.client_update = client_update if client_update is not None else FedAvgClientUpdate()
        self.progress = progress
        self._state = _state_store(self.state_dir)
        self._models = _ModelPool(model_selector, model_name)

    def worker(
        self,
        cid: int,
        device: str,
        payload: FedAvgDownlinkPackage,
        stop_event: threading.Event,
    ) -> FedAvgUplinkPackage:
        """Train client ``cid`` in a worker thread."""
        loader = _client_loader(self.dataset, cid, self.batch_size, current_client().rng.torch_cpu)
        with self._models.borrow(device) as model:
            return self.client_update(
                cid=cid,
                model=model,
                payload=payload,
                loader=loader,
                device=device,
                epochs=self.epochs,
                lr=self.lr,
                stop_event=stop_event,
                state=self._state,
            )

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """The uplinks produced since the last call."""
        package, self.cache = self.cache, []
        return package


class _ModelPool:
    """Models lent to worker threads, one per concurrent client and reused afterwards.

    Building a model per client costs more than training it for small clients; the
    weights are overwritten from the payload anyway.
    """

    def __init__(self, selector: ModelSelector[Any], name: str) -> None:
        self._selector = selector
        self._name = name
        self._free: dict[str, list[nn.Module]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self, device: str) -> Iterator[nn.Module]:
        with self._lock:
            free = self._free.setdefault(device, [])
            model = free.pop() if free else None
        if model is None:
            model = self._selector.select_model(self._name).to(device)
        try:
            yield model
        finally:
            with self._lock:
                self._free[device].append(model)
