"""Per-round metrics: a CSV log (plus TensorBoard when installed) and model evaluation.

``metrics.csv`` in a run directory has one row per round. Every row is flushed to the
operating system as soon as it is written, so a run killed mid-way keeps every round it
finished; ``durable=True`` also fsyncs each row for protection against power loss.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from emberfl.crashpoints import crash_point
from emberfl.fileio import atomic_open, open_nofollow, refuse_symlink

__all__ = [
    "METRICS_FILE",
    "MetricsWriter",
    "RoundMetrics",
    "evaluate",
    "read_metrics",
    "round_metrics",
]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"


@dataclass
class RoundMetrics:
    """What one federated round produced.

    ``accuracy`` is a fraction in [0, 1] and ``loss`` the mean cross-entropy, both on the
    global test set. Times are wall-clock seconds; ``bytes_up`` counts client-to-server
    payload bytes and ``bytes_down`` server-to-client bytes. ``extra`` carries any
    algorithm-specific numbers (they become extra CSV columns, in the order of the
    first row written).
    """

    round: int
    accuracy: float
    loss: float
    round_seconds: float
    client_train_seconds_mean: float = 0.0
    client_train_seconds_max: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    num_clients: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def as_row(self) -> dict[str, float | int]:
        row: dict[str, float | int] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"
        }
        for key, value in self.extra.items():
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"extra metric names must be non-empty strings, got {key!r}")
            if key in row:
                raise ValueError(f"extra metric {key!r} clashes with a standard column")
            row[key] = value
        return row


def round_metrics(
    index: int,
    summary: Mapping[str, float],
    clients: Sequence[tuple[Mapping[str, float] | None, int]],
    **figures: Any,
) -> RoundMetrics:
    """A round's :class:`RoundMetrics` from the server's ``summary`` (``server_acc``,
    ``server_loss`` and any figures of the algorithm's own, which become columns) and
    each client's uplink ``(metadata, data_size)``: the mean and largest
    ``train_seconds``, and ``train_loss``, the data-weighted mean client loss.
    ``figures`` are the other fields (times, bytes, ``dropped`` among the extras)."""
    seconds = [(meta or {}).get("train_seconds", math.nan) for meta, _ in clients]
    weight = sum(n for _, n in clients)
    loss = sum((meta or {}).get("loss", math.nan) * n for meta, n in clients)
    extra = {
        "train_loss": loss / weight if weight > 0 else math.nan,
        "dropped": float(figures.pop("dropped")),
        **{k: float(v) for k, v in summary.items() if k not in ("server_acc", "server_loss")},
    }
    return RoundMetrics(
        round=index,
        accuracy=summary["server_acc"],
        loss=summary["server_loss"],
        client_train_seconds_mean=sum(seconds) / len(seconds) if seconds else 0.0,
        client_train_seconds_max=max(seconds) if seconds else 0.0,
        num_clients=len(clients),
        extra=extra,
        **figures,
    )


BASE_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(RoundMetrics) if f.name != "extra"
)

_TB_SCALARS: dict[str, str] = {
    "accuracy": "test/accuracy",
    "loss": "test/loss",
    "round_seconds": "time/round_seconds",
    "client_train_seconds_mean": "time/client_train_seconds_mean",
    "client_train_seconds_max": "time/client_train_seconds_max",
    "bytes_up": "traffic/bytes_up",
    "bytes_down": "traffic/bytes_down",
}


def _format(value: float | int) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    # repr of a float is the shortest string that reads back to the same double.
    return repr(float(value))


class MetricsWriter:
    """Appends :class:`RoundMetrics` rows to ``<run_dir>/metrics.csv``.

    The columns are fixed by the first row: then the header is written to a temporary
    file that is renamed over any ``metrics.csv`` already there. ``resume=True`` instead
    keeps an existing file's rows and appends after them (its header must match).
    TensorBoard scalars go to ``<run_dir>/tensorboard`` when ``tensorboard`` is true,
    or, by default (``None``), whenever ``torch.utils.tensorboard`` can be imported.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        tensorboard: bool | None = None,
        resume: bool = False,
        durable: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.durable = durable
        self._columns: list[str] | None = None
        self._fh: IO[str] | None = None
        self._tb: Any = None
        # Never read or appended to through a symbolic link (see emberfl.fileio).
        if resume and refuse_symlink(self.path):
            with open_nofollow(self.path, "r", newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), None)
            if header is None or list(header[: len(BASE_COLUMNS)]) != list(BASE_COLUMNS):
                raise ValueError(
                    f"cannot resume {self.path}: its header {header} does not start with "
                    f"{list(BASE_COLUMNS)}"
                )
            self._columns = list(header)
            self._fh = open_nofollow(self.path, "a", newline="", encoding="utf-8")
        if tensorboard is not False:
            self._tb = _open_tensorboard(self.run_dir / "tensorboard", required=bool(tensorboard))

    @property
    def columns(self) -> list[str] | None:
        """The CSV columns, known once the first row has been written (or resumed)."""
        return None if self._columns is None else list(self._columns)

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def write(self, metrics: RoundMetrics) -> None:
        """Append one row and flush it; also log TensorBoard scalars when enabled."""
        row = metrics.as_row()
        if self._columns is None:
            self._columns = list(row)
            self._start_file()
        elif set(row) != set(self._columns):
            missing = sorted(set(self._columns) - set(row))
            unexpected = sorted(set(row) - set(self._columns))
            raise ValueError(
                f"round {metrics.round}: metric columns differ from the header of {self.path} "
                f"(missing {missing}, unexpected {unexpected})"
            )
        assert self._fh is not None
        csv.writer(self._fh, lineterminator="\n").writerow([_format(row[c]) for c in self._columns])
        self._fh.flush()
        if self.durable:
            os.fsync(self._fh.fileno())
        crash_point("metrics.row")
        if self._tb is not None:
            for key, value in row.items():
                if key in ("round", "num_clients"):
                    continue
                tag = _TB_SCALARS.get(key, f"extra/{key}")
                self._tb.add_scalar(tag, float(value), global_step=metrics.round)
            self._tb.flush()

    def _start_file(self) -> None:
        assert self._columns is not None
        # The header goes into a temporary file renamed into place, so a reader never
        # sees a half-written header; rows are then appended to the renamed file.
        with atomic_open(self.path, "w", durable=self.durable, newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerow(self._columns)
        self._fh = open_nofollow(self.path, "a", newline="", encoding="utf-8")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort only: an explicit close() or the context manager is the contract.
        fh = getattr(self, "_fh", None)
        if fh is not None and not fh.closed:
            fh.close()


def _open_tensorboard(log_dir: Path, *, required: bool) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if required:
            raise ImportError(
                "TensorBoard logging was requested but `torch.utils.tensorboard` cannot be "
                "imported; install it with `pip install tensorboard`"
            ) from exc
        logger.debug("tensorboard not available; writing CSV metrics only")
        return None
    refuse_symlink(log_dir)  # its event files are not written elsewhere
    return SummaryWriter(log_dir=str(log_dir))


def read_metrics(run_dir_or_csv: str | os.PathLike[str]) -> dict[str, NDArray[np.float64]]:
    """Read a run's ``metrics.csv`` into ``{column: float64 array}`` (columns in file order).

    Accepts the run directory or the CSV path itself. The ``metrics.csv`` of a run
    directory is never read through a symbolic link; a CSV path named itself may be one.
    """
    path = Path(run_dir_or_csv)
    in_run_dir = path.is_dir()
    if in_run_dir:
        path = path / METRICS_FILE
        refuse_symlink(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (expected a run's {METRICS_FILE})")
    opened = (
        open_nofollow(path, "r", newline="", encoding="utf-8")
        if in_run_dir
        else path.open("r", newline="", encoding="utf-8")
    )
    with opened as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path} is empty; expected a header line")
        rows: list[list[float]] = []
        for lineno, rec in enumerate(reader, start=2):
            if not rec:
                continue
            if len(rec) != len(header):
                # A crash can only cut the last line short; anything else is corruption.
                logger.warning("%s:%d: ignoring incomplete row %r", path, lineno, rec)
                continue
            try:
                rows.append([float(v) for v in rec])
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: non-numeric value in {rec!r}") from exc
    data = np.array(rows, dtype=np.float64).reshape(len(rows), len(header))
    return {name: data[:, i].copy() for i, name in enumerate(header)}


def evaluate(
    model: nn.Module,
    x: torch.Tensor | NDArray[Any],
    y: torch.Tensor | NDArray[Any],
    batch_size: int,
    device: str | torch.device,
) -> tuple[float, float]:
    """Accuracy (fraction) and mean cross-entropy of ``model`` on ``(x, y)``.

    ``x`` must already be a floating-point model input (see
    :meth:`emberfl.data.Dataset.normalize`); ``y`` holds integer class labels. The model
    is moved to ``device`` and evaluated in eval mode under ``torch.inference_mode``; its
    previous train/eval mode is restored afterwards.
    """
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y)
    if xt.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty set")
    if xt.shape[0] != yt.shape[0]:
        raise ValueError(f"x has {xt.shape[0]} samples but y has {yt.shape[0]}")
    if not torch.is_floating_point(xt):
        raise TypeError(
            f"evaluate expects normalised floating-point inputs, got {xt.dtype}; "
            "convert them first (e.g. Dataset.normalize)"
        )
    if yt.dtype.is_floating_point or yt.dtype == torch.bool or yt.ndim != 1:
        raise TypeError(f"y must be a 1-D integer label tensor, got {yt.dtype} {tuple(yt.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    was_training = model.training
    model.to(dev)
    model.eval()
    correct = 0
    loss_sum = 0.0
    n = int(xt.shape[0])
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                xb = xt[start : start + batch_size].to(dev, non_blocking=True)
                yb = yt[start : start + batch_size].to(dev, dtype=torch.long, non_blocking=True)
                logits = model(xb)
                loss = nn.functional.cross_entropy(logits.float(), yb, reduction="sum")
                loss_sum += float(loss)
                correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    mean_loss = loss_sum / n
    if not math.isfinite(mean_loss):
        logger.warning("evaluation loss is not finite (%r)", mean_loss)
    return correct / n, mean_loss
