"""The run directory on disk: checkpoints, leftovers of interrupted runs, one writer.

A checkpoint, ``<run_dir>/checkpoint-<round>/``, is written crash-safely
(:func:`write_checkpoint`): into a temporary directory whose files and the directory
itself are fsynced, renamed into place (then the run directory is fsynced), and only
then named by ``latest`` (written by temp file + fsync + rename, see
:mod:`emberfl.fileio`). The previous checkpoint is deleted after that, so at every
instant ``latest`` names a complete checkpoint. A checkpoint holds
``server.safetensors`` (global model, round, the sampler's generators and the
algorithm's server state, see
:meth:`~emberfl.contrib.FedAvgBaseServerHandler.checkpoint_state`), a copy of
``metrics.csv`` up to its round, hard links to the client state files (those are
only ever replaced by rename, never rewritten, so a link keeps the state of the
checkpoint's round) and ``manifest.json``, written last.

:class:`RunDirLock` keeps one writer per run directory: an exclusive ``flock`` on
``<run_dir>/.lock``, which holds the holder's process id. The operating system
releases it when the holder exits or dies, so a crash never leaves a stale lock.

Others may write a run directory (it often lives on a shared file system), so no run
file is opened, copied, linked or deleted through a symbolic link: a link where a run
file, checkpoint or ``client_state`` belongs raises
:class:`~emberfl.fileio.UnsafePathError` naming it, and nothing is written through
it; the lock file must be a regular file of the user's own with no other name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from emberfl import __version__, store
from emberfl.crashpoints import crash_point
from emberfl.fileio import (
    UnsafePathError,
    atomic_copy,
    atomic_write_text,
    fsync_dir,
    fsync_file,
    is_temp_name,
    make_temp_dir,
    open_fd_nofollow,
    open_nofollow,
    publish_dir,
    refuse_symlink,
)
from emberfl.metrics import METRICS_FILE
from emberfl.runtimes.common import set_rounds_run

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "LATEST_FILE",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "SERVER_FILE",
    "STATE_DIR",
    "WORK_PREFIX",
    "CheckpointError",
    "CheckpointInfo",
    "RunDirLock",
    "RunDirLockedError",
    "latest_checkpoint",
    "load_checkpoint",
    "load_server_state",
    "read_manifest",
    "remove_leftovers",
    "restore_files",
    "restore_run",
    "write_checkpoint",
]

MODEL_FILE = "model.safetensors"
STATE_DIR = "client_state"
LATEST_FILE = "latest"
CHECKPOINT_PREFIX = "checkpoint-"
SERVER_FILE = "server.safetensors"
MANIFEST_FILE = "manifest.json"
WORK_PREFIX = ".work-"
LOCK_FILE = ".lock"
CHECKPOINT_FORMAT = 1

_CHECKPOINT_RE = re.compile(r"checkpoint-(0|[1-9][0-9]*)")
_STATE_FILE_RE = re.compile(r"(0|[1-9][0-9]*)\.safetensors")


class CheckpointError(ValueError):
    """A run directory holds no usable checkpoint; the message names the file."""


# ------------------------------------------------------------------------ reading


@dataclass
class CheckpointInfo:
    """A loaded checkpoint: its directory, round, manifest and server state tensors."""

    path: Path
    round: int
    manifest: dict[str, Any]
    state: dict[str, torch.Tensor]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint directory ``<run_dir>/latest`` names, or ``None`` when there is none.

    Raises :class:`CheckpointError` when ``latest`` names a missing or incomplete one.
    """
    directory = Path(run_dir)
    pointer = directory / LATEST_FILE
    try:
        with open_nofollow(pointer, "r", encoding="utf-8") as fh:
            name = fh.read().strip()
    except FileNotFoundError:
        return None
    if _CHECKPOINT_RE.fullmatch(name) is None:
        raise CheckpointError(f"{pointer} does not name a checkpoint: {name[:80]!r}")
    path = directory / name
    manifest = path / MANIFEST_FILE
    if not (refuse_symlink(path) and refuse_symlink(manifest) and manifest.is_file()):
        raise CheckpointError(f"{pointer} names {path}, which is missing or incomplete")
    return path


