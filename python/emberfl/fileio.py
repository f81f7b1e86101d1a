"""Crash-safe file publishing: atomic writes, directory publishing and umask-true modes.

Every file a run publishes is written to a temporary file next to its target (a
unique ``.<name>.<random>.tmp``, so concurrent writers never share one), optionally
fsynced, given the mode the process umask gives a plain ``open(path, "w")`` and only
then renamed over the target: a reader sees the old file or the new one, never half
of one. A failure of any kind (``KeyboardInterrupt`` included) removes the temporary
file. :func:`publish_dir` does the same for a directory built in a temporary one.

Others may write a run directory, so nothing here follows a symbolic link at a run
file: a rename replaces the link itself, :func:`open_nofollow` (and
:func:`atomic_copy`, which reads through it) opens only a regular file that is no
link, and :func:`refuse_symlink` checks a path used by name (a directory, a store
file). Each raises :class:`UnsafePathError` naming the path.

This module is the bottom layer of the package: it imports nothing from emberfl but
:mod:`emberfl.crashpoints` (fault injection for tests, itself import-free).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal, overload

from emberfl.crashpoints import crash_point

__all__ = [
    "TEMP_SUFFIX",
    "UnsafePathError",
    "atomic_copy",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "current_umask",
    "dir_mode",
    "file_mode",
    "fsync_dir",
    "fsync_file",
    "is_temp_name",
    "make_temp_dir",
    "open_fd_nofollow",
    "open_nofollow",
    "publish_dir",
    "refuse_symlink",
]

#: Suffix of every temporary file and directory made here; names also start with ".".
TEMP_SUFFIX = ".tmp"

_PROC_STATUS = "/proc/self/status"
_fallback_lock = threading.Lock()
_fallback_umask: int | None = None


class UnsafePathError(OSError):
    """A run file is a symbolic link, or not a regular file: it is refused rather than
    followed, since others may write the run directory. The message names the path."""


def _symlink_error(path: str | os.PathLike[str]) -> UnsafePathError:
    return UnsafePathError(
        f"{os.fspath(path)} is a symbolic link; emberfl never opens a run file through "
        "one (remove it)"
    )


def refuse_symlink(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` exists, looked at without following it; :class:`UnsafePathError`
    when it is a symbolic link.

    For a path used by name afterwards (a directory, a store file the core maps);
    a file this process opens goes through :func:`open_nofollow` instead, which leaves
    no moment between the check and the open.
    """
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if stat.S_ISLNK(st.st_mode):
        raise _symlink_error(path)
    return True


