"""Exact running sums of named vectors, folded in one contribution at a time.

A federated server averages its clients' updates. Holding every update until the
round is over costs one model per client; a :class:`StreamingSum` keeps one
:class:`~emberfl.aggregate.ExactSum` per *term* (``"model"``, ``"control"``, ...)
instead and adds each client's terms as they arrive::

    sums = StreamingSum()
    for update in updates:
        sums.add([("model", update.parameters, float(update.num_samples))])
    new_model = sums.mean("model")

The sums are exact (integers on a fixed binary grid), so the result does not depend
on the order of the contributions or on how they are split: sums built apart -- one
per worker process or thread, on other machines -- and combined with :meth:`merge`
(across processes through :meth:`save` / :meth:`load`) give the bits of one sum of
everything. Every mean is rounded to float32 once.

A contribution holding NaN or Inf is refused whole (none of its terms is added), so
one diverged client cannot poison the sums. A term too large for the grid
(``|w * x|`` beyond :attr:`~emberfl.aggregate.ExactSum.term_limit`) raises
:class:`~emberfl.aggregate.OutOfRangeError`; the sums are unusable afterwards.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, TypeAlias

import numpy as np
import torch

from emberfl import store
from emberfl.aggregate import Bytes, ExactSum, NonFiniteError, OutOfRangeError, find_nonfinite

__all__ = [
    "NonFiniteContribution",
    "NonFiniteMode",
    "StreamingSum",
    "Term",
    "flat_vector",
]

#: One named, weighted vector of a contribution: ``(name, vector, weight)``.
Term: TypeAlias = "tuple[str, torch.Tensor, float]"

#: What :class:`StreamingSum` does with a contribution holding NaN or Inf.
NonFiniteMode: TypeAlias = Literal["raise", "skip"]

# The dtypes the exact sum reads as they are; any other is converted to float32.
_NATIVE = (torch.float32, torch.float16, torch.bfloat16)
_FORMAT = "emberfl.streaming-sum.v1"


class NonFiniteContribution(NamedTuple):
    """A contribution left out for holding NaN or Inf: its label and the bad terms."""

    label: Any
    terms: tuple[str, ...]


def flat_vector(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` as a 1-D CPU tensor of float32, float16 or bfloat16 (other dtypes
    become float32); no copy for one that already is, such as a mapped uplink."""
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(vector).__name__}")
    if vector.dim() != 1:
        vector = vector.reshape(-1)
    if vector.device.type != "cpu":
        vector = vector.cpu()
    if vector.dtype not in _NATIVE:
        vector = vector.to(torch.float32)
    return vector


def _check_terms(terms: object) -> list[tuple[str, torch.Tensor, float]]:
    """``terms`` validated: names, flat CPU vectors and finite float weights."""
    if isinstance(terms, str | bytes) or not isinstance(terms, Sequence) or not terms:
        raise TypeError("a contribution must be a non-empty sequence of (name, vector, weight)")
    checked: list[tuple[str, torch.Tensor, float]] = []
    for term in terms:
        if not isinstance(term, tuple | list) or len(term) != 3:
            raise TypeError(f"a term must be a (name, vector, weight) triple, got {term!r}")
        name, vector, weight = term
        if not isinstance(name, str):
            raise TypeError(f"a term's name must be a str, got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise TypeError(f"the weight of term {name!r} must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"the weight of term {name!r} must be finite, got {weight!r}")
        checked.append((name, flat_vector(vector), float(weight)))
    names = [name for name, _, _ in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"a contribution names a term twice: {names}")
    return checked


