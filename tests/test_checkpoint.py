"""Checkpoints and resume: every algorithm continues bitwise where it stopped."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emberfl.checkpoint import RunDirLock
from emberfl.cli import main
from emberfl.metrics import read_metrics
from emberfl.simulation import (
    ALGORITHMS,
    CheckpointError,
    ConfigError,
    RunDirLockedError,
    Simulation,
    SimulationConfig,
    latest_checkpoint,
    load_checkpoint,
    resume_simulation,
    run_simulation,
)

# Bitwise comparisons need one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

ModelBytes = Callable[[Path], dict[str, bytes]]

TINY: dict[str, Any] = {
    "clients": 6,
    "sample_ratio": 0.5,
    "rounds": 4,
    "epochs": 1,
    "lr": 0.1,
    "runtime": "thread",
    "workers": 2,
    "threads": 1,
    "progress": False,
    "checkpoint_every": 2,
    "seed": 3,
}


def run_partly(run_dir: Path, rounds: int, **settings: Any) -> None:
    """Run ``rounds`` rounds and stop as if killed (no final model)."""
    config = SimulationConfig.from_mapping({**TINY, **settings})
    with Simulation(config, run_dir) as simulation:
        for _ in range(rounds):
            simulation.run_round()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_continues_bitwise(algorithm: str, tmp_path: Path, model_bytes: ModelBytes) -> None:
    extra = {"server_lr": 0.1} if algorithm in ("fedadam", "fedyogi", "fedadagrad") else {}
    run_simulation(TINY, out=str(tmp_path / "ref"), algorithm=algorithm, **extra)
    # Three rounds: the third is lost, the run continues from the checkpoint of round 2.
    run_partly(tmp_path / "run", 3, algorithm=algorithm, **extra)
    assert load_checkpoint(tmp_path / "run").round == 2
    result = resume_simulation(tmp_path / "run")
    assert [m.round for m in result.metrics] == [3, 4]
    assert model_bytes(tmp_path / "run") == model_bytes(tmp_path / "ref")
    assert read_metrics(tmp_path / "run")["round"].tolist() == [1.0, 2.0, 3.0, 4.0]
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "checkpoint-4" in names and "checkpoint-2" not in names
    # Nothing hidden is left but the lock file, which stays with the directory.
    assert [n for n in names if n.startswith(".")] == [".lock"]


def test_resume_with_another_runtime_is_bitwise_identical(
    tmp_path: Path, model_bytes: ModelBytes
) -> None:
    run_simulation(TINY, out=str(tmp_path / "ref"), algorithm="scaffold")
    run_partly(tmp_path / "run", 2, algorithm="scaffold")
    resume_simulation(tmp_path / "run", runtime="serial")
    assert model_bytes(tmp_path / "run") == model_bytes(tmp_path / "ref")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["runtime"] == "serial"


def test_client_state_is_restored_to_the_checkpoint(tmp_path: Path) -> None:
    run_partly(tmp_path / "run", 3, algorithm="scaffold")
    saved = latest_checkpoint(tmp_path / "run")
    assert saved is not None
    at_checkpoint = {p.name: p.read_bytes() for p in (saved / "client_state").iterdir()}
    live = {p.name: p.read_bytes() for p in (tmp_path / "run" / "client_state").iterdir()}
    assert live != at_checkpoint  # round 3 changed some clients' controls
    with Simulation.for_resume(tmp_path / "run") as simulation:
        simulation.prepare()
        assert simulation.resumed_from == 2
        restored = {p.name: p.read_bytes() for p in (tmp_path / "run" / "client_state").iterdir()}
        assert restored == at_checkpoint


def test_without_a_checkpoint_the_run_starts_over(tmp_path: Path, model_bytes: ModelBytes) -> None:
    run_simulation(TINY, out=str(tmp_path / "ref"))
    run_partly(tmp_path / "run", 1)
    assert latest_checkpoint(tmp_path / "run") is None
    result = resume_simulation(tmp_path / "run")
    assert [m.round for m in result.metrics] == [1, 2, 3, 4]
    assert model_bytes(tmp_path / "run") == model_bytes(tmp_path / "ref")


def test_resume_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        resume_simulation(tmp_path)
    run_partly(tmp_path / "run", 2)
    with pytest.raises(ConfigError, match=r"only .* may change, not lr"):
        resume_simulation(tmp_path / "run", lr=0.5)
    (tmp_path / "run" / "latest").write_text("checkpoint-9\n")
    with pytest.raises(CheckpointError, match="checkpoint-9, which is missing"):
        resume_simulation(tmp_path / "run")
    (tmp_path / "run" / "latest").write_text("checkpoint-2\n")
    (tmp_path / "run" / "checkpoint-2" / "server.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match=r"server\.safetensors"):
        load_checkpoint(tmp_path / "run")


def test_a_finished_run_is_not_restarted_by_run(tmp_path: Path) -> None:
    run_partly(tmp_path / "run", 2)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_simulation(TINY, out=str(tmp_path / "run"))


def test_cli_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_partly(tmp_path / "run", 3)
    assert main(["resume", str(tmp_path / "run"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "resuming from round 2" in out and "after 4 rounds" in out
    assert main(["resume", str(tmp_path / "nowhere")]) == 2
    assert "no config.json" in capsys.readouterr().err
    argv = ["run", "--out", str(tmp_path / "c"), "--rounds", "2", "--clients", "6",
            "--sample-ratio", "0.5", "--runtime", "thread", "--checkpoint-every", "1",
            "-q"]  # fmt: skip
    assert main(argv) == 0
    assert load_checkpoint(tmp_path / "c").round == 2


# ----------------------------------------------------------- modes and one writer


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["022", "077"])
def test_run_directory_gets_the_umask_modes(tmp_path: Path, mask: int) -> None:
    from emberfl.plot import plot_runs

    before = os.umask(mask)
    try:
        run = tmp_path / "run"
        # One round and stop, resume to the end: the files of a resume are checked too.
        settings = {**TINY, "algorithm": "scaffold", "rounds": 2, "checkpoint_every": 1}
        with Simulation(SimulationConfig.from_mapping(settings), run) as simulation:
            simulation.run_round()
        resume_simulation(run)
        png = plot_runs([run], tmp_path / "plots" / "acc.png")
    finally:
        os.umask(before)
    paths = [run, *sorted(run.rglob("*")), png.parent, png]
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    for expected in ("run/config.json", "run/metrics.csv", "run/latest", "run/.lock",
                     "run/checkpoint-2/manifest.json", "run/checkpoint-2/metrics.csv",
                     "run/checkpoint-2/server.safetensors", "run/client_state",
                     "run/model.safetensors"):  # fmt: skip
        assert expected in names, expected
    modes = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}
    want = {name: oct((0o777 if (tmp_path / name).is_dir() else 0o666) & ~mask) for name in modes}
    assert modes == want


def test_one_writer_per_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_partly(run, 3)
    with Simulation.for_resume(run) as holder:
        holder.prepare()
        work = [p for p in run.iterdir() if p.name.startswith(".work-")]
        assert work and (run / ".lock").read_text().strip() == str(os.getpid())
        # A second writer, in this process or another, fails before touching anything:
        # the holder's scratch directory is still there.
        with pytest.raises(
            RunDirLockedError, match=rf"{re.escape(str(run))}.* process {os.getpid()}"
        ):
            Simulation.for_resume(run).prepare()
        with pytest.raises(RunDirLockedError) as info:
            run_simulation(TINY, out=str(run))
        assert info.value.pid == os.getpid() and info.value.run_dir == run
        assert all(p.is_dir() for p in work)
        holder.run()
    # Released on close; the lock file stays, and does not make a directory a run.
    assert (run / ".lock").is_file()
    assert resume_simulation(run).metrics == []
    # A lock file left by a holder that died is no run either, and no obstacle.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".lock").write_text("999999999\n")
    assert [m.round for m in run_simulation(TINY, out=str(fresh)).metrics] == [1, 2, 3, 4]


def test_cli_refuses_a_locked_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_partly(tmp_path / "run", 1)
    with RunDirLock(tmp_path / "run"):
        assert main(["resume", str(tmp_path / "run"), "-q"]) == 2
        err = capsys.readouterr().err
        assert f"process {os.getpid()}" in err and "Traceback" not in err
        assert err.count("\n") == 1 and str(tmp_path / "run") in err
        argv = ["run", "--out", str(tmp_path / "run"), "--runtime", "serial", "-q"]
        assert main(argv) == 2
        assert f"process {os.getpid()}" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "run"), "-q"]) == 0
