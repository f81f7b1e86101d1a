"""Dataset loaders that return plain numpy arrays.

Every loader returns a :class:`Dataset`: train/test inputs and int64 labels, the input
shape, the number of classes and per-channel normalisation constants. Images stay
``uint8`` in NCHW layout (``(N, 1, 28, 28)`` for MNIST, ``(N, 3, 32, 32)`` for CIFAR-10,
``(N, 1, 8, 8)`` for digits, whose 0..16 grey levels are scaled to 0..255) so they are
small to store and map; :meth:`Dataset.normalize` turns them into float32 model input.
``mean`` and ``std`` are in the units of the stored values (0..255 for images).

Nothing is downloaded: MNIST, Fashion-MNIST and CIFAR-10 are read from a directory the
caller gives, the digits come with scikit-learn, and Synthetic(alpha, beta) is generated.

The module is one concept, the loaders of the named datasets, and its ~600 lines are five
loaders with the file-format checks each needs; a new dataset is a new loader here and a
:class:`~emberfl.data.registry.DatasetSpec` in :mod:`emberfl.data.registry`, which
resolves names and aliases (:func:`~emberfl.data.registry.load_dataset`).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from emberfl.data.partition import Partition

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "Dataset",
    "DatasetError",
    "DatasetNotFoundError",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
    "synthetic",
]

logger = logging.getLogger(__name__)

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

PathLike = str | os.PathLike[str]


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or not in the expected format."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset file or directory does not exist."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held in numpy arrays.

    ``partition`` is set only for data with a natural client split (Synthetic); its
    indices refer to the training arrays.
    """

    name: str
    train_x: NDArray[Any]
    train_y: NDArray[np.int64]
    test_x: NDArray[Any]
    test_y: NDArray[np.int64]
    num_classes: int
    in_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    partition: Partition | None = None

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if x.shape[0] != y.shape[0]:
                raise DatasetError(
                    f"{self.name}: {split} has {x.shape[0]} inputs but {y.shape[0]} labels"
                )
            if tuple(x.shape[1:]) != self.in_shape:
                raise DatasetError(
                    f"{self.name}: {split} inputs are {tuple(x.shape[1:])}, "
                    f"expected {self.in_shape}"
                )
            if y.dtype != np.int64 or y.ndim != 1:
                raise DatasetError(f"{self.name}: {split} labels must be 1-D int64, got {y.dtype}")
            if y.size and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DatasetError(
                    f"{self.name}: {split} labels must lie in [0, {self.num_classes}), "
                    f"found {int(y.min())}..{int(y.max())}"
                )
        if len(self.mean) != len(self.std) or len(self.mean) != self.channels:
            raise DatasetError(
                f"{self.name}: need one mean/std per channel ({self.channels}), "
                f"got {len(self.mean)}/{len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise DatasetError(f"{self.name}: std must be positive, got {self.std}")

    @property
    def channels(self) -> int:
        """Number of normalisation channels: axis 1 of an image, 1 for flat features."""
        return self.in_shape[0] if len(self.in_shape) == 3 else 1

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_x.shape[0])

    def _stats(self, ndim: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        if len(self.in_shape) == 3:
            # Broadcast per channel over (N, C, H, W).
            shape = (1, -1) + (1,) * (ndim - 2)
            return mean.reshape(shape), std.reshape(shape)
        return mean, std

    def normalize(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """``(x - mean) / std`` per channel, as float32 (``x`` is a batch of inputs)."""
        arr = np.asarray(x)
        if tuple(arr.shape[1:]) != self.in_shape:
            raise ValueError(f"expected a batch shaped (N, {self.in_shape}), got {arr.shape}")
        mean, std = self._stats(arr.ndim)
        out: NDArray[np.float32] = (arr.astype(np.float32) - mean) / std
        return out

    def normalize_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Torch twin of :meth:`normalize` (keeps ``x``'s device)."""
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"expected a batch shaped (N, {self.in_shape}), got {tuple(x.shape)}")
        mean, std = self._stats(x.ndim)
        return (x.to(torch.float32) - torch.from_numpy(mean).to(x.device)) / torch.from_numpy(
            std
        ).to(x.device)


# ---------------------------------------------------------------------------------------------
# helpers


def _channel_stats(x: NDArray[Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of the training inputs (exact, via a histogram for uint8)."""
    if x.ndim == 4:
        planes = [np.ascontiguousarray(x[:, c]).ravel() for c in range(x.shape[1])]
    else:
        planes = [x.ravel()]
    means: list[float] = []
    stds: list[float] = []
    for plane in planes:
        if plane.dtype == np.uint8:
            hist = np.bincount(plane, minlength=256).astype(np.float64)
            levels = np.arange(256, dtype=np.float64)
            total = hist.sum()
            mu = float((hist * levels).sum() / total)
            var = float((hist * (levels - mu) ** 2).sum() / total)
        else:
            mu = float(plane.mean(dtype=np.float64))
            var = float(plane.var(dtype=np.float64))
        means.append(mu)
        # A constant channel would divide by zero; leave it unscaled instead.
        stds.append(float(np.sqrt(var)) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


def _stratified_split(
    y: NDArray[np.int64], test_fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    train: list[NDArray[np.int64]] = []
    test: list[NDArray[np.int64]] = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c)).astype(np.int64)
        n_test = round(test_fraction * members.size)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn, embedded)


def _digits_table() -> np.ndarray:
    """The digits as scikit-learn ships them: 1,797 rows of 64 pixels and a label.

    The CSV is read straight from scikit-learn's package data: importing
    ``sklearn.datasets`` costs seconds, which would dominate a quick-start run.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in locations:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            if table.shape != (1797, 65):
                raise DatasetError(f"{path}: expected 1797 rows of 65 values, got {table.shape}")
            return table
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    return np.column_stack([bunch.data, bunch.target]).astype(np.float64)


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits, split train/test stratified by class.

    The 0..16 grey levels are scaled to 0..255 and stored as ``uint8`` images
    ``(N, 1, 8, 8)``. The split is drawn from ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    table = _digits_table()
    raw = table[:, :-1].reshape(-1, 8, 8)
    images = np.rint(raw * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = table[:, -1].astype(np.int64)
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    train_x = np.ascontiguousarray(images[train_idx])
    mean, std = _channel_stats(train_x)
    return Dataset(
        name="digits",
        train_x=train_x,
        train_y=labels[train_idx],
        test_x=np.ascontiguousarray(images[test_idx]),
        test_y=labels[test_idx],
        num_classes=10,
        in_shape=(1, 8, 8),
        mean=mean,
        std=std,
    )


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head == b"\x1f\x8b":
                # Decide by content, not by name: a renamed .gz file is still read.
                with gzip.GzipFile(fileobj=fh) as gz:
                    return gz.read()
            return fh.read()
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"{path}: file not found") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"{path}: cannot read ({exc}); the file is damaged or truncated"
        ) from exc


def read_idx(path: PathLike, *, ndim: int | None = None) -> NDArray[Any]:
    """Read one IDX file (gzip-compressed or not) into a numpy array.

    Checks the magic number (two zero bytes, a known type code, the number of
    dimensions), that ``ndim`` matches when given, and that the payload length equals
    the product of the declared sizes.
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4:
        raise DatasetError(f"{p}: {len(data)} bytes is too short for an IDX header")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{p}: bad IDX magic number {data[:4].hex()}; expected 0000 followed by a type code "
            "(08 for uint8) and the number of dimensions"
        )
    dtype = _IDX_DTYPES[data[2]]
    dims = data[3]
    if ndim is not None and dims != ndim:
        raise DatasetError(f"{p}: IDX file has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise DatasetError(f"{p}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=dims, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(
            f"{p}: IDX payload is {len(data) - header} bytes but the header {shape} "
            f"requires {expected}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    # frombuffer over immutable bytes is read-only; hand out an ordinary array.
    return arr.astype(dtype.newbyteorder("="), copy=True)


_IDX_STEMS = {
    "train_x": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_y": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_x": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_y": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_idx(root: Path, key: str) -> Path:
    candidates = [root / (stem + ext) for stem in _IDX_STEMS[key] for ext in (".gz", "")]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise DatasetNotFoundError(
        f"{root}: no {_IDX_STEMS[key][0]} file; expected one of "
        + ", ".join(c.name for c in candidates)
    )


def _load_idx_dataset(name: str, data_dir: PathLike, num_classes: int) -> Dataset:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"{name}: data directory {root} does not exist; expected a directory holding "
            "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
        )
    arrays: dict[str, NDArray[Any]] = {}
    for key in ("train_x", "train_y", "test_x", "test_y"):
        path = _find_idx(root, key)
        is_images = key.endswith("_x")
        arr = read_idx(path, ndim=3 if is_images else 1)
        if arr.dtype != np.uint8:
            raise DatasetError(f"{path}: expected uint8 data (type code 08), got {arr.dtype}")
        if is_images and (arr.shape[1] < 1 or arr.shape[2] < 1):
            raise DatasetError(f"{path}: images have an empty size {arr.shape[1:]}")
        if not is_images and arr.size and int(arr.max()) >= num_classes:
            raise DatasetError(
                f"{path}: label {int(arr.max())} out of range for {num_classes} classes"
            )
        arrays[key] = arr
    for split in ("train", "test"):
        nx, ny = arrays[f"{split}_x"].shape[0], arrays[f"{split}_y"].shape[0]
        if nx != ny:
            raise DatasetError(
                f"{root}: {split} split has {nx} images but {ny} labels; the files do not belong "
                "together"
            )
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DatasetError(
            f"{root}: train images are {arrays['train_x'].shape[1:]} but test images are "
            f"{arrays['test_x'].shape[1:]}"
        )
    train_x = arrays["train_x"][:, None, :, :]
    test_x = arrays["test_x"][:, None, :, :]
    mean, std = _channel_stats(train_x)
    logger.info("%s: %d train / %d test images from %s", name, len(train_x), len(test_x), root)
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=arrays["train_y"].astype(np.int64),
        test_x=test_x,
        test_y=arrays["test_y"].astype(np.int64),
        num_classes=num_classes,
        in_shape=tuple(int(d) for d in train_x.shape[1:]),
        mean=mean,
        std=std,
    )


def load_mnist(data_dir: PathLike) -> Dataset:
    """MNIST from the four IDX files (``.gz`` or uncompressed) in ``data_dir``."""
    return _load_idx_dataset("mnist", data_dir, 10)


def load_fashion_mnist(data_dir: PathLike | None = None) -> Dataset:
    """Fashion-MNIST from its IDX files; by default from Debian's install location."""
    root = DEFAULT_FASHION_MNIST_DIR if data_dir is None else Path(data_dir)
    if data_dir is None and not root.is_dir():
        raise DatasetNotFoundError(
            f"fashion-mnist: no data directory given and the default {root} does not exist; "
            "install Debian's dataset-fashion-mnist package or pass the directory holding the "
            "four IDX files"
        )
    return _load_idx_dataset("fashion-mnist", root, 10)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)

# The batches are numpy pickles; only the globals needed to rebuild plain numpy arrays
# are resolved, so a tampered file cannot name arbitrary callables.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: CIFAR-10 batch file not found")
    try:
        with path.open("rb") as fh:
            obj = _BatchUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetError(
            f"{path}: not a CIFAR-10 python batch ({exc}); expected a pickled dict with "
            "b'data' (N x 3072 uint8) and b'labels'"
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    # Batches pickled by Python 2 have bytes keys; accept str keys from re-saved files too.
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in obj)
        raise DatasetError(f"{path}: missing b'data' or b'labels' (keys: {keys})")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: b'labels' is not a list of integers") from exc
    if y.ndim != 1 or y.shape[0] != data.shape[0]:
        raise DatasetError(f"{path}: {data.shape[0]} images but labels shaped {y.shape}")
    if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DatasetError(f"{path}: labels must lie in 0..9, found {int(y.min())}..{int(y.max())}")
    # Rows are 1024 red, 1024 green, 1024 blue values, each plane row-major: NCHW as is.
    return data.reshape(-1, 3, 32, 32), y


def load_cifar10(data_dir: PathLike) -> Dataset:
    """CIFAR-10 from the standard ``cifar-10-batches-py`` directory (or its parent)."""
    root = Path(data_dir).expanduser()
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"cifar10: data directory {root} does not exist; expected the extracted "
            "cifar-10-batches-py directory (data_batch_1..5, test_batch)"
        )
    parts = [_read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_cifar_batch(root / "test_batch")
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    mean, std = _channel_stats(train_x)
    return Dataset(
        name="cifar10",
        train_x=train_x,
        train_y=train_y,
        test_x=np.ascontiguousarray(test_x),
        test_y=test_y,
        num_classes=10,
        in_shape=(3, 32, 32),
        mean=mean,
        std=std,
    )


# ---------------------------------------------------------------------------------------------
# Synthetic(alpha, beta) -- Li et al. 2020 (FedProx)


def synthetic(
    alpha: float,
    beta: float,
    num_clients: int = 30,
    seed: int = 0,
    *,
    dim: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    train_fraction: float = 0.9,
    size_mean: float = 4.0,
    size_sigma: float = 2.0,
    min_samples: int = 50,
) -> Dataset:
    """The Synthetic(alpha, beta) federated data of Li et al. 2020 (FedProx).

    Client ``k`` has a softmax model ``y = argmax(W_k x + b_k)`` with
    ``W_k, b_k ~ N(u_k, 1)``, ``u_k ~ N(0, alpha)``, and inputs ``x ~ N(v_k, Sigma)``
    with ``v_k ~ N(B_k, 1)``, ``B_k ~ N(0, beta)`` and ``Sigma = diag(j^-1.2)``.
    alpha controls how much the client models differ, beta how much their inputs do.
    As in the reference generator, the second argument of each ``N(., .)`` above is used
    as the standard deviation. ``iid=True`` gives Synthetic-IID (one shared model, all
    ``v_k = 0``). Client sizes are ``floor(LogNormal(size_mean, size_sigma)) +
    min_samples`` (a heavy, power-law-like tail). Each client's samples are split
    ``train_fraction`` / rest into train/test; the returned ``partition`` gives every
    client's rows of ``train_x``, the test set is the union of the clients' test parts.
    Inputs are float32 ``(N, dim)``, used raw (``mean = 0``, ``std = 1``), as in FedProx.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    if dim < 1 or num_classes < 2:
        raise ValueError(f"need dim >= 1 and num_classes >= 2, got {dim}, {num_classes}")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1], got {train_fraction}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(size_mean, size_sigma, num_clients).astype(np.int64) + min_samples
    u = rng.normal(0.0, alpha, num_clients)
    big_b = rng.normal(0.0, beta, num_clients)
    sd = np.arange(1, dim + 1, dtype=np.float64) ** (-1.2 / 2.0)  # sqrt of diag(j^-1.2)
    w_shared = rng.normal(0.0, 1.0, (dim, num_classes)) if iid else None
    b_shared = rng.normal(0.0, 1.0, num_classes) if iid else None
    train_xs: list[NDArray[np.float32]] = []
    train_ys: list[NDArray[np.int64]] = []
    test_xs: list[NDArray[np.float32]] = []
    test_ys: list[NDArray[np.int64]] = []
    client_idx: list[NDArray[np.int64]] = []
    offset = 0
    for k in range(num_clients):
        v = np.zeros(dim) if iid else rng.normal(big_b[k], 1.0, dim)
        if w_shared is not None and b_shared is not None:
            w, b = w_shared, b_shared
        else:
            w = rng.normal(u[k], 1.0, (dim, num_classes))
            b = rng.normal(u[k], 1.0, num_classes)
        n_k = int(sizes[k])
        x = v + sd * rng.standard_normal((n_k, dim))
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)
        n_train = max(1, round(train_fraction * n_k))
        train_xs.append(x[:n_train].astype(np.float32))
        train_ys.append(y[:n_train])
        test_xs.append(x[n_train:].astype(np.float32))
        test_ys.append(y[n_train:])
        client_idx.append(np.arange(offset, offset + n_train, dtype=np.int64))
        offset += n_train
    train_y = np.concatenate(train_ys)
    return Dataset(
        name="synthetic",
        train_x=np.concatenate(train_xs),
        train_y=train_y,
        test_x=np.concatenate(test_xs).reshape(-1, dim),
        test_y=np.concatenate(test_ys),
        num_classes=num_classes,
        in_shape=(dim,),
        mean=(0.0,),
        std=(1.0,),
        partition=Partition(tuple(client_idx), train_y, num_classes),
    )