class StreamingSum:
    """Exact weighted sums of named terms, ``sum_i weight_i * vector_i`` per term.

    Every contribution is a sequence of ``(name, vector, weight)`` terms with the same
    names, in the same order and of the same lengths as the first one's. Vectors of
    any shape and device are flattened on the CPU; float32, float16 and bfloat16 are
    read as they are, other dtypes converted to float32.

    ``nonfinite`` decides what happens to a contribution holding NaN or Inf:
    ``"raise"`` (default) raises :class:`~emberfl.aggregate.NonFiniteError`, ``"skip"``
    leaves it out and records it in :attr:`skipped`. Either way none of its terms
    is added. ``threads`` are the kernels' (the result is the same for any count).
    """

    def __init__(self, *, nonfinite: NonFiniteMode = "raise", threads: int = 1) -> None:
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be positive (an int >= 1), got {threads!r}")
        self.nonfinite: NonFiniteMode = nonfinite
        self.threads = threads
        #: Contributions folded so far (merged ones included).
        self.count = 0
        #: Contributions left out for holding NaN or Inf (``nonfinite="skip"``), in order.
        self.skipped: list[NonFiniteContribution] = []
        self._names: tuple[str, ...] = ()
        self._sums: list[ExactSum] = []
        self._broken = False

    # -- adding ----------------------------------------------------------------------

    def add(self, terms: Sequence[Term], *, label: Any = None) -> bool:
        """Fold one contribution in; returns whether it was (False: skipped).

        ``label`` names it in errors and in :attr:`skipped` (default: its position).
        """
        self._check_usable()
        checked = _check_terms(terms)
        self._check_layout(checked)
        bad = self._nonfinite(checked)
        if bad:
            self._refuse([(self._label(label), tuple(checked[k][0] for k in bad))])
            return False
        self._fold_in(checked)
        return True

    def add_many(
        self, contributions: Sequence[Sequence[Term]], *, labels: Sequence[Any] | None = None
    ) -> list[bool]:
        """Fold several contributions in, in order; returns which were (see :meth:`add`).

        With ``nonfinite="raise"`` nothing is added unless every contribution is finite.
        """
        self._check_usable()
        if labels is not None and len(labels) != len(contributions):
            raise ValueError(f"got {len(labels)} labels for {len(contributions)} contributions")
        named = [
            labels[i] if labels is not None else self._label(None, i)
            for i in range(len(contributions))
        ]
        checked = [_check_terms(terms) for terms in contributions]
        bad = [self._nonfinite(terms) for terms in checked]
        found = [
            (label, tuple(terms[k][0] for k in b))
            for label, terms, b in zip(named, checked, bad, strict=True)
            if b
        ]
        if found and self.nonfinite == "raise":
            self._refuse(found)
        folded = []
        for label, terms, b in zip(named, checked, bad, strict=True):
            self._check_layout(terms)
            if b:
                self._refuse([(label, tuple(terms[k][0] for k in b))])
            else:
                self._fold_in(terms)
            folded.append(not b)
        return folded

    def merge(self, other: StreamingSum) -> None:
        """Add ``other``'s sums (same terms and lengths) into these: the bits of one sum
        of both sums' contributions, in any order. Its :attr:`skipped` are appended."""
        if not isinstance(other, StreamingSum):
            raise TypeError(f"expected a StreamingSum, got {type(other).__name__}")
        self._check_usable()
        other._check_usable()
        if other._names:
            if not self._names:
                self._names = other._names
                self._sums = [
                    ExactSum(len(s), grid=s.grid, threads=self.threads) for s in other._sums
                ]
            if other._names != self._names:
                raise ValueError(
                    f"cannot merge terms {list(other._names)} into {list(self._names)}"
                )
            for mine, theirs in zip(self._sums, other._sums, strict=True):
                if len(mine) != len(theirs):
                    raise ValueError(
                        f"cannot merge a sum of {len(theirs)} values into one of {len(mine)}"
                    )
            for mine, theirs in zip(self._sums, other._sums, strict=True):
                mine.merge(theirs)
        self.count += other.count
        self.skipped.extend(other.skipped)

    # -- across processes ------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the sums to a store file (atomically); :meth:`merge_file` and :meth:`load`
        read them back.

        One uint8 tensor per term holds :meth:`ExactSum.to_bytes`' format; :attr:`skipped`
        is not saved (labels are the caller's to carry).
        """
        tensors = {name: torch.from_numpy(data) for name, data in self.term_bytes().items()}
        metadata = {"format": _FORMAT, "terms": "\n".join(self._names), "count": str(self.count)}
        store.save(path, tensors, metadata=metadata)

    def merge_file(self, path: str | os.PathLike[str]) -> None:
        """Merge the sums that :meth:`save` wrote to ``path``, read in place from the mapped
        file (no copy of them is made). A file that is not one raises ``ValueError``."""
        self._check_usable()
        mapped = store.open_file(path)
        meta = mapped.metadata
        where = os.fspath(path)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{where} holds no saved StreamingSum")
        names = tuple(meta["terms"].split("\n")) if meta.get("terms") else ()
        if sorted(names) != sorted(mapped.keys()):
            raise ValueError(f"{where}: terms {list(names)} do not match its tensors")
        try:
            count = int(meta["count"])
        except (KeyError, ValueError):
            raise ValueError(f"{where}: no valid count") from None
        if names and self._names and names != self._names:
            raise ValueError(f"cannot merge terms {list(names)} into {list(self._names)}")
        for name in names:
            self.merge_term_bytes(name, mapped[name], where=where)
        self.count += count

    def term_bytes(self) -> dict[str, np.ndarray]:
        """Each term's exact sum in :meth:`ExactSum.to_bytes`' format, as uint8 arrays
        (what :meth:`save` writes; for other transports, such as collectives)."""
        self._check_usable()
        return {n: s.to_array() for n, s in zip(self._names, self._sums, strict=True)}

    def merge_term_bytes(self, name: str, data: Bytes, *, where: str = "") -> None:
        """Merge one term's exact sum, given in :meth:`ExactSum.to_bytes`' format (read in
        place). Terms must arrive in the order of the first contribution's: a new term
        is appended while this sum has counted nothing itself. :attr:`count` is not
        changed (the caller knows how many contributions the bytes hold).
        """
        self._check_usable()
        prefix = f"{where}: " if where else ""
        try:
            if name in self._names:
                self._sums[self._names.index(name)].merge_bytes(data)
                return
            if self.count:
                raise ValueError(f"no term {name!r} in {list(self._names)}")
            self._sums.append(ExactSum.from_bytes(data, threads=self.threads))
            self._names = (*self._names, name)
        except ValueError as exc:
            # A refused term leaves its sum as it was; earlier terms may be in.
            self._broken = bool(self._names)
            raise ValueError(f"{prefix}term {name!r}: {exc}") from None

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, nonfinite: NonFiniteMode = "raise", threads: int = 1
    ) -> StreamingSum:
        """Sums that :meth:`save` wrote (see :meth:`merge_file`)."""
        sums = cls(nonfinite=nonfinite, threads=threads)
        sums.merge_file(path)
        return sums

    # -- reading ---------------------------------------------------------------------

    @property
    def elements(self) -> int:
        """Elements summed over all terms (each holds a 16-byte exact sum)."""
        return sum(len(s) for s in self._sums)

    @property
    def names(self) -> tuple[str, ...]:
        """The terms' names, in order (empty until a contribution is folded)."""
        return self._names

    def term_length(self, name: str) -> int | None:
        """Elements in term ``name``'s sum; ``None`` while this sum has no such term
        (what :meth:`merge_term_bytes` accepts is ``48 + 16 *`` that many bytes)."""
        if name not in self._names:
            return None
        return len(self._sums[self._names.index(name)])

    @property
    def sums(self) -> list[torch.Tensor]:
        """The sums as float32 vectors (each rounded once), in :attr:`names` order."""
        return [self.sum(name) for name in self._names]

    @property
    def totals(self) -> list[float]:
        """The sum of the weights of every term, in :attr:`names` order."""
        return [total.total_weight for total in self._sums]

    def sum(self, name: str) -> torch.Tensor:
        """Term ``name``'s sum as float32, rounded once.

        Raises :class:`~emberfl.aggregate.NonFiniteError` when it is beyond the float32
        range.
        """
        k = self._index(name)
        try:
            return self._sums[k].finish_sum()
        except OutOfRangeError:
            raise NonFiniteError(self._overflow_message(name, "sum")) from None

    def total(self, name: str) -> float:
        """The sum of term ``name``'s weights."""
        return self._sums[self._index(name)].total_weight

    def mean(self, name: str) -> torch.Tensor:
        """Term ``name``'s weighted mean, ``sum / total``, rounded to float32 once.

        Raises :class:`~emberfl.aggregate.NonFiniteError` when it is beyond the float32
        range and ``ValueError`` when the weights add up to zero or less.
        """
        k = self._index(name)
        total = self._sums[k].total_weight
        if not total > 0:
            raise ValueError(f"the weights' sum must be finite and > 0, got {total!r}")
        try:
            return self._sums[k].finish()
        except OutOfRangeError:
            raise NonFiniteError(self._overflow_message(name, "mean")) from None

    def means(self) -> dict[str, torch.Tensor]:
        """Every term's weighted mean (see :meth:`mean`)."""
        return {name: self.mean(name) for name in self._names}

    def __repr__(self) -> str:
        return (
            f"StreamingSum(terms={list(self._names)}, count={self.count}, "
            f"skipped={len(self.skipped)})"
        )

    # -- machinery -------------------------------------------------------------------

    def _fold_in(self, checked: list[tuple[str, torch.Tensor, float]]) -> None:
        """Add a checked, finite contribution whose layout matches (the first fixes it)."""
        if not self._names:
            self._names = tuple(name for name, _, _ in checked)
            self._sums = [ExactSum(v.numel(), threads=self.threads) for _, v, _ in checked]
        for k, (total, (_, vector, weight)) in enumerate(zip(self._sums, checked, strict=True)):
            try:
                total.add(vector, weight)
            except (OutOfRangeError, ValueError):
                # A refused term leaves its sum as it was, but the earlier terms of
                # this contribution are in: the sums no longer mean anything.
                self._broken = k > 0
                raise
        self.count += 1

    def _nonfinite(self, terms: list[tuple[str, torch.Tensor, float]]) -> list[int]:
        """Which terms hold NaN or Inf (each on its own: their dtypes may differ)."""
        return [
            k
            for k, (_, vector, _) in enumerate(terms)
            if find_nonfinite([vector], threads=self.threads)
        ]

    def _check_usable(self) -> None:
        if self._broken:
            raise RuntimeError("a term was out of range mid-contribution: these sums are unusable")

    @staticmethod
    def _overflow_message(name: str, what: str) -> str:
        return (
            f"the {what} of the {name} terms overflowed: the contributions are finite but "
            "their result is beyond the float32 range"
        )

    def _label(self, label: Any, offset: int = 0) -> Any:
        return self.count + len(self.skipped) + offset if label is None else label

    def _index(self, name: str) -> int:
        try:
            return self._names.index(name)
        except ValueError:
            if not self._names:
                raise KeyError(f"no term {name!r}: nothing has been folded yet") from None
            raise KeyError(f"no term {name!r} (terms: {list(self._names)})") from None

    def _check_layout(self, terms: list[tuple[str, torch.Tensor, float]]) -> None:
        """The terms must match the first contribution's names and vector lengths."""
        if not self._names:
            return
        got = tuple(name for name, _, _ in terms)
        if got != self._names:
            raise ValueError(f"a contribution has terms {list(got)}, expected {list(self._names)}")
        for (name, vector, _), total in zip(terms, self._sums, strict=True):
            if vector.numel() != len(total):
                raise ValueError(
                    f"term {name!r} has {vector.numel()} values, expected {len(total)}"
                )

    def _refuse(self, found: list[tuple[Any, tuple[str, ...]]]) -> None:
        if self.nonfinite == "raise":
            labels = [label for label, _ in found]
            names = list(dict.fromkeys(name for _, terms in found for name in terms))
            raise NonFiniteError(
                f"the {' and '.join(names)} terms of contributions {labels} hold NaN or Inf"
            )
        self.skipped.extend(NonFiniteContribution(label, terms) for label, terms in found)
