"""Atomic writes and directory publishing: contents, modes, fsyncs and clean failures."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from emberfl import fileio
from emberfl.fileio import (
    atomic_copy,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    current_umask,
    is_temp_name,
    make_temp_dir,
    publish_dir,
)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    mask: int = request.param
    before = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if is_temp_name(p.name))


def test_current_umask_reads_without_changing_it(umask: int) -> None:
    assert current_umask() == umask
    assert os.umask(umask) == umask  # still set as it was


def test_current_umask_without_proc(umask: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileio, "_PROC_STATUS", "/nonexistent/status")
    monkeypatch.setattr(fileio, "_fallback_umask", None)
    assert current_umask() == umask
    assert os.umask(umask) == umask


def test_written_files_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    out = atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert out.read_text(encoding="utf-8") == "héllo\n"
    assert mode(out) == 0o666 & ~umask == mode(plain)
    assert mode(atomic_write_bytes(tmp_path / "b.bin", b"\0\1")) == 0o666 & ~umask
    assert mode(atomic_copy(out, tmp_path / "c.txt")) == 0o666 & ~umask
    assert (tmp_path / "c.txt").read_bytes() == out.read_bytes()
    assert temp_files(tmp_path) == []


def test_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old contents, longer")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    with atomic_open(target, "w", newline="") as fh:
        fh.write("a\r\nb")
    assert target.read_bytes() == b"a\r\nb"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_write_leaves_the_target_and_no_temp_file(
    tmp_path: Path, error: type[BaseException]
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(error), atomic_open(target, "wb") as fh:
        fh.write(b"half")
        raise error()
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_a_failed_rename_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(tmp_path / "f", "text")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_fsync_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fileio.os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write_text(tmp_path / "f", "text", durable=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("durable", [True, False])
def test_durable_fsyncs_the_file_then_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        info = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
        # The file is synced under its temporary name, before the rename.
        synced.append(f"{kind}:{(tmp_path / 'f').exists()}")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", record)
    atomic_write_bytes(tmp_path / "f", b"data", durable=durable)
    assert synced == (["file:False", "dir:True"] if durable else [])


def test_temp_names_are_unique_and_hidden(tmp_path: Path) -> None:
    target = tmp_path / "f"
    with atomic_open(target, "wb") as first, atomic_open(target, "wb") as second:
        first.write(b"1")
        second.write(b"2")
        names = temp_files(tmp_path)
        assert len(names) == 2 and all(n.startswith(".f.") for n in names)
    # The inner block ended first: the outer one's contents win.
    assert target.read_bytes() == b"1"
    assert temp_files(tmp_path) == []


def test_bad_modes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be"):
        atomic_open(tmp_path / "f", "a")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="text mode"):
        atomic_open(tmp_path / "f", "wb", encoding="utf-8")  # type: ignore[call-overload]


def test_publish_dir_sets_the_mode_and_replaces(tmp_path: Path, umask: int) -> None:
    built = make_temp_dir(tmp_path, "out")
    assert is_temp_name(built.name) and built.name.startswith(".out.")
    (built / "x").write_text("1")
    target = publish_dir(built, tmp_path / "out", durable=True)
    assert mode(target) == 0o777 & ~umask
    assert (target / "x").read_text() == "1"
    again = make_temp_dir(tmp_path, "out")
    (again / "y").write_text("2")
    publish_dir(again, target)
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_publish_keeps_the_old_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("kept")
    built = make_temp_dir(tmp_path, "out")
    (built / "new").write_text("lost")

    def fail(src: str, dst: str) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(fileio.os, "rename", fail)
    with pytest.raises(OSError, match="cross-device"):
        publish_dir(built, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "old").read_text() == "kept"
