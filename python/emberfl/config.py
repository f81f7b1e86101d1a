"""The configuration of a run: :class:`SimulationConfig`, config files and defaults.

Settings have the names of the ``emberfl run`` flags (``sample_ratio`` is
``--sample-ratio``). They come from the defaults, then a JSON or TOML file
(:func:`load_config_file`), then explicit values, each checked by
:meth:`SimulationConfig.from_mapping` and :meth:`SimulationConfig.validate`, which
raise :class:`ConfigError` naming the setting.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emberfl.contrib.registry import ALGORITHMS, RUNTIMES
from emberfl.core.runtime import rank_cpus
from emberfl.data import DATASET_NAMES
from emberfl.models import MODEL_NAMES
from emberfl.reproducibility import check_seed

__all__ = [
    "ALGORITHMS",
    "CONFIG_FILE",
    "DEFAULT_MODELS",
    "PARTITIONS",
    "RESUME_SETTINGS",
    "RUNTIMES",
    "ConfigError",
    "SimulationConfig",
    "default_run_dir",
    "load_config_file",
]

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards", "quantity")

#: The model each dataset gets when none is named. MNIST-like data default to
#: McMahan et al.'s 2NN rather than their CNN: it has 8x fewer parameters, reaches
#: about 97-98% on MNIST, and a round takes a fraction of a second on a laptop CPU.
DEFAULT_MODELS: dict[str, str] = {
    "digits": "mlp",
    "mnist": "2nn",
    "fashion-mnist": "2nn",
    "cifar10": "cifar_cnn",
    "synthetic": "logreg",
}

#: The resolved configuration in a run directory.
CONFIG_FILE = "config.json"

#: Settings a resumed run may change: they decide how the rounds run, not what they
#: compute (results are bitwise the same for any runtime and worker count; the batched
#: runtime agrees with the others within float rounding).
RESUME_SETTINGS: tuple[str, ...] = (
    "workers",
    "threads",
    "runtime",
    "batch_clients",
    "progress",
    "checkpoint_every",
    "rank_timeout",
)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting."""


