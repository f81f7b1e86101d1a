"""Folding uplinks where the clients train: one exact sum per worker, merged once.

A FedAvg-style server needs only weighted sums of its clients' vectors. When a
client trainer's ``uplink_fold`` attribute holds an :class:`UplinkFold`, every worker
(process or thread; the serial trainer is one) adds the uplinks of the clients it
trains into its own :class:`~emberfl.streaming.StreamingSum` and keeps only a
tensor-free *stand-in* of each: the package with its folded tensors replaced by
data-less ``meta`` tensors of the same shape and dtype, so ``cid``, sizes and
metadata (loss, timings) still reach the server. When the round's clients are done
the trainer merges one sum per worker and hands the result, a :class:`FoldedRound`,
to the fold's ``sink`` (the server handler), then puts the stand-ins in ``cache`` in
the order of ``cid_list`` as usual. No per-client uplink file is written and the
parent does O(workers) work per round, not O(clients).

The sums are exact, so the result is the same bits for any number of workers,
process or thread or serial, and any completion order. A NaN or Inf uplink is not
added; its stand-in is listed in :attr:`FoldedRound.skipped` for the server's
policy to raise on or drop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from emberfl.core.packages import join_package, split_package
from emberfl.streaming import StreamingSum

__all__ = [
    "FoldCollector",
    "FoldTerm",
    "FoldedRound",
    "InProcessFold",
    "UplinkFold",
    "WireStandIn",
    "map_fields",
    "read_fold",
]


@dataclass(frozen=True)
class FoldTerm:
    """One sum a fold keeps: ``name``, the uplink's ``field`` (attribute, or key of a
    mapping package) holding the vector, and its ``weight`` -- a number, or the name of
    the field holding it (such as ``"data_size"``)."""

    name: str
    field: str
    weight: str | float = 1.0

    def __post_init__(self) -> None:
        if not self.name or not self.field:
            raise ValueError(f"a FoldTerm needs a name and a field, got {self!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, str | int | float):
            raise TypeError(f"a FoldTerm's weight is a number or a field name, got {self!r}")


def _get(package: Any, name: str) -> Any:
    if isinstance(package, Mapping):
        try:
            return package[name]
        except KeyError:
            raise KeyError(f"the uplink has no key {name!r}") from None
    try:
        return getattr(package, name)
    except AttributeError:
        raise AttributeError(
            f"the uplink ({type(package).__name__}) has no field {name!r}"
        ) from None


def map_fields(package: Any, fn: Callable[[str, Any], Any]) -> Any:
    """``package`` (a dataclass or a mapping) with each top-level value ``v`` of field
    ``name`` replaced by ``fn(name, v)``; a mapping comes back as a dict."""
    if isinstance(package, Mapping):
        return {name: fn(name, value) for name, value in package.items()}
    if dataclasses.is_dataclass(package) and not isinstance(package, type):
        changed = {}
        for f in dataclasses.fields(package):
            value = getattr(package, f.name)
            new = fn(f.name, value)
            if new is not value:
                changed[f.name] = new
        return dataclasses.replace(package, **changed) if changed else package
    raise TypeError(f"folded uplinks must be dataclasses or mappings, got {type(package).__name__}")


@dataclass(frozen=True)
class FoldedRound:
    """One round's uplinks, folded: the merged sums and the stand-ins in client order.

    ``skipped`` holds the positions (in ``cid_list``) of the uplinks left out for
    holding NaN or Inf, each with the names of its bad terms.
    """

    sums: StreamingSum
    stand_ins: list[Any]
    skipped: dict[int, tuple[str, ...]]


@dataclass(frozen=True)
class _Shape:
    """A folded tensor's shape and dtype, standing for it on the wire."""

    shape: tuple[int, ...]
    dtype: str

    def meta(self) -> torch.Tensor:
        # Checked here: a stand-in from another rank is rebuilt without __init__.
        dtype = getattr(torch, self.dtype, None) if isinstance(self.dtype, str) else None
        shape = self.shape
        if not isinstance(dtype, torch.dtype) or not (
            isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
        ):
            raise ValueError(f"a stand-in's tensor of shape {shape!r} and dtype {self.dtype!r}")
        return torch.empty(shape, dtype=dtype, device="meta")


@dataclass(frozen=True)
class WireStandIn:
    """A stand-in as it crosses from a worker process: its pickled skeleton, with every
    folded tensor replaced by its shape and dtype -- no tensor is pickled -- and the
    names of its NaN/Inf terms."""

    skeleton: bytes
    bad_terms: tuple[str, ...]

    def package(self, load: Callable[[bytes], Any] | None = None) -> Any:
        """The stand-in, rebuilt around data-less ``meta`` tensors; ``load`` unpickles
        the skeleton (default: :func:`~emberfl.core.packages.join_package`, for this
        machine's workers; another rank's goes through
        :func:`~emberfl.distributed.peer_codec.load_skeleton`)."""
        skeleton = join_package(self.skeleton, {}) if load is None else load(self.skeleton)
        return map_fields(skeleton, lambda _, v: v.meta() if isinstance(v, _Shape) else v)


