"""Seeded partitioners that split a dataset's sample indices among virtual clients.

Every partitioner takes an integer seed, draws from its own ``numpy.random.Generator``
(the global numpy state is never touched), and returns a :class:`Partition`: one int64
index array per client. All of them assign every sample to exactly one client, so a
partition is always disjoint and covers ``range(n)``. The same arguments give the same
partition on every machine; numpy keeps ``Generator`` streams stable in practice but does
not promise it across releases, so store a partition (:meth:`Partition.to_flat`) when it
must outlive a numpy upgrade.

* :func:`iid` -- a uniform random split into near-equal parts.
* :func:`dirichlet` -- label skew: per class, client shares ~ Dirichlet(alpha).
* :func:`shards` -- the pathological split of McMahan et al. 2017 (sort by label,
  cut into equal shards, deal a fixed number of shards to each client).
* :func:`quantity_skew` -- random client sizes drawn from a log-normal distribution.

The names a run gives them (``--partition``) are in :mod:`emberfl.data.registry`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from emberfl.reproducibility import check_seed

__all__ = [
    "Partition",
    "dirichlet",
    "iid",
    "quantity_skew",
    "shards",
]

logger = logging.getLogger(__name__)

IndexArray = NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class Partition:
    """Per-client sample indices into one dataset.

    ``indices[k]`` is the sorted int64 array of the samples client ``k`` owns. A
    partition made from labels remembers them (``labels``/``num_classes``) so that
    :meth:`class_counts`, :meth:`format_counts` and :meth:`save_heatmap` need no
    arguments; for a partition made from a plain sample count pass the labels in.
    """

    indices: tuple[IndexArray, ...]
    labels: IndexArray | None = field(default=None, repr=False)
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if len(self.indices) == 0:
            raise ValueError("a partition needs at least one client")
        cleaned = []
        for k, idx in enumerate(self.indices):
            arr = np.asarray(idx)
            if arr.ndim != 1:
                raise ValueError(f"client {k}: index array must be 1-D, got shape {arr.shape}")
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"client {k}: indices must be integers, got dtype {arr.dtype}")
            arr = arr.astype(np.int64, copy=False)
            if arr.size and int(arr.min()) < 0:
                raise ValueError(f"client {k}: negative sample index {int(arr.min())}")
            cleaned.append(arr)
        # Frozen dataclass: normalising the field needs object.__setattr__.
        object.__setattr__(self, "indices", tuple(cleaned))
        if self.labels is not None:
            labels = _as_labels(self.labels)
            top = max((int(a.max()) for a in cleaned if a.size), default=-1)
            if top >= labels.shape[0]:
                raise ValueError(
                    f"partition refers to sample {top} but only {labels.shape[0]} labels were given"
                )
            object.__setattr__(self, "labels", labels)

    # -- container protocol -------------------------------------------------------------
    @property
    def num_clients(self) -> int:
        return len(self.indices)

    @property
    def num_samples(self) -> int:
        """Total number of samples over all clients."""
        return int(sum(a.shape[0] for a in self.indices))

    def sizes(self) -> IndexArray:
        """Number of samples per client, as an int64 array of length ``num_clients``."""
        return np.array([a.shape[0] for a in self.indices], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, cid: int) -> IndexArray:
        return self.indices[cid]

    def __iter__(self) -> Iterator[IndexArray]:
        return iter(self.indices)

    # -- checks and conversions -----------------------------------------------------------
    def check(self, n: int) -> None:
        """Raise ``ValueError`` unless the clients' indices are disjoint and cover ``range(n)``."""
        flat = np.concatenate(self.indices) if self.indices else np.empty(0, np.int64)
        if flat.size and int(flat.max()) >= n:
            raise ValueError(f"index {int(flat.max())} out of range for {n} samples")
        seen = np.bincount(flat, minlength=n)
        if np.any(seen > 1):
            raise ValueError(f"{int(np.sum(seen > 1))} samples are assigned to several clients")
        if np.any(seen == 0):
            raise ValueError(f"{int(np.sum(seen == 0))} samples are assigned to no client")

    def to_flat(self) -> tuple[IndexArray, IndexArray]:
        """Concatenated indices and ``num_clients + 1`` offsets (CSR form, easy to store)."""
        sizes = self.sizes()
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        return np.concatenate(self.indices).astype(np.int64, copy=False), offsets

    @classmethod
    def from_flat(
        cls,
        flat: ArrayLike,
        offsets: ArrayLike,
        labels: ArrayLike | None = None,
        num_classes: int | None = None,
    ) -> Partition:
        """Inverse of :meth:`to_flat`."""
        flat_arr = np.asarray(flat, dtype=np.int64)
        off = np.asarray(offsets, dtype=np.int64)
        if off.ndim != 1 or off.size < 2 or off[0] != 0 or off[-1] != flat_arr.size:
            raise ValueError(
                f"offsets must be 1-D, start at 0 and end at {flat_arr.size}; got {off!r}"
            )
        if np.any(np.diff(off) < 0):
            raise ValueError("offsets must be non-decreasing")
        parts = tuple(flat_arr[off[k] : off[k + 1]].copy() for k in range(off.size - 1))
        lab = None if labels is None else _as_labels(labels)
        return cls(parts, lab, num_classes)

    # -- reporting --------------------------------------------------------------------------
    def class_counts(
        self, labels: ArrayLike | None = None, num_classes: int | None = None
    ) -> IndexArray:
        """Matrix ``[num_clients, num_classes]`` of how many samples of each class a client has."""
        lab, k = self._labels_and_classes(labels, num_classes)
        out = np.zeros((self.num_clients, k), dtype=np.int64)
        for cid, idx in enumerate(self.indices):
            if idx.size:
                out[cid] = np.bincount(lab[idx], minlength=k)
        return out

    def format_counts(
        self,
        labels: ArrayLike | None = None,
        num_classes: int | None = None,
        *,
        max_rows: int | None = 50,
    ) -> str:
        """A plain-text table of per-client class counts (first ``max_rows`` clients)."""
        counts = self.class_counts(labels, num_classes)
        n_cli, k = counts.shape
        shown = n_cli if max_rows is None else min(n_cli, max_rows)
        width = max(5, len(str(int(counts.max(initial=0)))) + 1, len(str(k - 1)) + 1)
        cid_w = max(6, len(str(n_cli - 1)) + 1)
        tot_w = max(6, len(str(int(counts.sum(axis=1).max(initial=0)))) + 1)
        header = (
            "client".rjust(cid_w)
            + "".join(str(c).rjust(width) for c in range(k))
            + "total".rjust(tot_w)
        )
        lines = [header, "-" * len(header)]
        for cid in range(shown):
            row = counts[cid]
            lines.append(
                str(cid).rjust(cid_w)
                + "".join(str(int(v)).rjust(width) for v in row)
                + str(int(row.sum())).rjust(tot_w)
            )
        if shown < n_cli:
            lines.append(f"... {n_cli - shown} more clients")
        sizes = counts.sum(axis=1)
        lines.append(
            f"{n_cli} clients, {int(sizes.sum())} samples, size min/mean/max "
            f"{int(sizes.min())}/{float(sizes.mean()):.1f}/{int(sizes.max())}, "
            f"classes per client mean {float((counts > 0).sum(axis=1).mean()):.2f}"
        )
        return "\n".join(lines)

    def save_heatmap(
        self,
        path: str | os.PathLike[str],
        labels: ArrayLike | None = None,
        num_classes: int | None = None,
        *,
        title: str | None = None,
    ) -> None:
        """Write a PNG heat map of the per-client class counts (needs matplotlib)."""
        from emberfl.plot import plot_class_heatmap

        plot_class_heatmap(self.class_counts(labels, num_classes), path, title=title)

    def _labels_and_classes(
        self, labels: ArrayLike | None, num_classes: int | None
    ) -> tuple[IndexArray, int]:
        if labels is not None:
            lab = _as_labels(labels)
        elif self.labels is not None:
            lab = self.labels
        else:
            raise ValueError(
                "this partition was made from a sample count, not labels: pass the labels"
            )
        top = max((int(a.max()) for a in self.indices if a.size), default=-1)
        if top >= lab.shape[0]:
            raise ValueError(
                f"partition refers to sample {top} but only {lab.shape[0]} labels were given"
            )
        k = num_classes if num_classes is not None else self.num_classes
        if k is None:
            k = int(lab.max()) + 1 if lab.size else 0
        if lab.size and int(lab.max()) >= k:
            raise ValueError(f"label {int(lab.max())} does not fit num_classes={k}")
        return lab, k


