"""The data sets and partitioners a run can name.

One :class:`DatasetSpec` per data set says what names and aliases it answers to,
whether it is read from a directory (``--data-dir``), the model a run gets when none
is named, whether it brings its own split among the clients (Synthetic's generator
gives every client its own data, so its default partition is ``natural``), its own
settings and how to load it. One :class:`PartitionerSpec` per ``--partition`` name
says which settings it reads and how it splits a training set's labels among the
clients. Every setting is declared once here, as a :class:`~emberfl.core.setting.Setting`
(:data:`DATA_SETTINGS`), for the configuration, the command line and the settings
reference to read.

Adding a data set is a loader in :mod:`emberfl.data.datasets` and one entry in
:data:`DATASETS`; adding a partitioner is a function in :mod:`emberfl.data.partition`
and one entry in :data:`PARTITIONERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from numpy.typing import ArrayLike

from emberfl.core.checks import at_least, check_nonnegative_number, check_positive_number
from emberfl.core.setting import Setting
from emberfl.data.datasets import (
    DEFAULT_FASHION_MNIST_DIR,
    Dataset,
    PathLike,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    synthetic,
)
from emberfl.data.partition import Partition, dirichlet, iid, quantity_skew, shards

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "DATA_SETTINGS",
    "PARTITIONERS",
    "PARTITION_NAMES",
    "DatasetLoader",
    "DatasetSpec",
    "PartitionerSpec",
    "Splitter",
    "dataset_spec",
    "load_dataset",
    "partitioner_spec",
]

#: ``load(data_dir, seed, num_clients, options)``: the data set. ``options`` are the
#: values of the data set's settings keyed by setting name (a missing one takes its
#: default); any other key goes to the loader function as a keyword argument.
#: ``num_clients`` is read by data sets with a natural partition (None: the loader's
#: default) and ignored by the others.
DatasetLoader = Callable[[PathLike | None, int, int | None, Mapping[str, Any]], Dataset]

#: ``split(labels, num_clients, seed, options)``: the clients' partition of the samples
#: ``labels`` label. ``options`` are the values of the partitioner's settings keyed by
#: setting name (a missing one takes its default).
Splitter = Callable[[ArrayLike, int, int, Mapping[str, Any]], Partition]


# ---------------------------------------------------------------------------------------------
# settings

_ALPHA = Setting(
    "alpha",
    float,
    0.5,
    "Dirichlet concentration (--partition dirichlet)",
    "data",
    check=check_positive_number,
    owner="dirichlet",
)
_SHARDS_PER_CLIENT = Setting(
    "shards_per_client",
    int,
    2,
    "label-sorted shards per client (--partition shards)",
    "data",
    check=at_least(1),
    owner="shards",
)
_SIGMA = Setting(
    "sigma",
    float,
    1.0,
    "log-normal sigma of client sizes (--partition quantity)",
    "data",
    check=check_nonnegative_number,
    owner="quantity",
)
_SYNTHETIC_ALPHA = Setting(
    "synthetic_alpha",
    float,
    1.0,
    "Synthetic(alpha, beta): how much client models differ",
    "data",
    check=check_nonnegative_number,
    owner="synthetic",
)
_SYNTHETIC_BETA = Setting(
    "synthetic_beta",
    float,
    1.0,
    "Synthetic(alpha, beta): how much client inputs differ",
    "data",
    check=check_nonnegative_number,
    owner="synthetic",
)

#: Every setting of the data sets and partitioners, each once.
DATA_SETTINGS: tuple[Setting, ...] = (
    _ALPHA,
    _SHARDS_PER_CLIENT,
    _SIGMA,
    _SYNTHETIC_ALPHA,
    _SYNTHETIC_BETA,
)


def _value(options: Mapping[str, Any], setting: Setting) -> Any:
    return options.get(setting.name, setting.default)


# ---------------------------------------------------------------------------------------------
# data sets


@dataclass(frozen=True)
class DatasetSpec:
    """One data set a run can name.

    ``aliases`` are further names it answers to (matched, like ``name``, ignoring case
    and with ``_`` read as ``-``). ``needs_dir``: it is read from files in a directory
    the run must give (``--data-dir``); ``default_dir`` is where it is read from when
    none is given. ``default_model`` is the model a run gets when it names none.
    ``natural_partition``: the data set comes split among the clients (its default
    partition is ``natural``, not ``iid``). ``settings`` are the data set's own
    settings; each is named ``<name>_<keyword>`` after the loader keyword it sets
    (``synthetic_alpha`` is :func:`~emberfl.data.synthetic`'s ``alpha``). ``load`` is
    a :data:`DatasetLoader`.
    """

    name: str
    aliases: tuple[str, ...]
    needs_dir: bool
    default_dir: Path | None
    default_model: str
    natural_partition: bool
    settings: tuple[Setting, ...]
    description: str
    load: DatasetLoader


def _need_dir(name: str, data_dir: PathLike | None) -> PathLike:
    if data_dir is None:
        raise ValueError(
            f"dataset {name!r} is read from files: give its data directory (--data-dir)"
        )
    return data_dir


def _load_digits(
    data_dir: PathLike | None, seed: int, num_clients: int | None, options: Mapping[str, Any]
) -> Dataset:
    return load_digits(seed, **options)


def _load_mnist(
    data_dir: PathLike | None, seed: int, num_clients: int | None, options: Mapping[str, Any]
) -> Dataset:
    return load_mnist(_need_dir("mnist", data_dir), **options)


def _load_fashion_mnist(
    data_dir: PathLike | None, seed: int, num_clients: int | None, options: Mapping[str, Any]
) -> Dataset:
    # None: load_fashion_mnist reads DEFAULT_FASHION_MNIST_DIR, or says how to install it.
    return load_fashion_mnist(data_dir, **options)


def _load_cifar10(
    data_dir: PathLike | None, seed: int, num_clients: int | None, options: Mapping[str, Any]
) -> Dataset:
    return load_cifar10(_need_dir("cifar10", data_dir), **options)


def _load_synthetic(
    data_dir: PathLike | None, seed: int, num_clients: int | None, options: Mapping[str, Any]
) -> Dataset:
    kwargs = dict(options)
    alpha = kwargs.pop(_SYNTHETIC_ALPHA.name, _SYNTHETIC_ALPHA.default)
    beta = kwargs.pop(_SYNTHETIC_BETA.name, _SYNTHETIC_BETA.default)
    if num_clients is not None:
        kwargs["num_clients"] = num_clients
    return synthetic(alpha, beta, seed=seed, **kwargs)


#: The data sets, by name, in the order the command line lists them.
DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            DatasetSpec(
                name="digits",
                aliases=(),
                needs_dir=False,
                default_dir=None,
                default_model="mlp",
                natural_partition=False,
                settings=(),
                description="scikit-learn's 1,797 8x8 handwritten digits (no files needed)",
                load=_load_digits,
            ),
            DatasetSpec(
                name="mnist",
                aliases=(),
                needs_dir=True,
                default_dir=None,
                default_model="2nn",
                natural_partition=False,
                settings=(),
                description="MNIST handwritten digits, from the IDX files in --data-dir",
                load=_load_mnist,
            ),
            DatasetSpec(
                name="fashion-mnist",
                aliases=("fashion", "fmnist"),
                needs_dir=False,
                default_dir=DEFAULT_FASHION_MNIST_DIR,
                default_model="2nn",
                natural_partition=False,
                settings=(),
                description=(
                    f"Fashion-MNIST, from IDX files (default: {DEFAULT_FASHION_MNIST_DIR})"
                ),
                load=_load_fashion_mnist,
            ),
            DatasetSpec(
                name="cifar10",
                aliases=("cifar-10",),
                needs_dir=True,
                default_dir=None,
                default_model="cifar_cnn",
                natural_partition=False,
                settings=(),
                description="CIFAR-10, from the cifar-10-batches-py directory in --data-dir",
                load=_load_cifar10,
            ),
            DatasetSpec(
                name="synthetic",
                aliases=(),
                needs_dir=False,
                default_dir=None,
                default_model="logreg",
                natural_partition=True,
                settings=(_SYNTHETIC_ALPHA, _SYNTHETIC_BETA),
                description=(
                    "Synthetic(alpha, beta) of Li et al. 2020 (FedProx), generated with "
                    "every client's own data"
                ),
                load=_load_synthetic,
            ),
        )
    }
)

#: The data set names, in the order of :data:`DATASETS`.
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)


def _dataset_key(text: str) -> str:
    return text.strip().lower().replace("_", "-")


_DATASET_KEYS: Mapping[str, DatasetSpec] = MappingProxyType(
    {_dataset_key(key): spec for spec in DATASETS.values() for key in (spec.name, *spec.aliases)}
)


def dataset_spec(text: str) -> DatasetSpec:
    """The data set ``text`` names: a name or alias, in any case, ``_`` for ``-``;
    ``ValueError`` listing the names if it names none."""
    spec = _DATASET_KEYS.get(_dataset_key(text))
    if spec is None:
        raise ValueError(f"unknown dataset {text!r}; choose one of: {', '.join(DATASET_NAMES)}")
    return spec


def load_dataset(
    name: str, data_dir: PathLike | None = None, seed: int = 0, **options: Any
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES` or an alias).

    ``data_dir`` is required for mnist and cifar10, optional for fashion-mnist
    (Debian's location by default) and ignored for digits and synthetic. ``seed``
    drives the digits split and the synthetic generator; the file-based datasets have
    fixed splits. ``options`` go to the specific loader (e.g. ``alpha``, ``beta``,
    ``num_clients`` for synthetic, ``test_fraction`` for digits).
    """
    spec = dataset_spec(name)
    num_clients = options.pop("num_clients", None) if spec.natural_partition else None
    # The loader's keywords as setting names: synthetic's ``alpha`` is ``synthetic_alpha``.
    names = {s.name for s in spec.settings}
    prefix = spec.name.replace("-", "_") + "_"
    renamed: dict[str, Any] = {}
    for key, value in options.items():
        key = prefix + key if prefix + key in names else key
        if key in renamed:
            raise TypeError(f"load_dataset() got two values for {spec.name}'s {key!r}")
        renamed[key] = value
    return spec.load(data_dir, seed, num_clients, renamed)


# ---------------------------------------------------------------------------------------------
# partitioners


@dataclass(frozen=True)
class PartitionerSpec:
    """One ``--partition`` name: the settings it reads and its :data:`Splitter`."""

    name: str
    settings: tuple[Setting, ...]
    description: str
    split: Splitter


def _split_iid(
    labels: ArrayLike, num_clients: int, seed: int, options: Mapping[str, Any]
) -> Partition:
    return iid(labels, num_clients, seed=seed)


def _split_dirichlet(
    labels: ArrayLike, num_clients: int, seed: int, options: Mapping[str, Any]
) -> Partition:
    return dirichlet(labels, num_clients, _value(options, _ALPHA), seed=seed)


def _split_shards(
    labels: ArrayLike, num_clients: int, seed: int, options: Mapping[str, Any]
) -> Partition:
    return shards(labels, num_clients, _value(options, _SHARDS_PER_CLIENT), seed=seed)


def _split_quantity(
    labels: ArrayLike, num_clients: int, seed: int, options: Mapping[str, Any]
) -> Partition:
    return quantity_skew(labels, num_clients, _value(options, _SIGMA), seed=seed)


#: The partitioners, by ``--partition`` name. (``natural``, a data set's own split, is
#: not among them: it is the default of the data sets that have one.)
PARTITIONERS: Mapping[str, PartitionerSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            PartitionerSpec(
                name="iid",
                settings=(),
                description="a uniform random split into near-equal parts",
                split=_split_iid,
            ),
            PartitionerSpec(
                name="dirichlet",
                settings=(_ALPHA,),
                description="label skew: per class, client shares ~ Dirichlet(alpha)",
                split=_split_dirichlet,
            ),
            PartitionerSpec(
                name="shards",
                settings=(_SHARDS_PER_CLIENT,),
                description=(
                    "McMahan et al.'s pathological split: label-sorted shards dealt "
                    "shards_per_client to each client"
                ),
                split=_split_shards,
            ),
            PartitionerSpec(
                name="quantity",
                settings=(_SIGMA,),
                description="client sizes ~ LogNormal(0, sigma); labels IID within each client",
                split=_split_quantity,
            ),
        )
    }
)

#: The ``--partition`` names, in the order of :data:`PARTITIONERS`.
PARTITION_NAMES: tuple[str, ...] = tuple(PARTITIONERS)


def partitioner_spec(name: str) -> PartitionerSpec:
    """The partitioner ``name`` names; ``ValueError`` listing the names if none."""
    spec = PARTITIONERS.get(name)
    if spec is None:
        raise ValueError(f"unknown partition {name!r}; choose one of: {', '.join(PARTITION_NAMES)}")
    return spec
