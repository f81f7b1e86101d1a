"""Metrics CSV, optional TensorBoard, and evaluation."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from emberfl.metrics import METRICS_FILE, MetricsWriter, RoundMetrics, evaluate, read_metrics


def sample(r: int, **extra: float) -> RoundMetrics:
    return RoundMetrics(
        round=r,
        accuracy=0.5 + r / 100 + 1e-17,
        loss=1.0 / (r + 3),
        round_seconds=0.1 * r + 1 / 3,
        client_train_seconds_mean=0.01 * r,
        client_train_seconds_max=0.02 * r,
        bytes_up=1000 * r,
        bytes_down=2000 * r,
        num_clients=10,
        extra=dict(extra),
    )


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_writes_header_and_rows(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "run", tensorboard=False) as w:
        for r in range(1, 4):
            w.write(sample(r))
    got = rows(tmp_path / "run" / METRICS_FILE)
    assert len(got) == 3
    assert list(got[0])[:2] == ["round", "accuracy"]
    for r, row in enumerate(got, start=1):
        m = sample(r)
        assert int(row["round"]) == r
        # Floats round-trip exactly.
        assert float(row["accuracy"]) == m.accuracy
        assert float(row["round_seconds"]) == m.round_seconds
        assert int(row["bytes_up"]) == m.bytes_up and int(row["bytes_down"]) == m.bytes_down
        assert float(row["client_train_seconds_max"]) == m.client_train_seconds_max
    table = read_metrics(tmp_path / "run")
    np.testing.assert_array_equal(table["round"], [1, 2, 3])
    np.testing.assert_array_equal(table["loss"], [sample(r).loss for r in (1, 2, 3)])


def test_each_row_is_flushed(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(sample(1))
    w.write(sample(2))
    assert len(rows(tmp_path / METRICS_FILE)) == 2  # read while the writer is still open
    w.close()


def test_rows_survive_a_crash(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import os
        from emberfl.metrics import MetricsWriter, RoundMetrics
        w = MetricsWriter({str(tmp_path)!r}, tensorboard=False)
        for r in range(1, 6):
            w.write(RoundMetrics(round=r, accuracy=r / 10, loss=1.0, round_seconds=0.5))
        os._exit(3)  # no close, no interpreter shutdown
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()
    table = read_metrics(tmp_path)
    np.testing.assert_array_equal(table["round"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(table["accuracy"], [0.1, 0.2, 0.3, 0.4, 0.5])


def test_extra_columns(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(sample(1, drift=0.5, grad_norm=2.0))
        w.write(sample(2, grad_norm=3.0, drift=0.25))
        assert w.columns is not None and w.columns[-2:] == ["drift", "grad_norm"]
        with pytest.raises(ValueError, match="missing"):
            w.write(sample(3))
        with pytest.raises(ValueError, match="clashes"):
            w.write(sample(3, accuracy=1.0))
    table = read_metrics(tmp_path / METRICS_FILE)
    np.testing.assert_array_equal(table["drift"], [0.5, 0.25])


def test_new_writer_replaces_and_resume_appends(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(sample(1))
        w.write(sample(2))
    with MetricsWriter(tmp_path, tensorboard=False, resume=True) as w:
        w.write(sample(3))
    np.testing.assert_array_equal(read_metrics(tmp_path)["round"], [1, 2, 3])
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(sample(1))
    np.testing.assert_array_equal(read_metrics(tmp_path)["round"], [1])
    (tmp_path / METRICS_FILE).write_text("epoch,acc\n1,0.5\n")
    with pytest.raises(ValueError, match="cannot resume"):
        MetricsWriter(tmp_path, tensorboard=False, resume=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_read_metrics_tolerates_cut_last_line(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(sample(1))
        w.write(sample(2))
    path = tmp_path / METRICS_FILE
    path.write_text(path.read_text() + "3,0.9")
    np.testing.assert_array_equal(read_metrics(path)["round"], [1, 2])
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        read_metrics(tmp_path / "nothing-here")


class FakeSummaryWriter:
    instances: ClassVar[list[FakeSummaryWriter]] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_when_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeSummaryWriter.instances.clear()
    with MetricsWriter(tmp_path) as w:
        assert w.tensorboard_enabled
        w.write(sample(4, drift=0.5))
    (tb,) = FakeSummaryWriter.instances
    assert tb.log_dir == str(tmp_path / "tensorboard") and tb.closed
    got = {tag: (value, step) for tag, value, step in tb.scalars}
    assert got["test/accuracy"] == (sample(4).accuracy, 4)
    assert got["test/loss"] == (sample(4).loss, 4)
    assert got["traffic/bytes_up"] == (4000.0, 4)
    assert got["extra/drift"] == (0.5, 4)
    FakeSummaryWriter.instances.clear()
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        assert not w.tensorboard_enabled
    assert FakeSummaryWriter.instances == []


def test_tensorboard_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with MetricsWriter(tmp_path) as w:  # silently off
        assert not w.tensorboard_enabled
        w.write(sample(1))
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsWriter(tmp_path, tensorboard=True)


def test_evaluate_matches_full_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(23, 5)
    y = torch.randint(0, 3, (23,))
    with torch.no_grad():
        logits = model(x)
    expected_loss = float(nn.functional.cross_entropy(logits, y))
    expected_acc = int((logits.argmax(1) == y).sum()) / 23
    model.train()
    acc, loss = evaluate(model, x.numpy(), y.numpy(), batch_size=4, device="cpu")
    assert acc == pytest.approx(expected_acc, abs=1e-12)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert model.training  # mode restored
    acc2, loss2 = evaluate(model, x, y, batch_size=100, device=torch.device("cpu"))
    assert acc2 == acc and loss2 == pytest.approx(loss, rel=1e-6)


def test_evaluate_rejects_bad_input() -> None:
    model = nn.Flatten()
    with pytest.raises(TypeError, match="normalis"):
        evaluate(model, np.zeros((2, 3), np.uint8), np.zeros(2, np.int64), 2, "cpu")
    with pytest.raises(ValueError, match="samples"):
        evaluate(model, torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 2, "cpu")
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 2, "cpu")
    with pytest.raises(TypeError, match="integer"):
        evaluate(model, torch.zeros(2, 2), torch.zeros(2), 2, "cpu")
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), 0, "cpu")


def test_evaluate_perfect_model() -> None:
    class Oracle(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return x * 50.0

    y = torch.tensor([0, 2, 1, 1, 0])
    x = nn.functional.one_hot(y, 3).float()
    acc, loss = evaluate(Oracle(), x, y, batch_size=2, device="cpu")
    assert acc == 1.0 and 0.0 <= loss < 1e-12
