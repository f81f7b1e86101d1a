"""The same bits on any layout with the defaults a user types: no ``--threads``, no
``--workers``, on machines with other CPU counts.

Each run is ``python -m emberfl run`` as a user starts it. torch splits a reduction's
work by its intra-op thread count, so the count decides a model's last bits; the
default is one thread per client whatever the layout, and the layout (workers,
runtime, CPUs) decides only how many clients train at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from emberfl.core import available_cpus

pytestmark = pytest.mark.slow

COMMAND = [
    "run", "--clients", "20", "--sample-ratio", "0.5", "--rounds", "4", "--epochs", "1",
    "--seed", "5", "--no-progress", "--quiet",
]  # fmt: skip


def _run(out: Path, *flags: str, cpus: set[int] | None = None, command: str = "run") -> None:
    args = [*COMMAND, *flags, "--out", str(out)] if command == "run" else [command, *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    done = subprocess.run(
        [sys.executable, "-m", "emberfl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
        preexec_fn=pin,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_every_layout_gives_the_same_bits_without_flags(
    tmp_path: Path, algorithm: str, model_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    layouts = {
        "workers1": ["--workers", "1"],
        "workers2": ["--workers", "2"],
        "thread": ["--runtime", "thread"],
        "serial": ["--runtime", "serial"],
        "default": [],
    }
    models = {}
    for name, flags in layouts.items():
        _run(tmp_path / name, "--algorithm", algorithm, *flags)
        models[name] = model_bytes(tmp_path / name)
    differ = [name for name, model in models.items() if model != models["default"]]
    assert not differ, f"{differ} differ from the default layout's model"


@pytest.mark.skipif(available_cpus() < 2, reason="needs 2 CPUs to run on one and on two")
def test_another_cpu_count_gives_the_same_bits(
    tmp_path: Path, model_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    # --workers fixed: the CPU count alone changes between the two runs.
    cpus = sorted(os.sched_getaffinity(0))
    _run(tmp_path / "one", "--workers", "1", cpus={cpus[0]})
    _run(tmp_path / "two", "--workers", "1", cpus=set(cpus[:2]))
    assert model_bytes(tmp_path / "one") == model_bytes(tmp_path / "two")


_TWO_ROUNDS = """
import os, sys
from emberfl.config import SimulationConfig
from emberfl.simulation import Simulation
settings = dict(clients=20, sample_ratio=0.5, rounds=4, epochs=1, seed=5, workers=1,
                checkpoint_every=2, progress=False, **eval(sys.argv[2]))
simulation = Simulation(SimulationConfig.from_mapping(settings), sys.argv[1])
simulation.run_round()
simulation.run_round()
os._exit(0)  # dies after round 2's checkpoint, as a killed run would
"""


@pytest.mark.skipif(available_cpus() < 2, reason="needs 2 CPUs to resume on fewer")
@pytest.mark.parametrize("threads", [None, 2])
def test_a_resume_on_fewer_cpus_gives_the_same_bits(
    tmp_path: Path, model_bytes: Callable[[Path], dict[str, bytes]], threads: int | None
) -> None:
    """A run on 2 CPUs, cut after round 2 and resumed on one CPU, with the default thread
    count and with 2 threads per client: the resume takes the count from config.json
    (not from the new machine), so the model is the uninterrupted one's."""
    cpus = sorted(os.sched_getaffinity(0))
    flags = [] if threads is None else ["--threads", str(threads)]
    _run(tmp_path / "whole", "--workers", "1", *flags, cpus=set(cpus[:2]))
    run = tmp_path / "cut"
    settings = {} if threads is None else {"threads": threads}
    subprocess.run(
        [sys.executable, "-c", _TWO_ROUNDS, str(run), repr(settings)],
        check=True,
        timeout=300,
        preexec_fn=lambda: os.sched_setaffinity(0, set(cpus[:2])),
    )
    assert json.loads((run / "config.json").read_text())["threads"] == (threads or 1)
    assert (run / "latest").read_text().strip() == "checkpoint-2"
    _run(run, str(run), "--no-progress", command="resume", cpus={cpus[0]})
    assert model_bytes(run) == model_bytes(tmp_path / "whole")
