"""A run directory others can write: no run file is opened, copied, linked or deleted
through a symbolic link, and the lock file must be the user's own regular file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from emberfl.checkpoint import (
    RunDirLock,
    latest_checkpoint,
    remove_leftovers,
    restore_files,
    write_checkpoint,
)
from emberfl.cli import main
from emberfl.contrib import ClientStateStore
from emberfl.fileio import UnsafePathError, atomic_copy, open_nofollow
from emberfl.metrics import BASE_COLUMNS, MetricsWriter, read_metrics
from emberfl.simulation import Simulation, SimulationConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot a real key\n"

TINY: dict[str, Any] = {
    "algorithm": "scaffold",
    "clients": 6,
    "sample_ratio": 0.5,
    "rounds": 4,
    "epochs": 1,
    "lr": 0.1,
    "runtime": "serial",
    "threads": 1,
    "progress": False,
    "checkpoint_every": 2,
    "seed": 3,
}


def symlinked(path: Path) -> str:
    """The start of the error for a symbolic link at ``path``, as a pattern."""
    return rf"{re.escape(str(path))} is a symbolic link"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SCAFFOLD run stopped after round 3 as if killed: checkpoint-2, with client state."""
    run = tmp_path_factory.mktemp("template") / "run"
    with Simulation(SimulationConfig.from_mapping(TINY), run) as simulation:
        for _ in range(3):
            simulation.run_round()
    return run


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template run."""
    copy = tmp_path / "run"
    shutil.copytree(template, copy, symlinks=True)
    return copy


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A private file of the user, outside the run directory."""
    path = tmp_path / "home" / "id_ed25519"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def link(path: Path, target: Path) -> None:
    """Put a symbolic link to ``target`` where ``path`` is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.symlink_to(target)


def moved_out(path: Path, tmp_path: Path) -> Path:
    """Move ``path`` out of the run directory and leave a symbolic link to it in its place."""
    away = tmp_path / "elsewhere" / path.name
    away.parent.mkdir(exist_ok=True)
    os.rename(path, away)
    path.symlink_to(away)
    return away


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ the lock file


def test_a_symlinked_lock_file_is_refused_and_its_target_kept(run: Path, victim: Path) -> None:
    link(run / ".lock", victim)
    lock = RunDirLock(run)
    with pytest.raises(UnsafePathError, match=symlinked(run / ".lock")):
        lock.acquire()
    assert not lock.held
    assert victim.read_bytes() == SECRET


def test_a_dangling_lock_symlink_creates_nothing(run: Path, tmp_path: Path) -> None:
    target = tmp_path / "home" / ".bashrc"
    target.parent.mkdir()
    link(run / ".lock", target)
    with pytest.raises(UnsafePathError, match=symlinked(run / ".lock")):
        RunDirLock(run).acquire()
    assert not target.exists()


def test_a_hard_linked_lock_file_is_refused(run: Path, victim: Path) -> None:
    (run / ".lock").unlink()
    os.link(victim, run / ".lock")
    with pytest.raises(UnsafePathError, match=rf"{re.escape(str(run / '.lock'))} has 2 links"):
        RunDirLock(run).acquire()
    assert victim.read_bytes() == SECRET


def test_a_lock_file_of_another_user_is_refused(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (run / ".lock").read_bytes()
    owner = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)
    with pytest.raises(
        UnsafePathError, match=rf"{re.escape(str(run / '.lock'))} belongs to user {owner}, "
    ):
        RunDirLock(run).acquire()
    assert (run / ".lock").read_bytes() == before


def test_a_lock_that_is_no_regular_file_is_refused(run: Path) -> None:
    (run / ".lock").unlink()
    os.mkfifo(run / ".lock")
    with pytest.raises(UnsafePathError, match=r"\.lock is not a regular file"):
        RunDirLock(run).acquire()


def test_cli_resume_refuses_a_symlinked_lock_file(
    run: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link(run / ".lock", victim)
    assert main(["resume", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(symlinked(run / ".lock"), err)
    assert victim.read_bytes() == SECRET


# ------------------------------------------------------- latest, config, checkpoints


def test_a_symlinked_latest_is_refused(run: Path, tmp_path: Path) -> None:
    moved_out(run / "latest", tmp_path)
    with pytest.raises(UnsafePathError, match=symlinked(run / "latest")):
        latest_checkpoint(run)


def test_a_symlinked_checkpoint_directory_is_refused(run: Path, tmp_path: Path) -> None:
    moved_out(run / "checkpoint-2", tmp_path)
    with pytest.raises(UnsafePathError, match=symlinked(run / "checkpoint-2")):
        latest_checkpoint(run)


def test_resume_refuses_a_symlinked_config(run: Path, tmp_path: Path) -> None:
    moved_out(run / "config.json", tmp_path)
    with pytest.raises(UnsafePathError, match=symlinked(run / "config.json")):
        Simulation.for_resume(run)


@pytest.mark.parametrize("name", ["server.safetensors", "manifest.json", "metrics.csv"])
def test_resume_refuses_symlinked_checkpoint_files(run: Path, tmp_path: Path, name: str) -> None:
    moved_out(run / "checkpoint-2" / name, tmp_path)
    before = tree(run)
    with (
        pytest.raises(UnsafePathError, match=symlinked(run / "checkpoint-2" / name)),
        Simulation.for_resume(run) as simulation,
    ):
        simulation.prepare()
    # The lock file and config.json are the resume's own (written by rename).
    own = {".lock", "config.json"}
    after = tree(run)
    assert {k: v for k, v in after.items() if k not in own} == {
        k: v for k, v in before.items() if k not in own
    }


def test_cli_resume_does_not_copy_a_symlinked_checkpoint_file(run: Path, victim: Path) -> None:
    link(run / "checkpoint-2" / "metrics.csv", victim)
    metrics = (run / "metrics.csv").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "emberfl", "resume", str(run), "-q"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.search(symlinked(run / "checkpoint-2" / "metrics.csv"), lines[0])
    assert (run / "metrics.csv").read_bytes() == metrics
    assert victim.read_bytes() == SECRET


# ----------------------------------------------------------------------- metrics.csv


def bare_run(tmp_path: Path) -> Path:
    run = tmp_path / "bare"
    run.mkdir()
    return run


def checkpoint_of(run: Path, round: int = 1) -> Path:
    return write_checkpoint(
        run, {"round": torch.tensor(round)}, round=round, rounds=9, algorithm="scaffold", seed=0
    )


def test_a_symlinked_metrics_file_is_not_copied_into_a_checkpoint(
    tmp_path: Path, victim: Path
) -> None:
    run = bare_run(tmp_path)
    link(run / "metrics.csv", victim)
    with pytest.raises(UnsafePathError, match=symlinked(run / "metrics.csv")):
        checkpoint_of(run)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv"]


def test_resume_refuses_a_symlinked_metrics_file(run: Path, victim: Path) -> None:
    link(run / "metrics.csv", victim)
    with (
        pytest.raises(UnsafePathError, match=symlinked(run / "metrics.csv")),
        Simulation.for_resume(run) as simulation,
    ):
        simulation.prepare()
    assert (run / "metrics.csv").is_symlink() and victim.read_bytes() == SECRET


def test_the_metrics_writer_does_not_append_through_a_symlink(tmp_path: Path, victim: Path) -> None:
    header = ",".join(BASE_COLUMNS) + "\n"
    victim.write_text(header)
    run = bare_run(tmp_path)
    link(run / "metrics.csv", victim)
    with pytest.raises(UnsafePathError, match=symlinked(run / "metrics.csv")):
        MetricsWriter(run, tensorboard=False, resume=True)
    assert victim.read_text() == header


def test_reading_the_metrics_of_a_run_refuses_a_symlink(tmp_path: Path, victim: Path) -> None:
    run = bare_run(tmp_path)
    link(run / "metrics.csv", victim)
    with pytest.raises(UnsafePathError, match=symlinked(run / "metrics.csv")):
        read_metrics(run)


def test_pruning_removes_a_symlinked_checkpoint_name_not_its_target(tmp_path: Path) -> None:
    run = bare_run(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work\n")
    (run / "checkpoint-1").symlink_to(precious, target_is_directory=True)
    checkpoint_of(run, 2)
    assert (precious / "thesis.tex").read_text() == "years of work\n"
    remove_leftovers(run)
    assert not (run / "checkpoint-1").is_symlink()
    assert (precious / "thesis.tex").read_text() == "years of work\n"


# ---------------------------------------------------------------------- client_state


def outside_state(tmp_path: Path) -> Path:
    """A directory of valid client state files outside the run directory."""
    outside = tmp_path / "outside-state"
    ClientStateStore(outside).save(0, {"control": torch.ones(3)})
    return outside


def test_a_symlinked_state_file_is_neither_linked_nor_read(tmp_path: Path) -> None:
    run = bare_run(tmp_path)
    states = ClientStateStore(run / "client_state")
    outside = outside_state(tmp_path)
    (run / "client_state" / "0.safetensors").symlink_to(outside / "0.safetensors")
    with pytest.raises(UnsafePathError, match=symlinked(run / "client_state" / "0.safetensors")):
        checkpoint_of(run)
    assert sorted(p.name for p in run.iterdir()) == ["client_state"]
    with pytest.raises(UnsafePathError, match=symlinked(states.path(0))):
        states.load(0)


def test_restore_refuses_a_symlinked_state_file_of_the_checkpoint(
    run: Path, tmp_path: Path
) -> None:
    saved = run / "checkpoint-2" / "client_state"
    name = sorted(p.name for p in saved.iterdir())[0]
    away = moved_out(saved / name, tmp_path)
    with pytest.raises(UnsafePathError, match=symlinked(saved / name)):
        restore_files(run, run / "checkpoint-2")
    assert not any(os.path.samefile(p, away) for p in (run / "client_state").iterdir())


def test_a_symlinked_client_state_directory_is_refused(run: Path, tmp_path: Path) -> None:
    outside = outside_state(tmp_path)
    (outside / ".0.safetensors.a1b2c3.tmp").write_bytes(b"someone else's")
    before = tree(outside)
    link(run / "client_state", outside)
    state_dir = symlinked(run / "client_state")
    with pytest.raises(UnsafePathError, match=state_dir):
        remove_leftovers(run)
    with pytest.raises(UnsafePathError, match=state_dir):
        checkpoint_of(run, 7)
    with pytest.raises(UnsafePathError, match=state_dir):
        restore_files(run, run / "checkpoint-2")
    with pytest.raises(UnsafePathError, match=state_dir):
        ClientStateStore(run / "client_state")
    assert tree(outside) == before
    assert not (run / "checkpoint-7").exists() and (run / "client_state").is_symlink()


def test_cli_run_does_not_write_state_into_a_symlinked_client_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    run = bare_run(tmp_path)
    (run / "client_state").symlink_to(outside, target_is_directory=True)
    argv = ["run", "--algorithm", "scaffold", "--runtime", "serial", "--clients", "4",
            "--sample-ratio", "0.5", "--rounds", "1", "--threads", "1", "--no-progress", "-q",
            "--out", str(run)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(symlinked(run / "client_state"), err)
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------- helpers


def test_atomic_copy_refuses_a_symlinked_source(tmp_path: Path, victim: Path) -> None:
    link(tmp_path / "src", victim)
    with pytest.raises(UnsafePathError, match=symlinked(tmp_path / "src")):
        atomic_copy(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_open_nofollow_does_not_block_on_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafePathError, match=r"fifo is not a regular file"):
        open_nofollow(tmp_path / "fifo", "rb")