def load_checkpoint(run_dir: str | os.PathLike[str]) -> CheckpointInfo:
    """Read and check the last checkpoint of ``run_dir`` (see :func:`latest_checkpoint`)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{Path(run_dir) / LATEST_FILE} does not exist: no checkpoint")
    manifest = read_manifest(path)
    state = load_server_state(path)
    saved = state.get("round")
    if saved is None or saved.numel() != 1 or int(saved.item()) != manifest.get("round"):
        raise CheckpointError(f"{path}: the round of {SERVER_FILE} and {MANIFEST_FILE} differ")
    return CheckpointInfo(path=path, round=int(manifest["round"]), manifest=manifest, state=state)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the checkpoint directory ``path``, checked for format and round."""
    file = path / MANIFEST_FILE
    try:
        with open_nofollow(file, "r", encoding="utf-8") as fh:
            manifest = json.loads(fh.read())
    except UnsafePathError:
        raise
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file} is not a format-{CHECKPOINT_FORMAT} checkpoint manifest")
    if not isinstance(manifest.get("round"), int):
        raise CheckpointError(f"{file} has no round")
    return manifest


def load_server_state(path: Path) -> dict[str, torch.Tensor]:
    """The server state tensors of the checkpoint directory ``path``, read into memory:
    a resumed run keeps them for its whole life, and a mapping would die with SIGBUS if
    the file were rewritten in place meanwhile."""
    refuse_symlink(path / SERVER_FILE)  # the core opens it by name
    try:
        return store.load(path / SERVER_FILE, copy=True)
    except (OSError, store.StoreError) as exc:
        raise CheckpointError(f"cannot load {path / SERVER_FILE}: {exc}") from exc


# ------------------------------------------------------------------------ writing


