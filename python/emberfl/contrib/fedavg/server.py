"""FedAvg's server handler: client sampling, weighted averaging and evaluation.

The uplinks are summed exactly, in an :class:`~emberfl.streaming.StreamingSum`:
either a whole round's list in :meth:`~FedAvgBaseServerHandler.global_update`, or
folded where the clients train (a trainer's ``uplink_fold`` set to
:meth:`~FedAvgBaseServerHandler.uplink_fold`: one sum per worker, merged once), the
same bits either way; the mean is handed to
:meth:`~FedAvgBaseServerHandler.apply_update` (FedOpt and SCAFFOLD override it).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from emberfl.aggregate import NonFiniteError
from emberfl.core import (
    BaseServerHandler,
    FoldedRound,
    FoldTerm,
    ModelSelector,
    UplinkFold,
    available_cpus,
    deserialize_model,
    serialize_model,
)
from emberfl.core.checks import check_positive_int
from emberfl.core.model_packages import (
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgPartitionType,
    FedAvgUplinkPackage,
)
from emberfl.core.training import evaluate_loader
from emberfl.reproducibility import (
    check_seed,
    create_rng_suite,
    restore_rng_suite,
    rng_suite_state,
)
from emberfl.streaming import StreamingSum

__all__ = ["SAMPLERS", "FedAvgBaseServerHandler", "NonFinitePolicy", "RoundRelease"]

# The module's historical name: logging configurations refer to it.
logger = logging.getLogger("emberfl.contrib.fedavg")

NonFinitePolicy = Literal["raise", "drop"]

#: ``sampler(rng, num_clients, sample_ratio)``: one round's client ids, sorted.
Sampler = Callable[[random.Random, int, float], list[int]]


def _fixed_size(rng: random.Random, num_clients: int, sample_ratio: float) -> list[int]:
    # int(N * q) distinct clients, uniformly: BlazeFL's sampler.
    return sorted(rng.sample(range(num_clients), int(num_clients * sample_ratio)))


def _poisson(rng: random.Random, num_clients: int, sample_ratio: float) -> list[int]:
    # Each client on its own with probability q: the sampling the standard
    # client-level DP analysis assumes. A round may draw none.
    return [cid for cid in range(num_clients) if rng.random() < sample_ratio]


#: The client samplers by name (``--sampler``).
SAMPLERS: Mapping[str, Sampler] = MappingProxyType({"fixed": _fixed_size, "poisson": _poisson})


class RoundRelease(Protocol):
    """A rule that changes what a round releases: which sums the clients fold, what the
    downlink carries, and how the sums become the next model (client-level
    differential privacy, :mod:`emberfl.contrib.privacy`). ``round`` is the index of
    the round being run (rounds completed before it)."""

    def fold_terms(self) -> tuple[FoldTerm, ...]: ...

    def downlink(self, package: FedAvgDownlinkPackage, round: int) -> FedAvgDownlinkPackage: ...

    def release(
        self,
        model: torch.Tensor,
        sums: StreamingSum | None,
        kept: list[FedAvgUplinkPackage],
        round: int,
    ) -> torch.Tensor:
        """The vector handed to ``apply_update`` in place of the weighted mean, from the
        global ``model`` and the round's ``sums`` (None when no client update was kept)."""
        ...

    def summary(self, round: int) -> dict[str, float]: ...

    def exhausted(self, round: int) -> bool:
        """Whether running round ``round`` would go beyond the rule's budget."""
        ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None: ...


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
    ``sampler``
        ``"fixed"`` (default): ``int(num_clients * sample_ratio)`` distinct clients a
        round, uniformly at random. ``"poisson"``: every client takes part with
        probability ``sample_ratio`` on its own, so the cohort's size varies (and may be
        zero; :meth:`aggregate_empty_round` closes such a round).

    :attr:`privacy` may hold a :class:`RoundRelease` (client-level DP) that changes
    what the clients fold and how the round's sums become the model.

    State that a checkpoint needs: ``model``, ``round`` and ``rng_suite`` (the
    client sampler); :meth:`checkpoint_state` gathers it.

    Speed and memory: set ``trainer.uplink_fold = handler.uplink_fold()`` and every
    worker folds the uplinks of its clients into its own exact sums; this process
    merges one sum per worker per round instead of handling every uplink, and no
    uplink file is written, with the same result bit for bit.
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
        sampler: str = "fixed",
    ) -> None:
        check_positive_int(global_round, "global_round")
        check_positive_int(num_clients, "num_clients")
        check_positive_int(batch_size, "batch_size")
        if not (
            isinstance(sample_ratio, int | float)
            and not isinstance(sample_ratio, bool)
            and 0 < sample_ratio <= 1
        ):
            raise ValueError(f"sample_ratio must be in the interval (0, 1], got {sample_ratio!r}")
        num_clients_per_round = int(num_clients * sample_ratio)
        if num_clients_per_round <= 0:
            raise ValueError(
                "sample_ratio selects zero clients per round; increase sample_ratio or "
                f"num_clients (got num_clients={num_clients}, sample_ratio={sample_ratio})"
            )
        if nonfinite not in ("raise", "drop"):
            raise ValueError(f"nonfinite must be 'raise' or 'drop', got {nonfinite!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if aggregation_threads is None:
            aggregation_threads = available_cpus()
        check_positive_int(aggregation_threads, "aggregation_threads")

        self.model = model_selector.select_model(model_name)
        self.model_selector = model_selector
        self.model_name = model_name
        self.dataset = dataset
        self.global_round = global_round
        self.num_clients = num_clients
        self.sample_ratio = sample_ratio
        self.device = device
        self.batch_size = batch_size
        self.seed = check_seed(seed, "seed")
        self.nonfinite: NonFinitePolicy = nonfinite
        self.aggregation_threads = aggregation_threads
        self.sampler = sampler
        self.privacy: RoundRelease | None = None

        self.model.to(device)
        self.client_buffer_cache: list[FedAvgUplinkPackage] = []
        self.num_clients_per_round = num_clients_per_round
        self.round = 0
        self.dropped: list[int] = []
        self.rng_suite = create_rng_suite(self.seed)
        self.round_sums: list[torch.Tensor] = []
        self._fold: _Fold | None = None
        self._round_size: int | None = None

    # -- BlazeFL's protocol ----------------------------------------------------

    def sample_clients(self) -> list[int]:
        """This round's client ids, sorted, drawn by the :attr:`sampler`."""
        sampled = SAMPLERS[self.sampler](self.rng_suite.python, self.num_clients, self.sample_ratio)
        self._round_size = len(sampled)
        return sampled

    def is_stopped(self) -> bool:
        """Whether ``global_round`` rounds have been aggregated (or the privacy
        budget would not cover another)."""
        if self.round >= self.global_round:
            return True
        return self.privacy is not None and self.privacy.exhausted(self.round)

    def load(self, payload: FedAvgUplinkPackage) -> bool:
        """Buffer one uplink; aggregate once a whole round's worth has arrived (the
        clients :meth:`sample_clients` drew last)."""
        self.client_buffer_cache.append(payload)
        expected = self.num_clients_per_round if self._round_size is None else self._round_size
        if len(self.client_buffer_cache) < expected:
            return False
        buffer, self.client_buffer_cache = self.client_buffer_cache, []
        self._close_round(buffer)
        return True

    def aggregate_empty_round(self) -> None:
        """Close a round for which :meth:`sample_clients` drew no client (Poisson
        sampling can): it counts as a round, and a :attr:`privacy` rule still releases
        its noise, as its analysis requires."""
        if self._round_size != 0 or self.client_buffer_cache:
            raise RuntimeError("aggregate_empty_round: this round sampled clients")
        self._close_round([])

    def _close_round(self, buffer: list[FedAvgUplinkPackage]) -> None:
        self.global_update(buffer)
        self._round_size = None
        self.round += 1

    def downlink_package(self) -> FedAvgDownlinkPackage:
        """The global model's state vector (with what a :attr:`privacy` rule adds)."""
        package = FedAvgDownlinkPackage(serialize_model(self.model))
        return package if self.privacy is None else self.privacy.downlink(package, self.round)

    def global_update(self, buffer: list[FedAvgUplinkPackage]) -> None:
        """Average the uplinks' models (weighted by data size) and apply the result.

        ``buffer`` holds either full uplinks or, all of them, the stand-ins of a round
        that a trainer folded with this handler's :meth:`uplink_fold`. Either way the
        sums are exact: the same uplinks give the same bits, folded or not, in any
        order.
        """
        fold = self._take_fold(buffer)
        if fold is None:
            _refuse_stand_ins(buffer)
            sums = self._new_sums()
            terms = self.uplink_fold()
            folded = sums.add_many(
                [terms.contributions(p) for p in buffer], labels=[p.cid for p in buffer]
            )
            skipped = [(skip.label, skip.terms) for skip in sums.skipped]
            kept = [p for p, ok in zip(buffer, folded, strict=True) if ok]
        else:
            sums, kept, skipped = fold.sums, fold.kept, fold.skipped
        if self.nonfinite == "raise" and skipped:
            raise NonFiniteError(
                f"round {self.round}: the {_term_names(skipped)} updates of clients "
                f"{[cid for cid, _ in skipped]} hold NaN or Inf; lower the learning "
                "rate, or pass nonfinite='drop' to leave such clients out"
            )
        self.dropped = [cid for cid, _ in skipped]
        if self.dropped:
            logger.warning(
                "round %d: dropping %d client update(s) holding NaN or Inf (clients %s)",
                self.round,
                len(self.dropped),
                self.dropped,
            )
        if self.privacy is not None:
            self.round_sums = sums.sums if kept else []
            model = serialize_model(self.model)
            released = self.privacy.release(model, sums if kept else None, kept, self.round)
            self.apply_update(released, kept)
            return
        if not kept:
            self.round_sums = []
            logger.warning(
                "round %d: no usable client update (dropped: %s); the global model is unchanged",
                self.round,
                self.dropped,
            )
            return
        # Exact sums of terms within the grid's range cannot overflow float32.
        self.round_sums = sums.sums
        if sums.totals[0] <= 0:
            logger.warning(
                "round %d: the sampled clients hold no data; the global model is unchanged",
                self.round,
            )
            return
        self.apply_update(sums.mean(sums.names[0]), kept)

    def uplink_fold(self) -> UplinkFold:
        """What a trainer folds for this handler: set ``trainer.uplink_fold`` to it.

        Every worker then adds its clients' uplinks into its own exact sums (the
        :meth:`fold_terms`), the trainer merges one sum per worker and hands the round
        to this handler; the stand-ins that reach :meth:`load` carry each client's
        ``cid``, ``data_size`` and metadata. The result equals averaging the full
        uplinks bit for bit.
        """
        return UplinkFold(self.fold_terms(), sink=self._receive_folded)

    def _receive_folded(self, folded: FoldedRound) -> None:
        stand_ins = folded.stand_ins
        self._fold = _Fold(
            sums=folded.sums,
            seen=stand_ins,
            ids={id(p) for p in stand_ins},
            kept=[p for i, p in enumerate(stand_ins) if i not in folded.skipped],
            skipped=[(stand_ins[i].cid, terms) for i, terms in folded.skipped.items()],
        )

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
        if self.privacy is not None:
            state.update(self.privacy.state())
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
        if self.privacy is not None:
            self.privacy.load_state(state)
        self.client_buffer_cache = []
        self._fold = None
        self._round_size = None

    # -- hooks -----------------------------------------------------------------

    def fold_terms(self) -> tuple[FoldTerm, ...]:
        """What an uplink adds to the round: named sums ``sum_i weight_i * vector_i``
        over the clients, in :attr:`round_sums` in this order; the first one's weighted
        mean becomes the update. FedAvg: the model, weighted by the client's data size;
        a :attr:`privacy` rule's own terms when it has one.
        """
        if self.privacy is not None:
            return self.privacy.fold_terms()
        return (FoldTerm("model", "model_parameters", "data_size"),)

    def apply_update(self, mean: torch.Tensor, buffer: list[FedAvgUplinkPackage]) -> None:
        """Make the weighted mean of the clients' models the global model.

        ``buffer`` holds the aggregated uplinks, or their stand-ins when they were
        folded (:meth:`uplink_fold`); the sums of every term are in :attr:`round_sums`.
        """
        deserialize_model(self.model, mean)

    # -- BlazeFL's helpers -----------------------------------------------------

    @staticmethod
    def aggregate(parameters_list: list[torch.Tensor], weights_list: list[int]) -> torch.Tensor:
        """Weighted average of flat parameter vectors (BlazeFL's helper, on the Rust kernel).

        Bitwise the same as the handler's own averaging of the same uplinks.
        """
        weights = [float(w) for w in weights_list]
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights_list!r}")
        if len(parameters_list) != len(weights):
            raise ValueError(
                f"got {len(parameters_list)} parameter vectors and {len(weights)} weights"
            )
        sums = StreamingSum()
        sums.add_many(
            [[("parameters", p, w)] for p, w in zip(parameters_list, weights, strict=True)]
        )
        return sums.mean("parameters")

    @staticmethod
    def evaluate(
        model: nn.Module, test_loader: DataLoader[Any], device: str
    ) -> tuple[float, float]:
        """Mean loss and accuracy of ``model`` over ``test_loader``.

        Raises ``ValueError`` when the loader yields no sample: there is nothing to
        average, and 0.0 would read as a real accuracy.
        """
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
        summary = {"server_acc": acc, "server_loss": loss}
        if self.privacy is not None:
            summary.update(self.privacy.summary(self.round))
        return summary

    # -- machinery -------------------------------------------------------------

    def _new_sums(self) -> StreamingSum:
        # Always "skip": the handler words the error itself, naming round and clients.
        return StreamingSum(nonfinite="skip", threads=self.aggregation_threads)

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
                f"{len(fold.seen)} folded this round with others or in another order; "
                "a round's uplinks must be either all folded or none"
            )
        return fold


def _term_names(skipped: list[tuple[int, tuple[str, ...]]]) -> str:
    names: list[str] = []
    for _, terms in skipped:
        names.extend(name for name in terms if name not in names)
    return " and ".join(names)


@dataclass
class _Fold:
    """One round folded by a trainer with :meth:`FedAvgBaseServerHandler.uplink_fold`."""

    sums: StreamingSum
    seen: list[Any]  # the stand-ins, in client order
    ids: set[int]  # their ids (kept alive by ``seen``)
    kept: list[Any]  # stand-ins of the folded uplinks
    skipped: list[tuple[int, tuple[str, ...]]]  # (cid, NaN/Inf terms) of the others


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


def _refuse_stand_ins(buffer: list[FedAvgUplinkPackage]) -> None:
    """Stand-ins carry no data: averaging them anywhere but in their own fold is a bug."""
    for package in buffer:
        if _is_stand_in(package):
            raise ValueError(
                f"the uplink of client {package.cid} is a stand-in of a round folded for "
                "another handler (or an earlier round); hand each round's stand-ins to "
                "the handler whose uplink_fold() folded them"
            )
