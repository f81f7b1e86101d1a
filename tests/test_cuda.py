"""What runs on a GPU (``pytest -m cuda``; skipped without one), and the GPU check
script's answer on a machine without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from emberfl import store
from emberfl.contrib import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgBatchedClientTrainer,
)

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@needs_cuda
def test_store_load_onto_the_gpu(tmp_path: Path) -> None:
    x = torch.randn(1000, 33)
    store.save(tmp_path / "x.safetensors", {"x": x, "i": torch.arange(7)})
    got = store.load(tmp_path / "x.safetensors", device="cuda")
    assert got["x"].is_cuda and torch.equal(got["x"].cpu(), x)
    assert torch.equal(got["i"].cpu(), torch.arange(7))


@pytest.mark.cuda
@needs_cuda
def test_batched_clients_on_the_gpu_train_as_alone(digits: Any) -> None:
    dataset, selector = digits
    args = (selector, "mlp", dataset, "cuda", 6, 1, 10, 0.1, 7)
    handler = FedAvgBaseServerHandler(selector, "mlp", dataset, 1, 6, 1.0, "cuda", 512, 7)
    payload = handler.downlink_package()
    alone = FedAvgBaseClientTrainer(*args, progress=False)
    alone.local_process(payload, [0, 3])
    batched = FedAvgBatchedClientTrainer(*args)
    batched.local_process(payload, [0, 3])
    for x, y in zip(batched.uplink_package(), alone.uplink_package(), strict=True):
        torch.testing.assert_close(x.model_parameters, y.model_parameters, rtol=1e-4, atol=1e-5)


def test_gpu_check_says_when_there_is_no_gpu() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "gpu_check.py")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert run.returncode == 3, run.stderr
    assert "no CUDA device is visible" in run.stdout and "nothing was checked" in run.stdout