def write_checkpoint(
    run_dir: Path,
    state: Mapping[str, torch.Tensor],
    *,
    round: int,
    rounds: int,
    algorithm: str,
    seed: int,
    hook: Callable[[str, int], None] | None = None,
) -> Path:
    """Write ``<run_dir>/checkpoint-<round>`` crash-safely and point ``latest`` at it.

    ``state`` is the server's (:meth:`checkpoint_state`); ``metrics.csv`` and the
    client state files of ``run_dir`` are saved with it. ``hook(stage, round)`` is
    called at the stages ``"written"`` (files complete, not yet renamed into place),
    ``"renamed"`` (in place, ``latest`` not yet updated) and ``"done"``. The previous
    checkpoint is removed only once the new one is complete and named.
    """
    name = f"{CHECKPOINT_PREFIX}{round}"
    tmp = make_temp_dir(run_dir, name)
    try:
        crash_point("checkpoint.begin")
        store.save(
            tmp / SERVER_FILE,
            state,
            metadata={"algorithm": algorithm, "round": str(round)},
            durable=True,
        )
        crash_point("checkpoint.server")
        metrics = run_dir / METRICS_FILE
        if refuse_symlink(metrics):
            # Rows are flushed as they are written: the file holds every row so far.
            atomic_copy(metrics, tmp / METRICS_FILE, durable=True)
        crash_point("checkpoint.metrics")
        state_dir = run_dir / STATE_DIR
        if refuse_symlink(state_dir) and state_dir.is_dir():
            _link_state_files(state_dir, tmp / STATE_DIR)
        crash_point("checkpoint.state")
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "round": round,
            "rounds": rounds,
            "algorithm": algorithm,
            "seed": seed,
            "emberfl_version": __version__,
        }
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n", durable=True)
        crash_point("checkpoint.written")
        if hook is not None:
            hook("written", round)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # An existing checkpoint-<round> was left by a run killed before it named it
    # (never current): it is replaced.
    final = publish_dir(tmp, run_dir / name, durable=True)
    crash_point("checkpoint.renamed")
    if hook is not None:
        hook("renamed", round)
    atomic_write_text(run_dir / LATEST_FILE, name + "\n", durable=True)
    crash_point("checkpoint.latest")
    for entry in os.scandir(run_dir):
        # A link of that name is no checkpoint: what it points to is not deleted.
        if (
            entry.name != name
            and _CHECKPOINT_RE.fullmatch(entry.name)
            and entry.is_dir(follow_symlinks=False)
        ):
            _remove_checkpoint(Path(entry.path))
    crash_point("checkpoint.done")
    if hook is not None:
        hook("done", round)
    return final


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint that ``latest`` no longer names, entry by entry (so that a
    test can kill the run between two: ``checkpoint.prune``)."""
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            crash_point("checkpoint.prune")
    shutil.rmtree(path, ignore_errors=True)


def _link_state_files(src: Path, dst: Path) -> None:
    """Hard-link (or, across file systems, copy) the client state files of ``src``; a
    symbolic link among them is refused, neither linked nor copied."""
    dst.mkdir(exist_ok=True)
    for entry in os.scandir(src):
        if _STATE_FILE_RE.fullmatch(entry.name) is None:
            continue  # e.g. the temporary file of a write in progress
        if not (refuse_symlink(entry.path) and entry.is_file(follow_symlinks=False)):
            continue
        target = dst / entry.name
        try:
            os.link(entry.path, target, follow_symlinks=False)
        except OSError:
            atomic_copy(entry.path, target)
        fsync_file(target)
    fsync_dir(dst)


def _replace_state_dir(target: Path, source: Path | None) -> None:
    """Make ``target`` a copy (hard links) of the state files in ``source``, or empty."""
    fresh = make_temp_dir(target.parent, target.name)
    try:
        if source is not None:
            _link_state_files(source, fresh)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    publish_dir(fresh, target, durable=True)


def restore_files(run_dir: Path, checkpoint: Path | None) -> None:
    """Bring the files of ``run_dir`` back to ``checkpoint`` (``None``: to before round 1).

    ``metrics.csv`` and the client state become the checkpoint's; the final model,
    from a later round, is removed (it is written again at the end of the run). A
    symbolic link at any of these files, in ``run_dir`` or the checkpoint, is refused.
    """
    metrics = run_dir / METRICS_FILE
    state_dir = run_dir / STATE_DIR
    for path in (metrics, state_dir, run_dir / MODEL_FILE):
        refuse_symlink(path)
    saved_metrics = None if checkpoint is None else checkpoint / METRICS_FILE
    if saved_metrics is not None and refuse_symlink(saved_metrics):
        atomic_copy(saved_metrics, metrics, durable=True)
    else:
        metrics.unlink(missing_ok=True)
    crash_point("restore.metrics")
    saved_state = None if checkpoint is None else checkpoint / STATE_DIR
    if saved_state is not None and not (refuse_symlink(saved_state) and saved_state.is_dir()):
        saved_state = None
    if saved_state is not None or state_dir.exists():
        _replace_state_dir(state_dir, saved_state)
    (run_dir / MODEL_FILE).unlink(missing_ok=True)


def remove_leftovers(run_dir: Path) -> None:
    """Delete what an interrupted run left in ``run_dir``: scratch directories,
    unfinished checkpoints and temporary files, and checkpoints ``latest`` does not name.

    The lock file stays: the caller holds it. A link of a stale name is removed itself,
    never what it points to; a symbolic link at ``client_state`` is refused.
    """
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    current = latest_checkpoint(run_dir)
    state_dir = run_dir / STATE_DIR
    has_state = refuse_symlink(state_dir) and state_dir.is_dir()
    for entry in os.scandir(run_dir):
        if entry.name == LOCK_FILE:
            continue
        stale = (
            entry.name.startswith(WORK_PREFIX)
            or is_temp_name(entry.name)
            or (
                _CHECKPOINT_RE.fullmatch(entry.name) is not None
                and (current is None or entry.name != current.name)
            )
        )
        if not stale:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
    if has_state:
        for entry in os.scandir(state_dir):
            if is_temp_name(entry.name):
                Path(entry.path).unlink(missing_ok=True)


# --------------------------------------------------------------------------- lock


class RunDirLockedError(RuntimeError):
    """Another process is writing the run directory (running or resuming it)."""

    def __init__(self, run_dir: Path, pid: int | None) -> None:
        self.run_dir = run_dir
        self.pid = pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"{run_dir} is in use by {holder} (it holds {run_dir / LOCK_FILE}); "
            "wait for it to finish or stop it, then try again"
        )


class RunDirLock:
    """An exclusive lock on a run directory, held from :meth:`acquire` to :meth:`release`.

    ``flock`` on ``<run_dir>/.lock``: one holder per directory, across processes and
    within one (a second lock in the same process fails too). The file stays when the
    lock is released; removing it could let two processes lock two different files.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock; :class:`RunDirLockedError` naming the holder when it is taken.

        The lock file is truncated and written, so it is checked first: no symbolic
        link, a regular file, the user's own and no other file's name (a hard link), else
        :class:`~emberfl.fileio.UnsafePathError` naming it.
        """
        if self._fd is not None:
            return
        fd = open_fd_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _check_own_file(self.path, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirLockedError(self.run_dir, _holder_pid(fd)) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self, *, remove: bool = False) -> None:
        """Release the lock; ``remove=True`` also deletes the lock file (only for a run
        directory about to be removed)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if remove:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __del__(self) -> None:
        # Best effort only: release() (or close() of the simulation) is the contract.
        fd = getattr(self, "_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _check_own_file(path: Path, fd: int) -> None:
    """:class:`UnsafePathError` unless the open file ``fd`` (at ``path``) is the user's
    own and has no other name, so that writing it cannot change another file."""
    st = os.fstat(fd)
    uid = os.getuid()
    if st.st_uid != uid:
        raise UnsafePathError(
            f"{path} belongs to user {st.st_uid}, not to this user ({uid}); a run "
            "directory's lock file must be its writer's own (remove it)"
        )
    if st.st_nlink > 1:
        raise UnsafePathError(
            f"{path} has {st.st_nlink} links: it is another file's name too (remove it)"
        )


def _holder_pid(fd: int, wait: float = 0.5) -> int | None:
    """The pid written in the lock file; the holder writes it just after locking, so a
    lock taken a moment ago may need a short wait."""
    deadline = time.monotonic() + wait
    while True:
        with contextlib.suppress(OSError, ValueError):
            text = os.pread(fd, 32, 0).decode("ascii").strip()
            if text:
                return int(text)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def restore_run(run_dir: Path, algorithm: str, handler: Any, trainer: object) -> int | None:
    """Bring ``run_dir``, the server ``handler`` and the client ``trainer`` back to the
    last checkpoint of an ``algorithm`` run; returns its round (None: no checkpoint, the
    run starts over)."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        logger.info("%s has no checkpoint: the run starts over", run_dir)
        restore_files(run_dir, None)
        return None
    manifest = read_manifest(checkpoint)
    if manifest.get("algorithm") != algorithm:
        raise CheckpointError(
            f"{checkpoint} was written by a {manifest.get('algorithm')!r} run, not {algorithm!r}"
        )
    state = load_server_state(checkpoint)
    try:
        handler.load_checkpoint_state(state)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{checkpoint / SERVER_FILE} does not fit this run: {exc}") from exc
    round_: int = handler.round
    set_rounds_run(trainer, round_)  # the clients' random streams continue from there
    restore_files(run_dir, checkpoint)
    logger.info("resuming %s from round %d", run_dir, round_)
    return round_