@dataclass(frozen=True)
class UplinkFold:
    """What the workers fold from each uplink (``terms``) and who gets the round.

    ``sink`` is called in the trainer's process with each round's :class:`FoldedRound`
    before the stand-ins reach ``cache``; it stays in that process (the fold pickles
    without it). Every tensor at the top level of an uplink must be named by a term:
    the stand-in carries no data, so an unfolded tensor would be lost, and that is
    refused with ``ValueError``.
    """

    terms: tuple[FoldTerm, ...]
    sink: Callable[[FoldedRound], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.terms or not all(isinstance(t, FoldTerm) for t in self.terms):
            raise TypeError("an UplinkFold needs a non-empty tuple of FoldTerm")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"an UplinkFold names a sum twice: {names}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (UplinkFold, (self.terms,))

    def contributions(self, package: Any) -> list[tuple[str, torch.Tensor, float]]:
        """The uplink's ``(name, vector, weight)`` terms."""
        out = []
        for term in self.terms:
            vector = _get(package, term.field)
            if not isinstance(vector, torch.Tensor):
                raise TypeError(
                    f"uplink field {term.field!r} must hold a tensor, got {type(vector).__name__}"
                )
            weight = _get(package, term.weight) if isinstance(term.weight, str) else term.weight
            if isinstance(weight, torch.Tensor) and weight.numel() == 1:
                weight = weight.item()
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise TypeError(f"uplink field {term.weight!r} must hold a number, got {weight!r}")
            out.append((term.name, vector, float(weight)))
        return out

    def stand_in(self, package: Any) -> Any:
        """``package`` with its folded tensors replaced by data-less ``meta`` tensors."""
        return self._replace_folded(package, lambda t: t.new_empty(t.shape, device="meta"))

    def _replace_folded(self, package: Any, make: Callable[[torch.Tensor], Any]) -> Any:
        folded = {t.field for t in self.terms}

        def replace(name: str, value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            if name not in folded:
                raise ValueError(
                    f"uplink field {name!r} holds a tensor that no fold term names; "
                    "name it in a FoldTerm or leave trainer.uplink_fold unset"
                )
            return make(value)

        return map_fields(package, replace)

    def wire_skeleton(self, package: Any) -> bytes:
        """The skeleton of ``package``'s stand-in, the form that crosses processes (see
        :class:`WireStandIn`); refuses a package the fold cannot carry."""
        shapes = self._replace_folded(
            package, lambda t: _Shape(tuple(t.shape), str(t.dtype).removeprefix("torch."))
        )
        skeleton, tensors, arrays = split_package(shapes)
        if tensors or arrays:
            raise ValueError(
                f"the uplink holds tensors or arrays ({sorted(tensors)}) below its top "
                "level, which a folded round cannot carry"
            )
        return skeleton

    def fold(self, sums: StreamingSum, package: Any, label: int) -> tuple[str, ...]:
        """Add ``package`` into ``sums`` (a ``nonfinite="skip"`` sum); returns the names
        of its NaN/Inf terms (empty when it was added)."""
        before = len(sums.skipped)
        sums.add(self.contributions(package), label=label)
        return sums.skipped[before].terms if len(sums.skipped) > before else ()

    def new_sums(self) -> StreamingSum:
        """An empty per-worker sum (non-finite uplinks are skipped, the server decides)."""
        return StreamingSum(nonfinite="skip")


def read_fold(trainer: object) -> UplinkFold | None:
    """The trainer's ``uplink_fold``, checked (None when unset)."""
    fold = getattr(trainer, "uplink_fold", None)
    if fold is not None and not isinstance(fold, UplinkFold):
        raise TypeError(
            f"{type(trainer).__name__}.uplink_fold must be an UplinkFold or None, "
            f"got {type(fold).__name__}"
        )
    return fold


class FoldCollector:
    """The trainer's side of one folded round: the stand-ins in client order, and the
    workers' sums merged as they come in (any order gives the same bits)."""

    def __init__(self, fold: UplinkFold, count: int) -> None:
        self.fold = fold
        self.stand_ins: list[Any] = [None] * count
        self.skipped: dict[int, tuple[str, ...]] = {}
        self.total = StreamingSum(nonfinite="skip")

    def record(self, index: int, stand_in: Any, bad_terms: tuple[str, ...]) -> None:
        """The stand-in of the uplink at position ``index`` (and its NaN/Inf terms)."""
        self.stand_ins[index] = stand_in
        if bad_terms:
            self.skipped[index] = bad_terms

    def merge(self, sums: StreamingSum) -> None:
        """Merge one worker's sums."""
        self.total.merge(sums)

    def merge_file(self, path: str | os.PathLike[str]) -> None:
        """Merge the sums a worker process saved to ``path``, then remove the file."""
        self.total.merge_file(path)
        with contextlib.suppress(OSError):
            os.unlink(path)

    def finish(self) -> FoldedRound:
        """The round, handed to the fold's sink."""
        self.total.skipped.clear()  # the positions are in ``skipped``, in client order
        result = FoldedRound(self.total, list(self.stand_ins), dict(sorted(self.skipped.items())))
        if self.fold.sink is not None:
            self.fold.sink(result)
        return result


class InProcessFold(FoldCollector):
    """A round folded in this process: one sum per thread, merged at the end.

    The thread pool folds in its worker threads (each into its own sum); the serial
    trainers and the process pool's in-process mode fold in the calling thread.
    """

    def __init__(self, fold: UplinkFold, count: int) -> None:
        super().__init__(fold, count)
        self._sums: dict[int, StreamingSum] = {}
        self._lock = threading.Lock()

    def add(self, index: int, package: Any) -> Any:
        """Fold the uplink at position ``index`` into this thread's sum; returns its
        stand-in."""
        key = threading.get_ident()
        with self._lock:
            sums = self._sums.get(key)
            if sums is None:
                sums = self._sums[key] = self.fold.new_sums()
        stand_in = self.fold.stand_in(package)
        bad = self.fold.fold(sums, package, index)
        with self._lock:
            self.record(index, stand_in, bad)
        return stand_in

    def finish(self) -> FoldedRound:
        for sums in self._sums.values():
            self.merge(sums)
        self._sums.clear()
        return super().finish()
