"""The examples run on tiny settings, as a user runs them (a script in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emberfl import store
from emberfl.metrics import read_metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run_example(name: str, out: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name / "main.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=out.parent,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.mark.slow
def test_quickstart_fedavg(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    stdout = _run_example(
        "quickstart-fedavg", out, "--rounds", "2", "--clients", "4", "--sample-ratio", "0.5"
    )
    assert "final accuracy:" in stdout
    metrics = read_metrics(out)
    assert metrics["round"].tolist() == [1.0, 2.0]
    assert metrics["accuracy"][-1] > 0.5 and (metrics["num_clients"] == 2).all()
    state = store.load(out / "model.safetensors")
    assert state["net.1.weight"].shape == (128, 64)


@pytest.mark.slow
def test_step_by_step_dsfl(tmp_path: Path) -> None:
    out = tmp_path / "dsfl"
    stdout = _run_example("step-by-step-dsfl", out, "--rounds", "2", "--clients", "4")
    assert "final server accuracy:" in stdout
    metrics = read_metrics(out)
    assert metrics["round"].tolist() == [1.0, 2.0]
    # Distillation from the clients' labels teaches the server model something ...
    assert metrics["accuracy"][-1] > 0.3
    # ... ERA lowers the entropy of the averaged soft labels ...
    assert (metrics["entropy_era"] < metrics["entropy_avg"]).all()
    # ... and the uplink is soft labels for the open sample, not a model.
    assert (metrics["bytes_up"] == 2 * 200 * 10 * 4).all()
    assert (out / "server_model.safetensors").is_file()