@dataclass
class SimulationConfig:
    """Every setting of a run. The defaults are the quick start (FedAvg on digits).

    Names match the command line flags (``sample_ratio`` is ``--sample-ratio``).
    ``partition=None`` means ``iid``, except for ``synthetic``, whose generator gives
    every client its own data. ``model=None`` picks :data:`DEFAULT_MODELS`.
    """

    algorithm: str = "fedavg"
    dataset: str = "digits"
    data_dir: str | None = None
    partition: str | None = None
    alpha: float = 0.5
    shards_per_client: int = 2
    sigma: float = 1.0
    model: str | None = None
    clients: int = 100
    sample_ratio: float = 0.1
    rounds: int = 40
    epochs: int = 5
    batch_size: int = 10
    lr: float = 0.2
    workers: int | None = None
    threads: int = 1
    runtime: str = "process"
    batch_clients: int = 32
    device: str = "cpu"
    rank_timeout: float = 10.0
    seed: int = 0
    mu: float = 0.01
    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    nonfinite: str = "raise"
    checkpoint_every: int | None = 10
    eval_every: int = 1
    eval_batch_size: int = 1024
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    out: str | None = None
    progress: bool = True

    # -- building ------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: SimulationConfig | None = None
    ) -> SimulationConfig:
        """``base`` (default: the defaults) with ``values`` applied.

        Keys may use dashes or underscores (``sample-ratio``). Unknown keys and values
        of the wrong type raise :class:`ConfigError`.
        """
        config = dataclasses.replace(base) if base is not None else cls()
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in types:
                raise ConfigError(
                    f"unknown setting {raw_key!r}; valid settings are: "
                    + ", ".join(n.replace("_", "-") for n in cls.field_names())
                )
            setattr(config, key, _coerce(key, str(types[key]), value))
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- derived values --------------------------------------------------------------

    @property
    def dataset_key(self) -> str:
        key = self.dataset.strip().lower().replace("_", "-")
        return {"fashion": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(
            key, key
        )

    @property
    def model_name(self) -> str:
        return self.model if self.model is not None else DEFAULT_MODELS[self.dataset_key]

    @property
    def partition_name(self) -> str:
        if self.partition is not None:
            return self.partition
        return "natural" if self.dataset_key == "synthetic" else "iid"

    @property
    def workers_per_rank(self) -> int:
        """Clients this process trains at once: ``workers``, or as many as this rank's
        share of the CPUs holds at ``threads`` each, and no more than a round has
        clients. Results do not depend on it (each client's arithmetic depends only on
        ``threads``), so it may differ between machines, ranks and a resume."""
        if self.workers is not None:
            return self.workers
        return max(1, min(rank_cpus() // self.threads, self.clients_per_round))

    @property
    def clients_per_round(self) -> int:
        return int(self.clients * self.sample_ratio)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting."""
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("dataset", self.dataset_key, DATASET_NAMES)
        if self.partition is not None:
            _choice("partition", self.partition, PARTITIONS)
        _choice("model", self.model_name.strip().lower().replace("-", "_"), MODEL_NAMES)
        _choice("runtime", self.runtime, RUNTIMES)
        _choice("nonfinite", self.nonfinite, ("raise", "drop"))
        if self.dataset_key in ("mnist", "cifar10") and self.data_dir is None:
            raise ConfigError(
                f"dataset {self.dataset_key!r} is read from files: give its directory (--data-dir)"
            )
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"data directory {self.data_dir} does not exist")
        _at_least("clients", self.clients, 1)
        _at_least("rounds", self.rounds, 1)
        _at_least("epochs", self.epochs, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("eval_every", self.eval_every, 1)
        if self.checkpoint_every is not None:
            _at_least("checkpoint_every", self.checkpoint_every, 0)
        _at_least("eval_batch_size", self.eval_batch_size, 1)
        _at_least("shards_per_client", self.shards_per_client, 1)
        if self.workers is not None:
            _at_least("workers", self.workers, 1 if self.runtime == "thread" else 0)
        _at_least("batch_clients", self.batch_clients, 1)
        _at_least("threads", self.threads, 1)
        try:
            check_seed(self.seed)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        if not 0 < self.sample_ratio <= 1:
            raise ConfigError(f"sample_ratio must lie in (0, 1], got {self.sample_ratio}")
        if self.clients_per_round < 1:
            raise ConfigError(
                f"sample_ratio {self.sample_ratio} of {self.clients} clients selects no client "
                "per round; raise sample_ratio or clients"
            )
        _positive("lr", self.lr)
        _positive("rank_timeout", self.rank_timeout)
        _positive("alpha", self.alpha)
        _positive("server_lr", self.server_lr)
        _positive("tau", self.tau)
        _non_negative("mu", self.mu)
        _non_negative("sigma", self.sigma)
        _non_negative("synthetic_alpha", self.synthetic_alpha)
        _non_negative("synthetic_beta", self.synthetic_beta)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ConfigError(f"{name} must lie in [0, 1), got {value}")
        device = self.device.strip().lower()
        try:
            torch.device(device)
        except RuntimeError:
            raise ConfigError(f"device {self.device!r} is not a torch device") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} was asked for but CUDA is not available")


def _coerce(key: str, type_text: str, value: Any) -> Any:
    """``value`` checked (and, for ints given as floats like 3.0, converted) for ``key``."""
    optional = "None" in type_text
    if value is None:
        if optional:
            return None
        raise ConfigError(f"setting {key!r} cannot be null")
    if type_text.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"setting {key!r} must be true or false, got {value!r}")
    if type_text.startswith("int"):
        if isinstance(value, bool):
            raise ConfigError(f"setting {key!r} must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise ConfigError(f"setting {key!r} must be an integer, got {value!r}")
    if type_text.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"setting {key!r} must be a number, got {value!r}")
        return float(value)
    if type_text.startswith("str"):
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"setting {key!r} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled setting type {type_text} for {key}")


def _choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


def _at_least(what: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {value}")


def _positive(what: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be a finite number > 0, got {value}")


def _non_negative(what: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{what} must be a finite number >= 0, got {value}")


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings in a JSON (``.json``) or TOML (any other suffix) file.

    A TOML file may keep them at the top level or under a ``[run]`` table.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    data: Any
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: invalid JSON: {exc}") from None
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            try:
                import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]
            except ModuleNotFoundError:
                raise ConfigError(
                    f"{p}: reading TOML on Python 3.10 needs the 'tomli' package; "
                    "install it or use a .json config"
                ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("run"), dict) and len(data) == 1:
            data = data["run"]
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a table of settings, got {type(data).__name__}")
    return data


def default_run_dir(config: SimulationConfig, parent: str | os.PathLike[str] = "runs") -> Path:
    """``<parent>/<timestamp>-<algorithm>-<dataset>``, made unique with a suffix."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(parent) / f"{stamp}-{config.algorithm}-{config.dataset_key}"
    candidate = base
    n = 1
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate
