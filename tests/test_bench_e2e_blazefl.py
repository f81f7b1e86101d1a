"""The BlazeFL rows of benches/e2e_report.py do the report's work: with BlazeFL 2.0's
FedAvg trainers and server handler unchanged, the final global model is bitwise the
serial floor's (same model, samples, batches, lr; torch.optim.SGD's step is sgd_step's).
Skipped when blazefl 2.0 is not installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("blazefl.contrib")

pytestmark = pytest.mark.slow

BENCHES = Path(__file__).resolve().parent.parent / "benches"


@pytest.fixture(scope="module")
def report() -> ModuleType:
    if str(BENCHES) not in sys.path:
        sys.path.insert(0, str(BENCHES))  # the pool's workers unpickle e2e_report's classes
    spec = importlib.util.spec_from_file_location("e2e_report", BENCHES / "e2e_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["e2e_report"] = module
    spec.loader.exec_module(module)
    if module.blazefl_missing():
        pytest.skip(module.blazefl_missing())
    return module


@pytest.mark.parametrize(
    ("impl", "regime"),
    [
        ("blazefl-thread", "batch"),
        ("blazefl-thread", "epoch"),
        ("blazefl-process", "batch"),
    ],
)
def test_blazefl_rows_match_serial_floor(
    report: ModuleType, tmp_path: Path, impl: str, regime: str
) -> None:
    clients, samples, rounds = 4, 100, 2
    data = tmp_path / "data.safetensors"
    report.make_data(data, clients, samples, seed=0)
    setup = report.Setup(str(data), "cifar_cnn", regime, samples, 50, 0.1, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = report.initial_params(setup)
        for rnd in range(rounds):
            total = torch.zeros_like(params)
            for cid in range(clients):
                total.add_(report.client_update(setup, params, cid, rnd), alpha=1.0 / clients)
            params = total
        _, got = report.blazefl_fedavg(setup, impl, clients, rounds, 2, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, params)
