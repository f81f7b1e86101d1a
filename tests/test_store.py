"""The tensor store: format compatibility, layout, zero-copy mapping and atomic writes."""

from __future__ import annotations

import gc
import itertools
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
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
    # 4 MiB: files up to 2 MiB are read, not mapped.
    state = {"a": torch.arange(float(1 << 20)), "b": torch.ones(3, dtype=torch.bfloat16)}
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


# ------------------------------------------------------------- files from elsewhere


def write_raw(path: Path, header: dict[str, object], data: bytes = b"") -> Path:
    """A safetensors file with exactly ``header`` (as JSON) and ``data``."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def empty_entry(dtype: str, shape: list[int]) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}


@pytest.mark.parametrize(
    ("shape", "dtype", "needle"),
    [
        ([0, 2**64 - 1], "F32", f"shape dimension {2**64 - 1} exceeds the limit"),
        ([0, 2**63], "U8", "exceeds the limit of 9223372036854775807"),
        ([1] * 65, "U8", "shape has 65 dimensions, more than the limit of 64"),
        ([1] * 200_000, "U8", "shape has 200000 dimensions"),
        ([0, 2**62], "F32", "overflows the address space"),
        ([2**31, 0, 2**31], "F64", "overflows the address space"),
    ],
    ids=["u64-max", "past-isize", "65-dims", "200000-dims", "empty-f32", "empty-f64"],
)
def test_shapes_numpy_cannot_hold_are_store_errors(
    tmp_path: Path, shape: list[int], dtype: str, needle: str
) -> None:
    """The validator refuses them, naming the file: numpy never sees them."""
    numel = 0 if 0 in shape else 1
    entry = {"dtype": dtype, "shape": shape, "data_offsets": [0, numel]}
    path = write_raw(tmp_path / "f.safetensors", {"t": entry}, b"\0" * numel)
    with pytest.raises(store.StoreError) as info:
        store.load(path)
    assert str(info.value).startswith(f'{path}: tensor "t": '), info.value
    assert needle in str(info.value)


def test_shapes_at_the_limits_load(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "f.safetensors",
        {"deep": {"dtype": "U8", "shape": [1] * 64, "data_offsets": [0, 1]}},
        b"\x07",
    )
    (t,) = store.load(path).values()
    assert t.dim() == 64 and int(t.reshape(-1)[0]) == 7
    huge = 2**63 - 1
    path = write_raw(tmp_path / "e.safetensors", {"e": empty_entry("U8", [0, huge])})
    assert store.load(path)["e"].shape == (0, huge)


def test_more_tensors_than_the_limit_are_a_store_error(tmp_path: Path) -> None:
    header = {str(i): empty_entry("U8", [0]) for i in range(100_001)}
    path = write_raw(tmp_path / "many.safetensors", header)
    with pytest.raises(store.StoreError, match="more than 100000 tensors"):
        store.open_file(path)


def test_metadata_past_its_limits_is_a_store_error(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "m.safetensors", {"__metadata__": {f"k{i}": "v" for i in range(4097)}}
    )
    with pytest.raises(store.StoreError, match="more than 4096 entries"):
        store.open_file(path)
    path = write_raw(tmp_path / "m.safetensors", {"__metadata__": {"k": "x" * (16 << 20)}})
    with pytest.raises(store.StoreError, match=r"holds 16777217 bytes .* limit of 16777216"):
        store.open_file(path)
    with pytest.raises(store.StoreError, match="more than the limit"):
        store.save(tmp_path / "w.safetensors", {}, metadata={"k": "x" * (16 << 20)})
    assert not (tmp_path / "w.safetensors").exists()


def load_within(path: Path, seconds: float) -> BaseException | None:
    """``store.load(path)`` on a thread: what it raised (None: it returned), or a test
    failure if it did not answer within ``seconds``."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            store.load(path)
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        # Release the blocked open (a FIFO opens once a writer comes), then fail.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(5)
        pytest.fail(f"store.load({path}) blocked for {time.monotonic() - started:.1f} s")
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_is_a_store_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    started = time.monotonic()
    error = load_within(fifo, 5.0)
    assert time.monotonic() - started < 1.0
    assert isinstance(error, store.StoreError), error
    assert str(error) == f"{fifo}: not a regular file (a FIFO)"
    error = load_within(tmp_path, 5.0)
    assert isinstance(error, store.StoreError) and "(a directory)" in str(error)
    if Path("/dev/null").exists():
        error = load_within(Path("/dev/null"), 5.0)
        assert isinstance(error, store.StoreError) and "(a character device)" in str(error)


