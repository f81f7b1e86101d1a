"""The settings every FedAvg-family client trainer takes, checked in one place.

:class:`FedAvgTrainerSettings` holds the arguments that BlazeFL's serial, process-pool
and thread-pool trainers all take (and the batched trainer,
:mod:`emberfl.runtimes.batched`); the trainers keep one instance and expose its
fields as their attributes (:class:`SettingsAttributes`: BlazeFL code reads
``trainer.lr`` and may assign it: an assignment replaces the settings, checked again).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, overload

import torch

from emberfl.core.checks import (
    check_nonnegative_int,
    check_positive_int,
    check_positive_number,
)
from emberfl.core.client_state import ClientStateStore
from emberfl.core.model_packages import FedAvgPartitionedDataset
from emberfl.core.model_selector import ModelSelector
from emberfl.core.step import FedAvgClientUpdate
from emberfl.reproducibility import check_seed

__all__ = ["FedAvgTrainerSettings", "SettingsAttributes"]


@dataclass(frozen=True)
class FedAvgTrainerSettings:
    """The settings of a FedAvg client trainer (and FedProx's, SCAFFOLD's).

    ``device`` is where clients train ("cpu", "cuda" -- spread over the devices by
    the pools -- or a specific device); ``num_clients`` the clients of the federation;
    ``epochs``, ``batch_size`` and ``lr`` the local training; ``seed`` the root of
    every client's random streams; ``state_dir`` where per-client state files go
    (algorithms that keep any); ``client_update`` the client step (FedAvg's by
    default); ``progress`` a bar per round. ``model_selector`` and ``dataset`` are
    only read when clients run, so a trainer may be built before they exist
    (``None``) and given them later.
    """

    model_selector: ModelSelector[Any]
    model_name: str
    dataset: FedAvgPartitionedDataset
    device: str
    num_clients: int
    epochs: int
    batch_size: int
    lr: float
    seed: int
    state_dir: Path | None = None
    client_update: FedAvgClientUpdate = field(default_factory=FedAvgClientUpdate)
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a str such as 'cpu' or 'cuda', got {self.device!r}")
        check_positive_int(self.num_clients, "num_clients")
        check_nonnegative_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_positive_number(self.lr, "lr")
        check_seed(self.seed, "seed")
        if self.state_dir is not None and not isinstance(self.state_dir, Path):
            object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not isinstance(self.client_update, FedAvgClientUpdate):
            raise TypeError(
                "client_update must be a FedAvgClientUpdate, got "
                f"{type(self.client_update).__name__}"
            )
        object.__setattr__(self, "progress", bool(self.progress))

    def client_state(self) -> ClientStateStore | None:
        """The per-client state store in ``state_dir`` (created), or None without one."""
        return None if self.state_dir is None else ClientStateStore(self.state_dir)


class _HasSettings(Protocol):
    settings: FedAvgTrainerSettings


_T = TypeVar("_T")


class _Setting(Generic[_T]):
    """A trainer attribute that reads, and on assignment replaces, one settings field."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Setting[_T]: ...

    @overload
    def __get__(self, obj: _HasSettings, owner: type | None = None) -> _T: ...

    def __get__(self, obj: _HasSettings | None, owner: type | None = None) -> _T | _Setting[_T]:
        if obj is None:
            return self
        value: _T = getattr(self._settings(obj), self.name)
        return value

    def __set__(self, obj: _HasSettings, value: _T) -> None:
        changes: dict[str, Any] = {self.name: value}
        obj.settings = dataclasses.replace(self._settings(obj), **changes)

    def _settings(self, obj: _HasSettings) -> FedAvgTrainerSettings:
        settings = vars(obj).get("settings")
        if not isinstance(settings, FedAvgTrainerSettings):
            # A subclass touched the attribute before the base __init__ built the settings.
            raise AttributeError(
                f"{type(obj).__name__}.{self.name} lives in the trainer's settings, which "
                "the FedAvg trainer's __init__ creates: call it before using this attribute"
            )
        return settings


class SettingsAttributes:
    """Mixin: the fields of ``self.settings`` as attributes, as BlazeFL's trainers have them."""

    settings: FedAvgTrainerSettings

    model_selector = _Setting[ModelSelector[Any]]()
    model_name = _Setting[str]()
    dataset = _Setting[FedAvgPartitionedDataset]()
    device = _Setting[str]()
    num_clients = _Setting[int]()
    epochs = _Setting[int]()
    batch_size = _Setting[int]()
    lr = _Setting[float]()
    seed = _Setting[int]()
    state_dir = _Setting[Path | None]()
    client_update = _Setting[FedAvgClientUpdate]()
    progress = _Setting[bool]()
