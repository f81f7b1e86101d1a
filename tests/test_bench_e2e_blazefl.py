"""The BlazeFL rows of benches/e2e_report.py do the report's work: with BlazeFL 2.0's
FedAvg trainers and server handler unchanged, the final global model is bitwise the
serial floor's (same model, samples, batches, lr; torch.optim.SGD's step is sgd_step's).
The report checks it itself (``--check-blazefl-bits``), run here as a subprocess.
Skipped when blazefl 2.0 is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("blazefl.contrib")

pytestmark = pytest.mark.slow

REPORT = Path(__file__).resolve().parents[1] / "benches" / "e2e_report.py"
SKIPPED = "# skipped the BlazeFL bits check: "
#: The report's sizes for the check (the serial floor runs in the report's process too).
SMALL = {
    "models": "cnn",
    "clients": 4,
    "samples": 100,
    "rounds": 2,
    "batch": 50,
    "lr": 0.1,
    "seed": 0,
    "workers": 2,
}


@pytest.mark.parametrize(
    ("impl", "regime"),
    [
        ("blazefl-thread", "batch"),
        ("blazefl-thread", "epoch"),
        ("blazefl-process", "batch"),
    ],
)
def test_blazefl_rows_match_serial_floor(impl: str, regime: str) -> None:
    sizes = [f"--{k}={v}" for k, v in SMALL.items()]
    check = [str(REPORT), "--check-blazefl-bits", f"--impls={impl}", f"--regimes={regime}"]
    done = subprocess.run(
        [sys.executable, *check, *sizes],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith(SKIPPED):
            pytest.skip(line.removeprefix(SKIPPED))
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert f"{impl} cnn {regime}: bitwise the serial floor's" in done.stdout, done.stdout
