"""Fault injection: killed runs and workers, failing and hanging clients, full disks,
corrupt uplinks, NaN updates and signals.

Every case checks that the run fails with a clear error (or recovers, where that is
the documented behaviour), that no process outlives it, that no temporary file is left
behind and that the last checkpoint still loads. The kill-9 test checks that a run
killed at several points (inside checkpoint writes too) and resumed ends with a final
model bitwise identical to an uninterrupted run; ``test_kill_sweep.py`` kills it at
every step that writes the run directory.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import faults_helpers as fh
from emberfl import store
from emberfl.aggregate import NonFiniteError
from emberfl.core import ClientError, ClientTimeoutError, WorkerCrashedError
from emberfl.metrics import read_metrics
from emberfl.simulation import Simulation, SimulationConfig, load_checkpoint
from linux import default_sigint

# Bitwise comparisons need one torch thread (see conftest.one_thread).
pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("one_thread")]

HELPER = Path(fh.__file__).resolve()
PYTHON = sys.executable


class Child:
    """A child process in its own process group whose stdout lines are queued."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            preexec_fn=default_sigint,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._err: list[str] = []
        # Each pipe has exactly one reader, a thread of its own, so neither can fill up
        # and block the child, and nothing else ever reads (or closes) them.
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self._err.extend(self.proc.stderr)

    def stderr(self, timeout: float = 30.0) -> str:
        """Everything the child wrote to stderr (waits for the pipe to close)."""
        self._readers[1].join(timeout)
        return "".join(self._err)

    def wait_for(self, predicate: Any, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out; output so far: {self.seen}") from None
            if line is None:
                err = self.stderr()
                raise AssertionError(f"child ended early; output {self.seen}; stderr {err}")
            self.seen.append(line)
            if predicate(line):
                return line

    def wait_killed(self, timeout: float = 120.0) -> None:
        """Wait for the child to SIGKILL its own process group (``EMBERFL_CRASH_AT``);
        call it once its workers run, so that they are checked too."""
        family = [self.proc.pid, *(p.pid for p in fh.descendants(self.proc.pid))]
        self.proc.wait(timeout=timeout)
        assert self.proc.returncode == -signal.SIGKILL, f"not killed: {self.stderr()}"
        assert fh.wait_gone(family) == [], "processes outlived the kill of their group"

    def kill_group(self) -> None:
        family = [self.proc.pid, *(p.pid for p in fh.descendants(self.proc.pid))]
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert fh.wait_gone(family) == [], "processes outlived the kill of their group"

    def finish(self, timeout: float = 180.0) -> tuple[int, str]:
        family = [self.proc.pid, *(p.pid for p in fh.descendants(self.proc.pid))]
        self.proc.wait(timeout=timeout)
        err = self.stderr()
        assert fh.wait_gone(family) == [], "worker processes outlived the run"
        return self.proc.returncode, err


def helper(*args: str, env: dict[str, str] | None = None) -> Child:
    return Child([PYTHON, str(HELPER), *args], env)


def assert_clean(run_dir: Path) -> None:
    assert fh.temp_leftovers(run_dir) == []


# ------------------------------------------------------------------- kill -9


def test_kill9_at_several_points_then_resume_is_bitwise_identical(
    tmp_path: Path, model_bytes: Callable[[Path], dict[str, bytes]], test_seed: int
) -> None:
    # The seed picks the client of step 2; EMBERFL_TEST_SEED=<n> tries another.
    rng = random.Random(test_seed)
    note = f"(EMBERFL_TEST_SEED={test_seed})"
    reference = tmp_path / "reference"
    code, err = helper("run", str(reference), "scaffold").finish()
    assert code == 0, err

    run = tmp_path / "run"
    # 1. Killed inside the first checkpoint write, before its rename: no checkpoint.
    child = helper("run", str(run), "scaffold", env={"EMBERFL_TEST_PAUSE": "written:2"})
    child.wait_for(lambda line: line == "CKPT written 2")
    child.kill_group()
    assert not (run / "latest").exists()
    assert fh.temp_leftovers(run), "the killed write should have left its temporary files"

    # 2. Resumed (from scratch), killed by its own crash point after a client of
    #    rounds 3 to 5 (3 a round): whatever client state files that round has
    #    rewritten since the last checkpoint (2 or 4) are restored to it.
    client = rng.randint(7, 15)
    child = helper("resume", str(run), env={"EMBERFL_CRASH_AT": f"round.client:{client}"})
    child.wait_for(lambda line: line.startswith("START"))
    child.wait_killed()
    assert load_checkpoint(run).round == 2 * ((client - 1) // 6), note

    # 3. Resumed, killed after the last checkpoint was renamed into place but before
    #    `latest` named it.
    child = helper("resume", str(run), env={"EMBERFL_TEST_PAUSE": "renamed:8"})
    child.wait_for(lambda line: line == "CKPT renamed 8")
    child.kill_group()
    assert load_checkpoint(run).round == 6, note

    # 4. Resumed to the end, from round 6.
    child = helper("resume", str(run))
    child.wait_for(lambda line: line.startswith("START"))
    code, err = child.finish()
    assert code == 0, f"{note}: {err}"
    assert child.seen[-1] == "START 6", note

    assert model_bytes(run) == model_bytes(reference), (
        f"resumed model differs from the uninterrupted one {note}"
    )
    assert (run / "model.safetensors").read_bytes() == (
        reference / "model.safetensors"
    ).read_bytes()
    assert read_metrics(run)["round"].tolist() == [float(r) for r in range(1, fh.ROUNDS + 1)]
    assert load_checkpoint(run).round == fh.ROUNDS
    assert_clean(run)


# ------------------------------------------------------------------- one writer


def test_second_writer_is_refused_until_the_holder_dies(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # The holder stops inside its first checkpoint write: lock held, scratch files in use.
    holder = helper(
        "run", str(run), env={"EMBERFL_TEST_PAUSE": "written:2", "EMBERFL_TEST_WORKERS": "1"}
    )
    holder.wait_for(lambda line: line == "CKPT written 2")
    in_use = sorted(p for p in run.iterdir() if p.name.startswith("."))
    assert [p for p in in_use if p.name.startswith(".work-")]
    for argv in (["resume", str(run)], ["run", "--out", str(run), "--rounds", "2"]):
        done = subprocess.run(
            [PYTHON, "-m", "emberfl", *argv, "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert f"{run} is in use by process {holder.proc.pid}" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    # The refused commands touched nothing of the holder's.
    assert sorted(p for p in run.iterdir() if p.name.startswith(".")) == in_use
    assert holder.proc.poll() is None
    # The OS releases the lock of a killed holder: the next resume runs to the end.
    holder.kill_group()
    child = helper("resume", str(run))
    child.wait_for(lambda line: line.startswith("START"))
    code, err = child.finish()
    assert code == 0, err
    assert child.seen[-1] == "START None"
    assert read_metrics(run)["round"].tolist() == [float(r) for r in range(1, fh.ROUNDS + 1)]
    assert load_checkpoint(run).round == fh.ROUNDS
    assert_clean(run)


# ------------------------------------------------------------ in-process faults


def small_simulation(tmp_path: Path, **settings: Any) -> Simulation:
    config = SimulationConfig.from_mapping(
        # One worker: starting one costs seconds (a fresh interpreter importing torch).
        {**fh.SETTINGS, "checkpoint_every": 1, "rounds": 4, "workers": 1, **settings}
    )
    return Simulation(config, tmp_path / "run")


def fault_round(simulation: Simulation, update: fh.FaultyClientUpdate, **attrs: Any) -> list[int]:
    """Make ``update`` the client step of the next rounds; returns the worker pids."""
    pids = list(simulation.trainer.worker_pids)
    simulation.trainer.client_update = update
    for key, value in attrs.items():
        setattr(simulation.trainer, key, value)
    return pids


def after_failure(simulation: Simulation, pids: list[int]) -> None:
    run_dir = simulation.run_dir
    share = simulation.trainer.share_path
    rounds_done = simulation.round
    simulation.close()
    assert fh.wait_gone(pids) == [], "worker processes outlived the failed run"
    assert share is None or not share.exists()
    assert_clean(run_dir)
    assert load_checkpoint(run_dir).round == rounds_done == 1


def first_cid(simulation: Simulation) -> int:
    # The next round's first client, from a copy of the sampler's generator.
    import copy

    assert simulation.handler is not None
    sampler = copy.deepcopy(simulation.handler.rng_suite.python)
    n = simulation.handler.num_clients
    return sorted(sampler.sample(range(n), simulation.handler.num_clients_per_round))[0]


def test_worker_killed_mid_client_raises(tmp_path: Path) -> None:
    marker = tmp_path / "hang"
    simulation = small_simulation(tmp_path)
    simulation.run_round()
    update = fh.FaultyClientUpdate(first_cid(simulation), "hang", str(marker))
    pids = fault_round(simulation, update)
    killer = threading.Thread(target=_kill_when_marked, args=(marker,), daemon=True)
    killer.start()
    with pytest.raises(WorkerCrashedError, match="killed by SIGKILL"):
        simulation.run_round()
    after_failure(simulation, pids)


def test_worker_killed_mid_client_is_retried(tmp_path: Path) -> None:
    marker = tmp_path / "hang"
    simulation = small_simulation(tmp_path)
    simulation.run_round()
    update = fh.FaultyClientUpdate(first_cid(simulation), "hang", str(marker))
    fault_round(simulation, update, retry_crashed=True)
    threading.Thread(target=_kill_when_marked, args=(marker,), daemon=True).start()
    metrics = simulation.run_round()  # the retried client succeeds
    assert metrics is not None and metrics.round == 2
    pids = list(simulation.trainer.worker_pids)
    simulation.close()
    assert fh.wait_gone(pids) == []
    assert_clean(tmp_path / "run")
    assert load_checkpoint(tmp_path / "run").round == 2


def _kill_when_marked(marker: Path) -> None:
    # The hanging client renames its marker into place complete (pid written), then
    # sleeps: once the marker exists, the worker is inside the client.
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(int(marker.read_text()), signal.SIGKILL)


def test_worker_raising_is_a_client_error(tmp_path: Path) -> None:
    simulation = small_simulation(tmp_path)
    simulation.run_round()
    cid = first_cid(simulation)
    pids = fault_round(simulation, fh.FaultyClientUpdate(cid, "raise"))
    with pytest.raises(ClientError, match=f"injected failure in client {cid}") as info:
        simulation.run_round()
    assert info.value.cid == cid and "Traceback" in str(info.value)
    after_failure(simulation, pids)


def test_client_timeout_stops_the_worker(tmp_path: Path) -> None:
    simulation = small_simulation(tmp_path)
    simulation.run_round()
    update = fh.FaultyClientUpdate(first_cid(simulation), "hang", str(tmp_path / "hang"))
    pids = fault_round(simulation, update, client_timeout=1.0)
    start = time.monotonic()
    with pytest.raises(ClientTimeoutError, match="client_timeout"):
        simulation.run_round()
    assert time.monotonic() - start < 30
    hung = int((tmp_path / "hang").read_text())
    assert fh.wait_gone([hung]) == [], "the timed-out worker is still running"
    after_failure(simulation, pids)


def test_disk_full_while_writing_an_uplink(tmp_path: Path) -> None:
    simulation = small_simulation(tmp_path)
    simulation.run_round()
    pids = fault_round(simulation, fh.FaultyClientUpdate(first_cid(simulation), "fsize"))
    with pytest.raises(ClientError, match=r"(?i)file too large|no space"):
        simulation.run_round()
    after_failure(simulation, pids)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, where mounting one is allowed (root); else the test skips.

    The tests above limit file sizes instead (RLIMIT_FSIZE), which works anywhere;
    this one runs into a genuinely full file system (ENOSPC).
    """
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_full_file_system_while_writing_an_uplink(small_tmpfs: Path) -> None:
    config = SimulationConfig.from_mapping(
        {**fh.SETTINGS, "checkpoint_every": 1, "rounds": 4, "workers": 1}
    )
    simulation = Simulation(config, small_tmpfs / "run")
    simulation.run_round()
    # Leave room for the next round's downlink (the model, about 42 KB) but not for
    # the first uplink after it.
    free = shutil.disk_usage(small_tmpfs).free
    (small_tmpfs / "filler").write_bytes(b"\0" * (free - 64 * 1024))
    pids = list(simulation.trainer.worker_pids)
    with pytest.raises(ClientError, match="No space left on device"):
        simulation.run_round()
    after_failure(simulation, pids)


def test_disk_full_while_writing_a_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    child = helper(
        "run", str(run), env={"EMBERFL_TEST_FSIZE_AFTER": "2", "EMBERFL_TEST_WORKERS": "1"}
    )
    code, err = child.finish()
    assert code != 0
    assert "server.safetensors" in err and "File too large" in err, err
    assert load_checkpoint(run).round == 2
    assert_clean(run)
    # ... and the run resumes from there.
    code, err = helper("resume", str(run)).finish()
    assert code == 0, err
    assert load_checkpoint(run).round == fh.ROUNDS


@pytest.mark.parametrize("damage", ["truncate", "corrupt-header", "corrupt-values"])
def test_damaged_sums_file_is_a_clear_error(
    tmp_path: Path, damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emberfl.core.fold import FoldCollector

    simulation = small_simulation(tmp_path)
    simulation.run_round()
    pids = list(simulation.trainer.worker_pids)
    original = FoldCollector.merge_file
    damaged: list[str] = []

    def merge_damaged(self: FoldCollector, path: Any) -> None:
        # Between a worker writing its folded sums and the trainer merging them.
        if not damaged:
            p = Path(path)
            data = bytearray(p.read_bytes())
            if damage == "truncate":
                data = data[: len(data) // 2]
            elif damage == "corrupt-header":
                data[:64] = b"\xff" * 64
            else:
                data[-1] ^= 0x40  # the top byte of the last element's sum
            p.write_bytes(bytes(data))
            damaged.append(p.name)
        original(self, path)

    monkeypatch.setattr(FoldCollector, "merge_file", merge_damaged)
    expected = ValueError if damage == "corrupt-values" else store.StoreError
    with pytest.raises(expected) as info:
        simulation.run_round()
    assert damaged and damaged[0] in str(info.value)
    after_failure(simulation, pids)


def test_nonfinite_update_raises(tmp_path: Path) -> None:
    simulation = small_simulation(tmp_path)
    simulation.run_round()
    cid = first_cid(simulation)
    pids = fault_round(simulation, fh.FaultyClientUpdate(cid, "nan"))
    with pytest.raises(NonFiniteError, match=rf"clients \[{cid}\]"):
        simulation.run_round()
    after_failure(simulation, pids)


def test_nonfinite_update_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    simulation = small_simulation(tmp_path, nonfinite="drop")
    simulation.run_round()
    cid = first_cid(simulation)
    fault_round(simulation, fh.FaultyClientUpdate(cid, "nan"))
    with caplog.at_level(logging.WARNING):
        metrics = simulation.run_round()
    assert metrics is not None and metrics.extra["dropped"] == 1.0
    assert f"clients [{cid}]" in caplog.text
    pids = list(simulation.trainer.worker_pids)
    simulation.close()
    assert fh.wait_gone(pids) == []
    assert_clean(tmp_path / "run")
    state = load_checkpoint(tmp_path / "run").state
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("model."))


# -------------------------------------------------------------------- signals


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_the_parent_stops_cleanly(tmp_path: Path, signum: int, code: int) -> None:
    run = tmp_path / "run"
    args = [PYTHON, "-m", "emberfl", "run", "--out", str(run), "--rounds", "200",
            "--clients", "10", "--epochs", "1", "--threads", "1", "--checkpoint-every", "1",
            "--no-progress", "--workers", "1"]  # fmt: skip
    child = Child(args)
    child.wait_for(lambda line: line.split()[:1] == ["3"])
    workers = [p.pid for p in fh.descendants(child.proc.pid)]
    child.proc.send_signal(signum)
    returncode, err = child.finish(timeout=60)
    assert returncode == code, err
    assert "Traceback" not in err
    assert fh.wait_gone(workers) == []
    assert_clean(run)
    assert load_checkpoint(run).round >= 3
