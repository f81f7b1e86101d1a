"""Packages split into a pickled skeleton plus store-file tensors, and back."""

from __future__ import annotations

import pickle
from collections import OrderedDict, namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from emberfl import store
from emberfl.core import PackageError, load_package, save_package
from emberfl.core.packages import join_package, read_skeleton, split_package
from linux import proc_self

Pair = namedtuple("Pair", ["left", "right"])


@dataclass
class Inner:
    weights: torch.Tensor
    tag: str = "inner"


@dataclass
class Package:
    cid: int
    model_parameters: torch.Tensor
    data_size: int
    metadata: dict[str, float] | None = None
    extra: list[object] = field(default_factory=list)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def test_skeleton_of_a_large_package_is_small_and_holds_no_tensor_data() -> None:
    big = torch.randn(1_000_000)
    pkg = Package(cid=7, model_parameters=big, data_size=500, metadata={"loss": 0.5})
    skeleton, tensors, arrays = split_package(pkg)
    assert len(skeleton) < 2048
    assert list(tensors) == ["0"]
    assert tensors["0"] is big
    assert arrays == []
    # Sanity check of the check: plain pickle of the same package is megabytes.
    assert len(pickle.dumps(pkg)) > 4_000_000


def test_round_trip_through_a_file_is_exact_and_zero_copy(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(3, 4, generator=gen)
    pkg = {
        "pkg": Package(
            cid=3,
            # 4 MiB, so that the file is mapped (files up to 2 MiB are read into memory).
            model_parameters=torch.randn(1 << 20, generator=gen),
            data_size=12,
            metadata={"acc": 0.25},
            extra=[Inner(torch.arange(6, dtype=torch.int64).reshape(2, 3)), "text", 4.5],
        ),
        "pair": Pair(shared, shared),  # one tensor referenced twice
        "ordered": OrderedDict(a=torch.ones(2, dtype=torch.bfloat16), b=None),
        "mask": torch.tensor([True, False, True]),
        "half": torch.full((5,), 1.5, dtype=torch.float16),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.empty(0, 7),
        "array": np.arange(10, dtype=np.int32),
        "objects": np.array(["a", "b"], dtype=object),  # not storable: stays pickled
        "tuple": (1, (torch.zeros(2), "x")),
    }
    path = tmp_path / "pkg.safetensors"
    size = save_package(path, pkg)
    assert size == len(read_skeleton(path))
    back = load_package(path)

    assert isinstance(back["pkg"], Package)
    assert back["pkg"].cid == 3 and back["pkg"].data_size == 12
    assert back["pkg"].metadata == {"acc": 0.25}
    assert _same(back["pkg"].model_parameters, pkg["pkg"].model_parameters)
    inner = back["pkg"].extra[0]
    assert isinstance(inner, Inner) and _same(inner.weights, pkg["pkg"].extra[0].weights)
    assert back["pkg"].extra[1:] == ["text", 4.5]
    assert isinstance(back["pair"], Pair)
    assert back["pair"].left is back["pair"].right  # identity survives
    assert _same(back["pair"].left, shared)
    assert isinstance(back["ordered"], OrderedDict) and back["ordered"]["b"] is None
    assert _same(back["ordered"]["a"], pkg["ordered"]["a"])
    for key in ("mask", "half", "scalar", "empty"):
        assert _same(back[key], pkg[key]), key
    assert isinstance(back["array"], np.ndarray)
    np.testing.assert_array_equal(back["array"], pkg["array"])
    assert back["array"].dtype == np.int32
    assert list(back["objects"]) == ["a", "b"]
    assert back["tuple"][0] == 1 and back["tuple"][1][1] == "x"

    # The store file holds every tensor with data once (the shared one included,
    # the empty one not at all), and the loaded tensors are views of that file's
    # mapping, not private copies.
    assert len(store.open_file(path)) == 9
    for t in (back["pkg"].model_parameters, back["pair"].left, back["mask"]):
        assert mapping_path(t.data_ptr()) == str(path)


def mapping_path(address: int) -> str | None:
    """The file mapped at ``address`` in this process (``None`` for anonymous memory)."""
    with open(proc_self("maps")) as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                name = fields[5].strip() if len(fields) == 6 else ""
                name = name.removesuffix(" (deleted)")
                return name if name.startswith("/") else None
    return None


def test_parameters_and_requires_grad_are_kept(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.randn(3))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    g = torch.randn(4, requires_grad=True)
    save_package(tmp_path / "p.safetensors", {"p": p, "frozen": frozen, "g": g})
    back = load_package(tmp_path / "p.safetensors")
    assert isinstance(back["p"], torch.nn.Parameter) and back["p"].requires_grad
    assert isinstance(back["frozen"], torch.nn.Parameter) and not back["frozen"].requires_grad
    assert not isinstance(back["g"], torch.nn.Parameter) and back["g"].requires_grad
    assert torch.equal(back["p"].detach(), p.detach())


def test_package_without_tensors_and_plain_values(tmp_path: Path) -> None:
    for value in (None, 5, "text", {"a": [1, 2]}, Package(1, torch.zeros(0), 0)):
        save_package(tmp_path / "v.safetensors", value)
        back = load_package(tmp_path / "v.safetensors")
        if isinstance(value, Package):
            assert back.cid == 1 and back.model_parameters.numel() == 0
        else:
            assert back == value


def test_split_and_join_without_a_file() -> None:
    pkg = {"w": torch.arange(4.0), "n": 2}
    skeleton, tensors, _ = split_package(pkg)
    back = join_package(skeleton, {k: torch.as_tensor(v) for k, v in tensors.items()})
    assert torch.equal(back["w"], pkg["w"]) and back["n"] == 2
    with pytest.raises(PackageError, match="missing"):
        join_package(skeleton, {})


def test_unsupported_tensors_are_refused_by_name() -> None:
    with pytest.raises(PackageError, match="complex64"):
        split_package({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(PackageError, match="dense"):
        split_package({"s": torch.zeros(3, 3).to_sparse()})
    with pytest.raises(TypeError, match="cannot pickle"):
        split_package({"f": lambda: 1})


def test_a_store_file_that_is_no_package_is_refused(tmp_path: Path) -> None:
    store.save(tmp_path / "plain.safetensors", {"a": torch.zeros(2)})
    with pytest.raises(PackageError, match="not an emberfl package"):
        load_package(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(store.StoreError):
        load_package(tmp_path / "junk.safetensors")


def test_writing_into_a_loaded_package_never_reaches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    save_package(path, {"w": torch.zeros(8)})
    first = load_package(path)
    first["w"].add_(1.0)
    second = load_package(path)
    assert torch.equal(second["w"], torch.zeros(8))
