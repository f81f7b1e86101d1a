"""Kill -9 at every step a run writes, resume, and compare with an uninterrupted run.

A random kill lands where the timing puts it and rarely in a window a few
microseconds wide; these tests stop ``emberfl run`` exactly at each fault-injection
point of :mod:`emberfl.crashpoints` instead (``EMBERFL_CRASH_AT=<point>:<n>`` sends
SIGKILL to its whole process group, workers included, the ``n``-th time it passes
``<point>``), then ``emberfl resume`` it, in some cases killing the resume too, and
check that the final ``model.safetensors`` has the bytes of an uninterrupted run's and
``metrics.csv`` its rows (every column but the timings).

Every point is swept for FedAvg, in the serial runtime (where a kill mid-round lands
at one exact client); the delicate ones (mid-round, between the rename and
``latest``, the pruning, the restore itself) also for SCAFFOLD (client state files
rewritten after the checkpoint) and FedAdam (server moments), and in the process
runtime with two workers. The sweep is ``slow`` (about 3 minutes of CPU time, most of it
interpreters starting); a few cases run without that mark.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import faults_helpers as fh
from emberfl.crashpoints import CRASH_ENV, POINTS
from emberfl.simulation import load_checkpoint

pytestmark = [pytest.mark.faults]

ROUNDS = 5
#: 10 clients, 3 a round, a checkpoint every round (as in the report that led here).
BASE_ARGS = (
    "--dataset",
    "digits",
    "--clients",
    "10",
    "--sample-ratio",
    "0.3",
    "--rounds",
    str(ROUNDS),
    "--epochs",
    "1",
    "--seed",
    "7",
    "--checkpoint-every",
    "1",
    "--threads",
    "1",
    "--no-progress",
    "-q",
)
SERIAL = ("--runtime", "process", "--workers", "0")
PROCESS = ("--runtime", "process", "--workers", "2")
#: The last round has no checkpoint: a resume runs it again after its model was written.
EVERY_2 = (*SERIAL, "--checkpoint-every", "2")
RUNTIME_NAMES = {SERIAL: "serial", PROCESS: "process", EVERY_2: "serial-every2"}
#: The columns that do not depend on the model: wall-clock times.
TIMING_COLUMNS = {"round_seconds", "client_train_seconds_mean", "client_train_seconds_max"}

#: Every point, with the pass to kill at (3 clients a round, a checkpoint per round;
#: ``checkpoint.prune`` passes once per entry of the checkpoint it deletes).
FEDAVG_CASES: tuple[str, ...] = (
    "simulation.setup:1",  # config.json written, the data not loaded yet
    "write.metrics.csv:1",  # the header
    "round.client:1",  # before any checkpoint: the resume starts over
    "round.client:8",  # round 3, after checkpoint 2
    "metrics.row:1",
    "metrics.row:3",
    "checkpoint.begin:3",
    "checkpoint.server:3",
    "checkpoint.metrics:3",
    "write.metrics.csv:4",  # the copy into checkpoint 3's directory
    "write.manifest.json:3",
    "checkpoint.written:3",
    "checkpoint.renamed:1",  # no previous checkpoint, no `latest` yet
    "checkpoint.renamed:3",
    "write.latest:3",
    "checkpoint.latest:3",
    "checkpoint.prune:1",
    "checkpoint.prune:5",
    "checkpoint.done:3",
    "checkpoint.renamed:5",  # the final checkpoint, before `latest`
    "simulation.model:1",  # the final model written, the run not yet closed
)

Case = tuple[str, tuple[str, ...], tuple[str, ...]]

#: (algorithm, runtime, the kill of the run, then the kills of the resumes).
DELICATE_CASES: tuple[Case, ...] = (
    ("scaffold", SERIAL, ("round.client:8",)),  # 2 of round 3's state files rewritten
    ("scaffold", SERIAL, ("checkpoint.state:3",)),
    ("scaffold", SERIAL, ("checkpoint.renamed:3",)),
    ("scaffold", SERIAL, ("checkpoint.prune:6",)),
    # Resumes killed while they restore the files, then mid-round: resumed three times.
    ("scaffold", SERIAL, ("round.client:8", "publish.client_state:1", "round.client:2")),
    ("scaffold", SERIAL, ("round.client:11", "restore.metrics:1", "write.metrics.csv:1")),
    ("fedadam", SERIAL, ("checkpoint.renamed:3",)),
    ("fedadam", SERIAL, ("metrics.row:3", "round.client:2")),
    ("fedavg", EVERY_2, ("simulation.model:1",)),
    # Workers die with the group; state files are written by them.
    ("fedavg", PROCESS, ("round.client:8",)),
    ("scaffold", PROCESS, ("round.client:5", "publish.client_state:1", "round.client:4")),
)

#: The cases that run without ``slow``.
QUICK_CASES: tuple[Case, ...] = (
    ("fedavg", SERIAL, ("checkpoint.renamed:3", "checkpoint.latest:1")),
    ("scaffold", SERIAL, ("round.client:8", "publish.client_state:1")),
    ("fedadam", SERIAL, ("checkpoint.prune:5",)),
)


def case_id(case: Case) -> str:
    algorithm, runtime, kills = case
    return "-".join([algorithm, RUNTIME_NAMES[runtime], *kills])


def emberfl(*args: str, crash: str | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run ``python -m emberfl ARGS`` in a process group of its own; with ``crash``,
    armed to kill itself there. Returns the exit status and stderr, once no process of
    the group is left."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash is not None:
        env[CRASH_ENV] = crash
    proc = subprocess.Popen(
        [sys.executable, "-m", "emberfl", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert _group_gone(proc.pid), f"processes of the group of {args} outlived it"
    return proc.returncode, err


def _group_gone(pgid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        if not alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def run_args(algorithm: str, runtime: tuple[str, ...], out: Path) -> list[str]:
    return ["run", *BASE_ARGS, *runtime, "--algorithm", algorithm, "--out", str(out)]


def model_columns(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` as written (exact reprs), without the timings."""
    with (run_dir / "metrics.csv").open(newline="", encoding="utf-8") as fh_:
        return [
            {k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(fh_)
        ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """``reference(algorithm)``: the directory of an uninterrupted run (made once).

    The serial and the process runtime give the same bits, so one run serves both.
    """
    made: dict[str, Path] = {}

    def get(algorithm: str) -> Path:
        if algorithm not in made:
            out = tmp_path_factory.mktemp("reference") / algorithm
            code, err = emberfl(*run_args(algorithm, SERIAL, out))
            assert code == 0, err
            made[algorithm] = out
        return made[algorithm]

    yield get


def kill_and_resume(
    reference: Path, run: Path, algorithm: str, runtime: tuple[str, ...], kills: tuple[str, ...]
) -> None:
    """Run, killed at ``kills[0]``; resume, killed at each later one; resume to the end;
    then compare with ``reference``."""
    args = run_args(algorithm, runtime, run)
    code, err = emberfl(*args, crash=kills[0])
    assert code == -signal.SIGKILL, f"the run passed no {kills[0]} (exit {code}): {err}"
    for point in kills[1:]:
        code, err = emberfl("resume", str(run), crash=point)
        assert code == -signal.SIGKILL, f"the resume passed no {point} (exit {code}): {err}"
    code, err = emberfl("resume", str(run))
    assert code == 0, f"resume after {kills} failed: {err}"
    assert model_columns(run) == model_columns(reference), f"metrics after {kills}"
    assert (run / "model.safetensors").read_bytes() == (
        reference / "model.safetensors"
    ).read_bytes(), f"the final model after {kills} differs from an uninterrupted run's"
    every = [int(args[i + 1]) for i, a in enumerate(args) if a == "--checkpoint-every"][-1]
    last = ROUNDS - ROUNDS % every  # the last flag given wins
    assert load_checkpoint(run).round == last
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{last}"]
    assert fh.temp_leftovers(run) == []


def test_every_point_is_swept() -> None:
    swept = {c.rpartition(":")[0] for c in FEDAVG_CASES}
    for _, _, kills in DELICATE_CASES + QUICK_CASES:
        swept.update(k.rpartition(":")[0] for k in kills)
    assert set(POINTS) <= swept, f"points never swept: {sorted(set(POINTS) - swept)}"


def test_crash_point_kills_its_process_group_only_when_armed() -> None:
    code = "from emberfl.crashpoints import crash_point as c; c('x'); c('y'); c('y'); print('on')"
    for spec, expected in ((None, 0), ("y:3", 0), ("y:2", -signal.SIGKILL), ("y", -signal.SIGKILL)):
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        if spec is not None:
            env[CRASH_ENV] = spec
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, start_new_session=True, capture_output=True
        )
        assert proc.returncode == expected, (spec, proc.stderr)


@pytest.mark.slow
def test_killed_before_its_config_is_written_is_run_again(
    tmp_path: Path, reference: Callable[[str], Path]
) -> None:
    """Killed before ``config.json`` exists (the first thing written), a run cannot be
    resumed: the resume says so, and the run started again gives the same result."""
    run = tmp_path / "run"
    args = run_args("fedavg", SERIAL, run)
    code, err = emberfl(*args, crash="write.config.json:1")
    assert code == -signal.SIGKILL, err
    code, err = emberfl("resume", str(run))
    assert code == 2 and "no config.json" in err, err
    code, err = emberfl(*args)
    assert code == 0, err
    assert (run / "model.safetensors").read_bytes() == (
        reference("fedavg") / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    ("algorithm", "runtime", "kills"), QUICK_CASES, ids=map(case_id, QUICK_CASES)
)
def test_killed_at_a_point_then_resumed_is_bitwise_identical(
    tmp_path: Path,
    reference: Callable[[str], Path],
    algorithm: str,
    runtime: tuple[str, ...],
    kills: tuple[str, ...],
) -> None:
    kill_and_resume(reference(algorithm), tmp_path / "run", algorithm, runtime, kills)


@pytest.mark.slow
@pytest.mark.parametrize("point", FEDAVG_CASES)
def test_sweep_fedavg_every_point(
    tmp_path: Path, reference: Callable[[str], Path], point: str
) -> None:
    kill_and_resume(reference("fedavg"), tmp_path / "run", "fedavg", SERIAL, (point,))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "runtime", "kills"), DELICATE_CASES, ids=map(case_id, DELICATE_CASES)
)
def test_sweep_delicate_points(
    tmp_path: Path,
    reference: Callable[[str], Path],
    algorithm: str,
    runtime: tuple[str, ...],
    kills: tuple[str, ...],
) -> None:
    kill_and_resume(reference(algorithm), tmp_path / "run", algorithm, runtime, kills)
