"""The process pool: ordering, reuse, small messages, mapped uplinks, faults, clean-up.

The trainer classes live at module level so that worker processes (spawned) can
import them by name, exactly as a user's script is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from emberfl.core import (
    ClientError,
    ClientTimeoutError,
    ProcessPoolClientTrainer,
    WorkerCrashedError,
    current_client,
)
from linux import default_sigint, proc_self

HERE = Path(__file__).resolve().parent  # this module, imported by the child script
TESTS_DIR = HERE.parent  # tests/: linux.py, which this module imports


class ScriptedTrainer(ProcessPoolClientTrainer[dict, dict, dict, dict]):
    """Each client does what ``actions[cid]`` says (default: return a result)."""

    def __init__(self, num_parallels: int, scratch: Path) -> None:
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[dict] = []
        self.stop_event = threading.Event()
        self.progress = False
        self.scratch = scratch
        self.actions: dict[int, tuple[str, float]] = {}
        # Elements of payload["big"] each uplink carries back: 1 << 20 (4 MiB) makes the
        # uplink files large enough to be mapped (files up to 2 MiB are read).
        self.uplink_big = 4

    def get_client_config(self, cid: int) -> dict:
        action, arg = self.actions.get(cid, ("ok", 0.0))
        return {
            "cid": cid,
            "action": action,
            "arg": arg,
            "scratch": str(self.scratch),
            "uplink_big": self.uplink_big,
        }

    @staticmethod
    def worker(
        config: dict, payload: dict, device: str, stop_event: Any, *, shm_buffer: Any = None
    ) -> dict:
        cid, action, arg = config["cid"], config["action"], config["arg"]
        scratch = Path(config["scratch"])
        if action == "raise":
            raise ValueError(f"client {cid} failed on purpose")
        if action == "sleep":
            time.sleep(arg)
        if action == "announce_and_sleep":
            # Written whole, then renamed: whoever sees pid-<cid> can read the pid.
            (scratch / f"pid-{cid}.partial").write_text(str(os.getpid()))
            os.replace(scratch / f"pid-{cid}.partial", scratch / f"pid-{cid}")
            time.sleep(arg)  # until killed, interrupted or replaced
        if action == "wait_for_flag":
            # Finishes only once the parent has written the flag (or fails after arg s).
            deadline = time.monotonic() + arg
            while not (scratch / "flag").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"client {cid}: no flag after {arg} s")
                time.sleep(0.01)
        if action == "die_once":
            marker = scratch / f"died-{cid}"
            if not marker.exists():
                marker.write_text("x")
                os.kill(os.getpid(), signal.SIGKILL)
        # In place on purpose: the next client on this worker must not see it.
        w = payload["w"].add_(cid)
        return {
            "cid": cid,
            "pid": os.getpid(),
            "w": w.clone(),
            "big": payload["big"][: config["uplink_big"]].clone(),
            "round": current_client().round,
            "stop_seen": stop_event.is_set(),
            "threads": torch.get_num_threads(),
        }


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScriptedTrainer]:
    t = ScriptedTrainer(2, tmp_path_factory.mktemp("scratch"))
    yield t
    t.close()


def _payload(value: float) -> dict:
    return {"w": torch.full((3,), value), "big": torch.arange(1_000_000, dtype=torch.float32)}


def _reset(trainer: ScriptedTrainer) -> None:
    trainer.actions = {}
    trainer.uplink_big = 4
    trainer.retry_crashed = False  # type: ignore[attr-defined]
    trainer.client_timeout = None  # type: ignore[attr-defined]
    # One client per worker, so that every worker (some may just have been
    # replaced) has started up before a test times anything.
    trainer.local_process(_payload(0.0), [0, 1])
    trainer.cache = []


def test_uplinks_come_in_cid_order_from_reused_workers(trainer: ScriptedTrainer) -> None:
    _reset(trainer)
    # Early clients are slow, so completion order differs from the list order.
    cids = [5, 2, 9, 0, 7, 3]
    trainer.actions = {5: ("sleep", 0.6), 2: ("sleep", 0.3)}
    pids_seen: list[set[int]] = []
    rounds: list[int] = []
    for r in range(3):
        trainer.local_process(_payload(float(r)), cids)
        results = trainer.uplink_package()
        assert [p["cid"] for p in results] == cids
        for p in results:
            assert torch.equal(p["w"], torch.full((3,), float(r) + p["cid"]))
            assert torch.equal(p["big"], torch.arange(4, dtype=torch.float32))
            assert p["round"] == results[0]["round"]
            assert p["stop_seen"] is False
            assert p["threads"] >= 1
        pids_seen.append({p["pid"] for p in results})
        rounds.append(results[0]["round"])
    assert rounds == [rounds[0], rounds[0] + 1, rounds[0] + 2]
    assert len(trainer.worker_pids) == 2
    # The same two processes served every round, and both did work.
    assert pids_seen[0] == pids_seen[1] == pids_seen[2] == set(trainer.worker_pids)
    assert trainer.stop_event.is_set()  # set once a round ends, as in BlazeFL


def test_task_messages_are_small_and_carry_no_tensors(trainer: ScriptedTrainer) -> None:
    _reset(trainer)
    trainer.local_process(_payload(1.0), [1, 2, 3])
    trainer.uplink_package()
    state = trainer._emberfl_runtime[0]  # type: ignore[attr-defined]
    stats = state.pool.stats
    assert stats.tasks_sent >= 3
    # The payload holds a 4 MB tensor; messages hold ids and paths only.
    assert 0 < stats.max_task_message_bytes < 1024
    assert 0 < stats.max_round_message_bytes < 2048


def _mapping_of(address: int) -> str | None:
    with open(proc_self("maps")) as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def test_uplinks_are_mapped_from_files_that_are_then_removed(trainer: ScriptedTrainer) -> None:
    _reset(trainer)
    trainer.uplink_big = 1 << 20
    trainer.local_process(_payload(0.0), [4, 6])
    trainer.uplink_big = 4
    results = trainer.uplink_package()
    share = trainer.share_path
    assert share is not None
    for p in results:
        where = _mapping_of(p["w"].data_ptr())
        assert where is not None and where.startswith(str(share)), where
        assert where.endswith("(deleted)")  # unlinked once mapped; the mapping lives on
    # Nothing of the round is left on disk, only the stop flag.
    assert sorted(x.name for x in share.iterdir()) == ["stop.flag"]


def test_a_raising_client_names_its_cid_with_the_worker_traceback(
    trainer: ScriptedTrainer,
) -> None:
    _reset(trainer)
    trainer.actions = {8: ("raise", 0.0), 1: ("sleep", 5.0)}
    start = time.monotonic()
    with pytest.raises(ClientError) as info:
        trainer.local_process(_payload(0.0), [1, 8, 2])
    assert time.monotonic() - start < 4.0  # did not wait for the sleeping client
    err = info.value
    assert err.cid == 8
    assert "client 8 failed" in str(err)
    assert "ValueError: client 8 failed on purpose" in str(err)
    assert "in worker" in err.remote_traceback  # the frame of the user's worker
    assert trainer.cache == []
    # The trainer keeps working: the worker stuck with client 1 was replaced.
    _reset(trainer)
    trainer.local_process(_payload(2.0), [3, 4])
    assert [p["cid"] for p in trainer.uplink_package()] == [3, 4]
    assert len(trainer.worker_pids) == 2


def _kill_when_announced(path: Path, killed: list[tuple[int, float]]) -> None:
    # Once the file exists the worker is inside the client (announce_and_sleep).
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(path.read_text())
    os.kill(pid, signal.SIGKILL)
    killed.append((pid, time.monotonic()))


def test_a_killed_worker_is_reported_quickly(trainer: ScriptedTrainer) -> None:
    _reset(trainer)
    scratch = trainer.scratch
    trainer.actions = {6: ("announce_and_sleep", 60.0)}
    killed: list[tuple[int, float]] = []
    killer = threading.Thread(
        target=_kill_when_announced, args=(scratch / "pid-6", killed), daemon=True
    )
    killer.start()
    with pytest.raises(WorkerCrashedError) as info:
        trainer.local_process(_payload(0.0), [0, 6, 1])
    detected = time.monotonic()
    killer.join(5)
    assert killed, "the client never announced itself"
    pid, kill_time = killed[0]
    assert detected - kill_time < 3.0
    assert info.value.cid == 6
    assert "client 6" in str(info.value) and "SIGKILL" in str(info.value)
    assert info.value.exitcode == -signal.SIGKILL
    assert not psutil.pid_exists(pid)  # reaped, not a zombie
    # Client 0's uplink may have been handed over before the crash: the error (whose
    # traceback holds the round's frames) must not keep it mapped.
    share = trainer.share_path
    assert share is not None and _mapped_uplinks(share) == 0
    (scratch / "pid-6").unlink()
    # The next round replaces the dead worker.
    _reset(trainer)
    trainer.local_process(_payload(1.0), [2, 3])
    assert [p["cid"] for p in trainer.uplink_package()] == [2, 3]
    assert pid not in trainer.worker_pids
    assert len(trainer.worker_pids) == 2


def test_retry_crashed_restarts_the_worker_and_retries_once(trainer: ScriptedTrainer) -> None:
    _reset(trainer)
    trainer.retry_crashed = True  # type: ignore[attr-defined]
    trainer.actions = {3: ("die_once", 0.0)}
    pool = trainer._emberfl_runtime[0].pool  # type: ignore[attr-defined]
    restarts = pool.stats.restarts
    trainer.local_process(_payload(1.0), [2, 3, 4])
    results = trainer.uplink_package()
    assert [p["cid"] for p in results] == [2, 3, 4]
    assert torch.equal(results[1]["w"], torch.full((3,), 4.0))
    assert (trainer.scratch / "died-3").exists()
    assert pool.stats.restarts == restarts + 1


def test_tasks_queued_behind_a_crashed_client_are_rerun_in_order(
    trainer: ScriptedTrainer,
) -> None:
    # With many clients each worker has a second task queued behind its running one;
    # when the worker dies, that queued task never ran and must be run elsewhere once.
    _reset(trainer)
    trainer.retry_crashed = True  # type: ignore[attr-defined]
    trainer.actions = {13: ("die_once", 0.0)}
    pool = trainer._emberfl_runtime[0].pool  # type: ignore[attr-defined]
    sent = pool.stats.tasks_sent
    cids = list(range(10, 30))
    trainer.local_process(_payload(1.0), cids)
    # Every client once, plus the crashed one again, plus the one queued behind it.
    assert pool.stats.tasks_sent - sent == len(cids) + 2
    results = trainer.uplink_package()
    assert [p["cid"] for p in results] == cids
    for p in results:
        assert torch.equal(p["w"], torch.full((3,), 1.0 + p["cid"]))
    assert (trainer.scratch / "died-13").exists()


def test_client_timeout_stops_a_stuck_client(trainer: ScriptedTrainer) -> None:
    _reset(trainer)
    trainer.client_timeout = 1.0  # type: ignore[attr-defined]
    trainer.actions = {9: ("sleep", 60.0)}
    start = time.monotonic()
    with pytest.raises(ClientTimeoutError) as info:
        trainer.local_process(_payload(0.0), [9, 1])
    assert info.value.cid == 9
    assert time.monotonic() - start < 5.0


def test_empty_round_and_bad_input(trainer: ScriptedTrainer) -> None:
    _reset(trainer)
    trainer.local_process(_payload(0.0), [])
    assert trainer.uplink_package() == []
    rounds = trainer.rounds_run
    with pytest.raises(TypeError, match="client id must be an int"):
        trainer.local_process(_payload(0.0), ["a"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"client id must be an int in \[0, 2\*\*32\)"):
        trainer.local_process(_payload(0.0), [1, 2**32])
    assert trainer.rounds_run == rounds  # refused before a round started
    assert trainer.cache == []


def _mapped_uplinks(share: Path) -> int:
    with open(proc_self("maps")) as maps:
        return sum(1 for line in maps if str(share) in line and "/uplink-" in line)


def test_uplinks_are_handed_over_in_order_while_the_round_runs(
    trainer: ScriptedTrainer,
) -> None:
    _reset(trainer)
    flag = trainer.scratch / "flag"
    flag.unlink(missing_ok=True)
    cids = list(range(10))
    # The last client finishes only after the first uplink has been handed over, so
    # a runtime that handed uplinks over when the round is done would time it out.
    trainer.actions = {9: ("wait_for_flag", 30.0), 1: ("sleep", 0.3)}
    share = trainer.share_path
    assert share is not None
    seen: list[tuple[int, int, int]] = []

    def on_uplink(index: int, package: dict) -> dict:
        if index == 0:
            flag.write_text("x")
        seen.append((index, package["cid"], _mapped_uplinks(share)))
        return {"cid": package["cid"]}  # what the cache keeps: the tensors are dropped

    trainer.on_uplink = on_uplink  # type: ignore[attr-defined]
    trainer.uplink_big = 1 << 20
    try:
        trainer.local_process(_payload(0.0), cids)
    finally:
        trainer.on_uplink = None  # type: ignore[attr-defined]
        trainer.uplink_big = 4
    assert [(i, c) for i, c, _ in seen] == list(enumerate(cids))
    # Only the uplink being handed over is mapped: earlier ones were released.
    assert max(m for _, _, m in seen) == 1
    assert trainer.uplink_package() == [{"cid": c} for c in cids]
    assert sorted(x.name for x in share.iterdir()) == ["stop.flag"]


def test_a_failing_on_uplink_hook_stops_the_round(trainer: ScriptedTrainer) -> None:
    _reset(trainer)

    def on_uplink(index: int, package: dict) -> dict:
        if index == 2:
            raise RuntimeError("server refused client 2")
        return package

    trainer.on_uplink = on_uplink  # type: ignore[attr-defined]
    try:
        with pytest.raises(RuntimeError, match="refused client 2"):
            trainer.local_process(_payload(0.0), list(range(6)))
    finally:
        trainer.on_uplink = None  # type: ignore[attr-defined]
    assert trainer.uplink_package() == []  # no partial round in the cache
    trainer.local_process(_payload(1.0), [3, 4])
    assert [p["cid"] for p in trainer.uplink_package()] == [3, 4]


class InlineTrainer(ScriptedTrainer):
    pass


def test_num_parallels_zero_runs_in_process_and_restores_global_rng(tmp_path: Path) -> None:
    with InlineTrainer(0, tmp_path) as trainer:
        torch.manual_seed(123)
        before = torch.get_rng_state()
        trainer.local_process(_payload(1.0), [2, 0])
        assert torch.equal(torch.get_rng_state(), before)
        results = trainer.uplink_package()
        assert [p["pid"] for p in results] == [os.getpid(), os.getpid()]
        assert [p["cid"] for p in results] == [2, 0]
        assert torch.equal(results[0]["w"], torch.full((3,), 3.0))
        assert trainer.worker_pids == []
        trainer.actions = {0: ("raise", 0.0)}
        with pytest.raises(ClientError, match="client 0 failed"):
            trainer.local_process(_payload(1.0), [2, 0])
        share = trainer.share_path
        assert share is not None and share.exists()
    assert not share.exists()


def test_close_stops_workers_and_removes_the_share_dir(tmp_path: Path) -> None:
    trainer = ScriptedTrainer(1, tmp_path)
    trainer.share_dir = tmp_path  # type: ignore[attr-defined]
    # A time limit counts from a worker's start-up being done, not from its spawn.
    trainer.client_timeout = 0.5  # type: ignore[attr-defined]
    trainer.local_process(_payload(0.0), [1])
    share = trainer.share_path
    pids = trainer.worker_pids
    assert share is not None and share.parent == tmp_path and len(pids) == 1
    trainer.close()
    assert not share.exists()
    assert tmp_path.is_dir()  # share_dir existed before: it stays
    _gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], 5)
    assert alive == []
    trainer.close()  # idempotent
    assert trainer.worker_pids == []


def test_a_missing_share_dir_is_created_and_removed_on_close(tmp_path: Path) -> None:
    share_dir = tmp_path / "runs" / "a" / "share"
    with InlineTrainer(0, tmp_path) as trainer:
        trainer.share_dir = share_dir  # type: ignore[attr-defined]
        trainer.local_process(_payload(1.0), [1])
        assert [p["cid"] for p in trainer.uplink_package()] == [1]
        share = trainer.share_path
        assert share is not None and share.parent == share_dir
    assert not share.exists()
    # Removed up to, not including, the first directory that existed before.
    assert not (tmp_path / "runs").exists()
    assert tmp_path.is_dir()


def test_directories_made_for_share_dir_stay_while_others_use_them(tmp_path: Path) -> None:
    share_dir = tmp_path / "runs" / "share"
    with InlineTrainer(0, tmp_path) as trainer:
        trainer.share_dir = share_dir  # type: ignore[attr-defined]
        trainer.local_process(_payload(1.0), [1])
        (tmp_path / "runs" / "notes.txt").write_text("not the trainer's")
    assert not share_dir.exists()  # made for the trainer and empty again
    assert (tmp_path / "runs" / "notes.txt").read_text() == "not the trainer's"


def test_a_share_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with InlineTrainer(0, tmp_path) as trainer:
        trainer.share_dir = tmp_path / "file"  # type: ignore[attr-defined]
        with pytest.raises(NotADirectoryError, match=r"share_dir .* is not a directory"):
            trainer.local_process(_payload(1.0), [1])
        assert trainer.rounds_run == 0 and trainer.share_path is None


_EXIT_SCRIPT = """
import sys, time
sys.path[:0] = [{here!r}, {tests!r}]
import torch
from test_process import ScriptedTrainer
from pathlib import Path

