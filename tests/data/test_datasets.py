"""Dataset loaders: shapes, dtypes, exact contents, and clear errors for bad files."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emberfl.data import (
    DATASET_NAMES,
    DEFAULT_FASHION_MNIST_DIR,
    Dataset,
    DatasetError,
    DatasetNotFoundError,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    read_idx,
    synthetic,
)

# ---------------------------------------------------------------------------------------------
# helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.tobytes()


def write_idx_set(
    root: Path, n_train: int = 12, n_test: int = 5, *, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        payload = idx_bytes(arr)
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (root / stem).write_bytes(payload)
    return arrays


def md5_table(readme: Path) -> dict[str, str]:
    rows = re.findall(r"\|\s*([\w.-]+\.gz)\s*\|\s*([0-9a-f]{32})\s*\|", readme.read_text())
    return dict(rows)


@pytest.fixture(scope="module")
def mnist(mnist_dir: Path) -> Dataset:
    return load_mnist(mnist_dir)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_and_split() -> None:
    from sklearn.datasets import load_digits as sk_digits

    ds = load_digits(seed=0)
    assert ds.name == "digits"
    assert ds.in_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.train_x.dtype == np.uint8 and ds.test_x.dtype == np.uint8
    assert ds.train_x.shape[1:] == (1, 8, 8)
    assert ds.train_y.dtype == np.int64 and ds.test_y.dtype == np.int64
    assert ds.num_train + ds.num_test == 1797
    # Stratified: every class is split 80/20 up to rounding.
    total = np.bincount(sk_digits().target, minlength=10)
    test_counts = np.bincount(ds.test_y, minlength=10)
    np.testing.assert_array_equal(test_counts, np.round(0.2 * total).astype(int))
    # The union of both splits is scikit-learn's data, 0..16 scaled to 0..255.
    expected = np.rint(sk_digits().images * (255 / 16)).astype(np.uint8).reshape(1797, -1)
    got = np.concatenate([ds.train_x, ds.test_x]).reshape(1797, -1)
    labels = np.concatenate([ds.train_y, ds.test_y])

    def key(rows: np.ndarray, y: np.ndarray) -> list[tuple[int, bytes]]:
        return sorted(zip(y.tolist(), (r.tobytes() for r in rows), strict=True))

    assert key(got, labels) == key(expected, np.asarray(sk_digits().target))
    assert int(ds.train_x.max()) == 255


def test_digits_seeded() -> None:
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    assert not np.array_equal(a.test_x, c.test_x)
    small = load_digits(seed=0, test_fraction=0.5)
    assert abs(small.num_test - 1797 / 2) <= 10
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(seed=0, test_fraction=1.0)


def test_normalisation_constants_and_normalize() -> None:
    ds = load_digits(seed=0)
    x = ds.train_x.astype(np.float64)
    assert ds.mean[0] == pytest.approx(x.mean(), rel=1e-12)
    assert ds.std[0] == pytest.approx(x.std(), rel=1e-12)
    z = ds.normalize(ds.train_x)
    assert z.dtype == np.float32 and z.shape == ds.train_x.shape
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1.0) < 1e-4
    zt = ds.normalize_tensor(torch.from_numpy(ds.train_x))
    assert zt.dtype == torch.float32
    np.testing.assert_allclose(zt.numpy(), z, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batch"):
        ds.normalize(ds.train_x[:, 0])


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


def test_mnist_from_shared_dir(mnist: Dataset, mnist_dir: Path) -> None:
    assert mnist.train_x.shape == (60000, 1, 28, 28)
    assert mnist.test_x.shape == (10000, 1, 28, 28)
    assert mnist.train_x.dtype == np.uint8 and mnist.train_y.dtype == np.int64
    assert set(np.unique(mnist.train_y).tolist()) == set(range(10))
    assert mnist.in_shape == (1, 28, 28)
    assert mnist.train_x.flags.writeable
    # Serialising the loaded arrays back to IDX reproduces the published md5 sums.
    md5 = md5_table(mnist_dir / "README.md")
    assert len(md5) == 4
    pairs = {
        "train-images-idx3-ubyte.gz": mnist.train_x[:, 0],
        "train-labels-idx1-ubyte.gz": mnist.train_y.astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": mnist.test_x[:, 0],
        "t10k-labels-idx1-ubyte.gz": mnist.test_y.astype(np.uint8),
    }
    for name, arr in pairs.items():
        assert hashlib.md5(idx_bytes(np.ascontiguousarray(arr))).hexdigest() == md5[name], name
    x = mnist.train_x.astype(np.float64)
    assert mnist.mean[0] == pytest.approx(x.mean(), rel=1e-9)
    assert mnist.std[0] == pytest.approx(x.std(), rel=1e-9)


def test_fashion_mnist_loader_reads_mnist_format(mnist: Dataset, mnist_dir: Path) -> None:
    ds = load_fashion_mnist(mnist_dir)
    assert ds.name == "fashion-mnist"
    assert ds.num_train == 60000 and ds.num_test == 10000
    np.testing.assert_array_equal(ds.test_x, mnist.test_x)
    np.testing.assert_array_equal(ds.train_y, mnist.train_y)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader_on_generated_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_set(tmp_path, gz=gz)
    ds = load_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(ds.train_x[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_y, arrays["train-labels-idx1-ubyte"].astype(np.int64))
    np.testing.assert_array_equal(ds.test_x[:, 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_y, arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    assert load_mnist(tmp_path).name == "mnist"


def test_idx_original_dotted_names(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path, gz=False)
    for stem in arrays:
        os.rename(tmp_path / stem, tmp_path / stem.replace("-idx", ".idx"))
    ds = load_mnist(tmp_path)
    np.testing.assert_array_equal(ds.test_x[:, 0], arrays["t10k-images-idx3-ubyte"])


def test_fashion_mnist_default_dir() -> None:
    if DEFAULT_FASHION_MNIST_DIR.is_dir():
        ds = load_fashion_mnist()
        assert (ds.num_train, ds.num_test) == (60000, 10000)
    else:
        with pytest.raises(DatasetNotFoundError, match=str(DEFAULT_FASHION_MNIST_DIR)):
            load_fashion_mnist()


def test_idx_missing_dir_and_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "nope")
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_mnist(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def corrupt(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x00\x01" + b[2:], "magic"),
        (lambda b: b[:2] + b"\x99" + b[3:], "magic"),
        (lambda b: b[:-7], "payload"),
        (lambda b: b + b"\x00", "payload"),
        (lambda b: b[:3] + b"\x02" + b[4:], "dimensions"),
        (lambda b: b[:6], "header"),
        (lambda b: b"", "too short"),
    ],
)
def test_idx_corrupt_images(tmp_path: Path, mutate: object, message: str) -> None:
    arrays = write_idx_set(tmp_path, gz=False)
    target = tmp_path / "train-images-idx3-ubyte"
    corrupt(target, mutate(idx_bytes(arrays["train-images-idx3-ubyte"])))  # type: ignore[operator]
    with pytest.raises(DatasetError, match=message) as info:
        load_mnist(tmp_path)
    assert str(target) in str(info.value)


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:200])
    with pytest.raises(DatasetError, match="truncated") as info:
        load_mnist(tmp_path)
    assert str(target) in str(info.value)


def test_idx_inconsistent_files(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=False)
    labels = np.zeros(11, dtype=np.uint8)  # 12 images
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DatasetError, match="12 images but 11 labels"):
        load_mnist(tmp_path)
    bad = np.full(12, 10, dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(bad))
    with pytest.raises(DatasetError, match="out of range"):
        load_mnist(tmp_path)


def test_read_idx_generic(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x.idx").write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx"), arr)
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    header = bytes([0, 0, 0x0C, 2]) + np.asarray([2, 3], dtype=">u4").tobytes()
    (tmp_path / "y.idx").write_bytes(header + big.tobytes())
    out = read_idx(tmp_path / "y.idx")
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3))
    assert out.dtype.isnative
    with pytest.raises(DatasetError, match="expected 1"):
        read_idx(tmp_path / "x.idx", ndim=1)


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def write_cifar(
    root: Path, per_batch: int = 4, *, seed: int = 0, legacy: bool = False
) -> list[dict[bytes, object]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    batches = []
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch: dict[bytes, object] = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        blob = pickle.dumps(batch, protocol=2)
        if legacy:
            # The published batches were pickled by numpy 1.x, under its old module path.
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (root / name).write_bytes(blob)
        batches.append(batch)
    return batches


def test_cifar10_fake_batches(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_cifar10(tmp_path)  # the parent directory is accepted too
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int64
    row = batches[1][b"data"][2]  # type: ignore[index]
    img = ds.train_x[4 + 2]
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    np.testing.assert_array_equal(img[0], row[:1024].reshape(32, 32))
    np.testing.assert_array_equal(img[2], row[2048:].reshape(32, 32))
    assert ds.train_y.tolist() == [y for b in batches[:5] for y in b[b"labels"]]  # type: ignore[attr-defined]
    assert ds.test_y.tolist() == batches[5][b"labels"]
    direct = load_cifar10(tmp_path / "cifar-10-batches-py")
    np.testing.assert_array_equal(direct.test_x, ds.test_x)
    assert len(ds.mean) == 3 and len(ds.std) == 3
    assert ds.mean[1] == pytest.approx(ds.train_x[:, 1].astype(np.float64).mean(), rel=1e-12)


def test_cifar10_legacy_module_path(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path, legacy=True)
    assert b"numpy.core.multiarray" in (tmp_path / "test_batch").read_bytes()
    ds = load_cifar10(tmp_path)
    np.testing.assert_array_equal(ds.test_x.reshape(4, -1), batches[5][b"data"])


def test_cifar10_errors(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(root)
    write_cifar(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_cifar10(root)
    write_cifar(root)
    with (root / "test_batch").open("wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DatasetError, match="3072"):
        load_cifar10(root)
    with (root / "test_batch").open("wb") as fh:
        pickle.dump({b"pixels": 1}, fh)
    with pytest.raises(DatasetError, match="b'data'"):
        load_cifar10(root)
    with (root / "test_batch").open("wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, fh)
    with pytest.raises(DatasetError, match=r"0\.\.9"):
        load_cifar10(root)
    (root / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="test_batch"):
        load_cifar10(root)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_cifar10_refuses_foreign_globals(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root)
    with (root / "test_batch").open("wb") as fh:
        pickle.dump({b"data": _Boom(), b"labels": []}, fh)
    with pytest.raises(DatasetError, match="refusing"):
        load_cifar10(root)
    assert not (Path.cwd() / "pwned").exists()


def test_cifar10_real_if_present() -> None:
    where = os.environ.get("EMBERFL_CIFAR10_DIR")
    if not where:
        pytest.skip("set EMBERFL_CIFAR10_DIR to a cifar-10-batches-py directory to check it")
    ds = load_cifar10(where)
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    np.testing.assert_array_equal(np.bincount(ds.test_y), np.full(10, 1000))


# ---------------------------------------------------------------------------------------------
# Synthetic(alpha, beta)


def test_synthetic_structure() -> None:
    ds = synthetic(1.0, 1.0, num_clients=12, seed=3)
    assert ds.in_shape == (60,) and ds.num_classes == 10
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int64
    part = ds.partition
    assert part is not None and part.num_clients == 12
    part.check(ds.num_train)
    # Each client keeps ~90% of its >= 50 samples for training; the rest is test data.
    assert part.sizes().min() >= 45
    per_client_total = part.sizes() / 0.9
    assert ds.num_test == pytest.approx(per_client_total.sum() - ds.num_train, abs=12)
    np.testing.assert_array_equal(
        part.class_counts().sum(axis=0), np.bincount(ds.train_y, minlength=10)
    )
    z = ds.normalize(ds.train_x)
    np.testing.assert_array_equal(z, ds.train_x)  # raw features, as in FedProx


def test_synthetic_seeded_and_parameters_matter() -> None:
    a = synthetic(0.5, 0.5, num_clients=8, seed=1)
    b = synthetic(0.5, 0.5, num_clients=8, seed=1)
    c = synthetic(0.5, 0.5, num_clients=8, seed=2)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    assert a.num_train != c.num_train or not np.array_equal(a.train_x, c.train_x)

    def spread_of_client_means(beta: float) -> float:
        ds = synthetic(0.0, beta, num_clients=20, seed=0)
        assert ds.partition is not None
        means = np.stack([ds.train_x[idx].mean(axis=0) for idx in ds.partition])
        return float(means.mean(axis=1).std())

    # beta spreads the clients' input means B_k apart.
    assert spread_of_client_means(10.0) > 3 * spread_of_client_means(0.0)

    iid = synthetic(1.0, 1.0, num_clients=20, seed=0, iid=True)
    assert abs(float(iid.train_x.mean())) < 0.1
    with pytest.raises(ValueError, match="alpha"):
        synthetic(-1.0, 0.0)


# ---------------------------------------------------------------------------------------------
# dispatcher


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    assert set(DATASET_NAMES) == {"digits", "mnist", "fashion-mnist", "cifar10", "synthetic"}
    d = load_dataset("digits", seed=4)
    np.testing.assert_array_equal(d.test_y, load_digits(4).test_y)
    s = load_dataset("synthetic", seed=2, alpha=0.5, beta=0.5, num_clients=5)
    assert s.partition is not None and s.partition.num_clients == 5
    np.testing.assert_array_equal(s.train_x, synthetic(0.5, 0.5, 5, seed=2).train_x)
    write_idx_set(tmp_path / "idx")
    assert load_dataset("mnist", tmp_path / "idx").num_train == 12
    assert load_dataset("fashion-mnist", str(tmp_path / "idx")).name == "fashion-mnist"
    write_cifar(tmp_path / "c" / "cifar-10-batches-py")
    assert load_dataset("cifar10", tmp_path / "c").num_test == 4
    with pytest.raises(ValueError, match="digits, mnist, fashion-mnist, cifar10, synthetic"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="data directory"):
        load_dataset("mnist")
    with pytest.raises(TypeError):
        load_dataset("digits", bogus=1)


def test_dataset_validates_itself() -> None:
    x = np.zeros((3, 1, 2, 2), np.uint8)
    y = np.zeros(3, np.int64)

    def make(**changes: Any) -> Dataset:
        fields: dict[str, Any] = {
            "name": "t",
            "train_x": x,
            "train_y": y,
            "test_x": x,
            "test_y": y,
            "num_classes": 2,
            "in_shape": (1, 2, 2),
            "mean": (0.0,),
            "std": (1.0,),
        }
        fields.update(changes)
        return Dataset(**fields)

    assert make().channels == 1
    with pytest.raises(DatasetError, match="3 inputs but 2 labels"):
        make(train_y=y[:2])
    with pytest.raises(DatasetError, match="expected"):
        make(in_shape=(1, 4))
    with pytest.raises(DatasetError, match="per channel"):
        make(mean=(0.0, 0.0), std=(1.0, 1.0))
    with pytest.raises(DatasetError, match=r"\[0, 2\)"):
        make(test_y=y + 2)
    with pytest.raises(DatasetError, match="positive"):
        make(std=(0.0,))
