"""The tensor store: format compatibility, layout, zero-copy mapping and atomic writes."""

from __future__ import annotations

import gc
import itertools
import os
import resource
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch as st
import torch

from emberfl import store
from linux import proc_self

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 200, shape, generator=g).to(dtype)


def every_dtype() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(DTYPES):
        name = str(dtype).removeprefix("torch.")
        out[f"{name}.matrix"] = sample(dtype, (3, 5), seed=i)
        out[f"{name}.scalar"] = sample(dtype, (), seed=i + 100)
        out[f"{name}.empty"] = sample(dtype, (0, 4), seed=i)
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def mapping_of(ptr: int) -> str | None:
    """The path of the /proc/self/maps entry holding address ``ptr``."""
    for line in proc_self("maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) == 6 else ""
    return None


def rss_bytes() -> int:
    for line in proc_self("status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_every_dtype_round_trips_through_us_and_safetensors(tmp_path: Path) -> None:
    tensors = every_dtype()
    ours = tmp_path / "ours.safetensors"
    store.save(ours, tensors, metadata={"format": "pt", "round": "3"})
    assert_same(store.load(ours), tensors)
    assert_same(st.load_file(str(ours)), tensors)
    assert store.open_file(ours).metadata == {"format": "pt", "round": "3"}

    theirs = tmp_path / "theirs.safetensors"
    st.save_file(tensors, str(theirs), metadata={"k": "v"})
    assert_same(store.load(theirs), tensors)
    assert store.open_file(theirs).metadata == {"k": "v"}


def test_files_holding_only_empty_tensors(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(0), "b": torch.zeros(3, 0, dtype=torch.int64)}
    store.save(tmp_path / "e.safetensors", tensors)
    assert_same(store.load(tmp_path / "e.safetensors"), tensors)
    store.save(tmp_path / "none.safetensors", {})
    assert store.load(tmp_path / "none.safetensors") == {}
    assert store.open_file(tmp_path / "e.safetensors").flat().numel() == 0


def test_numpy_inputs(tmp_path: Path) -> None:
    arrays = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i": np.arange(4, dtype=np.int64),
        "b": np.array([True, False]),
        "u": np.arange(7, dtype=np.uint8)[::2],  # non-contiguous input is made contiguous
    }
    store.save(tmp_path / "np.safetensors", arrays)
    back = store.load(tmp_path / "np.safetensors")
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k].numpy(), v)


def test_layout_groups_dtypes_and_aligns_the_data_section(tmp_path: Path) -> None:
    def make() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3),
            torch.nn.BatchNorm2d(8),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 2),
        )

    model = make()
    state = model.state_dict()
    path = tmp_path / "m.safetensors"
    store.save_model(model, path)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert (8 + header_len) % 4096 == 0
    assert raw[8 + header_len - 1 : 8 + header_len] in (b" ", b"}")

    f = store.open_file(path)
    f32_names = [k for k, v in state.items() if v.dtype == torch.float32]
    assert f.names(torch.float32) == f32_names  # insertion order kept within a dtype
    flat = f.flat(torch.float32)
    expected = torch.cat([state[k].reshape(-1) for k in f32_names])
    assert torch.equal(flat, expected)
    # The flat vector is a view of the same memory as the named tensors.
    assert flat.data_ptr() == f[f32_names[0]].data_ptr()
    ranges = [f.byte_range(n) for n in f.names()]
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    # The widest dtype comes first and starts the page-aligned data section.
    first = f.names()[0]
    assert f[first].dtype == torch.int64
    assert f[first].data_ptr() % 4096 == 0
    restored = store.load_model(make(), path)
    assert_same(restored.state_dict(), state)