def open_fd_nofollow(path: str | os.PathLike[str], flags: int, mode: int = 0o666) -> int:
    """``os.open(path, flags, mode)`` of a regular file, never through a symbolic link.

    A link planted in a run directory must not make a run read, truncate or append to
    a file elsewhere; :class:`UnsafePathError` names ``path`` when it is a link or not
    a regular file. The open does not block on a FIFO (``O_NONBLOCK``, cleared again).
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        # O_NOFOLLOW fails with ELOOP (EMLINK on FreeBSD) at a link.
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise _symlink_error(path) from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):  # a directory, a socket or FIFO
            raise UnsafePathError(f"{os.fspath(path)} is not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{os.fspath(path)} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@overload
def open_nofollow(
    path: str | os.PathLike[str],
    mode: Literal["rb"] = "rb",
    *,
    encoding: None = None,
    newline: None = None,
) -> IO[bytes]: ...


@overload
def open_nofollow(
    path: str | os.PathLike[str],
    mode: Literal["r", "a"],
    *,
    encoding: str = "utf-8",
    newline: str | None = None,
) -> IO[str]: ...


def open_nofollow(
    path: str | os.PathLike[str],
    mode: Literal["r", "rb", "a"] = "rb",
    *,
    encoding: str | None = None,
    newline: str | None = None,
) -> IO[Any]:
    """A file object of the regular file ``path``, opened without following a link (see
    :func:`open_fd_nofollow`): ``"rb"``, ``"r"`` (text, default UTF-8) or ``"a"``
    (append text to an existing file)."""
    flags = os.O_WRONLY | os.O_APPEND if mode == "a" else os.O_RDONLY
    fd = open_fd_nofollow(path, flags)
    try:
        if mode == "rb":
            return os.fdopen(fd, "rb")
        return os.fdopen(fd, mode, encoding=encoding or "utf-8", newline=newline)
    except BaseException:
        os.close(fd)
        raise


def current_umask() -> int:
    """The process umask, read without changing it.

    ``os.umask`` can only be read by setting it, which races with threads creating
    files at that moment; Linux shows it in ``/proc/self/status`` instead. Elsewhere
    the set-and-restore is done once, under a lock, and its result reused.
    """
    global _fallback_umask
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _fallback_lock:
        if _fallback_umask is None:
            mask = os.umask(0o022)
            os.umask(mask)
            _fallback_umask = mask
        return _fallback_umask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory under the current umask."""
    return 0o777 & ~current_umask()


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file or directory made by this module."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush the regular file ``path``'s data to the disk (never through a link)."""
    fd = open_fd_nofollow(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s entries (a rename or new file in it) to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@overload
def atomic_open(
    path: str | os.PathLike[str],
    mode: Literal["wb"] = "wb",
    *,
    durable: bool = False,
    encoding: None = None,
    newline: None = None,
) -> contextlib.AbstractContextManager[IO[bytes]]: ...


@overload
def atomic_open(
    path: str | os.PathLike[str],
    mode: Literal["w"],
    *,
    durable: bool = False,
    encoding: str = "utf-8",
    newline: str | None = None,
) -> contextlib.AbstractContextManager[IO[str]]: ...


def atomic_open(
    path: str | os.PathLike[str],
    mode: Literal["w", "wb"] = "wb",
    *,
    durable: bool = False,
    encoding: str | None = None,
    newline: str | None = None,
) -> contextlib.AbstractContextManager[IO[Any]]:
    """A file to write whose contents replace ``path`` when the ``with`` block ends.

    ``mode`` is ``"wb"`` or ``"w"`` (text, ``encoding`` default UTF-8). ``durable=True``
    fsyncs the file before the rename and the directory after it, so the new contents
    survive a power cut once the block has ended. If the block raises, ``path`` is
    left as it was and the temporary file is removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    if mode == "wb" and (encoding is not None or newline is not None):
        raise ValueError("encoding and newline apply to text mode ('w') only")
    return _atomic_open(Path(path), mode, durable, encoding or "utf-8", newline)


@contextlib.contextmanager
def _atomic_open(
    target: Path, mode: str, durable: bool, encoding: str, newline: str | None
) -> Iterator[IO[Any]]:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        try:
            # mkstemp makes the file 0600; a published file gets what the umask allows.
            os.fchmod(fd, file_mode())
            if mode == "wb":
                fh: IO[Any] = os.fdopen(fd, "wb")
            else:
                fh = os.fdopen(fd, "w", encoding=encoding, newline=newline)
        except BaseException:
            os.close(fd)  # not yet owned by a file object
            raise
        with fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        crash_point(f"write.{target.name}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> Path:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_open`); returns it."""
    with atomic_open(path, "wb", durable=durable) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(
    path: str | os.PathLike[str],
    text: str,
    *,
    durable: bool = False,
    encoding: str = "utf-8",
) -> Path:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_open`); returns it."""
    with atomic_open(path, "w", durable=durable, encoding=encoding, newline="") as fh:
        fh.write(text)
    return Path(path)


def atomic_copy(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, durable: bool = False
) -> Path:
    """Replace ``dst`` with a copy of ``src`` atomically (see :func:`atomic_open`).

    ``src`` is opened with :func:`open_nofollow`: a link there is refused, so no file
    elsewhere is ever copied to ``dst`` with the umask's mode.
    """
    with open_nofollow(src, "rb") as source, atomic_open(dst, "wb", durable=durable) as fh:
        shutil.copyfileobj(source, fh)
    return Path(dst)


def make_temp_dir(parent: str | os.PathLike[str], name: str) -> Path:
    """A new, uniquely named, empty temporary directory ``<parent>/.<name>.<random>.tmp``.

    Build a directory's contents in it, then :func:`publish_dir` it.
    """
    return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=parent))


def publish_dir(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, durable: bool = False
) -> Path:
    """Rename the directory ``source`` (see :func:`make_temp_dir`) to ``target``.

    ``source`` gets the mode ``mkdir`` would give it. An existing ``target`` is
    replaced: it is first moved into a temporary directory, removed once ``source``
    is in place, so a crash leaves either of them at ``target`` and the other under a
    temporary name. ``durable=True`` fsyncs ``source`` before the rename and the
    parent directory after it (the files in ``source`` are the caller's to fsync).
    On failure ``source`` is removed.
    """
    src, dst = Path(source), Path(target)
    old: Path | None = None
    try:
        os.chmod(src, dir_mode())
        if durable:
            fsync_dir(src)
        if dst.exists() or dst.is_symlink():
            old = make_temp_dir(dst.parent, f"{dst.name}.old")
            os.replace(dst, old / dst.name)
            crash_point(f"publish.{dst.name}")
        os.rename(src, dst)
    except BaseException:
        shutil.rmtree(src, ignore_errors=True)
        if old is not None and not dst.exists():
            # Put the previous directory back; if even that fails it stays under its
            # temporary name, for the caller's clean-up of leftovers to find.
            with contextlib.suppress(OSError):
                os.replace(old / dst.name, dst)
        if old is not None and not (old / dst.name).exists():
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if durable:
        fsync_dir(dst.parent)
    return dst
