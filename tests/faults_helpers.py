"""Helpers of the fault-injection tests: a small simulation run as a child process.

``python tests/faults_helpers.py run DIR [ALGORITHM]`` starts a run,
``python tests/faults_helpers.py resume DIR`` resumes one. The child prints
``START <round resumed from, or None>``, ``ROUND <n>`` after each round and
``CKPT <stage> <n>`` at each stage of a checkpoint write, so a test can kill it at a
known point. ``EMBERFL_TEST_PAUSE=<stage>:<round>`` makes it sleep at that checkpoint
stage (so a kill lands inside the write), ``EMBERFL_TEST_FSIZE_AFTER=<round>`` limits
the size of the files it may write after that round (see ``_child``) and
``EMBERFL_TEST_WORKERS`` sets the number of worker processes.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from emberfl.contrib import FedAvgClientUpdate, FedAvgUplinkPackage
from emberfl.contrib.fedavg import LocalRun

ROUNDS = 8

SETTINGS: dict[str, Any] = {
    "dataset": "digits",
    "clients": 10,
    "sample_ratio": 0.3,
    "rounds": ROUNDS,
    "epochs": 1,
    "batch_size": 10,
    "lr": 0.1,
    "runtime": "process",
    "workers": 2,
    "threads": 1,
    "seed": 7,
    "checkpoint_every": 2,
    "eval_every": 1,
    "progress": False,
}


def descendants(pid: int) -> list[psutil.Process]:
    """The live descendants of ``pid`` (none when it is gone)."""
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.is_running()]
    except psutil.NoSuchProcess:
        return []


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    """The pids among ``pids`` still alive (not zombies) after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.1)
    return alive


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def temp_leftovers(run_dir: Path) -> list[str]:
    """Scratch directories and temporary files left in a run directory."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        for name in [*dirs, *files]:
            if name.startswith(".work-") or name.endswith(".tmp"):
                found.append(os.path.join(root, name))
    return sorted(found)


def _child(argv: list[str]) -> int:
    from emberfl.simulation import Simulation, SimulationConfig

    torch.set_num_threads(1)
    command, run_dir = argv[0], argv[1]
    if command == "run":
        settings = dict(SETTINGS)
        settings["workers"] = int(os.environ.get("EMBERFL_TEST_WORKERS", settings["workers"]))
        if len(argv) > 2:
            settings["algorithm"] = argv[2]
        simulation = Simulation(SimulationConfig.from_mapping(settings), run_dir)
    else:
        simulation = Simulation.for_resume(run_dir)
    pause = os.environ.get("EMBERFL_TEST_PAUSE")
    # EMBERFL_TEST_FSIZE_AFTER=<n>: after round n (and its checkpoint) this process may
    # write no file as large as a checkpoint's server state, as if the disk were full.
    # The limit lies above the size of a round's downlink (the model alone, written by
    # this process too), so the next checkpoint is the write that fails; the workers,
    # which write the uplinks, are not limited.
    fsize_after = int(os.environ.get("EMBERFL_TEST_FSIZE_AFTER", "0"))

    def hook(stage: str, round_: int) -> None:
        print(f"CKPT {stage} {round_}", flush=True)
        if pause == f"{stage}:{round_}":
            time.sleep(60)

    simulation.checkpoint_hook = hook
    with simulation:
        simulation.prepare()
        print(f"START {simulation.resumed_from}", flush=True)

        def on_round(m: Any) -> None:
            print(f"ROUND {m.round}", flush=True)
            if m.round == fsize_after:
                server = Path(run_dir) / f"checkpoint-{m.round}" / "server.safetensors"
                limit = server.stat().st_size - 2048
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        simulation.run(on_round)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))


# ------------------------------------------------------------ faulty client steps


class FaultyClientUpdate(FedAvgClientUpdate):
    """FedAvg's client step that misbehaves for client ``cid``.

    ``mode``: ``"hang"`` (write ``marker`` with the worker's pid, complete before it
    appears, then sleep; only the first time, so that a retried client succeeds),
    ``"raise"``, ``"nan"`` (an uplink full of NaN) or ``"fsize"`` (a file-size limit
    below an uplink's size, as on a full disk, before the worker writes its uplink).
    """

    def __init__(self, cid: int, mode: str, marker: str = "") -> None:
        self.cid = cid
        self.mode = mode
        self.marker = marker

    def finish(
        self, run: LocalRun, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        if run.cid != self.cid:
            return package
        if self.mode == "hang" and not os.path.exists(self.marker):
            # Written whole, then renamed: whoever sees the marker can read the pid.
            partial = Path(f"{self.marker}.partial")
            partial.write_text(str(os.getpid()))
            os.replace(partial, self.marker)
            time.sleep(60)  # until killed (or timed out) by the test
        elif self.mode == "raise":
            raise RuntimeError(f"injected failure in client {run.cid}")
        elif self.mode == "nan":
            package.model_parameters = torch.full_like(package.model_parameters, math.nan)
        elif self.mode == "fsize":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        return package
