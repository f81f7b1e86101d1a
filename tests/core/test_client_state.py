"""Per-client state files: one safetensors file per client, written atomically."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from emberfl import store
from emberfl.contrib import ClientStateStore


def test_save_load_list_and_delete(tmp_path: Path) -> None:
    states = ClientStateStore(tmp_path / "s")
    assert states.load(3) is None and states.metadata(3) is None and len(states) == 0
    states.save(3, {"a": torch.arange(4.0), "b": torch.tensor([1, 2])}, metadata={"k": "v"})
    states.save(10, {"a": torch.zeros(2)})
    (tmp_path / "s" / "notes.txt").write_text("not a client")
    (tmp_path / "s" / "07.safetensors").write_bytes(b"")  # not a canonical id
    loaded = states.load(3)
    assert loaded is not None
    assert torch.equal(loaded["a"], torch.arange(4.0)) and torch.equal(
        loaded["b"], torch.tensor([1, 2])
    )
    assert states.metadata(3) == {"k": "v"}
    assert states.clients() == [3, 10] and len(states) == 2
    assert 3 in states and 4 not in states and "3" not in states
    # Replacing is atomic: a reader holding the old mapping keeps the old values.
    states.save(3, {"a": torch.ones(4)})
    assert torch.equal(loaded["a"], torch.arange(4.0))
    again = states.load(3)
    assert again is not None and torch.equal(again["a"], torch.ones(4)) and "b" not in again
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".")]
    states.delete(3)
    states.delete(3)
    assert states.clients() == [10]
    assert store.load(states.path(10))["a"].shape == (2,)


def test_pickles_as_its_path(tmp_path: Path) -> None:
    states = ClientStateStore(tmp_path / "s")
    states.save(1, {"x": torch.ones(3)})
    data = pickle.dumps(states)
    assert len(data) < 300
    clone = pickle.loads(data)
    got = clone.load(1)
    assert got is not None and torch.equal(got["x"], torch.ones(3))


def test_bad_ids_and_paths(tmp_path: Path) -> None:
    states = ClientStateStore(tmp_path / "s")
    with pytest.raises(ValueError, match=r"client id must be an int in \[0, 2\*\*32\), got -1"):
        states.path(-1)
    with pytest.raises(TypeError, match="bool"):
        states.path(True)
    with pytest.raises(TypeError, match="int"):
        states.path("3")  # type: ignore[arg-type]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        ClientStateStore(tmp_path / "file")
    (tmp_path / "s" / "5.safetensors").write_bytes(b"garbage")
    with pytest.raises(store.StoreError):
        states.load(5)