if __name__ == "__main__":
    t = ScriptedTrainer(2, Path({scratch!r}))
    t.actions = {{7: ("announce_and_sleep", 60.0)}}
    t.share_dir = Path({scratch!r}) / "share"
    t.share_dir.mkdir()
    print(" ".join(map(str, t.worker_pids)), flush=True)
    if {interrupt}:
        t.local_process({{"w": torch.zeros(3), "big": torch.zeros(8)}}, [1, 7, 2])
    else:
        t.local_process({{"w": torch.zeros(3), "big": torch.zeros(8)}}, [1, 2])
        print("done", flush=True)
    # no close(): interpreter exit (or Ctrl-C) must clean up
"""


def _run_script(tmp_path: Path, interrupt: bool) -> tuple[subprocess.Popen[str], Path, list[int]]:
    script = tmp_path / "sim.py"
    script.write_text(
        textwrap.dedent(
            _EXIT_SCRIPT.format(
                here=str(HERE), tests=str(TESTS_DIR), scratch=str(tmp_path), interrupt=interrupt
            )
        )
    )
    # The child imports the same emberfl as this interpreter (installed or editable).
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    assert proc.stdout is not None
    pids = [int(x) for x in proc.stdout.readline().split()]
    return proc, tmp_path / "share", pids


def _assert_all_gone(pids: list[int]) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=3)
    assert alive == [], f"orphans left: {alive}"


@pytest.mark.slow
def test_interpreter_exit_without_close_cleans_up(tmp_path: Path) -> None:
    proc, share, pids = _run_script(tmp_path, interrupt=False)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "done" in out
    assert len(pids) == 2  # started when the trainer was built
    assert list(share.iterdir()) == []  # the trainer's directory in it is gone
    _assert_all_gone(pids)


@pytest.mark.slow
def test_sigint_stops_everything_within_five_seconds(tmp_path: Path) -> None:
    proc, share, pids = _run_script(tmp_path, interrupt=True)
    try:
        marker = tmp_path / "pid-7"
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the sleeping client never started"
            time.sleep(0.05)
        # Every process below the simulation: workers and whatever they started.
        tree = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert set(pids) <= set(tree)
        assert len(list(share.iterdir())) == 1  # this trainer's directory
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=5)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert elapsed < 5.0
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert list(share.iterdir()) == []
    _assert_all_gone(tree)


class ForkServerTrainer(ScriptedTrainer):
    def __init__(self, num_parallels: int, scratch: Path) -> None:
        super().__init__(num_parallels, scratch)
        self.start_method = "forkserver"


def test_forkserver_start_method(tmp_path: Path) -> None:
    with ForkServerTrainer(2, tmp_path) as trainer:
        for r in range(2):
            trainer.local_process(_payload(float(r)), [3, 1, 2])
            results = trainer.uplink_package()
            assert [p["cid"] for p in results] == [3, 1, 2]
            assert torch.equal(results[0]["w"], torch.full((3,), r + 3.0))
        pids = trainer.worker_pids
        assert {p["pid"] for p in results} <= set(pids)
        # Forked from the fork server, not from this process; still alive after
        # their parent-watch had time to look.
        time.sleep(1.0)
        assert all(psutil.Process(p).ppid() != os.getpid() for p in pids)
        assert trainer.worker_pids == pids
    _assert_all_gone(pids)


class MethodWorkerTrainer(ProcessPoolClientTrainer[dict, dict, None, dict]):
    def __init__(self) -> None:
        self.num_parallels = 0
        self.device = "cpu"
        self.cache: list[dict] = []

    def worker(  # type: ignore[override]
        self, config: None, payload: dict, device: str, stop_event: Any
    ) -> dict:
        return payload


def test_a_worker_that_is_no_staticmethod_is_refused() -> None:
    with MethodWorkerTrainer() as trainer, pytest.raises(TypeError, match="staticmethod"):
        trainer.local_process({"w": torch.zeros(1)}, [0])