# ---------------------------------------------------------------------------------------------
# helpers


def _as_labels(labels: ArrayLike) -> IndexArray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"labels must be non-negative, found {int(arr.min())}")
    return arr


def _check_clients(num_clients: int, n: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or isinstance(num_clients, bool):
        raise TypeError(f"num_clients must be an int, got {type(num_clients).__name__}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"cannot give {num_clients} clients at least one of {n} samples each")


def _rng(seed: int) -> np.random.Generator:
    # 64 bits: a partition seed only feeds numpy's generator, which takes wide seeds;
    # the 32-bit limit of run seeds comes from the per-client streams.
    return np.random.default_rng(check_seed(seed, "seed", bits=64))


def _labels_or_n(labels_or_n: int | ArrayLike) -> tuple[int, IndexArray | None]:
    if isinstance(labels_or_n, (int, np.integer)) and not isinstance(labels_or_n, bool):
        n = int(labels_or_n)
        if n < 0:
            raise ValueError(f"number of samples must be >= 0, got {n}")
        return n, None
    labels = _as_labels(labels_or_n)
    return int(labels.shape[0]), labels


def _split_sorted(perm: IndexArray, sizes: Sequence[int] | IndexArray) -> tuple[IndexArray, ...]:
    bounds = np.cumsum(np.asarray(sizes, dtype=np.int64))[:-1]
    return tuple(np.sort(part) for part in np.split(perm, bounds))


# ---------------------------------------------------------------------------------------------
# partitioners


def iid(labels_or_n: int | ArrayLike, num_clients: int, seed: int) -> Partition:
    """Shuffle all samples and cut them into ``num_clients`` parts whose sizes differ by <= 1.

    ``labels_or_n`` is either the label array (remembered for class counts) or the
    number of samples.
    """
    n, labels = _labels_or_n(labels_or_n)
    _check_clients(num_clients, n)
    perm = _rng(seed).permutation(n).astype(np.int64)
    base, extra = divmod(n, num_clients)
    sizes = [base + (1 if k < extra else 0) for k in range(num_clients)]
    return Partition(_split_sorted(perm, sizes), labels)


def dirichlet(
    labels: ArrayLike,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int | None = None,
    *,
    num_classes: int | None = None,
    max_retries: int = 1000,
) -> Partition:
    """Label-skewed split: for every class, client shares are drawn from Dirichlet(alpha).

    Small ``alpha`` gives each client few classes; large ``alpha`` approaches IID. As in
    the common NIID-Bench formulation (Li et al. 2022), a client that already holds more
    than ``n / num_clients`` samples gets no share of the remaining classes, which keeps
    sizes from running away at small alpha. The whole draw is repeated until every
    client has at least ``min_size`` samples; after ``max_retries`` failed draws a
    ``ValueError`` says which knobs to turn. The default ``min_size`` is 10 (NIID-Bench's
    choice), lowered to a tenth of the mean client size when data is scarce (so 100
    clients on the 1,438 digits training images need 1 each), and never below 1.
    """
    lab = _as_labels(labels)
    n = int(lab.shape[0])
    _check_clients(num_clients, n)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if min_size is None:
        min_size = max(1, min(10, n // (10 * num_clients)))
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if min_size * num_clients > n:
        raise ValueError(
            f"min_size={min_size} x {num_clients} clients needs {min_size * num_clients} "
            f"samples but there are only {n}"
        )
    if max_retries < 1:
        raise ValueError(f"max_retries must be >= 1, got {max_retries}")
    k = int(lab.max()) + 1 if num_classes is None else int(num_classes)
    if int(lab.max()) >= k:
        raise ValueError(f"label {int(lab.max())} does not fit num_classes={k}")

    rng = _rng(seed)
    by_class = [np.flatnonzero(lab == c).astype(np.int64) for c in range(k)]
    cap = n / num_clients
    smallest = 0
    for attempt in range(1, max_retries + 1):
        buckets: list[list[IndexArray]] = [[] for _ in range(num_clients)]
        held = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            if idx.size == 0:
                continue
            members = rng.permutation(idx)
            share = rng.dirichlet(np.full(num_clients, alpha))
            share = np.where(held < cap, share, 0.0)
            total = share.sum()
            # Every client at the cap (possible only at the very end): spread evenly.
            share = np.full(num_clients, 1.0 / num_clients) if total <= 0.0 else share / total
            cuts = (np.cumsum(share) * members.size).astype(np.int64)[:-1]
            for cid, part in enumerate(np.split(members, cuts)):
                if part.size:
                    buckets[cid].append(part)
                    held[cid] += part.size
        smallest = int(held.min())
        if smallest >= min_size:
            if attempt > 1:
                logger.debug("dirichlet partition accepted after %d draws", attempt)
            parts = tuple(
                np.sort(np.concatenate(b)) if b else np.empty(0, np.int64) for b in buckets
            )
            return Partition(parts, lab, k)
    raise ValueError(
        f"dirichlet(alpha={alpha}) could not give all {num_clients} clients at least "
        f"min_size={min_size} samples in {max_retries} draws (smallest client in the last "
        f"draw: {smallest}); increase alpha, lower min_size, or use fewer clients"
    )


def shards(labels: ArrayLike, num_clients: int, shards_per_client: int, seed: int) -> Partition:
    """McMahan et al. 2017's pathological non-IID split.

    Samples are sorted by label (ties in a seeded random order), cut into
    ``num_clients * shards_per_client`` contiguous shards of equal size (sizes differ
    by at most one when the count does not divide), and every client receives
    ``shards_per_client`` shards chosen at random. MNIST's 60,000 training samples with
    100 clients and 2 shards each give 200 shards of 300 samples, so most clients see
    only two digits.
    """
    lab = _as_labels(labels)
    n = int(lab.shape[0])
    _check_clients(num_clients, n)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ValueError(
            f"{num_clients} clients x {shards_per_client} shards = {num_shards} shards "
            f"but there are only {n} samples"
        )
    rng = _rng(seed)
    shuffled = rng.permutation(n).astype(np.int64)
    order = shuffled[np.argsort(lab[shuffled], kind="stable")]
    shard_list = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards)
    parts = tuple(
        np.sort(
            np.concatenate(
                [shard_list[s] for s in deal[c * shards_per_client : (c + 1) * shards_per_client]]
            )
        )
        for c in range(num_clients)
    )
    return Partition(parts, lab)


def quantity_skew(
    labels_or_n: int | ArrayLike, num_clients: int, sigma: float, seed: int
) -> Partition:
    """Random client sizes: weights ~ LogNormal(0, sigma), every client gets >= 1 sample.

    ``sigma = 0`` gives equal sizes; larger ``sigma`` gives a heavier tail of big clients.
    Samples are shuffled before being dealt, so labels stay IID within each client.
    """
    n, labels = _labels_or_n(labels_or_n)
    _check_clients(num_clients, n)
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    rng = _rng(seed)
    # LogNormal(0, sigma) weights, normalised; exponentiating after subtracting the
    # largest log-weight cannot overflow however large sigma is.
    log_w = rng.normal(0.0, sigma, size=num_clients)
    weights = np.exp(log_w - log_w.max())
    weights = weights / weights.sum()
    # One sample is reserved per client; the rest is dealt by largest remainder so the
    # sizes add up exactly.
    spare = n - num_clients
    raw = weights * spare
    sizes = np.floor(raw).astype(np.int64)
    left = spare - int(sizes.sum())
    if left:
        sizes[np.argsort(-(raw - sizes), kind="stable")[:left]] += 1
    sizes += 1
    perm = rng.permutation(n).astype(np.int64)
    return Partition(_split_sorted(perm, sizes), labels)
