"""PNG pictures of runs and partitions.

matplotlib is optional (``pip install emberfl[plot]``) and imported only when a picture
is drawn. Figures are built with the object-oriented API on the Agg canvas, so drawing
never switches the pyplot backend of the caller's process (a notebook keeps its own).
Every PNG is written to a temporary file next to the target and renamed over it
(:func:`emberfl.fileio.atomic_open`), with the mode the umask gives a new file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from emberfl.fileio import atomic_open

__all__ = ["plot_class_heatmap", "plot_runs"]

_MISSING = (
    "drawing PNG files needs matplotlib, which is not installed; "
    "install it with `pip install matplotlib` (or `pip install emberfl[plot]`)"
)


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(_MISSING) from exc
    return Figure


def _save_png(fig: Any, out_png: str | os.PathLike[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_open(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    return out


def runs_figure(
    run_dirs: Sequence[str | os.PathLike[str]],
    metric: str = "accuracy",
    *,
    x: str = "round",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Any:
    """Build (without saving) the figure :func:`plot_runs` writes; returns a matplotlib Figure."""
    from emberfl.metrics import read_metrics

    if len(run_dirs) == 0:
        raise ValueError("plot_runs needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} run directories")
    series = []
    for i, run_dir in enumerate(run_dirs):
        table = read_metrics(run_dir)
        for col in (x, metric):
            if col not in table:
                raise ValueError(
                    f"{Path(run_dir) / 'metrics.csv'} has no column {col!r}; "
                    f"columns are: {', '.join(table)}"
                )
        name = labels[i] if labels is not None else _run_label(Path(run_dir))
        # A ``<name>_mean`` column with a ``<name>_std`` beside it (Ditto's personalized
        # accuracy over the round's clients) is drawn with a shaded +-std band.
        spread = table.get(metric[: -len("_mean")] + "_std") if metric.endswith("_mean") else None
        series.append((name, table[x], table[metric], spread))

    figure_cls = _figure_class()
    fig = figure_cls(figsize=(7.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for name, xs, ys, spread in series:
        (line,) = ax.plot(xs, ys, label=name, linewidth=1.5)
        if spread is not None:
            ax.fill_between(
                xs, ys - spread, ys + spread, color=line.get_color(), alpha=0.2, linewidth=0
            )
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    if title is not None:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _run_label(run_dir: Path) -> str:
    resolved = run_dir.resolve()
    return resolved.name or str(resolved)


def plot_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_png: str | os.PathLike[str],
    metric: str = "accuracy",
    *,
    x: str = "round",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Plot ``metric`` against ``x`` (default: accuracy vs round) for one or more runs.

    Each run directory must hold the ``metrics.csv`` written by
    :class:`emberfl.metrics.MetricsWriter`; all runs share one axes, and the legend
    names them by directory name unless ``labels`` is given. A metric named
    ``<name>_mean`` whose run also has a ``<name>_std`` column gets a shaded band of
    one standard deviation either side. Returns the PNG path.
    """
    fig = runs_figure(run_dirs, metric, x=x, labels=labels, title=title)
    return _save_png(fig, out_png)


def class_heatmap_figure(counts: ArrayLike, *, title: str | None = None) -> Any:
    """Build (without saving) the figure :func:`plot_class_heatmap` writes."""
    mat = np.asarray(counts)
    if mat.ndim != 2 or mat.shape[0] == 0 or mat.shape[1] == 0:
        raise ValueError(f"counts must be a non-empty [clients x classes] matrix, got {mat.shape}")
    if not np.issubdtype(mat.dtype, np.number):
        raise ValueError(f"counts must be numeric, got dtype {mat.dtype}")
    n_clients, n_classes = mat.shape
    figure_cls = _figure_class()
    # Clients run along x so that hundreds of clients still give a readable picture.
    width = float(min(16.0, max(5.0, 0.12 * n_clients + 2.0)))
    height = float(min(10.0, max(3.0, 0.35 * n_classes + 1.5)))
    fig = figure_cls(figsize=(width, height))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(mat.T, aspect="auto", interpolation="nearest", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax, label="samples")
    ax.set_xlabel("client")
    ax.set_ylabel("class")
    if n_classes <= 20:
        ax.set_yticks(range(n_classes))
    if n_clients <= 20 and n_classes <= 20:
        peak = float(mat.max()) if mat.size else 0.0
        for c in range(n_clients):
            for k in range(n_classes):
                value = mat[c, k]
                ax.text(
                    c,
                    k,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if value > 0.6 * peak else "white",
                )
    ax.set_title(title if title is not None else f"class counts ({n_clients} clients)")
    fig.tight_layout()
    return fig


def plot_class_heatmap(
    counts: ArrayLike, out_png: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Write a heat map of a ``[clients x classes]`` count matrix as PNG; returns the path."""
    fig = class_heatmap_figure(counts, title=title)
    return _save_png(fig, out_png)
