"""Running weighted sums of named vectors, folded in one contribution at a time.

A federated server averages its clients' updates. Holding every update until the
round is over costs one model per client; a :class:`StreamingSum` keeps one float32
running sum per *term* (``"model"``, ``"control"``, ...) instead and adds each
client's terms as they arrive, with the aggregation kernel
(:func:`emberfl.aggregate.accumulate`)::

    sums = StreamingSum()
    for update in updates:
        sums.add([("model", update.parameters, float(update.num_samples))])
    new_model = sums.mean("model")

Adding contributions one by one gives exactly the bits that
:func:`emberfl.aggregate.weighted_sum` gives for the whole list -- both start from
zero and add the same float32 products in the same order -- and every mean is one
division of a sum by its total weight (:func:`mean_of_sum`). :meth:`StreamingSum.add_many`
sums a list with one pass of the kernel per term, bitwise the same as adding its
items one by one.

A contribution holding NaN or Inf is refused whole (none of its terms is added), so
one diverged client cannot poison the sums. Finite contributions whose sum leaves
the float32 range are reported by :meth:`StreamingSum.overflowed` and refused by
:meth:`StreamingSum.mean`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, TypeAlias

import torch

from emberfl import aggregate
from emberfl.aggregate import NonFiniteError

__all__ = [
    "NonFiniteContribution",
    "NonFiniteMode",
    "StreamingSum",
    "Term",
    "flat_f32",
    "mean_of_sum",
]

#: One named, weighted vector of a contribution: ``(name, vector, weight)``.
Term: TypeAlias = "tuple[str, torch.Tensor, float]"

#: What :class:`StreamingSum` does with a contribution holding NaN or Inf.
NonFiniteMode: TypeAlias = Literal["raise", "skip"]


class NonFiniteContribution(NamedTuple):
    """A contribution left out for holding NaN or Inf: its label and the bad terms."""

    label: Any
    terms: tuple[str, ...]


def flat_f32(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` as a 1-D float32 CPU tensor; no copy for one that already is."""
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(vector).__name__}")
    if vector.dim() != 1:
        vector = vector.reshape(-1)
    if vector.dtype != torch.float32 or vector.device.type != "cpu":
        vector = vector.to("cpu", torch.float32)
    return vector


def mean_of_sum(total: torch.Tensor, weight: float) -> torch.Tensor:
    """The weighted mean from a weighted sum and the sum of its weights: one division.

    Every averaging path ends here, which is what makes them agree bit for bit.
    """
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"the weights' sum must be finite and > 0, got {weight!r}")
    return torch.div(total, weight)


def _check_terms(terms: object) -> list[tuple[str, torch.Tensor, float]]:
    """``terms`` validated: names, float32 CPU vectors and finite float weights."""
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
        checked.append((name, flat_f32(vector), float(weight)))
    names = [name for name, _, _ in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"a contribution names a term twice: {names}")
    return checked