# What another program may do to a file while this process has it open: truncate it in
# place, or copy another file over it the way `cp` does (truncate, then write), here a
# shorter one and one of the same size. (safetensors' save_file used to write in place
# too; it writes a new file and renames it since 0.6.)
REWRITES = {
    "truncate": "open(path, 'r+b').truncate(0)",
    "cp-shorter": "st.save_file({'x': torch.zeros(3)}, path + '.new')\n"
    "shutil.copyfile(path + '.new', path)",
    "cp-same-size": "st.save_file({'x': torch.zeros_like(x)}, path + '.new')\n"
    "shutil.copyfile(path + '.new', path)",
}


def run_after_rewrite(path: Path, load: str, rewrite: str) -> subprocess.CompletedProcess[str]:
    """In a child: ``load`` the file at ``path`` into ``x`` (a tensor), ``rewrite`` the
    file, then read every element of ``x`` and print its sum. A child, because reading a
    mapped page that the rewrite cut off kills the process with SIGBUS."""
    script = "\n".join(
        [
            "import shutil",
            "import torch",
            "import safetensors.torch as st",
            "from emberfl import store",
            "from emberfl.checkpoint import load_server_state",
            f"path = {str(path)!r}",
            f"x = {load}",
            rewrite,
            "print(float(x.double().sum()))",
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )


def assert_survived(proc: subprocess.CompletedProcess[str], expected: float) -> None:
    assert proc.returncode != -signal.SIGBUS, "killed by SIGBUS"
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == expected


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
def test_small_files_are_read_so_a_rewrite_cannot_kill_the_reader(
    tmp_path: Path, rewrite: str
) -> None:
    path = tmp_path / "small.safetensors"
    x = torch.arange(256 * 1024, dtype=torch.float32)  # 1 MiB
    store.save(path, {"x": x})
    f = store.open_file(path)
    assert not f.mapped and mapping_of(f["x"].data_ptr()) != str(path)
    del f
    proc = run_after_rewrite(path, "store.load(path)['x']", REWRITES[rewrite])
    assert_survived(proc, float(x.double().sum()))


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
def test_copy_true_reads_a_large_file_so_a_rewrite_cannot_kill_the_reader(
    tmp_path: Path, rewrite: str
) -> None:
    path = tmp_path / "large.safetensors"
    x = torch.arange(2 * 1024 * 1024, dtype=torch.float32)  # 8 MiB
    store.save(path, {"x": x})
    assert store.open_file(path).mapped
    copied = store.open_file(path, copy=True)
    assert not copied.mapped and torch.equal(copied["x"], x)
    assert copied["x"].data_ptr() % 4096 == 0  # where a mapping would put it
    proc = run_after_rewrite(path, "store.load(path, copy=True)['x']", REWRITES[rewrite])
    assert_survived(proc, float(x.double().sum()))


def test_resume_reads_the_server_state_into_memory(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    x = torch.arange(2 * 1024 * 1024, dtype=torch.float32)  # 8 MiB: would be mapped
    store.save(checkpoint / "server.safetensors", {"x": x})
    proc = run_after_rewrite(
        checkpoint / "server.safetensors",
        f"load_server_state(__import__('pathlib').Path({str(checkpoint)!r}))['x']",
        REWRITES["truncate"],
    )
    assert_survived(proc, float(x.double().sum()))


def _checkpointed_run(run_dir: Path) -> Path:
    """A run stopped after round 2 of 4 with a checkpoint of round 2; its server file."""
    from emberfl.simulation import Simulation, SimulationConfig

    config = SimulationConfig.from_mapping(
        {
            "clients": 4,
            "sample_ratio": 0.5,
            "rounds": 4,
            "runtime": "serial",
            "progress": False,
            "checkpoint_every": 2,
            "seed": 3,
        }
    )
    with Simulation(config, run_dir) as simulation:
        for _ in range(2):
            simulation.run_round()
    server = run_dir / "checkpoint-2" / "server.safetensors"
    assert server.is_file()
    return server


def _corrupt_with_huge_dimension(server: Path) -> None:
    write_raw(server, {"round": empty_entry("I64", [0, 2**64 - 1])})


def _corrupt_with_fifo(server: Path) -> None:
    server.unlink()
    os.mkfifo(server)


@pytest.mark.parametrize(
    "corrupt", [_corrupt_with_huge_dimension, _corrupt_with_fifo], ids=["huge-dim", "fifo"]
)
def test_resume_of_a_bad_server_file_is_one_line_and_status_2(
    tmp_path: Path, corrupt: Callable[[Path], None]
) -> None:
    run_dir = tmp_path / "run"
    server = _checkpointed_run(run_dir)
    corrupt(server)
    proc = subprocess.run(
        [sys.executable, "-m", "emberfl", "resume", str(run_dir), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emberfl: error: "), proc.stderr
    assert str(server) in lines[0]
