"""PNG curves of runs and partition heat maps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from emberfl.metrics import MetricsWriter, RoundMetrics
from emberfl.plot import class_heatmap_figure, plot_class_heatmap, plot_runs, runs_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(path: Path, accuracies: list[float]) -> Path:
    with MetricsWriter(path, tensorboard=False) as w:
        for r, acc in enumerate(accuracies, start=1):
            w.write(RoundMetrics(round=r, accuracy=acc, loss=1 - acc, round_seconds=0.1))
    return path


def test_plot_runs_writes_png_with_all_runs(tmp_path: Path) -> None:
    a = make_run(tmp_path / "fedavg-iid", [0.2, 0.5, 0.7, 0.8])
    b = make_run(tmp_path / "fedavg-shards", [0.1, 0.3, 0.4])
    out = plot_runs([a, b], tmp_path / "plots" / "acc.png")
    assert out == tmp_path / "plots" / "acc.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    assert [p.name for p in out.parent.iterdir()] == ["acc.png"]  # no temp files left

    fig = runs_figure([a, b])
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == 2
    np.testing.assert_array_equal(lines[0].get_ydata(), [0.2, 0.5, 0.7, 0.8])
    np.testing.assert_array_equal(lines[1].get_xdata(), [1, 2, 3])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["fedavg-iid", "fedavg-shards"]
    assert ax.get_xlabel() == "round" and ax.get_ylabel() == "accuracy"


def test_plot_other_metric_and_labels(tmp_path: Path) -> None:
    a = make_run(tmp_path / "r", [0.2, 0.6])
    fig = runs_figure([a], "loss", labels=["mine"], title="t")
    (ax,) = fig.axes
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [0.8, 0.4])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mine"]
    assert ax.get_title() == "t"


def test_plot_runs_errors(tmp_path: Path) -> None:
    a = make_run(tmp_path / "r", [0.5])
    with pytest.raises(ValueError, match=r"no column 'f1'.*accuracy"):
        plot_runs([a], tmp_path / "x.png", metric="f1")
    with pytest.raises(FileNotFoundError, match="missing-run"):
        plot_runs([tmp_path / "missing-run"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one"):
        plot_runs([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels"):
        plot_runs([a], tmp_path / "x.png", labels=["a", "b"])
    assert not (tmp_path / "x.png").exists()


def test_plotting_does_not_touch_pyplot(tmp_path: Path) -> None:
    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot_class_heatmap(np.ones((3, 4), dtype=np.int64), tmp_path / "h.png")
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_class_heatmap(tmp_path: Path) -> None:
    counts = np.arange(12).reshape(4, 3)
    out = plot_class_heatmap(counts, tmp_path / "heat.png", title="parts")
    assert out.read_bytes()[:8] == PNG_MAGIC
    fig = class_heatmap_figure(counts)
    ax = fig.axes[0]
    image = ax.get_images()[0]
    np.testing.assert_array_equal(image.get_array(), counts.T)  # classes on y, clients on x
    # Small matrices are annotated with their counts.
    assert sorted(int(t.get_text()) for t in ax.texts) == list(range(12))
    big = class_heatmap_figure(np.ones((500, 10)))
    assert len(big.axes[0].texts) == 0
    with pytest.raises(ValueError, match="clients x classes"):
        plot_class_heatmap(np.ones(5), tmp_path / "bad.png")


def test_missing_matplotlib_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_class_heatmap(np.ones((2, 2)), tmp_path / "h.png")
    a = make_run(tmp_path / "r", [0.5])
    with pytest.raises(ImportError, match="matplotlib"):
        plot_runs([a], tmp_path / "c.png")
