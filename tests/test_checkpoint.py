"""Checkpoints and resume: every algorithm continues bitwise where it stopped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from emberfl import store
from emberfl.cli import main
from emberfl.metrics import read_metrics
from emberfl.simulation import (
    ALGORITHMS,
    CheckpointError,
    ConfigError,
    Simulation,
    SimulationConfig,
    latest_checkpoint,
    load_checkpoint,
    resume_simulation,
    run_simulation,
)

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


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_bytes(run_dir: Path) -> dict[str, bytes]:
    tensors = store.load(run_dir / "model.safetensors")
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in tensors.items()}


def run_partly(run_dir: Path, rounds: int, **settings: Any) -> None:
    """Run ``rounds`` rounds and stop as if killed (no final model)."""
    config = SimulationConfig.from_mapping({**TINY, **settings})
    with Simulation(config, run_dir) as simulation:
        for _ in range(rounds):
            simulation.run_round()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_continues_bitwise(algorithm: str, tmp_path: Path) -> None:
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
    assert not [n for n in names if n.startswith(".")]


def test_resume_with_another_runtime_is_bitwise_identical(tmp_path: Path) -> None:
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


def test_without_a_checkpoint_the_run_starts_over(tmp_path: Path) -> None:
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
