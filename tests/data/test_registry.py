"""The data set and partitioner registries: names, aliases, defaults, settings, dispatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emberfl.config import ConfigError, SimulationConfig
from emberfl.core.setting import Setting
from emberfl.data import (
    DATA_SETTINGS,
    DATASET_NAMES,
    DATASETS,
    DEFAULT_FASHION_MNIST_DIR,
    PARTITION_NAMES,
    PARTITIONERS,
    DatasetSpec,
    Partition,
    PartitionerSpec,
    dataset_spec,
    dirichlet,
    iid,
    load_dataset,
    load_digits,
    partitioner_spec,
    quantity_skew,
    shards,
    synthetic,
)
from emberfl.run_data import load_run_data


def assert_same_partition(a: Partition, b: Partition) -> None:
    assert a.num_clients == b.num_clients
    for x, y in zip(a.indices, b.indices, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_digits(seed=0).train_y


# ---------------------------------------------------------------------------------------------
# data sets


def test_dataset_names_in_order() -> None:
    assert DATASET_NAMES == ("digits", "mnist", "fashion-mnist", "cifar10", "synthetic")
    assert tuple(DATASETS) == DATASET_NAMES
    assert all(isinstance(s, DatasetSpec) and DATASETS[s.name] is s for s in DATASETS.values())
    with pytest.raises(TypeError):
        DATASETS["imagenet"] = DATASETS["digits"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("digits", "digits"),
        ("mnist", "mnist"),
        ("MNIST", "mnist"),
        ("fashion-mnist", "fashion-mnist"),
        ("Fashion_MNIST", "fashion-mnist"),
        ("fashion", "fashion-mnist"),
        ("fmnist", "fashion-mnist"),
        (" FMNIST ", "fashion-mnist"),
        ("cifar10", "cifar10"),
        ("cifar-10", "cifar10"),
        ("CIFAR_10", "cifar10"),
        ("synthetic", "synthetic"),
    ],
)
def test_names_and_aliases_resolve(text: str, name: str) -> None:
    assert dataset_spec(text) is DATASETS[name]


def test_every_declared_alias_resolves() -> None:
    for spec in DATASETS.values():
        for key in (spec.name, *spec.aliases):
            assert dataset_spec(key) is spec
            assert dataset_spec(key.upper()) is spec
            assert dataset_spec(key.replace("-", "_")) is spec
    assert DATASETS["fashion-mnist"].aliases == ("fashion", "fmnist")
    assert DATASETS["cifar10"].aliases == ("cifar-10",)


def test_unknown_dataset_is_one_line_listing_choices() -> None:
    with pytest.raises(ValueError) as info:
        dataset_spec("imagenet")
    message = str(info.value)
    assert message == (
        "unknown dataset 'imagenet'; "
        "choose one of: digits, mnist, fashion-mnist, cifar10, synthetic"
    )
    assert "\n" not in message
    with pytest.raises(ValueError, match="choose one of: digits, mnist"):
        load_dataset("imagenet")


def test_default_models() -> None:
    assert {s.name: s.default_model for s in DATASETS.values()} == {
        "digits": "mlp",
        "mnist": "2nn",
        "fashion-mnist": "2nn",
        "cifar10": "cifar_cnn",
        "synthetic": "logreg",
    }


def test_directories_and_natural_partitions() -> None:
    assert [s.name for s in DATASETS.values() if s.needs_dir] == ["mnist", "cifar10"]
    assert {s.name: s.default_dir for s in DATASETS.values() if s.default_dir is not None} == {
        "fashion-mnist": DEFAULT_FASHION_MNIST_DIR
    }
    assert [s.name for s in DATASETS.values() if s.natural_partition] == ["synthetic"]
    assert all(s.description and "\n" not in s.description for s in DATASETS.values())


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_needs_dir_without_dir_is_a_clear_error(name: str) -> None:
    spec = DATASETS[name]
    with pytest.raises(ValueError) as info:
        spec.load(None, 0, None, {})
    message = str(info.value)
    assert message == f"dataset {name!r} is read from files: give its data directory (--data-dir)"
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset(name)


def test_loads_equal_the_loaders() -> None:
    d = DATASETS["digits"].load(None, 4, 7, {})
    ref = load_digits(4)
    assert d.train_x.tobytes() == ref.train_x.tobytes()
    assert d.test_y.tobytes() == ref.test_y.tobytes()
    options = {"synthetic_alpha": 0.5, "synthetic_beta": 0.25}
    s = DATASETS["synthetic"].load(None, 2, 5, options)
    ref = synthetic(0.5, 0.25, 5, seed=2)
    assert s.train_x.tobytes() == ref.train_x.tobytes()
    assert s.partition is not None and ref.partition is not None
    assert_same_partition(s.partition, ref.partition)


def test_load_dataset_keeps_the_loader_keywords() -> None:
    s = load_dataset("synthetic", seed=2, alpha=0.5, beta=0.25, num_clients=5)
    assert s.train_x.tobytes() == synthetic(0.5, 0.25, 5, seed=2).train_x.tobytes()
    # The defaults are the settings' (1.0, 1.0) and synthetic()'s 30 clients.
    assert (
        load_dataset("synthetic", seed=1).train_x.tobytes()
        == synthetic(1.0, 1.0, seed=1).train_x.tobytes()
    )
    assert load_dataset("digits", seed=0, test_fraction=0.5).num_test == (
        load_digits(0, test_fraction=0.5).num_test
    )
    with pytest.raises(TypeError):
        load_dataset("digits", bogus=1)
    with pytest.raises(TypeError):
        load_dataset("digits", num_clients=5)  # only data sets with their own split take it


def test_load_dataset_reads_directories(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "idx"
    root.mkdir()
    for stem, shape in (
        ("train-images-idx3-ubyte", (6, 28, 28)),
        ("train-labels-idx1-ubyte", (6,)),
        ("t10k-images-idx3-ubyte", (3, 28, 28)),
        ("t10k-labels-idx1-ubyte", (3,)),
    ):
        arr = rng.integers(0, 10, shape, dtype=np.uint8)
        header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
        (root / stem).write_bytes(header + arr.tobytes())
    assert load_dataset("MNIST", root).num_train == 6
    assert DATASETS["fashion-mnist"].load(root, 0, None, {}).name == "fashion-mnist"


# ---------------------------------------------------------------------------------------------
# partitioners


def test_partitioner_names() -> None:
    assert PARTITION_NAMES == ("iid", "dirichlet", "shards", "quantity")
    assert tuple(PARTITIONERS) == PARTITION_NAMES
    assert all(isinstance(s, PartitionerSpec) for s in PARTITIONERS.values())
    assert all(partitioner_spec(n) is PARTITIONERS[n] for n in PARTITION_NAMES)
    assert "natural" not in PARTITIONERS
    with pytest.raises(ValueError) as info:
        partitioner_spec("natural")
    assert str(info.value) == (
        "unknown partition 'natural'; choose one of: iid, dirichlet, shards, quantity"
    )


@pytest.mark.parametrize("seed", [0, 7])
def test_splits_equal_the_partition_functions(labels: np.ndarray, seed: int) -> None:
    n = 12
    cases = {
        "iid": ({}, iid(labels, n, seed=seed)),
        "dirichlet": ({"alpha": 0.3}, dirichlet(labels, n, 0.3, seed=seed)),
        "shards": ({"shards_per_client": 3}, shards(labels, n, 3, seed=seed)),
        "quantity": ({"sigma": 2.0}, quantity_skew(labels, n, 2.0, seed=seed)),
    }
    assert set(cases) == set(PARTITIONERS)
    for name, (options, expected) in cases.items():
        assert_same_partition(PARTITIONERS[name].split(labels, n, seed, options), expected)


def test_split_defaults_are_the_settings(labels: np.ndarray) -> None:
    assert_same_partition(
        PARTITIONERS["dirichlet"].split(labels, 5, 1, {}), dirichlet(labels, 5, 0.5, seed=1)
    )
    assert_same_partition(
        PARTITIONERS["shards"].split(labels, 5, 1, {}), shards(labels, 5, 2, seed=1)
    )
    assert_same_partition(
        PARTITIONERS["quantity"].split(labels, 5, 1, {}), quantity_skew(labels, 5, 1.0, seed=1)
    )


# ---------------------------------------------------------------------------------------------
# settings


def test_settings_declared_once() -> None:
    assert [s.name for s in DATA_SETTINGS] == [
        "alpha",
        "shards_per_client",
        "sigma",
        "synthetic_alpha",
        "synthetic_beta",
    ]
    specs: list[DatasetSpec | PartitionerSpec] = [*DATASETS.values(), *PARTITIONERS.values()]
    used = [s for spec in specs for s in spec.settings]
    assert all(isinstance(s, Setting) for s in used)
    assert len({s.name for s in used}) == len(used)
    assert {id(s) for s in used} == {id(s) for s in DATA_SETTINGS}
    for spec in specs:
        for s in spec.settings:
            assert s.group == "data" and s.owner == spec.name


def test_settings_match_the_configuration() -> None:
    config = SimulationConfig()
    table = {s.name: (s.type, s.default, s.help) for s in DATA_SETTINGS}
    assert table == {
        "alpha": (float, 0.5, "Dirichlet concentration (--partition dirichlet)"),
        "shards_per_client": (int, 2, "label-sorted shards per client (--partition shards)"),
        "sigma": (float, 1.0, "log-normal sigma of client sizes (--partition quantity)"),
        "synthetic_alpha": (float, 1.0, "Synthetic(alpha, beta): how much client models differ"),
        "synthetic_beta": (float, 1.0, "Synthetic(alpha, beta): how much client inputs differ"),
    }
    for s in DATA_SETTINGS:
        assert getattr(config, s.name) == s.default


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("alpha", 0.1, [0.0, -1.0, float("inf"), float("nan")]),
        ("shards_per_client", 1, [0, -2]),
        ("sigma", 0.0, [-0.5, float("inf"), float("nan")]),
        ("synthetic_alpha", 0.0, [-1.0, float("inf")]),
        ("synthetic_beta", 0.0, [-1.0, float("nan")]),
    ],
)
def test_setting_checks(name: str, good: float, bad: list[float]) -> None:
    (setting,) = (s for s in DATA_SETTINGS if s.name == name)
    setting.validate(setting.coerce(good))
    for value in bad:
        with pytest.raises(ValueError, match=name):
            setting.validate(setting.coerce(value))


# ---------------------------------------------------------------------------------------------
# a run's data


@pytest.mark.parametrize(
    ("partition", "expected"),
    [
        (None, lambda y: iid(y, 8, seed=3)),
        ("iid", lambda y: iid(y, 8, seed=3)),
        ("dirichlet", lambda y: dirichlet(y, 8, 0.7, seed=3)),
        ("shards", lambda y: shards(y, 8, 4, seed=3)),
        ("quantity", lambda y: quantity_skew(y, 8, 0.4, seed=3)),
    ],
)
def test_run_data_reads_the_settings(partition: str | None, expected: object) -> None:
    config = SimulationConfig(
        dataset="digits",
        partition=partition,
        clients=8,
        seed=3,
        alpha=0.7,
        shards_per_client=4,
        sigma=0.4,
    )
    data, split = load_run_data(config)
    assert data.train_y.tobytes() == load_digits(3).train_y.tobytes()
    assert callable(expected)
    assert_same_partition(split, expected(data.train_y))


def test_run_data_synthetic_is_natural() -> None:
    config = SimulationConfig(
        dataset="synthetic", clients=6, seed=2, synthetic_alpha=0.5, synthetic_beta=0.0
    )
    data, split = load_run_data(config)
    ref = synthetic(0.5, 0.0, 6, seed=2)
    assert data.train_x.tobytes() == ref.train_x.tobytes()
    assert ref.partition is not None
    assert_same_partition(split, ref.partition)


def test_run_data_bad_partitions_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="cannot partition digits"):
        load_run_data(SimulationConfig(dataset="digits", partition="shards", shards_per_client=500))
    with pytest.raises(ConfigError, match="no built-in client split"):
        load_run_data(SimulationConfig(dataset="digits", partition="natural", clients=4))