class StreamingSum:
    """Weighted sums of named terms, ``sum_i weight_i * vector_i`` per term, in float32.

    Every contribution is a sequence of ``(name, vector, weight)`` terms with the same
    names, in the same order and of the same lengths as the first one's. Vectors of
    any shape, dtype and device are flattened to float32 on the CPU (no copy for a
    1-D float32 CPU tensor, such as an uplink mapped from its file).

    ``nonfinite`` decides what happens to a contribution holding NaN or Inf:
    ``"raise"`` (default) raises :class:`~emberfl.aggregate.NonFiniteError`, ``"skip"``
    leaves it out and records it in :attr:`skipped`. Either way none of its terms
    is added. ``threads`` are the kernel's (the result is the same for any count).
    """

    def __init__(self, *, nonfinite: NonFiniteMode = "raise", threads: int = 1) -> None:
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be positive (an int >= 1), got {threads!r}")
        self.nonfinite: NonFiniteMode = nonfinite
        self.threads = threads
        #: Contributions folded so far.
        self.count = 0
        #: Contributions left out for holding NaN or Inf (``nonfinite="skip"``), in order.
        self.skipped: list[NonFiniteContribution] = []
        self._names: tuple[str, ...] = ()
        self._lengths: tuple[int, ...] = ()
        self._sums: list[torch.Tensor] = []
        self._totals: list[float] = []
        # Which sums hold NaN or Inf; None once an addition made it stale.
        self._overflow: list[bool] | None = None

    # -- adding ----------------------------------------------------------------------

    def add(self, terms: Sequence[Term], *, label: Any = None) -> bool:
        """Fold one contribution in; returns whether it was (False: skipped).

        ``label`` names it in errors and in :attr:`skipped` (default: its position).
        """
        checked = _check_terms(terms)
        self._check_layout(checked)
        vectors = [vector for _, vector, _ in checked]
        bad = aggregate.find_nonfinite(vectors, threads=self.threads)
        if bad:
            self._refuse([(self._label(label, 0), tuple(checked[k][0] for k in bad))])
            return False
        if not self._names:
            self._start(checked, [torch.zeros(v.numel(), dtype=torch.float32) for v in vectors])
        for k, (_, vector, weight) in enumerate(checked):
            aggregate.accumulate(self._sums[k], vector, weight, threads=self.threads)
            self._totals[k] += weight
        self.count += 1
        self._overflow = None
        return True

    def add_many(
        self, contributions: Sequence[Sequence[Term]], *, labels: Sequence[Any] | None = None
    ) -> list[bool]:
        """Fold several contributions in, in order; returns which were (see :meth:`add`).

        Into empty sums, each term is summed over all of them in one pass of the
        kernel (cache-blocked over the contributions), bitwise the same as adding
        them one by one. NaN and Inf are looked for only when a sum comes out
        non-finite, so a clean list is read once.
        """
        if labels is not None and len(labels) != len(contributions):
            raise ValueError(f"got {len(labels)} labels for {len(contributions)} contributions")
        named = [
            labels[i] if labels is not None else self._label(None, i)
            for i in range(len(contributions))
        ]
        if self.count or self.skipped or not contributions:
            return [self.add(terms, label=named[i]) for i, terms in enumerate(contributions)]
        checked = [_check_terms(terms) for terms in contributions]
        for terms in checked:
            self._check_layout(terms, pending=checked[0])
        kept = list(range(len(checked)))
        refused: dict[int, list[str]] = {}
        sums = self._sum_columns(checked, kept)
        overflow = [self._nonfinite(total) for total in sums]
        bad_columns = [k for k, bad in enumerate(overflow) if bad]
        for k in bad_columns:
            column = [checked[i][k][1] for i in kept]
            for j in aggregate.find_nonfinite(column, threads=self.threads):
                refused.setdefault(kept[j], []).append(checked[0][k][0])
        if refused:
            self._refuse([(named[i], tuple(terms)) for i, terms in sorted(refused.items())])
            # Summed again from zero without them: the same bits as leaving them out.
            kept = [i for i in kept if i not in refused]
            sums = self._sum_columns(checked, kept)
            overflow = [self._nonfinite(total) for total in sums]
        if kept:
            self._start(checked[0], sums)
            self._totals = [_total(checked, kept, k) for k in range(len(sums))]
            self.count = len(kept)
            self._overflow = overflow
        return [i not in refused for i in range(len(checked))]

    # -- reading ---------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """The terms' names, in order (empty until a contribution is folded)."""
        return self._names

    @property
    def sums(self) -> list[torch.Tensor]:
        """The running sums, one float32 vector per term in :attr:`names` order."""
        return list(self._sums)

    @property
    def totals(self) -> list[float]:
        """The sum of the weights of every term, in :attr:`names` order."""
        return list(self._totals)

    def sum(self, name: str) -> torch.Tensor:
        """The running sum of term ``name``."""
        return self._sums[self._index(name)]

    def total(self, name: str) -> float:
        """The sum of term ``name``'s weights."""
        return self._totals[self._index(name)]

    def overflowed(self) -> list[str]:
        """The terms whose sum holds NaN or Inf: finite updates too large to add up."""
        return [name for name, bad in zip(self._names, self._overflows(), strict=True) if bad]

    def mean(self, name: str) -> torch.Tensor:
        """Term ``name``'s weighted mean, ``sum / total``: one division.

        Raises :class:`~emberfl.aggregate.NonFiniteError` when the sum overflowed and
        ``ValueError`` when the weights add up to zero or less.
        """
        k = self._index(name)
        if self._overflows()[k]:
            raise NonFiniteError(
                f"the sum of the {name} terms overflowed (NaN or Inf): the contributions "
                "are finite but too large to add up in float32"
            )
        return mean_of_sum(self._sums[k], self._totals[k])

    def means(self) -> dict[str, torch.Tensor]:
        """Every term's weighted mean (see :meth:`mean`)."""
        return {name: self.mean(name) for name in self._names}

    def __repr__(self) -> str:
        return (
            f"StreamingSum(terms={list(self._names)}, count={self.count}, "
            f"skipped={len(self.skipped)})"
        )

    # -- machinery -------------------------------------------------------------------

    def _label(self, label: Any, offset: int) -> Any:
        return self.count + len(self.skipped) + offset if label is None else label

    def _index(self, name: str) -> int:
        try:
            return self._names.index(name)
        except ValueError:
            if not self._names:
                raise KeyError(f"no term {name!r}: nothing has been folded yet") from None
            raise KeyError(f"no term {name!r} (terms: {list(self._names)})") from None

    def _check_layout(
        self,
        terms: list[tuple[str, torch.Tensor, float]],
        pending: list[tuple[str, torch.Tensor, float]] | None = None,
    ) -> None:
        """The terms must match the first contribution's names and vector lengths."""
        if self._names:
            names, lengths = self._names, self._lengths
        elif pending is not None:
            names = tuple(name for name, _, _ in pending)
            lengths = tuple(vector.numel() for _, vector, _ in pending)
        else:
            return
        got = tuple(name for name, _, _ in terms)
        if got != names:
            raise ValueError(f"a contribution has terms {list(got)}, expected {list(names)}")
        for (name, vector, _), length in zip(terms, lengths, strict=True):
            if vector.numel() != length:
                raise ValueError(f"term {name!r} has {vector.numel()} values, expected {length}")

    def _start(
        self, terms: list[tuple[str, torch.Tensor, float]], sums: list[torch.Tensor]
    ) -> None:
        """Fix the layout from the first folded contribution, with ``sums`` to add into."""
        self._names = tuple(name for name, _, _ in terms)
        self._lengths = tuple(vector.numel() for _, vector, _ in terms)
        self._sums = sums
        self._totals = [0.0] * len(terms)

    def _overflows(self) -> list[bool]:
        if self._overflow is None:
            self._overflow = [self._nonfinite(total) for total in self._sums]
        return self._overflow

    def _refuse(self, found: list[tuple[Any, tuple[str, ...]]]) -> None:
        if self.nonfinite == "raise":
            labels = [label for label, _ in found]
            names = list(dict.fromkeys(name for _, terms in found for name in terms))
            raise NonFiniteError(
                f"the {' and '.join(names)} terms of contributions {labels} hold NaN or Inf"
            )
        self.skipped.extend(NonFiniteContribution(label, terms) for label, terms in found)

    def _sum_columns(
        self, checked: list[list[tuple[str, torch.Tensor, float]]], kept: list[int]
    ) -> list[torch.Tensor]:
        if not kept:
            return []
        sums = []
        for k in range(len(checked[0])):
            result = aggregate.weighted_sum(
                [checked[i][k][1] for i in kept],
                [checked[i][k][2] for i in kept],
                threads=self.threads,
                check_finite=False,
            )
            assert isinstance(result, torch.Tensor)
            sums.append(result)
        return sums

    def _nonfinite(self, vector: torch.Tensor) -> bool:
        return bool(aggregate.find_nonfinite([vector], threads=self.threads))


def _total(checked: list[list[tuple[str, torch.Tensor, float]]], kept: list[int], k: int) -> float:
    """The weights of column ``k`` added in contribution order, as :meth:`StreamingSum.add` does."""
    total = 0.0
    for i in kept:
        total += checked[i][k][2]
    return total
