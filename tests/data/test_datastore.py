"""The dataset store: written once, memory-mapped, pickled as a path."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from emberfl import store
from emberfl.data import (
    ClientPartition,
    DatasetStore,
    MappedArrayDataset,
    MappedDataLoader,
    Normalization,
    StorePartitionedDataset,
    iter_batches,
)
from emberfl.data.store import MANIFEST_NAME
from linux import proc_self

MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)


def make_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    return images, labels


CLIENTS = [list(range(0, 30)), list(range(30, 47)), [], [5, 3, 59, 5]]


@pytest.fixture
def arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"train": make_arrays(60, 1), "test": make_arrays(20, 2)}


@pytest.fixture
def root(tmp_path: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    path = tmp_path / "cifar-like"
    DatasetStore.create(
        path,
        arrays,
        {
            "train": CLIENTS,
            "val": ClientPartition("train", [[40, 41], [0], [], [1, 2, 3]]),
        },
        mean=MEAN,
        std=STD,
    )
    return path


def mapping_path(ptr: int) -> str | None:
    """The file mapped at address ``ptr`` in this process, from /proc/self/maps."""
    with open(proc_self("maps")) as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= ptr < hi:
                return fields[5].strip() if len(fields) == 6 else ""
    return None


def reference_normalize(raw: np.ndarray) -> np.ndarray:
    mean = np.array(MEAN).reshape(-1, 1, 1)
    std = np.array(STD).reshape(-1, 1, 1)
    out: np.ndarray = (raw.astype(np.float64) / 255.0 - mean) / std
    return out


# --- writing and reading ---------------------------------------------------------------


def test_store_round_trips_data_and_partitions(
    root: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    ds = DatasetStore.open(root)
    assert ds.splits == ("train", "test")
    assert ds.partition_types == ("train", "val")
    for split, (x, y) in arrays.items():
        assert ds.features(split).dtype == torch.uint8
        assert np.array_equal(ds.features(split).numpy(), x)
        assert ds.labels(split).dtype == torch.int64
        assert np.array_equal(ds.labels(split).numpy(), y)
    assert ds.num_clients("train") == 4
    assert ds.num_clients("val") == 4
    for cid, expected in enumerate(CLIENTS):
        assert ds.client_indices("train", cid).tolist() == expected
    assert ds.client_indices("val", 0).tolist() == [40, 41]
    assert ds.normalization == Normalization(MEAN, STD, 1 / 255)
    assert sorted(p.name for p in root.iterdir()) == [
        MANIFEST_NAME,
        "test.safetensors",
        "train.safetensors",
    ]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_tensors_are_views_of_the_store_files(tmp_path: Path) -> None:
    # Over 2 MiB each, split and manifest alike: smaller files are read, not mapped.
    root = tmp_path / "large"
    n = 12_000
    DatasetStore.create(root, {"train": make_arrays(n, 1)}, {"train": [list(range(n))] * 25})
    ds = DatasetStore.open(root)
    for split in ds.splits:
        path = os.path.realpath(ds.split_path(split))
        assert mapping_path(ds.features(split).data_ptr()) == path
        assert mapping_path(ds.labels(split).data_ptr()) == path
    manifest = os.path.realpath(root / MANIFEST_NAME)
    assert mapping_path(ds.client_indices("train", 1).data_ptr()) == manifest
    sample = ds.dataset("train", 0)
    assert sample.indices is not None
    assert mapping_path(sample.indices.data_ptr()) == manifest


def test_open_is_cached_per_process(root: Path) -> None:
    first = DatasetStore.open(root)
    assert DatasetStore.open(str(root)) is first
    assert DatasetStore.open(os.path.join(root, "..", root.name)) is first


def test_float_features_and_other_label_dtypes(tmp_path: Path) -> None:
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(6, 4)
    y = np.array([0, 1, 0, 1, 1, 0], dtype=np.int16)
    ds = DatasetStore.create(tmp_path / "tab", {"train": (x, y)}, {"train": [[0, 1], [2, 3, 4, 5]]})
    assert ds.normalization is None
    assert ds.labels("train").dtype == torch.int64
    data = ds.dataset("train", 1)
    x0, y0 = data[0]
    assert torch.equal(x0, torch.from_numpy(x[2]))
    assert int(y0) == 0
    # Without a scale the normalisation of float data is plain (x - mean) / std.
    normed = DatasetStore.create(
        tmp_path / "tab2", {"train": (x, y)}, mean=[0.5] * 4, std=[2.0] * 4
    ).dataset("train")
    assert torch.allclose(normed[3][0], (torch.from_numpy(x[3]) - 0.5) / 2.0)


def test_accepts_partition_objects_with_indices(tmp_path: Path) -> None:
    x, y = make_arrays(10)
    partition = SimpleNamespace(indices=(np.array([0, 1]), np.array([2, 3, 9])))
    ds = DatasetStore.create(tmp_path / "s", {"train": (x, y)}, {"train": partition})
    assert ds.client_indices("train", 1).tolist() == [2, 3, 9]


# --- datasets ------------------------------------------------------------------------------


def test_dataset_items_are_normalised_copies(
    root: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    ds = DatasetStore.open(root)
    client = ds.dataset("train", 3)
    assert len(client) == 4
    x_raw, y_all = arrays["train"]
    for i, row in enumerate(CLIENTS[3]):
        x, y = client[i]
        assert x.dtype == torch.float32
        assert x.shape == (3, 8, 8)
        np.testing.assert_allclose(x.numpy(), reference_normalize(x_raw[row]), rtol=0, atol=1e-5)
        assert y.dtype == torch.int64
        assert int(y) == y_all[row]
    # Negative indices count from the end.
    assert torch.equal(client[-1][0], client[3][0])
    # Items are fresh tensors: writing to them leaves the mapped data alone.
    raw = ds.dataset("train", 3, normalize=False)
    x, _ = raw[0]
    assert x.dtype == torch.uint8
    x.fill_(0)
    assert torch.equal(raw[0][0], torch.from_numpy(x_raw[5]))
    whole = ds.dataset("test")
    assert len(whole) == 20
    assert int(whole[7][1]) == arrays["test"][1][7]


def test_get_batch_equals_collated_items(root: Path) -> None:
    client = DatasetStore.open(root).dataset("train", 0)
    positions = torch.tensor([4, 0, 29, 4, -1])
    xb, yb = client.get_batch(positions)
    items = [client[int(i)] for i in positions]
    assert torch.equal(xb, torch.stack([x for x, _ in items]))
    assert torch.equal(yb, torch.stack([y for _, y in items]))
    with pytest.raises(IndexError, match="out of range"):
        client.get_batch([30])


def test_subset_and_errors(root: Path) -> None:
    ds = DatasetStore.open(root)
    client = ds.dataset("train", 1)
    sub = client.subset([0, 16])
    assert sub.indices is not None and sub.indices.tolist() == [30, 46]
    assert sub.source == client.source and str(sub.source) == f"{root.resolve()}:train"
    assert torch.equal(sub[1][0], client[16][0])
    with pytest.raises(IndexError, match="index 17 is out of range for a dataset of 17"):
        client[17]
    with pytest.raises(IndexError, match="index 99 is out of range for 17 samples"):
        client.subset([99])


@pytest.mark.parametrize(
    ("shuffle", "drop_last", "batch_size", "cid"),
    [
        (True, False, 7, 0),
        (True, False, 10, 0),
        (True, True, 7, 0),
        (True, True, 40, 0),
        (False, False, 7, 1),
        (False, True, 5, 1),
        (True, False, 1, 3),
    ],
)
@pytest.mark.parametrize("with_generator", [True, False])
def test_mapped_loader_matches_dataloader_bitwise(
    root: Path, shuffle: bool, drop_last: bool, batch_size: int, cid: int, with_generator: bool
) -> None:
    client = DatasetStore.open(root).dataset("train", cid)

    def run(make: Callable[[torch.Generator | None], Any]) -> tuple[list[Any], torch.Tensor]:
        g = torch.Generator().manual_seed(11) if with_generator else None
        torch.manual_seed(5)
        batches = [list(b) for b in make(g)] + [list(b) for b in make(g)]  # two epochs
        return batches, (g.get_state() if g is not None else torch.get_rng_state())

    expected, expected_state = run(
        lambda g: DataLoader(
            client, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last
        )
    )
    got, got_state = run(
        lambda g: MappedDataLoader(
            client, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last
        )
    )
    assert len(got) == len(expected)
    for (xe, ye), (xg, yg) in zip(expected, got, strict=True):
        assert torch.equal(xe, xg)
        assert torch.equal(ye, yg)
    assert torch.equal(expected_state, got_state), "generator must end in the same state"


def test_mapped_loader_runs_transforms_like_dataloader(root: Path) -> None:
    def flip(x: torch.Tensor) -> torch.Tensor:  # a random augmentation on the global RNG
        return x.flip(-1) if bool(torch.rand(()) < 0.5) else x

    client = DatasetStore.open(root).dataset(
        "train", 0, transform=flip, target_transform=lambda y: int(y) + 100
    )
    results = []
    for cls in (DataLoader, MappedDataLoader):
        torch.manual_seed(3)
        g = torch.Generator().manual_seed(4)
        results.append(list(cls(client, batch_size=8, shuffle=True, generator=g)))
    assert len(results[0]) == len(results[1]) == 4
    for (xe, ye), (xg, yg) in zip(*results, strict=True):
        assert torch.equal(xe, xg)
        assert torch.equal(ye, yg)
        assert int(ye.min()) >= 100


def test_iter_batches_rejects_bad_arguments(root: Path) -> None:
    client = DatasetStore.open(root).dataset("train", 0)
    with pytest.raises(ValueError, match="batch_size"):
        iter_batches(client, 0)
    empty = DatasetStore.open(root).dataset("train", 2)
    assert list(iter_batches(empty, 4)) == []
    with pytest.raises(ValueError, match="empty"):
        iter_batches(empty, 4, shuffle=True)


def test_normalization_is_the_same_alone_and_in_a_batch() -> None:
    norm = Normalization((0.1, 0.2), (0.3, 0.7), 1 / 255)
    batch = torch.randint(0, 256, (5, 2, 3), dtype=torch.uint8)
    together = norm.apply(batch, channel_dim=1)
    for i in range(5):
        assert torch.equal(norm.apply(batch[i], channel_dim=0), together[i])
    with pytest.raises(ValueError, match="2 channels"):
        norm.apply(torch.zeros(3, 4), channel_dim=0)
    with pytest.raises(ValueError, match="std"):
        Normalization((0.0,), (0.0,))
    with pytest.raises(ValueError, match="same"):
        Normalization((0.0, 1.0), (1.0,))


# --- the partitioned dataset ---------------------------------------------------------------


class Part(str, Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


def test_partitioned_dataset_api(root: Path) -> None:
    pd = StorePartitionedDataset(root)
    assert pd.num_clients(Part.TRAIN) == 4
    train = pd.get_dataset(Part.TRAIN, 1)
    assert isinstance(train, MappedArrayDataset)
    assert len(train) == 17
    assert len(pd.get_dataset("val", 3)) == 3  # type: ignore[arg-type]
    assert len(pd.get_dataset(Part.TEST, None)) == 20  # type: ignore[arg-type]

    loader = pd.get_dataloader(Part.TRAIN, 0, 8, torch.Generator().manual_seed(1))
    # Store datasets get the loader that fetches a batch with one indexing operation.
    assert isinstance(loader, MappedDataLoader)
    assert [len(y) for _, y in loader] == [8, 8, 8, 6]

    # Deterministic given the generator; "train" shuffles, "test" does not.
    def epoch(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in pd.get_dataloader("train", 0, 8, g)]).tolist()

    assert epoch(1) == epoch(1)
    assert epoch(1) != epoch(2)
    assert sorted(epoch(1)) == sorted(DatasetStore.open(root).labels("train")[:30].tolist())
    test_labels = [y for _, y in pd.get_dataloader(Part.TEST, None, 6, torch.Generator())]
    assert torch.equal(torch.cat(test_labels), DatasetStore.open(root).labels("test"))
    (xs, ys), *_ = pd.get_dataloader(Part.TEST, None, None, None)
    assert xs.shape == (20, 3, 8, 8)
    assert torch.equal(ys, DatasetStore.open(root).labels("test"))
    # An empty client gives an empty loader.
    assert list(pd.get_dataloader("train", 2, None, torch.Generator())) == []


def test_partitioned_dataset_set_dataset(root: Path) -> None:
    pd = StorePartitionedDataset(root)
    train = pd.get_dataset("train", 0)
    assert isinstance(train, MappedArrayDataset)
    held_out = train.subset([0, 1, 2])
    pd.set_dataset("val", 0, held_out)
    assert pd.get_dataset(Part.VAL, 0) is held_out
    assert pd.get_dataset("val", 1) is not held_out
    copy = pickle.loads(pickle.dumps(pd))
    restored = copy.get_dataset("val", 0)
    assert torch.equal(restored[2][0], held_out[2][0])
    with pytest.raises(TypeError, match="Dataset"):
        pd.set_dataset("val", 0, [1, 2, 3])  # type: ignore[arg-type]


def test_partitioned_dataset_pickles_as_a_small_path(tmp_path: Path, root: Path) -> None:
    pd = StorePartitionedDataset(root)
    payload = pickle.dumps(pd)
    assert len(payload) < 1024
    assert str(root).encode() in payload
    # No data travels: a store a hundred times larger pickles to the same size.
    big = tmp_path / ("x" * len(root.name))
    DatasetStore.create(big, {"train": make_arrays(6000)}, {"train": [list(range(6000))]})
    assert len(pickle.dumps(StorePartitionedDataset(big))) == len(payload)
    # Datasets taken from the store pickle as their indices, never their data.
    assert len(pickle.dumps(pd.get_dataset("test", None))) < 1024
    copy = pickle.loads(payload)
    assert copy.store is DatasetStore.open(root)


def test_dataset_not_from_a_store_refuses_to_pickle() -> None:
    ds = MappedArrayDataset(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="DatasetStore"):
        pickle.dumps(ds)


class RangeSource:
    """A tensor source of its own: rebuilds the same tensors wherever it is unpickled."""

    def __init__(self, n: int) -> None:
        self.n = n

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(2.0 * self.n).view(self.n, 2), torch.arange(self.n) % 2

    def normalization(self) -> Normalization | None:
        return Normalization((1.0,), (2.0,))

    def __str__(self) -> str:
        return f"range({self.n})"


def test_any_tensor_source_makes_a_dataset_picklable() -> None:
    source = RangeSource(5)
    features, labels = source.tensors()
    ds = MappedArrayDataset(
        features, labels, [4, 1], normalization=source.normalization(), source=source
    )
    payload = pickle.dumps(ds)
    assert b"RangeSource" in payload and len(payload) < 1024
    copy = pickle.loads(payload)
    assert repr(copy) == "MappedArrayDataset(range(5), samples=2)"
    assert torch.equal(copy[0][0], torch.tensor([3.5, 4.0])) and int(copy[1][1]) == 1
    # Without normalisation at pickling time, none is applied after unpickling.
    raw = pickle.loads(pickle.dumps(MappedArrayDataset(features, labels, source=source)))
    assert raw.normalization is None and torch.equal(raw[4][0], torch.tensor([8.0, 9.0]))


def _child_reads_dataset(payload: bytes) -> tuple[list[int], float, str]:
    """Runs in a spawned process: unpickle a dataset the parent took from a store."""
    dataset = pickle.loads(payload)
    x, y = dataset.get_batch(list(range(len(dataset))))
    return y.tolist(), float(x.double().sum()), repr(dataset)


def _child_reads(payload: bytes) -> dict[str, Any]:
    """Runs in a spawned process: unpickle, load one epoch, report what it saw."""
    pd = pickle.loads(payload)
    again = pickle.loads(payload)
    loader = pd.get_dataloader("train", 1, 5, torch.Generator().manual_seed(9))
    batches = [(x.double().sum().item(), y.tolist()) for x, y in loader]
    features = pd.store.features("train")
    return {
        "batches": batches,
        "same_store": again.store is pd.store,
        "mapped_from": mapping_path(features.data_ptr()),
        "pid": os.getpid(),
    }


@pytest.mark.skipif(sys.platform != "linux", reason="needs /proc/self/maps")
def test_partitioned_dataset_works_in_a_spawned_process(root: Path) -> None:
    pd = StorePartitionedDataset(root)
    payload = pickle.dumps(pd)
    loader = pd.get_dataloader("train", 1, 5, torch.Generator().manual_seed(9))
    expected = [(x.double().sum().item(), y.tolist()) for x, y in loader]
    ctx = multiprocessing.get_context("spawn")
    subset = pd.get_dataset("train", 1)
    assert isinstance(subset, MappedArrayDataset)
    subset = subset.subset([16, 0, 3])
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        seen = pool.submit(_child_reads, payload).result(timeout=300)
        # Workers unpickle store datasets (and their subsets) by mapping the store again.
        labels, total, shown = pool.submit(_child_reads_dataset, pickle.dumps(subset)).result(
            timeout=300
        )
    x, y = subset.get_batch([0, 1, 2])
    assert labels == y.tolist() and total == float(x.double().sum())
    assert shown == repr(subset)
    assert seen["pid"] != os.getpid()
    assert seen["batches"] == expected
    assert seen["same_store"] is True
    # The worker opened the store file itself: mapped when it is over 2 MiB, read into
    # the worker's own memory when it is as small as this one.
    train = os.path.realpath(root / "train.safetensors")
    assert os.path.getsize(train) <= 2 << 20
    assert seen["mapped_from"] != train


# --- validation ------------------------------------------------------------------------------


def test_create_validates_inputs(tmp_path: Path) -> None:
    x, y = make_arrays(10)

    def create(*args: Any, **kwargs: Any) -> DatasetStore:
        return DatasetStore.create(tmp_path / "bad", *args, **kwargs)

    with pytest.raises(ValueError, match=r"splits\['train'\]: 10 feature rows but 9 labels"):
        create({"train": (x, y[:9])})
    with pytest.raises(IndexError, match="partition 'train', client 1: index 10 is out of range"):
        create({"train": (x, y)}, {"train": [[0], [10]]})
    with pytest.raises(IndexError, match="index -1 is out of range"):
        create({"train": (x, y)}, {"train": [[-1]]})
    with pytest.raises(KeyError, match="not in splits"):
        create({"train": (x, y)}, {"val": [[0]]})
    with pytest.raises(TypeError, match="labels must be integers"):
        create({"train": (x, y.astype(np.float32))})
    with pytest.raises(TypeError, match="expected integers"):
        create({"train": (x, y)}, {"train": [[0.5]]})
    with pytest.raises(ValueError, match="not a valid name"):
        create({"../up": (x, y)})
    with pytest.raises(ValueError, match="both mean and std"):
        create({"train": (x, y)}, mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="3 channels"):
        create({"train": (x, y)}, mean=[0.5, 0.5], std=[1.0, 1.0])
    with pytest.raises(ValueError, match="non-empty"):
        create({})
    assert not (tmp_path / "bad" / MANIFEST_NAME).exists()


def test_access_validates_type_and_cid(root: Path) -> None:
    ds = DatasetStore.open(root)
    with pytest.raises(KeyError, match="no per-client partition 'nope'"):
        ds.dataset("nope", 0)
    with pytest.raises(KeyError, match="unknown split 'val'"):
        ds.dataset("val")
    with pytest.raises(
        IndexError, match="client id 4 is out of range for partition 'train' with 4"
    ):
        ds.dataset("train", 4)
    with pytest.raises(ValueError, match=r"cid must be an int in \[0, 2\*\*32\), got -1"):
        ds.dataset("train", -1)
    with pytest.raises(TypeError, match="cid"):
        ds.dataset("train", True)
    with pytest.raises(TypeError, match="partition type"):
        ds.dataset(3)  # type: ignore[arg-type]
    pd = StorePartitionedDataset(root)
    with pytest.raises(ValueError, match="batch_size"):
        pd.get_dataloader("train", 0, 0, None)
    with pytest.raises(FileNotFoundError, match="not a dataset store"):
        StorePartitionedDataset(root / "missing")


def test_existing_store_needs_overwrite(root: Path) -> None:
    x, y = make_arrays(5, seed=9)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        DatasetStore.create(root, {"train": (x, y)})
    old = DatasetStore.open(root)
    old_client = old.dataset("train", 0)
    old_first = old_client[0][0].clone()
    new = DatasetStore.create(root, {"train": (x, y)}, {"train": [[4, 3]]}, overwrite=True)
    assert new is not old
    assert DatasetStore.open(root) is new
    assert new.splits == ("train",)
    assert not (root / "test.safetensors").exists(), "files of the old store are removed"
    assert np.array_equal(new.features("train").numpy(), x)
    # Datasets taken before keep reading the files they mapped.
    assert torch.equal(old_client[0][0], old_first)


def test_open_detects_damaged_stores(tmp_path: Path, root: Path) -> None:
    x, y = make_arrays(60, 1)
    other = tmp_path / "other"
    DatasetStore.create(other, {"train": (x, y)})
    # A split file from another store (e.g. a crash between two writes).
    os.replace(other / "train.safetensors", root / "train.safetensors")
    with pytest.raises(store.StoreError, match="another version"):
        DatasetStore(root)
    # A manifest whose offsets are not a CSR offset list.
    damaged = tmp_path / "damaged"
    DatasetStore.create(damaged, {"train": (x, y)})
    meta = store.open_file(damaged / MANIFEST_NAME).metadata
    meta["partitions"] = '{"train": "train"}'
    store.save(
        damaged / MANIFEST_NAME,
        {"train/indices": torch.tensor([0, 1]), "train/offsets": torch.tensor([0, 3])},
        metadata=meta,
    )
    with pytest.raises(store.StoreError, match="CSR"):
        DatasetStore(damaged)
    store.save(
        damaged / MANIFEST_NAME,
        {"train/indices": torch.tensor([0, 60]), "train/offsets": torch.tensor([0, 2])},
        metadata=meta,
    )
    with pytest.raises(store.StoreError, match="index 60 is out of range"):
        DatasetStore(damaged)
    store.save(damaged / MANIFEST_NAME, {}, metadata={"format": "something else"})
    with pytest.raises(store.StoreError, match="not a dataset store manifest"):
        DatasetStore(damaged)
