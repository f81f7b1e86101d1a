"""Partitioners: disjoint, covering, seeded, and as skewed as they claim to be."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emberfl.data import Partition, dirichlet, iid, quantity_skew, read_idx, shards

# MNIST's training-set class sizes: generated labels with these proportions stand in for
# the real file where EMBERFL_MNIST_DIR is not set.
MNIST_CLASS_SIZES = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)


def write_label_idx(path: Path, labels: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, 1]) + np.asarray([len(labels)], dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + labels.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module", params=["generated", "mnist"])
def mnist_labels(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> np.ndarray:
    # Only the label file: the partitioners never look at pixels.
    if request.param == "mnist":
        path = request.getfixturevalue("mnist_dir") / "train-labels-idx1-ubyte.gz"
    else:
        rng = np.random.default_rng(2017)
        path = tmp_path_factory.mktemp("idx") / "train-labels-idx1-ubyte.gz"
        write_label_idx(path, rng.permutation(np.repeat(np.arange(10), MNIST_CLASS_SIZES)))
    labels = read_idx(path, ndim=1).astype(np.int64)
    assert labels.shape == (60000,)
    return labels


@pytest.fixture(scope="module")
def skewed_labels() -> np.ndarray:
    # Unequal class sizes so that nothing lines up by accident.
    rng = np.random.default_rng(123)
    return rng.choice(10, size=3000, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum())


PartitionFn = Callable[[np.ndarray, int], Partition]

PARTITIONERS: dict[str, PartitionFn] = {
    "iid": lambda y, seed: iid(y, 20, seed),
    "iid_n": lambda y, seed: iid(len(y), 20, seed),
    "dirichlet": lambda y, seed: dirichlet(y, 20, 0.5, seed, min_size=5),
    "shards": lambda y, seed: shards(y, 20, 3, seed),
    "quantity": lambda y, seed: quantity_skew(y, 20, 1.0, seed),
    "quantity_n": lambda y, seed: quantity_skew(len(y), 20, 1.0, seed),
}


def label_entropy(counts: np.ndarray) -> float:
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    q = counts / counts.sum(axis=1, keepdims=True)
    logs = np.log(np.where(q > 0, q, 1.0))
    return float(-(q * logs).sum(axis=1).mean())


@pytest.mark.parametrize("name", list(PARTITIONERS))
def test_disjoint_and_covering(name: str, skewed_labels: np.ndarray) -> None:
    part = PARTITIONERS[name](skewed_labels, 7)
    assert part.num_clients == 20
    flat = np.concatenate(list(part))
    assert flat.dtype == np.int64
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(skewed_labels)))
    assert all(idx.dtype == np.int64 and idx.ndim == 1 for idx in part)
    assert all(len(idx) > 0 for idx in part)
    part.check(len(skewed_labels))
    assert part.num_samples == len(skewed_labels)


@pytest.mark.parametrize("name", list(PARTITIONERS))
def test_deterministic_per_seed_and_different_across_seeds(
    name: str, skewed_labels: np.ndarray
) -> None:
    a = PARTITIONERS[name](skewed_labels, 1)
    b = PARTITIONERS[name](skewed_labels, 1)
    c = PARTITIONERS[name](skewed_labels, 2)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_partitioners_leave_global_numpy_state_alone(skewed_labels: np.ndarray) -> None:
    np.random.seed(5)
    expected = np.random.random(3)
    np.random.seed(5)
    for fn in PARTITIONERS.values():
        fn(skewed_labels, 3)
    np.testing.assert_array_equal(np.random.random(3), expected)


def test_iid_sizes_balanced() -> None:
    part = iid(1003, 10, seed=0)
    sizes = part.sizes()
    assert sizes.sum() == 1003
    assert sizes.max() - sizes.min() <= 1
    assert part.labels is None


def test_dirichlet_small_alpha_is_more_skewed(mnist_labels: np.ndarray) -> None:
    entropies = {
        alpha: label_entropy(dirichlet(mnist_labels, 100, alpha, seed=0).class_counts())
        for alpha in (0.1, 1.0, 100.0)
    }
    assert entropies[0.1] < entropies[1.0] < entropies[100.0]
    # Large alpha approaches the label entropy of the whole set.
    global_q = np.bincount(mnist_labels) / len(mnist_labels)
    global_entropy = float(-(global_q * np.log(global_q)).sum())
    assert entropies[100.0] > 0.95 * global_entropy
    assert entropies[0.1] < 0.5 * global_entropy


def test_dirichlet_min_size_and_errors(skewed_labels: np.ndarray) -> None:
    part = dirichlet(skewed_labels, 30, 0.3, seed=4, min_size=20)
    assert part.sizes().min() >= 20
    part.check(len(skewed_labels))
    with pytest.raises(ValueError, match="min_size"):
        dirichlet(skewed_labels, 30, 0.3, seed=0, min_size=200)  # 30 * 200 > 3000
    with pytest.raises(ValueError, match="draws"):
        dirichlet(skewed_labels, 300, 0.01, seed=0, min_size=9, max_retries=3)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(skewed_labels, 10, 0.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(skewed_labels, 10, float("nan"), seed=0)


def test_shards_mcmahan_setting(mnist_labels: np.ndarray) -> None:
    part = shards(mnist_labels, 100, 2, seed=0)
    sizes = part.sizes()
    assert np.all(sizes == 600)  # 200 shards of 300, two each
    counts = part.class_counts(num_classes=10)
    labels_per_client = (counts > 0).sum(axis=1)
    # A shard holds two labels only where a class boundary of the sorted order falls
    # inside it, and such a shard adds at most one label to one client.
    boundaries = np.cumsum(np.bincount(mnist_labels))[:-1]
    straddling = int(np.sum(boundaries % 300 != 0))
    assert int(np.sum(labels_per_client > 2)) <= straddling
    assert np.mean(labels_per_client <= 2) >= 1.0 - straddling / 100
    # Every client's samples are two runs of the label-sorted order, so each label it
    # holds comes in whole shards unless the shard straddles a boundary.
    assert np.all(counts.sum(axis=1) == 600)


def test_shards_uneven_split_still_covers() -> None:
    labels = np.repeat(np.arange(5), [13, 7, 29, 3, 11])
    part = shards(labels, 6, 2, seed=9)
    part.check(len(labels))
    assert part.sizes().max() - part.sizes().min() <= 2
    with pytest.raises(ValueError, match="shards"):
        shards(labels, 40, 2, seed=0)


def test_quantity_skew_sizes_vary() -> None:
    part = quantity_skew(10000, 50, sigma=1.5, seed=3)
    sizes = part.sizes()
    assert sizes.sum() == 10000
    assert sizes.min() >= 1
    assert sizes.max() > 4 * sizes.min()
    assert len(np.unique(sizes)) > 25
    flat = quantity_skew(10000, 50, sigma=0.0, seed=3).sizes()
    assert flat.max() - flat.min() <= 1
    tiny = quantity_skew(12, 12, sigma=3.0, seed=0).sizes()
    assert np.all(tiny == 1)


def test_class_counts_and_table(skewed_labels: np.ndarray) -> None:
    part = dirichlet(skewed_labels, 8, 0.5, seed=1, min_size=5)
    counts = part.class_counts()
    assert counts.shape == (8, 10)
    np.testing.assert_array_equal(counts.sum(axis=1), part.sizes())
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(skewed_labels, minlength=10))
    for cid in range(8):
        np.testing.assert_array_equal(
            counts[cid], np.bincount(skewed_labels[part[cid]], minlength=10)
        )
    text = part.format_counts()
    lines = text.splitlines()
    assert lines[0].split() == ["client", *map(str, range(10)), "total"]
    assert len(lines) == 2 + 8 + 1
    assert lines[2].split() == ["0", *map(str, counts[0]), str(counts[0].sum())]
    assert "8 clients" in lines[-1]
    short = part.format_counts(max_rows=3)
    assert "5 more clients" in short


def test_counts_need_labels_when_built_from_n(skewed_labels: np.ndarray) -> None:
    part = iid(len(skewed_labels), 5, seed=0)
    with pytest.raises(ValueError, match="labels"):
        part.class_counts()
    counts = part.class_counts(skewed_labels, 10)
    assert counts.sum() == len(skewed_labels)
    with pytest.raises(ValueError, match="num_classes"):
        part.class_counts(skewed_labels, 5)
    with pytest.raises(ValueError, match="labels"):
        part.class_counts(skewed_labels[:10], 10)


def test_save_heatmap_writes_png(tmp_path: Path, skewed_labels: np.ndarray) -> None:
    part = shards(skewed_labels, 12, 2, seed=0)
    out = tmp_path / "sub" / "heat.png"
    part.save_heatmap(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["heat.png"]


def test_flat_round_trip(skewed_labels: np.ndarray) -> None:
    part = quantity_skew(skewed_labels, 9, 0.8, seed=2)
    flat, offsets = part.to_flat()
    assert offsets[0] == 0 and offsets[-1] == len(skewed_labels) and len(offsets) == 10
    back = Partition.from_flat(flat, offsets, skewed_labels)
    for a, b in zip(part, back, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.class_counts(), part.class_counts())
    with pytest.raises(ValueError, match="offsets"):
        Partition.from_flat(flat, offsets[:-1])


def test_check_detects_overlap_and_gaps() -> None:
    with pytest.raises(ValueError, match="several clients"):
        Partition((np.array([0, 1]), np.array([1, 2]))).check(3)
    with pytest.raises(ValueError, match="no client"):
        Partition((np.array([0]), np.array([2]))).check(3)
    with pytest.raises(ValueError, match="out of range"):
        Partition((np.array([0]), np.array([5]))).check(3)


def test_bad_arguments() -> None:
    labels = np.arange(10) % 3
    with pytest.raises(ValueError, match="num_clients"):
        iid(labels, 0, seed=0)
    with pytest.raises(ValueError, match="at least one"):
        iid(labels, 11, seed=0)
    with pytest.raises(TypeError, match="seed"):
        iid(labels, 2, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        dirichlet(labels.reshape(2, 5), 2, 1.0, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        shards(labels - 1, 2, 1, seed=0)
    with pytest.raises(ValueError, match="integers"):
        shards(labels + 0.5, 2, 1, seed=0)
    with pytest.raises(ValueError, match="sigma"):
        quantity_skew(10, 2, -1.0, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        Partition((np.zeros((2, 2), dtype=np.int64),))
    with pytest.raises(ValueError, match="negative"):
        Partition((np.array([-1]),))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=400),
    clients=st.integers(min_value=1, max_value=50),
    seed=st.integers(min_value=0, max_value=2**32),
    sigma=st.floats(min_value=0.0, max_value=4.0),
)
def test_property_iid_and_quantity_partition_everything(
    n: int, clients: int, seed: int, sigma: float
) -> None:
    if clients > n:
        with pytest.raises(ValueError):
            iid(n, clients, seed)
        return
    for part in (iid(n, clients, seed), quantity_skew(n, clients, sigma, seed)):
        part.check(n)
        assert part.num_clients == clients
        assert part.sizes().min() >= 1


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    clients=st.integers(min_value=1, max_value=20),
    per_client=st.integers(min_value=1, max_value=4),
    alpha=st.floats(min_value=0.05, max_value=50.0),
)
def test_property_label_partitioners_cover(
    seed: int, clients: int, per_client: int, alpha: float
) -> None:
    labels = np.random.default_rng(seed).integers(0, 7, size=300)
    shards(labels, clients, per_client, seed).check(300)
    dirichlet(labels, clients, alpha, seed, min_size=0).check(300)