def test_load_is_a_private_zero_copy_mapping(tmp_path: Path) -> None:
    big = {"w": torch.randn(16 * 1024 * 1024 // 4 * 4)}  # 64 MiB of float32
    path = tmp_path / "big.safetensors"
    store.save(path, big)
    before_bytes = path.read_bytes()[-64:]

    rss0 = rss_bytes()
    loaded = store.load(path)
    rss1 = rss_bytes()
    w = loaded["w"]
    assert mapping_of(w.data_ptr()) == str(path)
    assert mapping_of(w.data_ptr() + w.numel() * 4 - 1) == str(path)
    # Mapping does not read the file: resident memory must not grow by the model size.
    assert rss1 - rss0 < 8 * 1024 * 1024
    assert torch.equal(w, big["w"])

    w[-16:] = 42.0  # copy-on-write: visible here, never in the file
    assert float(w[-1]) == 42.0
    assert path.read_bytes()[-64:] == before_bytes
    assert torch.equal(store.load(path)["w"], big["w"])


def test_a_tensor_keeps_its_mapping_alive_and_the_last_one_releases_it(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    state = {"a": torch.arange(4096.0), "b": torch.ones(3, dtype=torch.bfloat16)}
    store.save(path, state)
    handle = store.open_file(path)
    a, b = handle["a"], handle.tensors()["b"]
    del handle
    gc.collect()
    # The handle is gone; the tensors still view the live mapping.
    assert mapping_of(a.data_ptr()) == str(path)
    assert torch.equal(a, state["a"]) and torch.equal(b, state["b"])
    del b
    gc.collect()
    assert mapping_of(a.data_ptr()) == str(path)
    ptr = a.data_ptr()
    del a
    gc.collect()
    assert mapping_of(ptr) != str(path)  # unmapped with the last tensor


def test_published_files_are_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    store.save(path, {"x": torch.zeros(1000)})
    old = store.load(path)["x"]
    store.save(path, {"x": torch.ones(1000)})  # replaces by rename: the old inode lives on
    os.unlink(path)
    assert float(old.sum()) == 0.0


def test_writes_leave_no_temp_files_and_durable_works(tmp_path: Path) -> None:
    store.save(tmp_path / "a.safetensors", {"x": torch.ones(3)}, durable=True)
    with pytest.raises(store.StoreError, match="unsupported dtype"):
        store.save(tmp_path / "b.safetensors", {"x": torch.ones(3, dtype=torch.complex64)})
    with pytest.raises(store.StoreError, match="write failed"):
        store.save(tmp_path / "missing" / "c.safetensors", {"x": torch.ones(3)})
    with pytest.raises(store.StoreError, match="reserved"):
        store.save(tmp_path / "d.safetensors", {"__metadata__": torch.ones(3)})
    with pytest.raises(TypeError):
        store.save(tmp_path / "e.safetensors", {"x": [1.0, 2.0]})  # type: ignore[dict-item]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_core_takes_tensor_bytes_as_uint8_only(tmp_path: Path) -> None:
    from emberfl import _core

    path = tmp_path / "raw.safetensors"
    for buffer in (np.zeros(4, dtype=np.int8), np.zeros(1, dtype=np.float32)):
        with pytest.raises(
            TypeError, match=rf'tensor "w": expected a uint8 array, got {buffer.dtype}'
        ):
            _core.save_file(path, ["w"], ["F32"], [[1]], [buffer])
    with pytest.raises(ValueError, match='tensor "w": expected a 1-D array'):
        _core.save_file(path, ["w"], ["F32"], [[1]], [np.zeros((2, 2), dtype=np.uint8)])
    assert not path.exists()
    _core.save_file(path, ["w"], ["F32"], [[1]], [np.ones(1, np.float32).view(np.uint8)])
    raw = _core.MappedFile(path)
    assert raw.path == path and isinstance(raw.path, Path)
    assert raw.arrays()[0].tolist() == [1.0]


def test_a_failed_overwrite_keeps_the_old_file(tmp_path: Path) -> None:
    """A write that dies half-way (here: file size limit) leaves the previous file intact."""
    path = tmp_path / "model.safetensors"
    store.save(path, {"x": torch.arange(10, dtype=torch.float32)})
    original = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import resource, signal, torch
        from emberfl import store
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            store.save({str(path)!r}, {{"x": torch.zeros(1 << 20)}})
        except store.StoreError as e:
            print("StoreError:", e)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "StoreError:" in proc.stdout and "write failed" in proc.stdout
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert resource.RLIMIT_FSIZE and signal.SIGXFSZ  # the limits used above exist here


def test_unaligned_foreign_tensors_are_still_readable(tmp_path: Path) -> None:
    # safetensors' own writer packs tensors back to back: an f32 after a 3-byte u8
    # tensor is misaligned and must be copied rather than viewed.
    tensors = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.randn(5)}
    path = tmp_path / "packed.safetensors"
    st.save_file(tensors, str(path))
    assert_same(store.load(path), tensors)


def test_flat_rejects_interleaved_dtypes(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(4),
        "b": torch.arange(2, dtype=torch.int32),
        "c": torch.randn(4),
    }
    path = tmp_path / "mixed.safetensors"
    st.save_file(tensors, str(path))
    f = store.open_file(path)
    names_by_offset = f.names()
    if names_by_offset in (["a", "b", "c"], ["c", "b", "a"]):
        with pytest.raises(store.StoreError, match="not contiguous"):
            f.flat(torch.float32)
    # Our own writer always makes them contiguous.
    ours = tmp_path / "ours.safetensors"
    store.save(ours, tensors)
    assert torch.equal(store.open_file(ours).flat(), torch.cat([tensors["a"], tensors["c"]]))
    assert store.open_file(ours).flat(torch.float16).numel() == 0


def test_device_argument_moves_tensors(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    store.save(path, {"x": torch.ones(3)})
    assert store.load(path, device="cpu")["x"].device.type == "cpu"
    if torch.cuda.is_available():
        assert store.load(path, device="cuda")["x"].device.type == "cuda"
